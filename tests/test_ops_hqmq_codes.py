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
