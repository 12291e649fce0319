"Tests of tensormem.baselines: naive int ± Med3×, KIVI-style, TurboQuant-style — same interface, real packing, honest bytes."
import math
import pytest, torch
from hypothesis import given, settings, strategies as st
from tensormem.hqmq import HQMQ
from tensormem.quant import synthetic_kv, codes_equal, unpack_bits
from tensormem.baselines import (NaiveInt, IntPacked, KIVI, KIVIPacked, TurboQuantLike, TQPacked, kivi_encode, kivi_decode,
                                 lloyd_max, uniform_levels, sphere_coord_density, random_rotation, method_grid, evaluate_tensors)
from tensormem.quant import FAMILY_STYLE

FAST = settings(max_examples=10, deadline=None)

def rel_mse(a, b): return ((a.float() - b.float()).pow(2).sum() / b.float().pow(2).sum()).item()

ALL = [NaiveInt(4), NaiveInt(3, 'med'), NaiveInt(5, 'med_token'), KIVI(2, residual=8), KIVI(4, group=8, residual=0), TurboQuantLike(3), TurboQuantLike(2, 'hadamard', 'uniform')]

@FAST
@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 40), d=st.sampled_from([4, 8, 16, 20, 64]),
       qi=st.integers(0, len(ALL) - 1), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 999))
def test_interface_properties(B, H, T, d, qi, dtype, seed):
    q = ALL[qi]
    if isinstance(q, TurboQuantLike) and q.rotation == 'hadamard' and d & (d - 1): d = 16
    x = torch.randn(B, H, T, d, generator=torch.Generator().manual_seed(seed)).to(dtype)
    p = q.quantize(x, 3, 'k' if seed % 2 else 'v'); xh = q.dequantize(p)
    assert xh.shape == x.shape and xh.dtype == dtype and torch.isfinite(xh).all()
    assert p.nbytes == sum(t.numel() * t.element_size() for t in p.tensors().values()) and p.shape == tuple(x.shape)
    assert all(t.dtype in (torch.uint8, torch.float16, torch.int32) for t in p.tensors().values())   # really packed
    assert rel_mse(xh, x) < 0.6

def test_naive_int_exact_grid_and_bits():
    x = torch.randn(2, 3, 7, 64)
    for b in (2, 3, 4, 8):
        q = NaiveInt(b); p = q.quantize(x, 0, 'k'); qm = 2**(b - 1) - 1
        c = unpack_bits(p.codes, b, 64) - qm
        assert int(c.abs().max()) <= qm and p.codes.shape[-1] == 64 * b // 8
        torch.testing.assert_close(q.dequantize(p), c * p.scale.float()[..., None])
        assert p.bits_per_element == pytest.approx(b + 16 / 64) == pytest.approx(q.bits_per_element(64)['true'])
        assert (q.dequantize(p) - x).abs().max() <= (x.abs().amax(-1) / qm).max() * 0.51 + 1e-3

def test_naive_int_med3x_keeps_outliers_and_helps():
    x = synthetic_kv(2, 3, 32, 64, seed=0)
    e_plain, q = rel_mse(NaiveInt(4).fake_quant(x, 0, 'k'), x), NaiveInt(4, 'med')
    p = q.quantize(x, 0, 'k')
    assert rel_mse(q.dequantize(p), x) < e_plain / 3
    frac = len(p.outliers) / (x.numel() / 4)
    assert p.bits_per_element == pytest.approx(q.bits_per_element(64, outlier_frac=frac)['layout'])
    assert q.bits_per_element(64, outlier_frac=frac)['true'] < p.bits_per_element   # code slots for outliers are kept

@FAST
@given(cut=st.integers(1, 31), mode=st.sampled_from([None, 'med_token']))
def test_int_and_tq_cat(cut, mode):
    x = synthetic_kv(1, 2, 32, 16, seed=cut)
    for q, P in ((NaiveInt(4, mode), IntPacked), (TurboQuantLike(3), TQPacked)):
        assert codes_equal(P.cat([q.quantize(x[:, :, :cut], 0, 'v'), q.quantize(x[:, :, cut:], 0, 'v')]), q.quantize(x, 0, 'v'))

