"""Tests of tensormem.kernels: every Triton kernel against the PyTorch reference it replaces.

On a machine without a GPU the kernels run in Triton's interpreter (tensormem.kernels sets TRITON_INTERPRET=1 before
the first `import triton`; it is also set here, before anything imports triton), so CI checks correctness on CPU
with small odd shapes. `cuda` tests run the compiled kernels on a GPU at realistic sizes."""
import os, dataclasses
import torch
if not torch.cuda.is_available(): os.environ.setdefault('TRITON_INTERPRET', '1')
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from tensormem.kernels import (decayed_linear_attention, l2_read, sliding_window_attention, tensor_cache_heads, tensor_cache_forward,
                               hqmq_encode, hqmq_decode_attention, dequant_sdpa, outlier_tile_offsets, decode_bytes, fp16_kv_bytes,
                               INTERPRET, HAS_CUDA)
from tensormem.tensor_cache import evicted_read, window_attention, TensorCacheAttention
from tensormem.hqmq import HQMQ, synthetic_kv, codes_equal, pack_bits, unpack_bits

DEV = 'cuda' if HAS_CUDA else 'cpu'


def dla_loop(a, b, c, lam, eta, shift=0, reverse=False):
    "The generic decayed linear attention, one pair at a time, float64."
    B, H, T, _ = a.shape
    if reverse: a, b, c = a.flip(2), b.flip(2), c.flip(2)
    out = torch.zeros(B, H, T, c.shape[-1], dtype=torch.float64)
    for p in range(T):
        for pp in range(p - shift + 1):
            w = (eta * lam ** (p - shift - pp)).double()[None, :, None]
            out[:, :, p] += w * (a[:, :, p].double() * b[:, :, pp].double()).sum(-1, keepdim=True) * c[:, :, pp].double()
    return out.flip(2) if reverse else out


def test_interpreter_on_cpu():
    assert HAS_CUDA or INTERPRET, "without a GPU the kernels must be built for Triton's interpreter"


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(T=st.integers(1, 40), D=st.integers(1, 9), Dv=st.integers(1, 20), shift=st.integers(0, 12), rev=st.booleans(), seed=st.integers(0, 99))
def test_dla_matches_loop(T, D, Dv, shift, rev, seed):
    g = torch.Generator().manual_seed(seed)
    a, b, c = torch.randn(2, 2, T, D, generator=g), torch.randn(2, 2, T, D, generator=g), torch.randn(2, 2, T, Dv, generator=g)
    lam, eta = torch.rand(2, generator=g) * .3 + .7, torch.rand(2, generator=g) * .5 + .1
    o = decayed_linear_attention(a, b, c, lam, eta, shift, rev, chunk=16, poison=True)
    assert not o.isnan().any(), "unwritten output elements"
    torch.testing.assert_close(o.double(), dla_loop(a, b, c, lam, eta, shift, rev), atol=2e-5, rtol=1e-5)


def test_dla_fp16_operands_and_errors():
    g = torch.Generator().manual_seed(1)
    a, b, c = [torch.randn(1, 2, 33, 16, generator=g) for _ in range(3)]
    lam, eta = torch.tensor([.9, .97]), torch.tensor([.2, .1])
    o = decayed_linear_attention(a.half(), b.half(), c.half(), lam, eta, 3, chunk=16)
    assert o.dtype == torch.float16
    torch.testing.assert_close(o.double(), dla_loop(a.half().float(), b.half().float(), c.half().float(), lam, eta, 3), atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match='must share'): decayed_linear_attention(a, b[..., :3], c, lam, eta)
    with pytest.raises(TypeError, match='float32, float16 or bfloat16'): decayed_linear_attention(a.double(), b, c, lam, eta)


