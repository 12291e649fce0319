"Tests of the exported tensormem.hqmq package: codebooks, searches, packing, bits, Med3×, invariance, errors, pins."
import math
import pytest, torch
from hypothesis import given, settings, strategies as st
from tensormem.quaternion import qmul, hurwitz_units
from tensormem.hqmq import (HQMQ, HQMQPacked, secondary_codebooks, joint_codebook, search_directions, pack_digits, unpack_digits,
                            digits_per_word, index_layout, IndexLayout, radius_code)
from tensormem.quant import (pack_bits, unpack_bits, kv_cache_bytes, chunk_norms, outlier_mask, synthetic_kv, codes_equal,
                             attention_error, merge_outliers, check_kv)

FAST = settings(max_examples=12, deadline=None)

def rel_mse(a, b): return ((a.float() - b.float()).pow(2).sum() / b.float().pow(2).sum()).item()

def test_reference_seeding():
    sec = secondary_codebooks(3, 2, 48, seed=42)
    z = torch.randn(3, 2, 2, 48, 4, generator=torch.Generator().manual_seed(42))
    torch.testing.assert_close(sec, z / z.norm(dim=-1, keepdim=True))
    assert not torch.equal(sec, secondary_codebooks(3, 2, 48, seed=43))

def test_joint_index_order():
    sec = secondary_codebooks(1, 1, 24)[0, 0, 0]; J = joint_codebook(sec); P = hurwitz_units()
    for p, s in ((0, 0), (3, 17), (23, 23)): torch.testing.assert_close(J[p * 24 + s], qmul(P[p], sec[s]))

@FAST
@given(seed=st.integers(0, 10_000), S=st.sampled_from([1, 5, 24, 48]), n=st.integers(1, 300))
def test_three_searches_agree(seed, S, n):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(2, n, 4, generator=g); u = u / u.norm(dim=-1, keepdim=True)
    sec = torch.randn(2, S, 4, generator=g); sec = sec / sec.norm(dim=-1, keepdim=True)
    J = joint_codebook(sec); scores = u @ J.transpose(1, 2)
    top2 = scores.topk(min(2, 24 * S), -1).values; clear = (top2[..., 0] - top2[..., 1]) > 1e-5
    jb = search_directions(u, sec, 'brute')
    for m in ('rot', 'matmul'):
        j = search_directions(u, sec, m)
        torch.testing.assert_close(scores.gather(-1, j[..., None]), scores.gather(-1, jb[..., None]), atol=1e-5, rtol=0)
        assert torch.equal(j[clear], jb[clear])
    assert torch.equal(search_directions(u, sec, 'rot', budget=2 * 8 * S * 7), search_directions(u, sec, 'rot'))  # blocking is exact

@FAST
@given(width=st.integers(1, 17), n=st.integers(1, 40), seed=st.integers(0, 999))
def test_pack_bits_roundtrip(width, n, seed):
    c = torch.randint(0, 2**width, (2, 3, n), generator=torch.Generator().manual_seed(seed))
    p = pack_bits(c, width)
    assert p.dtype == torch.uint8 and p.shape[-1] == math.ceil(n * width / 8)
    assert torch.equal(unpack_bits(p, width, n), c)

@FAST
@given(q=st.sampled_from([3, 9, 21, 75, 375]), T=st.integers(1, 45), seed=st.integers(0, 999))
def test_pack_digits_roundtrip(q, T, seed):
    d = torch.randint(0, q, (2, 2, T, 3), generator=torch.Generator().manual_seed(seed))
    w = pack_digits(d, q); n = digits_per_word(q)
    assert w.dtype == torch.int32 and w.shape == (2, 2, math.ceil(T / n), 3)
    assert torch.equal(unpack_digits(w, q, T), d)
    assert q ** n <= 2**32 < q ** (n + 1)

def test_index_layouts():
    for k, S in enumerate((24, 48, 96, 192)):
        L = index_layout(S); assert L == IndexLayout(6 + k, 9, 10)
        assert 0 < L.bits - math.log2(24 * S) < 0.031
    assert index_layout(1000).q == 1 and index_layout(1000).m == 15     # plain-bit fallback when mixed radix is dearer
    assert index_layout(7) == IndexLayout(3, 21, 7)

@FAST
@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 23), d=st.integers(1, 20),
       S=st.sampled_from([1, 7, 24, 96]), b=st.integers(1, 8), mode=st.sampled_from([None, 'med', 'med_token']),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 999))
