"HQMQ on the codes (10c_ops_hqmq_codes): the encoder's unpacked codes, the code mirror, attention on the codes."
import pytest, torch
from hypothesis import given, settings, strategies as st
from tensormem.quant import synthetic_kv
from tensormem.hqmq import HQMQ
from tensormem.ops.hqmq_codes import (packed_codes, HQMQCodes,
                                      key_scores, value_mix, code_attention, attend_dense)


@settings(max_examples=10, deadline=None)
@given(cfg=st.sampled_from([(96, 4, 'med_token'), (96, 4, None), (24, 2, 'med'), (48, 3, 'med_row'), (192, 6, None), (7, 1, 'med_token')]),
       d=st.sampled_from([1, 5, 30, 62, 64]), B=st.integers(1, 2), T=st.integers(0, 40), seed=st.integers(0, 50),
       dtype=st.sampled_from([torch.float16, torch.float32]))
def test_encode_is_what_quantize_packs(cfg, d, B, T, seed, dtype):
    S, b, mode = cfg
    hq = HQMQ(S, b, 2, 2, d, outliers=mode, seed=seed)
    x = synthetic_kv(B, 2, T, d, seed=seed).to(dtype)
    j, rq, sigma, out, vals = hq.encode(x, 1, 'k'); p = hq.quantize(x, 1, 'k')
    assert all(torch.equal(a, b) for a, b in zip(hq.codes(p), (j, rq))) and torch.equal(p.sigma, sigma)
    assert torch.equal(packed_codes(hq, p)[0], j) and torch.equal(packed_codes(hq, p)[1], rq)


def test_encode_bad_input():
    hq = HQMQ(96, 4, 1, 2, 64)
    with pytest.raises(ValueError, match="`role` must be 'k' or 'v'"): hq.encode(torch.randn(1, 2, 3, 64), 0, 'q')
    with pytest.raises(ValueError, match='NaN'): hq.encode(torch.full((1, 2, 3, 64), float('nan')), 0, 'k')


@settings(max_examples=6, deadline=None)
@given(cfg=st.sampled_from([(96, 4, 'med_token'), (24, 3, 'med'), (48, 2, None)]), d=st.sampled_from([5, 64]),
       cuts=st.lists(st.integers(1, 12), min_size=1, max_size=4), seed=st.integers(0, 50))
def test_mirror_from_codes_equals_from_packed(cfg, d, cuts, seed):
    "Appending `HQMQ.encode` output, or packed writes, gives the same mirror; its `dequantize` is `HQMQ.dequantize`."
    S, b, mode = cfg
    hq = HQMQ(S, b, 1, 2, d, outliers=mode, seed=seed); x = synthetic_kv(2, 2, sum(cuts), d, seed=seed)
    mc, mp, a, ps = HQMQCodes(hq, 0, 'v', 2, 2, capacity=2), HQMQCodes(hq, 0, 'v', 2, 2, capacity=5), 0, []
    for c in cuts:
        mc.append_codes(*hq.encode(x[:, :, a:a + c], 0, 'v')); ps.append(hq.quantize(x[:, :, a:a + c], 0, 'v')); mp.append(ps[-1]); a += c
    T, n = mc.T, mc.n_out
    assert (T, n) == (mp.T, mp.n_out)
    for f in ('j', 'rq', 'sigma'): assert torch.equal(getattr(mc, f)[..., :T], getattr(mp, f)[..., :T]), f
    for f in ('orow', 'ot', 'oc', 'oval'): assert torch.equal(getattr(mc, f)[:n], getattr(mp, f)[:n]), f
    assert torch.equal(mc.dequantize(), torch.cat([hq.dequantize(p) for p in ps], 2))
    assert torch.equal(mc.dequantize(cuts[0]), torch.cat([hq.dequantize(p) for p in ps[1:]], 2) if ps[1:] else torch.zeros(2, 2, 0, d))