@pytest.mark.parametrize('B,H,T,D,W,ns,pad', [(2, 2, 29, 5, 6, 0, False), (1, 2, 37, 16, 9, 2, True), (1, 1, 20, 3, 25, 0, False)])
def test_l2_read_forward_and_grads(B, H, T, D, W, ns, pad):
    g = torch.Generator().manual_seed(T)
    q, k, v = [torch.randn(B, H, T, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    ll = (torch.rand(H, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_()
    ee = (torch.rand(H, generator=g, dtype=torch.float64) - 1).requires_grad_()
    valid = torch.rand(B, T, generator=g) > .2 if pad else None
    ref = evicted_read(q, k, v, torch.sigmoid(ll), torch.sigmoid(ee), W, ns, valid, chunk=7)
    up = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    gref = torch.autograd.grad((ref * up).sum(), [q, k, v, ll, ee])
    xs = [x.detach().float().requires_grad_() for x in (q, k, v, ll, ee)]
    out = l2_read(*xs[:3], torch.sigmoid(xs[3]), torch.sigmoid(xs[4]), W, ns, valid, chunk=16, backend='triton')
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip('q k v λ η'.split(), torch.autograd.grad((out * up.float()).sum(), xs), gref):
        assert ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12)) < 1e-4, name


def test_l2_read_backend_choice():
    g = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(1, 2, 12, 4, generator=g) for _ in range(3)]
    lam, eta = torch.tensor([.9, .8]), torch.tensor([.1, .2])
    ref = evicted_read(q, k, v, lam, eta, 3)
    if not HAS_CUDA: assert torch.equal(l2_read(q, k, v, lam, eta, 3), ref)   # auto on CPU = the torch reference, exactly
    with pytest.raises(ValueError, match="`backend` must be"): l2_read(q, k, v, lam, eta, 3, backend='cuda')
    with pytest.raises(ValueError, match='n_sink'): l2_read(q, k, v, lam, eta, 3, n_sink=3, backend='triton')


def test_flex_sliding_window_mask():
    import warnings; warnings.filterwarnings('ignore', message='flex_attention called without torch.compile')
    g = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(2, 2, 29, 8, generator=g) for _ in range(3)]
    valid = torch.rand(2, 29, generator=g) > .3
    for W, ns, val in [(5, 0, None), (8, 3, valid)]:
        torch.testing.assert_close(sliding_window_attention(q, k, v, W, ns, val, backend='flex'), window_attention(q, k, v, W, ns, val), atol=1e-5, rtol=1e-5)
    assert torch.equal(sliding_window_attention(q, k, v, 5, backend='torch'), window_attention(q, k, v, 5))
    # the mask is not a tautology: a wrong window gives a different result
    assert not torch.allclose(sliding_window_attention(q, k, v, 6, backend='flex'), window_attention(q, k, v, 5), atol=1e-3)


def test_tensor_cache_forward_matches_module():
    torch.manual_seed(0)
    m = TensorCacheAttention(16, 2, window=5, n_sink=1, rope=True, lam=[.9, .97], eta=.3)
    x = torch.randn(2, 23, 16); pm = torch.ones(2, 23); pm[0, :3] = 0
    y = tensor_cache_forward(m, x, pm, backend='triton')
    torch.testing.assert_close(y, m(x, pm), atol=1e-5, rtol=1e-5)
    y.sum().backward(); gk = [p.grad.clone() for p in m.parameters()]; m.zero_grad()
    m(x, pm).sum().backward()
    for a, p in zip(gk, m.parameters()): torch.testing.assert_close(a, p.grad, atol=1e-4, rtol=1e-4)
    o, r = tensor_cache_heads(*[torch.randn(1, 2, 9, 4) for _ in range(3)], torch.tensor([.9, .9]), torch.tensor([.1, .1]), 4, backend='triton')
    assert o.shape == r.shape == (1, 2, 9, 4)
    m2 = TensorCacheAttention(16, 2, window=5, rule='delta')
    with pytest.raises(ValueError, match="'outer' rule"): tensor_cache_forward(m2, x)


ENC = [(12, 3, 2, 1, 23, 64, None, True, torch.float32),   # base-9 digits, T not a multiple of 10
       (6, 4, 1, 2, 7, 6, None, True, torch.float16),       # d_h = 6: a padded chunk; fp16 input
       (12, 2, 1, 2, 31, 20, 'med_token', False, torch.float32),  # batch-invariant Med3×, σ without outliers
       (7, 3, 1, 1, 15, 16, 'med', True, torch.float32),    # 24S = 8·21: base-21 digits, 7 per word
       (41, 2, 1, 1, 9, 8, None, True, torch.bfloat16)]     # 24S = 8·123: plain ⌈log2 24S⌉-bit layout