def test_kivi_groups_and_residual():
    q = KIVI(2, group=32, residual=32); x = torch.randn(1, 2, 100, 64)
    for role in 'kv':
        p = q.quantize(x, 0, role)
        assert p.codes.shape[2] == 64 and p.residual.shape[2] == 36 and p.residual.dtype == torch.float16
        assert p.scale.shape == ((1, 2, 2, 64) if role == 'k' else (1, 2, 64, 2))
        assert torch.equal(q.dequantize(p)[:, :, 64:], x[:, :, 64:].half().float())
        assert p.bits_per_element == pytest.approx(q.bits_per_element(64, tokens=100, role=role)['layout'])
    short = q.quantize(x[:, :, :20], 0, 'k'); assert short.codes.shape[2] == 0 and q.bits_per_element(64, tokens=20)['true'] == 16
    assert q.bits_per_element(64)['true'] == pytest.approx(2 + 1)   # long-sequence limit: b + 32/G

def test_kivi_per_channel_vs_per_token():
    x = torch.randn(1, 1, 32, 8); x[..., 3] += 50               # a massive key channel
    ck, sk, zk = kivi_encode(x, 'k', 2, 32); cv, sv, zv = kivi_encode(x, 'v', 2, 8)
    assert sk.shape == (1, 1, 1, 8) and sv.shape == (1, 1, 32, 1)
    assert rel_mse(kivi_decode(ck, sk, zk, 'k', 32) - x.mean(2, keepdim=True), x - x.mean(2, keepdim=True)) < \
           rel_mse(kivi_decode(cv, sv, zv, 'v', 8) - x.mean(2, keepdim=True), x - x.mean(2, keepdim=True))

@settings(max_examples=6, deadline=None)
@given(T0=st.integers(1, 55), role=st.sampled_from(['k', 'v']))
def test_kivi_decode_appends_equal_whole_fp16(T0, role):
    q = KIVI(3, group=8, residual=8)
    x = torch.randn(1, 2, 60, 32, generator=torch.Generator().manual_seed(T0)).half()
    p = q.quantize(x[:, :, :T0], 0, role)
    for t in range(T0, 60): p = KIVIPacked.cat([p, q.quantize(x[:, :, t:t+1], 0, role)])
    assert codes_equal(p, q.quantize(x, 0, role))

def test_lloyd_max_and_uniform():
    t, w = sphere_coord_density(128)
    assert abs((w * t**2).sum().item() - 1 / 128) < 1e-5          # E[t²] = 1/d on the sphere
    mse = lambda c: (w * (t - c[torch.bucketize(t, (c[1:] + c[:-1]) / 2)])**2).sum().item()
    for b in (1, 2, 3, 4):
        c = lloyd_max(128, b); assert torch.all(c[1:] > c[:-1]) and mse(c) <= mse(uniform_levels(128, b)) + 1e-12
    assert torch.allclose(lloyd_max(128, 1) * math.sqrt(128), torch.tensor([-0.798, 0.798], dtype=torch.float64), atol=0.01)

def test_rotations_orthogonal():
    for kind, d in (('orthogonal', 48), ('hadamard', 64)):
        R = random_rotation(d, kind, seed=3); torch.testing.assert_close(R @ R.T, torch.eye(d), atol=1e-5, rtol=0)
    assert not torch.equal(random_rotation(16, seed=0), random_rotation(16, seed=1))

def test_turboquant_bits_and_error_pins():
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for b, bound in ((2, 0.13), (3, 0.04), (4, 0.012)):
        q = TurboQuantLike(b); p = q.quantize(x, 0, 'k')
        assert p.bits_per_element == pytest.approx(b + 0.25) and rel_mse(q.dequantize(p), x) < bound

