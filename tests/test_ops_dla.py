"""Tests of tensormem.ops.dla: the decayed linear attention kernels against `dla_naive` (exported beside them), the
L2 read and its gradients against `evicted_read`, FlexAttention's sliding window against `window_attention`.

Without a GPU the kernels run in Triton's interpreter (tensormem.ops.triton_utils sets TRITON_INTERPRET=1 before the
first `import triton`; it is also set here), on small odd shapes. `cuda` tests run the compiled kernels at realistic sizes."""
import os
import torch
if not torch.cuda.is_available(): os.environ.setdefault('TRITON_INTERPRET', '1')   # before anything imports triton
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from tensormem.ops.dla import (dla_naive, decayed_linear_attention, l2_read, sliding_window_attention, tensor_cache_heads,
                               tensor_cache_forward)
from tensormem.ops.triton_utils import INTERPRET, HAS_CUDA, HAS_TRITON
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason='needs the gpu extra: pip install "tensormem[gpu]"')
from tensormem.tensor_cache import evicted_read, window_attention, TensorCacheAttention


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(T=st.integers(1, 40), D=st.integers(1, 9), Dv=st.integers(1, 20), shift=st.integers(0, 12), rev=st.booleans(), seed=st.integers(0, 99))
def test_dla_matches_loop(T, D, Dv, shift, rev, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(2, 2, T, D, generator=g), torch.randn(2, 2, T, D, generator=g), torch.randn(2, 2, T, Dv, generator=g)
    lam, eta = torch.rand(2, generator=g) * .3 + .7, torch.rand(2, generator=g) * .5 + .1
    o = decayed_linear_attention(q, k, v, lam, eta, shift, rev, chunk=16, poison=True)
    assert not o.isnan().any(), "unwritten output elements"
    torch.testing.assert_close(o.double(), dla_naive(q, k, v, lam, eta, shift, rev), atol=2e-5, rtol=1e-5)


def test_dla_fp16_operands_and_errors():
    g = torch.Generator().manual_seed(1)
    q, k, v = [torch.randn(1, 2, 33, 16, generator=g) for _ in range(3)]
    lam, eta = torch.tensor([.9, .97]), torch.tensor([.2, .1])
    o = decayed_linear_attention(q.half(), k.half(), v.half(), lam, eta, 3, chunk=16)
    assert o.dtype == torch.float16
    torch.testing.assert_close(o.double(), dla_naive(q.half().float(), k.half().float(), v.half().float(), lam, eta, 3), atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match='must share'): decayed_linear_attention(q, k[..., :3], v, lam, eta)
    with pytest.raises(TypeError, match='float32, float16 or bfloat16'): decayed_linear_attention(q.double(), k, v, lam, eta)


def test_dla_keeps_lambda_fp32_with_bf16_activations():
    "λ = 0.995 must not round to bf16's 0.99609: the kernel matches the loop with λ exact, not with λ rounded."
    g = torch.Generator().manual_seed(2)
    q, k, v = [torch.randn(1, 1, 200, 16, generator=g).bfloat16() for _ in range(3)]
    lam, eta = torch.tensor([.995]), torch.tensor([.05])
    o = decayed_linear_attention(q, k, v, lam, eta, chunk=16).double()
    err = lambda ref: ((o - ref).abs().max() / ref.abs().max()).item()
    exact, rounded = err(dla_naive(q, k, v, lam, eta)), err(dla_naive(q, k, v, lam.bfloat16(), eta))
    assert exact < 3e-2 and rounded > 3 * exact, (exact, rounded)


def test_tensor_cache_forward_passes_fp32_lambda(monkeypatch):
    "Under bf16 autocast (fp32 parameters, bf16 activations) λ and η reach the L2 read in fp32, not rounded to q's dtype."
    import tensormem.ops.dla as dla
    seen = []
    monkeypatch.setattr(dla, 'l2_read', lambda q, k, v, lam, eta, *a, **kw: seen.append((q.dtype, lam.dtype, eta.dtype)) or torch.zeros_like(q))
    m = TensorCacheAttention(16, 2, window=4, lam=[.995, .995], eta=.05)
    with torch.autocast('cpu', dtype=torch.bfloat16): tensor_cache_forward(m, torch.randn(1, 9, 16), backend='torch')
    assert seen == [(torch.bfloat16, torch.float32, torch.float32)], seen


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


@pytest.mark.cuda
def test_cuda_tensor_cache_bf16():
    B, H, T, D = 1, 4, 3000, 64
    q, k, v = [torch.randn(B, H, T, D, device='cuda') for _ in range(3)]
    lam, eta = torch.full((H,), .995, device='cuda'), torch.full((H,), .05, device='cuda')
    o, r = tensor_cache_heads(q.bfloat16(), k.bfloat16(), v.bfloat16(), lam, eta, 512)
    o_ref, r_ref = window_attention(q, k, v, 512), evicted_read(q, k, v, lam, eta, 512)
    assert (o.float() - o_ref).abs().max() < 3e-2 and (r.float() - r_ref).abs().max() < 3e-2 * r_ref.abs().max()