def test_packed_codes_equal_codes():
    hq = HQMQ(96, 4, 1, 2, 62, outliers='med_token'); p = hq.quantize(synthetic_kv(2, 2, 23, 62, seed=3), 0, 'k')
    j, rq = packed_codes(hq, p); j0, rq0 = hq.codes(p)
    assert torch.equal(j, j0) and torch.equal(rq, rq0)


def _cache(S, b, mode, B, H, d, cuts, ns, seed):
    "K/V with `ns` sinks, quantized write by write into two mirrors, and the dense (sinks + dequantized) reference."
    hq = HQMQ(S, b, 2, H, d, outliers=mode)
    T = ns + sum(cuts); k, v = synthetic_kv(B, H, T, d, seed=seed), synthetic_kv(B, H, T, d, seed=seed + 1)
    kc, vc = HQMQCodes(hq, 1, 'k', B, H, capacity=3), HQMQCodes(hq, 1, 'v', B, H, capacity=3)
    kd, vd, a = [k[:, :, :ns]], [v[:, :, :ns]], ns
    for c in cuts:
        pk, pv = hq.quantize(k[:, :, a:a + c], 1, 'k'), hq.quantize(v[:, :, a:a + c], 1, 'v')
        kc.append(pk); vc.append(pv); kd.append(hq.dequantize(pk)); vd.append(hq.dequantize(pv)); a += c
    return hq, kc, vc, k[:, :, :ns], v[:, :, :ns], torch.cat(kd, 2), torch.cat(vd, 2)


@settings(max_examples=12, deadline=None)
@given(cfg=st.sampled_from([(96, 4, 'med_token'), (24, 3, 'med'), (48, 2, None), (7, 5, 'med_row')]),
       d=st.sampled_from([3, 10, 64]), B=st.integers(1, 2), H=st.integers(1, 3), G=st.integers(1, 3),
       cuts=st.lists(st.integers(1, 30), min_size=1, max_size=4), ns=st.integers(0, 3), pad=st.booleans(), seed=st.integers(0, 99))
def test_code_attention_matches_reference(cfg, d, B, H, G, cuts, ns, pad, seed):
    S, b, mode = cfg
    hq, kc, vc, sk, sv, kd, vd = _cache(S, b, mode, B, H, d, cuts, ns, seed)
    q = torch.randn(B, H * G, d, generator=torch.Generator().manual_seed(seed))
    first = torch.randint(0, ns + sum(cuts), (B,), generator=torch.Generator().manual_seed(seed)) if pad else None
    o, lse = code_attention(q, kc, vc, 0.3, first, sk if ns else None, sv if ns else None)
    o_ref, lse_ref = attend_dense(q, kd, vd, 0.3, first)
    scale = o_ref.abs().max().item() + 1
    assert o.shape == (B, H * G, d) and lse.shape == (B, H * G)
    assert (o.double() - o_ref).abs().max().item() < 2e-5 * scale
    assert torch.allclose(lse.double(), lse_ref, atol=2e-5 * (lse_ref.abs().max().item() + 1))


def test_outliers_and_sinks_matter():
    "The corrections are not decoration: dropping the outliers or the sinks changes the output."
    hq, kc, vc, sk, sv, kd, vd = _cache(96, 4, 'med_token', 1, 3, 64, [20, 1, 9], 2, 0)
    q = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(0)) * 3
    o, _ = code_attention(q, kc, vc, sink_k=sk, sink_v=sv)
    assert kc.n_out > 0 and vc.n_out > 0
    assert not torch.allclose(o, code_attention(q, kc, vc)[0], atol=1e-3)
    kc.n_out = vc.n_out = 0
    assert not torch.allclose(o, code_attention(q, kc, vc, sink_k=sk, sink_v=sv)[0], atol=1e-3)


def test_key_scores_and_value_mix_shapes():
    hq, kc, vc, *_ = _cache(96, 4, 'med_token', 2, 3, 64, [5, 7], 0, 1)
    q4 = torch.randn(2, 3, 3, 16, 4)
    assert key_scores(q4, kc).shape == (6, 3, 12)
    assert value_mix(torch.rand(6, 3, 12), vc).shape == (3, 6, 16, 4)