def test_bad_inputs():
    x = torch.randn(1, 2, 4, 8)
    for f, msg in [(lambda: NaiveInt(1), '`bits`'), (lambda: NaiveInt(4, outliers='x'), '`outliers`'), (lambda: KIVI(0), '`bits`'),
                   (lambda: KIVI(2, group=0), '`group`'), (lambda: TurboQuantLike(9), '`bits`'), (lambda: TurboQuantLike(2, rotation='x'), '`rotation`'),
                   (lambda: NaiveInt(4).quantize(x[0], 0, 'k'), '4 dims'), (lambda: KIVI(2).quantize(x.int(), 0, 'k'), 'floating'),
                   (lambda: TurboQuantLike(2).quantize(x, 0, 'q'), '`role`'), (lambda: NaiveInt(4).quantize(x * float('nan'), 0, 'k'), 'NaN'),
                   (lambda: NaiveInt(4).quantize(x * 1e6, 0, 'k'), 'fp16 range'), (lambda: TurboQuantLike(2, 'hadamard').quantize(x[..., :6], 0, 'k'), 'power of 2'),
                   (lambda: NaiveInt(3).dequantize(NaiveInt(4).quantize(x, 0, 'k')), 'made by another quantizer configuration'),
                   (lambda: NaiveInt(3).dequantize(KIVI(2).quantize(x, 0, 'k')), 'must be a IntPacked made by NaiveInt(int3)'),
                   (lambda: KIVIPacked.cat([KIVI(2).quantize(x, 0, 'k'), KIVI(2).quantize(x, 0, 'v')]), 'different `role`')]:
        with pytest.raises((ValueError, TypeError)) as e: f()
        assert msg in str(e.value), (msg, str(e.value))

def test_evaluate_harness_and_grid():
    grid = method_grid(1, 2, 16)
    assert {q.family for q in grid} == {'HQMQ', 'HQMQ+Med3×', 'HQMQ+Med3×(token)', 'naive int', 'naive int+Med3×', 'KIVI-style', 'TurboQuant-style'}
    assert all(q.family in FAMILY_STYLE for q in grid)
    k, v = synthetic_kv(1, 2, 40, 16, seed=0), synthetic_kv(1, 2, 40, 16, seed=1, massive=0)
    rows = evaluate_tensors([HQMQ(96, 4, 1, 2, 16), NaiveInt(4), TurboQuantLike(4)], k, v, torch.randn(1, 4, 40, 16))
    assert [r['name'] for r in rows] == ['s96r4', 'int4', 'tq4'] and all(0 < r['attn'] < 1 and r['bits'] > 4 for r in rows)
    assert rows[0]['mse_k'] < rows[1]['mse_k']   # HQMQ beats per-token int4 on heavy-tailed keys (synthetic)

@pytest.mark.cuda
def test_cuda_matches_cpu():
    x = synthetic_kv(1, 3, 40, 64, seed=0)
    for q in (NaiveInt(4, 'med'), KIVI(2, residual=8), TurboQuantLike(3)):
        torch.testing.assert_close(q.fake_quant(x.cuda(), 0, 'k').cpu(), q.fake_quant(x, 0, 'k'), atol=1e-2, rtol=1e-2)

def test_bits_report_measured_equals_layout():
    from tensormem.baselines import bits_report
    x = synthetic_kv(1, 3, 70, 64, seed=5)
    for q in (HQMQ(96, 4, 1, 3, 64), HQMQ(24, 3, 1, 3, 64, outliers='med'), NaiveInt(4, 'med'), KIVI(2, residual=16), TurboQuantLike(3)):
        for role in 'kv':
            r = bits_report(q, q.quantize(x, 0, role))
            assert r['measured'] == pytest.approx(r['layout'], rel=1e-12) and r['headline'] <= r['true'] + 1e-9