def test_quantize_roundtrip_properties(B, H, T, d, S, b, mode, dtype, seed):
    x = torch.randn(B, H, T, d, generator=torch.Generator().manual_seed(seed)).to(dtype)
    q = HQMQ(S, b, 2, H, d, seed=seed, outliers=mode)
    p = q.quantize(x, 1, 'v'); xh = q.dequantize(p)
    assert xh.shape == x.shape and xh.dtype == dtype and torch.isfinite(xh).all()
    nc = math.ceil(d / 4)
    j, rq = q.codes(p)
    assert j.shape == (B, H, T, nc) and int(j.max()) < 24 * S and int(rq.max()) < 2**b
    # bit-exact: the unpacked radius codes equal the codes computed directly
    xc = torch.nn.functional.pad(x.float(), (0, 4 * nc - d)).unflatten(-1, (nc, 4)); r = chunk_norms(xc)
    if mode is None: assert torch.equal(rq, radius_code(r, r.amax(-1).half(), b))
    assert p.nbytes == sum(t.numel() * t.element_size() for t in p.tensors().values())
    if mode is None: assert p.nbytes * 8 == pytest.approx(q.bits_per_element(tokens=T)['layout'] * x.numel() / d * d, rel=1e-9)

def test_decode_formula_and_exact_codes():
    q = HQMQ(24, 3, 2, 3, 64); g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 64, generator=g); p = q.quantize(x, 1, 'k'); j, rq = q.codes(p)
    xc = x.unflatten(-1, (16, 4)); r = chunk_norms(xc)
    u = (xc / r[..., None]).transpose(0, 1).reshape(3, -1, 4)
    assert torch.equal(j, search_directions(u, q.sec[1, :, 0], 'brute').view(3, 2, 7, 16).transpose(0, 1))
    P, sk = hurwitz_units(), q.sec[1, :, 0]
    direct = qmul(P[j // 24], sk[torch.arange(3)[None, :, None, None], j % 24]) * (rq * p.sigma.float()[..., None] / 7)[..., None]
    torch.testing.assert_close(q.dequantize(p), direct.flatten(-2))

@FAST
@given(cuts=st.lists(st.integers(1, 29), min_size=1, max_size=4, unique=True), mode=st.sampled_from([None, 'med_token']), S=st.sampled_from([24, 7]))
def test_cat_equals_whole(cuts, mode, S):
    x = synthetic_kv(2, 2, 30, 12, seed=3)
    q = HQMQ(S, 4, 1, 2, 12, outliers=mode, sigma_outliers=False)
    bounds = [0] + sorted(cuts) + [30]
    joined = HQMQPacked.cat([q.quantize(x[:, :, a:b], 0, 'k') for a, b in zip(bounds, bounds[1:])])
    whole = q.quantize(x, 0, 'k')
    assert codes_equal(joined, whole) and joined.nbytes == whole.nbytes and joined.shape == whole.shape
    assert torch.equal(q.dequantize(joined), q.dequantize(whole))

def test_decode_appends_keep_one_partial_word():
    q = HQMQ(96, 4, 1, 1, 64); x = torch.randn(1, 1, 37, 64)
    p = q.quantize(x[:, :, :1], 0, 'v')
    for t in range(1, 37): p = HQMQPacked.cat([p, q.quantize(x[:, :, t:t+1], 0, 'v')])
    assert p.digits.shape == (1, 1, 4, 16) and codes_equal(p, q.quantize(x, 0, 'v'))

def _row0(p, nc):
    import dataclasses
    n0 = int(unpack_bits(p.flags[:1], 1, nc).sum()) if p.flags is not None else 0
    return dataclasses.replace(p, shape=(1, *p.shape[1:]), **{k: (v[:n0] if k == 'outliers' else v[:1]) for k, v in p.tensors().items()})

@FAST
@given(seed=st.integers(0, 500), split=st.integers(1, 39), scale=st.floats(0.1, 10))
def test_batch_invariant_mode(seed, split, scale):
    q = HQMQ(48, 3, 1, 2, 16, outliers='med_token', sigma_outliers=False)
    row = synthetic_kv(1, 2, 40, 16, seed=seed)
    mates = torch.cat([row, scale * synthetic_kv(2, 2, 40, 16, seed=seed + 1)])
    alone = q.quantize(row, 0, 'k')
    assert codes_equal(alone, _row0(q.quantize(mates, 0, 'k'), 4))
    assert codes_equal(alone, HQMQPacked.cat([q.quantize(row[:, :, :split], 0, 'k'), q.quantize(row[:, :, split:], 0, 'k')]))

def test_paper_med_is_not_batch_invariant():
    q = HQMQ(48, 3, 1, 2, 16, outliers='med', sigma_outliers=False)
    row = synthetic_kv(1, 2, 40, 16, seed=0); mates = torch.cat([row, 5 * synthetic_kv(2, 2, 40, 16, seed=1)])
    assert not codes_equal(q.quantize(row, 0, 'k'), _row0(q.quantize(mates, 0, 'k'), 4))

def test_outliers_kept_exactly():
    x = torch.randn(1, 1, 8, 16); x[0, 0, :, 4:8] = 100 + torch.arange(32.).view(8, 4)
    for mode in ('med', 'med_row', 'med_token'):
        q = HQMQ(24, 2, 1, 1, 16, outliers=mode)
        p = q.quantize(x, 0, 'k'); xh = q.dequantize(p)
        assert torch.equal(xh[0, 0, :, 4:8], x[0, 0, :, 4:8].half().float()) and len(p.outliers) >= 8
    r = torch.ones(2, 1, 3, 4); r[0, 0, 0, 1] = 10.; r[1] = 4.
    assert outlier_mask(r, 'med').sum() == 0 and outlier_mask(r, 'med_row').sum() == 1 and outlier_mask(r, 'med_token').sum() == 1

def test_sigma_excluding_outliers_helps_on_heavy_tails():
    x = synthetic_kv(2, 3, 64, 64, seed=1)
    e = {so: rel_mse(HQMQ(96, 4, 1, 3, 64, outliers='med', sigma_outliers=so).fake_quant(x, 0, 'k'), x) for so in (True, False)}
    plain = rel_mse(HQMQ(96, 4, 1, 3, 64).fake_quant(x, 0, 'k'), x)
    assert e[False] < e[True] < plain

def test_spec_bit_table_and_storage():
    for S, b, head, true in ((24, 3, 3.04, 3.17), (96, 4, 3.79, 3.92), (192, 6, 4.54, 4.67)):
        q = HQMQ(S, b, 1, 2, 128); bits = q.bits_per_element()
        assert (round(bits['headline'], 2), round(bits['true'], 2)) == (head, true)
        meas = q.quantize(torch.randn(1, 2, 20, 128), 0, 'k').bits_per_element
        assert meas == pytest.approx(bits['layout'], abs=1e-12) and abs(meas - bits['true']) < 0.01
    t = HQMQ(24, 3, 1, 1, 128).bits_per_element()['true']
    assert round(16 / t, 2) == 5.05
    assert round(kv_cache_bytes(80, 8, 128, 131072, 16) / 1e9) == 43 and round(kv_cache_bytes(80, 8, 128, 131072, t) / 1e9, 1) == 8.5
    assert kv_cache_bytes(1, 1, 4, 2, 8) == 16

@FAST
@given(T=st.integers(1, 64), S=st.sampled_from([24, 192, 100]))
def test_measured_equals_layout(T, S):
    q = HQMQ(S, 4, 1, 3, 64)
    p = q.quantize(torch.randn(1, 3, T, 64), 0, 'k')
    assert p.bits_per_element == pytest.approx(q.bits_per_element(tokens=T)['layout'], rel=1e-12)

def test_med3x_true_bits_formula():
    q = HQMQ(96, 4, 1, 1, 64, outliers='med')   # Eq. 2 with σ: (1-p) h + 16 p + 1/4 + 16/d
    h = (math.log2(24 * 96) + 4) / 4
    assert q.bits_per_element(outlier_frac=0.1)['true'] == pytest.approx(0.9 * h + 1.6 + 0.25 + 0.25)

def test_zero_input_and_padding():
    q = HQMQ(24, 3, 1, 2, 6); z = torch.zeros(1, 2, 3, 6)
    out = q.dequantize(q.quantize(z, 0, 'k')); assert torch.equal(out, z)
    x = torch.randn(1, 2, 3, 6); x[0, 0, 1] = 0
    xh = q.dequantize(q.quantize(x, 0, 'k')); assert xh.shape == x.shape and torch.isfinite(xh).all() and torch.equal(xh[0, 0, 1], torch.zeros(6))

def test_bad_inputs():
    q = HQMQ(24, 3, 2, 3, 8); x = torch.randn(1, 3, 4, 8)
    cases = [(lambda: q.quantize(x[0], 0, 'k'), '`x` must have 4 dims'), (lambda: q.quantize(x.long(), 0, 'k'), 'floating'),
             (lambda: q.quantize(x.double(), 0, 'k'), 'float16, bfloat16 or float32'),
             (lambda: q.quantize(x.masked_fill(x > 1, float('nan')), 0, 'k'), 'NaN or Inf'),
             (lambda: q.quantize(x.masked_fill(x > 1, float('inf')), 0, 'k'), 'NaN or Inf'),
             (lambda: q.quantize(x, 2, 'k'), '`layer`'), (lambda: q.quantize(x, -1, 'k'), '`layer`'), (lambda: q.quantize(x, 0, 'x'), '`role`'),
             (lambda: q.quantize(x[:, :2], 0, 'k'), 'KV heads'), (lambda: q.quantize(x[..., :4], 0, 'k'), 'head_dim'),
             (lambda: q.quantize(x * 1e5, 0, 'k'), 'fp16 range'),
             (lambda: HQMQ(0, 3, 1, 1, 8), '`S`'), (lambda: HQMQ(5000, 3, 1, 1, 8), '`S`'), (lambda: HQMQ(24, 0, 1, 1, 8), '`radius_bits`'),
             (lambda: HQMQ(24, 9, 1, 1, 8), '`radius_bits`'), (lambda: HQMQ(24, 3, 1, 1, 8, outliers='x'), '`outliers`'),
             (lambda: HQMQ(24, 3, 1, 1, 8, C=0), '`C`'), (lambda: HQMQ(24, 3, 1, 1, 8, encoder='x'), '`encoder`'),
             (lambda: HQMQ(48, 3, 2, 3, 8).dequantize(q.quantize(x, 0, 'k')), 'made by another quantizer configuration'),
             (lambda: HQMQPacked.cat([q.quantize(x, 0, 'k'), q.quantize(x, 1, 'k')]), 'different `layer`')]
    for f, msg in cases:
        with pytest.raises((ValueError, TypeError), match=None) as e: f()
        assert msg in str(e.value), (msg, str(e.value))

@pytest.mark.parametrize('bad', [True, False, 1.0, -1, 2, 10**9, '0', None])
def test_layer_is_checked_as_an_int(bad):
    q = HQMQ(24, 3, 2, 3, 8); x = torch.zeros(1, 3, 4, 8)
    with pytest.raises(ValueError, match='`layer` must be an int in \\[0, 1\\]') as e: q.quantize(x, bad, 'k')
    assert f'got {bad!r}' in str(e.value)
    assert q.quantize(x, 1, 'v').layer == 1                                     # the upper bound n_layers - 1 is allowed

def test_regression_pins():
    x = synthetic_kv(1, 2, 5, 16, seed=0)
    q = HQMQ(48, 3, 2, 2, 16, seed=42); p = q.quantize(x, 1, 'k'); j, rq = q.codes(p)
    assert j[0, 0].tolist() == [[892, 8, 256, 35], [892, 324, 108, 7], [892, 229, 836, 1026], [892, 665, 1054, 304], [892, 15, 633, 302]]
    assert rq[0, 0].tolist() == [[7, 1, 1, 1], [7, 1, 1, 1], [7, 0, 0, 1], [7, 1, 1, 1], [7, 2, 1, 0]]
    assert p.sigma[0, 0].tolist() == [19.359375, 19.46875, 21.34375, 22.21875, 21.890625] and p.nbytes == 102
    xs = synthetic_kv(2, 3, 64, 64, seed=1)   # pinned error bounds (synthetic heavy-tailed data)
    for kw, bound, nbytes in ((dict(S=96, radius_bits=4), 0.0225, 12672), (dict(S=24, radius_bits=3), 0.06, 10368),
                              (dict(S=192, radius_bits=6), 0.0125, 14976), (dict(S=96, radius_bits=4, outliers='med_token', sigma_outliers=False), 0.0035, 17968)):
        q = HQMQ(n_layers=1, n_kv_heads=3, head_dim=64, **kw); pk = q.quantize(xs, 0, 'k')
        assert rel_mse(q.dequantize(pk), xs) < bound and pk.nbytes == nbytes

def test_attention_error():
    k, v = synthetic_kv(1, 2, 32, 16, seed=0), synthetic_kv(1, 2, 32, 16, seed=1)
    qq = torch.randn(1, 4, 3, 16)
    assert attention_error(k, v, k, v, qq) == 0
    q = HQMQ(96, 4, 1, 2, 16)
    assert 0 < attention_error(k, v, q.fake_quant(k, 0, 'k'), q.fake_quant(v, 0, 'v'), qq) < 0.2

@pytest.mark.cuda
def test_cuda_matches_cpu():
    x = synthetic_kv(2, 3, 50, 64, seed=0)
    for mode in (None, 'med_token'):
        q = HQMQ(96, 4, 1, 3, 64, outliers=mode)
        pc, pg = q.quantize(x, 0, 'k'), q.quantize(x.cuda(), 0, 'k')
        j1, j2 = q.codes(pc)[0], q.codes(pg.to('cpu'))[0]
        assert (j1 == j2).float().mean() > 0.999
        torch.testing.assert_close(q.dequantize(pg).cpu(), q.dequantize(pc), atol=1e-2, rtol=1e-2)