@pytest.mark.parametrize('S,b,B,H,T,d,mode,so,dt', ENC)
def test_encode_identical_bytes(S, b, B, H, T, d, mode, so, dt):
    hq = HQMQ(S, b, 2, H, d, outliers=mode, sigma_outliers=so)
    x = synthetic_kv(B, H, T, d, seed=S).to(dt)
    mine, ref = hqmq_encode(hq, x, 1, 'k', backend='triton', poison=True), hq.quantize(x, 1, 'k')
    assert (mine.digits is None) == (hq.layout.q == 1)
    assert codes_equal(mine, ref)
    assert mine.nbytes == ref.nbytes and mine.shape == ref.shape and mine.dtype == ref.dtype


@pytest.mark.filterwarnings('ignore:overflow')
def test_encode_errors_and_auto():
    hq = HQMQ(6, 3, 1, 2, 8)
    with pytest.raises(ValueError, match='KV heads'): hqmq_encode(hq, torch.randn(1, 3, 4, 8), 0, 'k', backend='triton')
    with pytest.raises(ValueError, match='fp16 range'): hqmq_encode(hq, torch.randn(1, 2, 4, 8) * 1e5, 0, 'k', backend='triton')
    x = torch.randn(1, 2, 5, 8)
    if not HAS_CUDA: assert codes_equal(hqmq_encode(hq, x, 0, 'v'), hq.quantize(x, 0, 'v'))


def test_outlier_tile_offsets():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(2, 3, 37, 11, generator=g) > .8
    off = outlier_tile_offsets(pack_bits(m, 1), 11, 16)
    flat = m.flatten().long(); before = torch.cumsum(flat, 0) - flat
    want = before.view(2, 3, 37, 11)[:, :, ::16, 0].reshape(6, -1)
    assert torch.equal(off.long(), want)


DEC = [(12, 3, 2, 2, 3, 45, 32, None, 3, 'fp32'), (6, 4, 1, 1, 2, 70, 6, 'med_token', None, 'fp32'),
       (7, 3, 1, 2, 1, 33, 20, 'med', 2, 'fp32'), (41, 2, 1, 1, 4, 20, 16, 'med_row', 1, 'fp16')]


@pytest.mark.parametrize('S,b,B,Hkv,G,T,d,mode,ns,dot', DEC)
def test_fused_decode_matches_dequant_sdpa(S, b, B, Hkv, G, T, d, mode, ns, dot):
    hq = HQMQ(S, b, 2, Hkv, d, outliers=mode)
    pk, pv = hq.quantize(synthetic_kv(B, Hkv, T, d, seed=3), 1, 'k'), hq.quantize(synthetic_kv(B, Hkv, T, d, seed=4), 1, 'v')
    q = torch.randn(B, Hkv * G, d, generator=torch.Generator().manual_seed(T))
    o = hqmq_decode_attention(q, hq, pk, pv, block=16, n_split=ns, dot=dot, poison=True)
    ref = dequant_sdpa(q, hq, pk, pv, dtype=torch.float64)
    tol = 1e-4 if dot == 'fp32' else 1e-2
    assert (o.double() - ref).abs().max() <= tol * ref.abs().max()
    if mode is not None:   # the outliers matter: dropping them changes the answer
        assert pk.flags is not None and len(pk.outliers) > 0
        z = dataclasses.replace(pk, flags=torch.zeros_like(pk.flags), outliers=pk.outliers[:0])
        assert (dequant_sdpa(q, hq, z, pv, dtype=torch.float64) - ref).abs().max() > 2 * tol * ref.abs().max()


