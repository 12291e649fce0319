"Property tests of the quaternion algebra and 2T (the binary tetrahedral group, 24 Hurwitz units) against independent references."
import itertools, math
import pytest, torch
from hypothesis import given, settings, strategies as st
from tensormem.quaternion import (qmul, qconj, qnorm, qinv, qmat_left, qmat_right, hurwitz_units, hurwitz_table,
                                  nearest_hurwitz, best_product)

def rand(shape, seed, dtype=torch.float64):
    return torch.randn(*shape, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype)

def unit(shape, seed, dtype=torch.float64):
    q = rand(shape, seed, dtype); return q / q.norm(dim=-1, keepdim=True)

def loop_qmul(a, b):
    "Plain float64 loop of the Hamilton product written out component by component, one quaternion at a time."
    out = torch.empty(a.shape[0], 4, dtype=torch.float64)
    for n in range(a.shape[0]):
        aw, ax, ay, az = a[n].tolist(); bw, bx, by, bz = b[n].tolist()
        out[n] = torch.tensor([aw*bw-ax*bx-ay*by-az*bz, aw*bx+ax*bw+ay*bz-az*by,
                               aw*by-ax*bz+ay*bw+az*bx, aw*bz+ax*by-ay*bx+az*bw], dtype=torch.float64)
    return out

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3)
seeds = st.integers(0, 2**31 - 1)