def test_mirror_bytes_pinned():
    "s96r4 at d_h = 64: 16 chunks × (2 + 1) bytes + 2 bytes of σ per token and head, plus 32 bytes per outlier."
    hq = HQMQ(96, 4, 1, 3, 64, outliers='med_token')
    kc = HQMQCodes(hq, 0, 'k', 1, 3).append(hq.quantize(synthetic_kv(1, 3, 100, 64, seed=0), 0, 'k'))
    assert kc.nbytes() == 3 * 100 * 50 + kc.n_out * 32 and kc.j.dtype == torch.int16
    assert HQMQCodes(HQMQ(2048, 4, 1, 1, 8), 0, 'k', 1, 1).j.dtype == torch.int32


def test_fully_masked_row_is_zero():
    hq, kc, vc, *_ = _cache(24, 3, None, 2, 1, 8, [6], 0, 2)
    o, lse = code_attention(torch.randn(2, 2, 8), kc, vc, first=torch.tensor([0, 6]))
    assert torch.equal(o[1], torch.zeros(2, 8)) and torch.isinf(lse[1]).all() and torch.isfinite(o).all()


def test_bad_inputs():
    hq, kc, vc, sk, sv, *_ = _cache(24, 3, 'med_token', 2, 3, 64, [5], 2, 3)
    q = torch.randn(2, 9, 64)
    with pytest.raises(ValueError, match=r'`q` must be \[2, k·3, 64\]'): code_attention(q[:, :8], kc, vc)
    with pytest.raises(TypeError, match="`kc` must be the HQMQCodes of role 'k'"): code_attention(q, vc, kc)
    with pytest.raises(ValueError, match='given together'): code_attention(q, kc, vc, sink_k=sk)
    with pytest.raises(ValueError, match='`sink_v` must be'): code_attention(q, kc, vc, sink_k=sk, sink_v=sv[:, :, :1])
    with pytest.raises(ValueError, match='`first` must be a tensor of shape'): code_attention(q, kc, vc, first=torch.tensor([1]))
    with pytest.raises(ValueError, match='NaN'): code_attention(q * float('nan'), kc, vc)
    with pytest.raises(ValueError, match="role 'k'"): kc.append(hq.quantize(torch.randn(2, 3, 4, 64), 1, 'v'))
    with pytest.raises(ValueError, match='n_kv_heads'): HQMQCodes(hq, 0, 'k', 1, 2)
    with pytest.raises(TypeError, match='HQMQ quantizer'): HQMQCodes(object(), 0, 'k', 1, 3)
    with pytest.raises(ValueError, match='`j`/`rq` must be'): kc.append_codes(*[t[:, :2] if t is not None and t.ndim > 2 else t for t in hq.encode(torch.randn(2, 3, 4, 64), 1, 'k')])
    empty_k, empty_v = HQMQCodes(hq, 0, 'k', 2, 3), HQMQCodes(hq, 0, 'v', 2, 3)
    with pytest.raises(ValueError, match='the cache is empty'): code_attention(q, empty_k, empty_v)


# ---- the compiled CPU kernels (core.c_library): same codes, same attention as the torch forms ----
from tensormem.core import c_library
from tensormem.hqmq import HQMQ_ENCODE_C, radius_code
from tensormem.ops.hqmq_codes import CODE_ATTENTION_C, compiled_code_attention
needs_cc = pytest.mark.skipif(c_library('hqmq_encode', HQMQ_ENCODE_C) is None, reason='no C compiler: the torch path is the only path')


def _torch_codes(hq, x, layer, role, valid=None):
    "The torch steps of `HQMQ.encode` (the compiled encoder is bypassed)."
    xc, r = hq.chunks(x); out, sigma = hq.scales(r, valid)
    j, rq = hq.directions(xc, r, layer, role), radius_code(r, sigma, hq.radius_bits)
    if out is not None: j, rq = j.masked_fill(out, 0), rq.masked_fill(out, 0)
    return j, rq, sigma, out