def test_fused_decode_growing_cache_and_errors():
    hq = HQMQ(6, 3, 1, 1, 8)
    x = synthetic_kv(1, 1, 25, 8, seed=0)
    pk = type(hq.quantize(x, 0, 'k')).cat([hq.quantize(x[:, :, :13], 0, 'k')] + [hq.quantize(x[:, :, t:t + 1], 0, 'k') for t in range(13, 25)])
    pv = hq.quantize(x.flip(2), 0, 'v')
    q = torch.randn(1, 2, 8)
    torch.testing.assert_close(hqmq_decode_attention(q, hq, pk, pv, block=16).double(), dequant_sdpa(q, hq, pk, pv, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match='role'): hqmq_decode_attention(q, hq, pv, pk)
    with pytest.raises(ValueError, match='`q` must be'): hqmq_decode_attention(q[:, :, :4], hq, pk, pv)
    assert decode_bytes(pk, pv) == pk.nbytes + pv.nbytes and fp16_kv_bytes(1, 1, 25, 8) == 800


# ---------------------------------------------------------------- GPU (compiled kernels, realistic sizes)

@pytest.mark.cuda
def test_cuda_fused_decode_fp16_llama_layer():
    hq = HQMQ(96, 4, 1, 8, 128)
    g = torch.Generator(device='cuda').manual_seed(0)
    k, v = [torch.randn(2, 8, 4099, 128, device='cuda', generator=g, dtype=torch.float16) for _ in range(2)]
    pk, pv = hqmq_encode(hq, k, 0, 'k'), hqmq_encode(hq, v, 0, 'v')
    q = torch.randn(2, 32, 128, device='cuda', generator=g, dtype=torch.float16)
    o = hqmq_decode_attention(q, hq, pk, pv)
    ref = dequant_sdpa(q, hq, pk, pv, dtype=torch.float32)
    assert (o.float() - ref).abs().max() <= 1e-2


@pytest.mark.cuda
def test_cuda_encode_matches_quantize():
    hq = HQMQ(96, 4, 1, 8, 128, outliers='med_token')
    x = synthetic_kv(1, 8, 1000, 128, seed=0).half().cuda()
    mine, ref = hqmq_encode(hq, x, 0, 'k'), hq.quantize(x, 0, 'k')
    j1, r1 = hq.codes(mine); j2, r2 = hq.codes(ref)
    assert (j1 == j2).float().mean() > 0.999 and (r1 == r2).float().mean() > 0.999   # FMA rounding may flip near-ties
    assert torch.equal(mine.sigma, ref.sigma)


@pytest.mark.cuda
def test_cuda_tensor_cache_bf16():
    B, H, T, D = 1, 4, 3000, 64
    q, k, v = [torch.randn(B, H, T, D, device='cuda') for _ in range(3)]
    lam, eta = torch.full((H,), .995, device='cuda'), torch.full((H,), .05, device='cuda')
    o, r = tensor_cache_heads(q.bfloat16(), k.bfloat16(), v.bfloat16(), lam, eta, 512)
    o_ref, r_ref = window_attention(q, k, v, 512), evicted_read(q, k, v, lam, eta, 512)
    assert (o.float() - o_ref).abs().max() < 3e-2 and (r.float() - r_ref).abs().max() < 3e-2 * r_ref.abs().max()


# ---------------------------------------------------------------- the GPU benchmark script (CPU: refusal and smoke mode)

def test_gpu_bench_refuses_without_gpu_and_smoke_runs(capsys, tmp_path):
    from tensormem import gpu_bench
    if not HAS_CUDA:
        assert gpu_bench.main(['--out', str(tmp_path)]) == 2
        assert 'no CUDA GPU visible' in capsys.readouterr().err
    assert gpu_bench.main(['--smoke', '--only', 'tc,step', '--out', str(tmp_path)]) == 0
    assert 'all passed' in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []          # a smoke run writes no record


def test_gpu_bench_targets_and_tables(tmp_path):
    "Formatting and target logic on a hand-made record (test fixture numbers, not measurements)."
    from tensormem import gpu_bench
    res = dict(decode=[dict(B=1, T=32768, fused_over_fp16=0.5), dict(B=1, T=131072, fused_over_fp16=0.5)],
               encode=[{'B': 1, 'T': 32768, 'triton_s96r4_GBps': 250.}],
               tensor_cache=[dict(T=65536, ours_over_flex=2.0, full_over_ours=12.)], tc_step=[dict(context=1024, over_first=1.), dict(context=131072, over_first=1.05)])
    t = gpu_bench.targets(res)
    assert t['decode_32k_le_0.6x_fp16']['met'] and t['decode_128k_le_0.45x_fp16']['met'] is False
    assert t['encode_ge_300GBps']['met'] is False and t['tc_64k_le_1.5x_flex']['met'] is False
    assert t['tc_64k_ge_10x_faster_than_full']['met'] and t['tc_step_128k_le_1.1x_1k']['met']
    assert gpu_bench.targets({})['decode_32k_le_0.6x_fp16'] == dict(value=None, limit=0.6, met=None)
    txt = gpu_bench.table([dict(a=1.23456, b=None)], ['a', 'b'])
    assert '1.235' in txt and '—' in txt
    ck = gpu_bench.checks(dict(decode=[dict(B=1, T=8, max_err_vs_dequant_sdpa=0.5)]), smoke=False)
    assert list(ck.values()) == [(0.5, False)]
    (tmp_path / 'bench' / 'records').mkdir(parents=True)
    rec = dict(kind='gpu', env=dict(card='fixture'), results=dict(decode=[dict(B=1, T=8, fp16_sdpa_ms=1., fp16_sdpa_GBps=2.)]), targets=t)
    (tmp_path / 'bench' / 'records' / 'x.json').write_text(__import__('json').dumps(rec))
    (tmp_path / 'bench' / 'records' / 'y.json').write_text(__import__('json').dumps(dict(rec, kind='smoke')))
    found = gpu_bench.find_records(tmp_path)
    assert len(found) == 1 and found[0]['_path'] == 'x.json'
    import matplotlib; matplotlib.use('Agg')
    gpu_bench.show_record(found[0]); gpu_bench.plot_decode(found[0])


@pytest.mark.slow
def test_kernels_compile_for_h100_and_a100():
    "Every kernel compiles to a cubin for sm_90 and sm_80 without a GPU (Triton's compiler + bundled ptxas), no spills."
    from tensormem.kernels import compile_report
    for arch in (90, 80):
        rows = compile_report(arch)
        assert len(rows) == 7 and all(r['compiled'] for r in rows), [r.get('error') for r in rows]
        assert all(r['stack_bytes'] == 0 for r in rows)


# ---------------------------------------------------------------- bf16 on CPU (the interpreter, with `_mm`'s bf16 emulation)

def test_bf16_l2_read_forward_and_grads_in_interpreter():
    g = torch.Generator().manual_seed(11)
    B, H, T, D, W = 2, 2, 45, 16, 8
    x = [torch.randn(B, H, T, D, generator=g).bfloat16() for _ in range(3)]
    lam = torch.tensor([.9, .97], requires_grad=True); eta = torch.tensor([.1, .3], requires_grad=True)
    qb, kb, vb = [t.clone().requires_grad_() for t in x]
    qf, kf, vf = [t.float().requires_grad_() for t in x]          # the same (bf16-rounded) numbers in fp32
    r = l2_read(qb, kb, vb, lam, eta, W, n_sink=1, backend='triton')
    ref = evicted_read(qf, kf, vf, lam, eta, W, 1)
    assert r.dtype == torch.bfloat16 and (r.float() - ref).abs().max() <= 1e-2 * ref.abs().max()
    go = torch.randn(ref.shape, generator=g)
    gl = torch.autograd.grad(r.float(), [qb, kb, vb, lam, eta], go)
    gr = torch.autograd.grad(ref, [qf, kf, vf, lam, eta], go)
    for a, b in zip(gl, gr): assert (a.float() - b).abs().max() <= 2e-2 * b.abs().max()


def test_bf16_fused_decode_in_interpreter():
    hq = HQMQ(12, 3, 1, 2, 32, outliers='med_token')
    x = synthetic_kv(2, 2, 50, 32, seed=8)
    pk, pv = hq.quantize(x.bfloat16(), 0, 'k'), hq.quantize(x.flip(2).bfloat16(), 0, 'v')
    q = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3)).bfloat16()
    ref = dequant_sdpa(q, hq, pk, pv, dtype=torch.float64)
    for dot in ('fp16', 'fp32'):
        o = hqmq_decode_attention(q, hq, pk, pv, block=16, dot=dot, poison=True)
        assert o.dtype == torch.bfloat16 and (o.double() - ref).abs().max() <= 1e-2 * ref.abs().max()