@settings(max_examples=30, deadline=None)
@given(shapes, seeds)
def test_qmul_matches_loop_and_matrix(shape, seed):
    a, b = rand(shape, seed), rand(shape, seed + 1)
    ref = loop_qmul(a.reshape(-1, 4), b.reshape(-1, 4)).reshape(a.shape)
    torch.testing.assert_close(qmul(a, b), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((qmat_left(a) @ b[..., None])[..., 0], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((qmat_right(b) @ a[..., None])[..., 0], ref, rtol=1e-12, atol=1e-12)

@settings(max_examples=30, deadline=None)
@given(shapes, seeds)
def test_group_laws(shape, seed):
    a, b, c = rand(shape, seed), rand(shape, seed + 1), rand(shape, seed + 2)
    torch.testing.assert_close(qmul(qmul(a, b), c), qmul(a, qmul(b, c)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(qnorm(qmul(a, b)), qnorm(a) * qnorm(b), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(qmul(a, qinv(a)), torch.tensor([1., 0, 0, 0], dtype=torch.float64).expand_as(a), rtol=0, atol=1e-12)
    torch.testing.assert_close(qconj(qmul(a, b)), qmul(qconj(b), qconj(a)), rtol=1e-12, atol=1e-12)

@pytest.mark.parametrize('dtype,tol', [(torch.float16, 2e-2), (torch.bfloat16, 8e-2), (torch.float32, 1e-5)])
def test_low_precision_dtypes(dtype, tol):
    a, b = rand((64,), 0), rand((64,), 1)
    r = qmul(a.to(dtype), b.to(dtype))
    assert r.dtype == dtype
    err = (r.double() - qmul(a, b)).abs().amax(-1) / (qnorm(a) * qnorm(b))
    assert err.max() < tol

def test_hurwitz_units_definition():
    P = hurwitz_units(torch.float64)
    axis = [[(s if c == a else 0.) for c in range(4)] for a in range(4) for s in (1., -1.)]
    half = [[.5 * s for s in sg] for sg in itertools.product((1., -1.), repeat=4)]
    assert P.tolist() == axis + half
    torch.testing.assert_close(qnorm(P), torch.ones(24, dtype=torch.float64))
    cos = P @ P.T; cos.fill_diagonal_(-2); assert cos.max().item() == 0.5

def test_closure_and_inverses():
    P = hurwitz_units(torch.float64); T = hurwitz_table()
    torch.testing.assert_close(qmul(P[:, None], P[None]), P[T])
    conj = qconj(P)
    assert all(((P - c).abs().amax(-1) < 1e-12).any() for c in conj)
    assert T[0].tolist() == list(range(24))  # +1 is the identity

@settings(max_examples=20, deadline=None)
@given(st.integers(1, 2000), seeds, st.sampled_from([torch.float32, torch.float64]))
def test_nearest_hurwitz_vs_brute(n, seed, dtype):
    u = unit((n,), seed, dtype); P = hurwitz_units(dtype)
    idx, p = nearest_hurwitz(u)
    sc = u @ P.T
    torch.testing.assert_close((u * p).sum(-1), sc.max(-1).values, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)
    top2 = sc.topk(2, -1).values; clear = top2[:, 0] - top2[:, 1] > 1e-5
    assert torch.equal(idx[clear], sc.argmax(-1)[clear])
    torch.testing.assert_close(P[idx], p)

def test_nearest_hurwitz_ties_and_scale():
    u = torch.tensor([[1., 1., 0., 0.], [3., 0., 0., 0.], [-1., -1., -1., -1.]])
    idx, p = nearest_hurwitz(u)
    assert idx[1].item() == 0 and idx[2].item() == 23
    assert math.isclose((u[0] / u[0].norm() * p[0]).sum().item(), 1 / math.sqrt(2), rel_tol=1e-6)

@settings(max_examples=15, deadline=None)
@given(st.integers(1, 64), st.integers(1, 300), seeds)
def test_best_product_vs_brute(S, n, seed):
    u, sec = unit((n,), seed), unit((S,), seed + 7)
    P = hurwitz_units(torch.float64)
    book = qmul(P[:, None], sec[None]).reshape(24 * S, 4)
    sc = u @ book.T
    pi, si, cos = best_product(u, sec)
    torch.testing.assert_close(cos, sc.max(-1).values, rtol=0, atol=1e-12)
    torch.testing.assert_close((u * qmul(P[pi], sec[si])).sum(-1), cos, rtol=0, atol=1e-12)

def test_best_product_grouped():
    u, sec = unit((2, 3, 40), 0), unit((3, 10), 1)
    pi, si, cos = best_product(u, sec)
    for h in range(3):
        ph, sh, ch = best_product(u[:, h], sec[h])
        assert torch.equal(pi[:, h], ph) and torch.equal(si[:, h], sh)

def test_isometry_identity():
    u, s = unit((500,), 3), unit((500,), 4)
    p = hurwitz_units(torch.float64)[torch.randint(0, 24, (500,), generator=torch.Generator().manual_seed(5))]
    torch.testing.assert_close((u * qmul(p, s)).sum(-1), (qmul(u, qconj(s)) * p).sum(-1), rtol=0, atol=1e-12)

def test_bad_input():
    with pytest.raises(ValueError, match='last dim 4'): qmul(torch.zeros(3, 3), torch.zeros(3, 4))
    with pytest.raises(TypeError, match='floating'): qmul(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4))
    with pytest.raises(ValueError, match='NaN'): nearest_hurwitz(torch.tensor([[float('nan'), 0., 0., 1.]]))
    with pytest.raises(ValueError, match='zero quaternion'): qinv(torch.zeros(2, 4))

@pytest.mark.cuda
def test_cuda_matches_cpu():
    a, b = rand((1000,), 0, torch.float32), rand((1000,), 1, torch.float32)
    torch.testing.assert_close(qmul(a.cuda(), b.cuda()).cpu(), qmul(a, b))
    u, sec = unit((5000,), 2, torch.float32), unit((96,), 3, torch.float32)
    pi, si, c = best_product(u.cuda(), sec.cuda()); pc, sc, cc = best_product(u, sec)
    torch.testing.assert_close(c.cpu(), cc, rtol=0, atol=1e-5)
    for dt in (torch.float16, torch.bfloat16): assert qmul(a.cuda().to(dt), b.cuda().to(dt)).dtype == dt