@needs_cc
@settings(max_examples=12, deadline=None)
@given(cfg=st.sampled_from([(96, 4, 'med_token'), (96, 4, None), (24, 2, 'med'), (48, 3, 'med_row'), (2048, 3, 'med_token'), (7, 1, None)]),
       d=st.sampled_from([1, 5, 62, 64]), B=st.integers(1, 2), T=st.integers(1, 70), seed=st.integers(0, 50), pad=st.booleans())
def test_compiled_encoder_gives_the_torch_codes(cfg, d, B, T, seed, pad):
    "Every product and sum of the C encoder is ordered as in the torch steps: identical j, r_q, σ and outlier mask (S = 2048: int32 indices)."
    S, b, mode = cfg
    hq = HQMQ(S, b, 1, 2, d, outliers=mode, seed=seed)
    x = synthetic_kv(B, 2, T, d, seed=seed)
    valid = None
    if pad: valid = torch.ones(B, T, dtype=torch.bool); valid[0, :T // 3] = False
    assert hq.compiled(x)
    j, rq, sigma, out, vals = hq.encode(x, 0, 'v', valid)
    j0, rq0, s0, o0 = _torch_codes(hq, x, 0, 'v', valid)
    assert torch.equal(rq, rq0) and torch.equal(sigma, s0) and ((out is None and o0 is None) or torch.equal(out, o0))
    assert_same_directions(hq, x, j, j0, 0, 'v')


def assert_same_directions(hq, x, j, j0, layer, role):
    "Equal joint indices, except a float32 tie: two codewords whose cosines to the direction agree to 1e-6 (the torch search is a matrix product, rounded differently)."
    diff = (j != j0).nonzero()
    if not len(diff): return
    from tensormem.hqmq import joint_codebook
    J = joint_codebook(hq.codebook(layer, role, 'cpu')[0].double()); xc, r = hq.chunks(x)
    b, h, t, c = diff.unbind(1); u = xc[b, h, t, c].double() / r[b, h, t, c].double()[:, None]
    gap = ((u * J[h, j[b, h, t, c]]).sum(-1) - (u * J[h, j0[b, h, t, c]]).sum(-1)).abs()
    assert len(diff) <= max(1, j.numel() // 10_000) and float(gap.max()) < 1e-6, (len(diff), float(gap.max()))


@needs_cc
def test_compiled_encoder_on_real_scale_errors():
    "σ beyond fp16 or below its normal range: the compiled path reports it and the torch steps raise their message."
    hq = HQMQ(24, 3, 1, 1, 8)
    with pytest.raises(ValueError, match='beyond the fp16 range'): hq.encode(torch.full((1, 1, 2, 8), 1e6), 0, 'k')
    with pytest.raises(ValueError, match='below'): hq.encode(torch.full((1, 1, 2, 8), 1e-7), 0, 'k')
    m = HQMQCodes(hq, 0, 'k', 1, 1)
    with pytest.raises(ValueError, match='NaN'): m.encode_append(torch.full((1, 1, 2, 8), float('nan')))
    assert m.T == 0


@needs_cc
@settings(max_examples=12, deadline=None)
@given(cfg=st.sampled_from([(96, 4, 'med_token'), (24, 3, None), (2048, 2, 'med')]), d=st.sampled_from([6, 64]),
       H=st.integers(1, 2), G=st.sampled_from([1, 2, 3, 5, 7]), T=st.integers(1, 600), ns=st.integers(0, 3),
       firsts=st.lists(st.integers(0, 700), min_size=2, max_size=2), seed=st.integers(0, 30))
def test_compiled_attention_equals_torch_form(cfg, d, H, G, T, ns, firsts, seed):
    "The compiled decode step equals the torch form (float32 rounding) with GQA, padding masks, sinks and outliers."
    S, b, mode = cfg; B = 2
    hq = HQMQ(S, b, 1, H, d, outliers=mode, seed=seed)
    kc, vc = HQMQCodes(hq, 0, 'k', B, H), HQMQCodes(hq, 0, 'v', B, H)
    kc.encode_append(synthetic_kv(B, H, T, d, seed=seed)); vc.encode_append(synthetic_kv(B, H, T, d, seed=seed + 1))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H * G, d, generator=g)
    sk, sv = (torch.randn(B, H, ns, d, generator=g), torch.randn(B, H, ns, d, generator=g)) if ns else (None, None)
    first = torch.tensor(firsts)
    o_t, l_t = code_attention(q, kc, vc, first=first, sink_k=sk, sink_v=sv, backend='torch')
    o_c, l_c = code_attention(q, kc, vc, first=first, sink_k=sk, sink_v=sv, backend='c')
    dead = torch.isinf(l_t)                               # every key of the row masked: both give 0 and −inf
    assert torch.equal(dead, torch.isinf(l_c)) and float(o_c[dead].abs().sum()) == 0
    live = ~dead
    assert float((o_c - o_t).abs().max()) <= 2e-4 * float(o_t.abs().max().clamp_min(1))
    if live.any(): assert float((l_c - l_t)[live].abs().max()) <= 2e-4 * float(l_t[live].abs().max().clamp_min(1))


def test_torch_fallback_without_compiler(monkeypatch):
    "TENSORMEM_NO_C: every caller takes its torch path (same codes), and asking for the compiled step says why it cannot."
    hq = HQMQ(96, 4, 1, 3, 64, outliers='med_token'); x = synthetic_kv(1, 3, 20, 64, seed=2)
    a = HQMQCodes(hq, 0, 'k', 1, 3).encode_append(x); v = HQMQCodes(hq, 0, 'v', 1, 3).encode_append(x)
    monkeypatch.setenv('TENSORMEM_NO_C', '1')
    assert not hq.compiled(x) and compiled_code_attention(torch.randn(1, 9, 64), a, v) is None
    b = HQMQCodes(hq, 0, 'k', 1, 3).encode_append(x)
    assert torch.equal(a.j[..., :20], b.j[..., :20]) and torch.equal(a.rq[..., :20], b.rq[..., :20]) and a.n_out == b.n_out
    with pytest.raises(RuntimeError, match='compiled code attention is not available'): code_attention(torch.randn(1, 9, 64), a, v, backend='c')
    assert code_attention(torch.randn(1, 9, 64), a, v)[0].shape == (1, 9, 64)


@pytest.mark.parametrize('backend', ['c', 'torch'])
def test_two_layouts_and_leading_range(backend):
    "Keys s2048r5 (int32 indices, 5 radius bits, outliers) and values s12r3 (int16, 3 bits); `end` attends to the codes before it only."
    from tensormem.ops.hqmq_codes import attend_dense
    B, H, T, d = 2, 2, 90, 16
    hk, hv = HQMQ(2048, 5, 1, H, d, outliers='med_token'), HQMQ(12, 3, 1, H, d)
    k, v = synthetic_kv(B, H, T, d, seed=3), synthetic_kv(B, H, T, d, seed=4)
    kc, vc = HQMQCodes(hk, 0, 'k', B, H).append(hk.quantize(k, 0, 'k')), HQMQCodes(hv, 0, 'v', B, H).append(hv.quantize(v, 0, 'v'))
    assert (kc.j.dtype, vc.j.dtype) == (torch.int32, torch.int16) and kc.n_out > 0
    kd, vd = hk.dequantize(hk.quantize(k, 0, 'k')), hv.dequantize(hv.quantize(v, 0, 'v'))
    q = torch.randn(B, 6, d, generator=torch.Generator().manual_seed(0))
    for first, end in [(None, None), (torch.tensor([0, 30]), 50), (torch.tensor([48, 49]), 49)]:
        o, lse = code_attention(q, kc, vc, first=first, end=end, backend=backend)
        ro, rl = attend_dense(q, kd[:, :, :end], vd[:, :, :end], first=first)
        assert (o.double() - ro).abs().max() < 1e-4 * ro.abs().max()
        fin = rl.isfinite(); assert torch.allclose(lse.double()[fin], rl[fin], atol=1e-4) and bool((lse[~fin] == float('-inf')).all())
    with pytest.raises(ValueError, match='`end` must be'): code_attention(q, kc, vc, end=0)
