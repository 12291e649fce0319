"Tests for tensormem.voxel: coordinates, trilinear read, Gaussian soft write (dense, local, auto), hard write."
import math
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from tensormem.voxel import (grid_shape, cell_size, voxel_centres, coord_to_index, index_to_coord, trilinear_read,
                             soft_write_dense, soft_write_local, soft_write_separable, soft_write, hard_write, write_mass, local_offsets,
                             local_reach)
import tensormem.tensor_memory as tm



def trilinear_loop(h, loc):
    "Hand-written trilinear interpolation with border clamping: h [C, D, H, W], loc [3] → [C]."
    C, D, H, W = h.shape
    i = [(float(loc[a].clamp(-1, 1)) + 1) / 2 * (s - 1) for a, s in enumerate((W, H, D))]
    lo = [min(int(math.floor(i[a])), s - 2) for a, s in enumerate((W, H, D))]
    out = torch.zeros(C, dtype=h.dtype)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                n = (lo[0] + dx, lo[1] + dy, lo[2] + dz)
                w = math.prod(1 - abs(i[a] - n[a]) for a in range(3))
                out += w * h[:, n[2], n[1], n[0]]
    return out


def write_loop(content, loc, sigma, grid):
    "The Gaussian soft-write formula, cell by cell: content [N, C], loc [N, 3], sigma [N] → [C, D, H, W]."
    D, H, W = grid
    out = torch.zeros(content.shape[1], D, H, W, dtype=content.dtype)
    for n in range(content.shape[0]):
        for d in range(D):
            for h in range(H):
                for w in range(W):
                    p = torch.tensor([-1 + 2 * w / (W - 1), -1 + 2 * h / (H - 1), -1 + 2 * d / (D - 1)], dtype=content.dtype)
                    out[:, d, h, w] += content[n] * torch.exp(-((p - loc[n]) ** 2).sum() / (2 * sigma[n] ** 2 + 1e-6))
    return out


def test_public_names_reachable_from_tensor_memory():
    assert tm.soft_write is soft_write and tm.trilinear_read is trilinear_read


def test_grid_validation():
    assert grid_shape(3) == (3, 3, 3) and grid_shape((2, 4, 5)) == (2, 4, 5)
    for bad in (1, (4, 1, 4), (4, 4), (4.0, 4, 4), 0):
        with pytest.raises(ValueError, match='grid'):
            grid_shape(bad)
    assert cell_size((3, 5, 9)) == pytest.approx((0.25, 0.5, 1.0))


def test_centres_follow_grid_sample_order():
    P = voxel_centres((2, 3, 4))
    assert P.shape == (2, 3, 4, 3)
    assert torch.allclose(P[0, 1, 2], torch.tensor([1 / 3, 0., -1.]))
    # grid_sample itself: x indexes W, y indexes H, z indexes D
    h = torch.arange(24.).view(1, 1, 2, 3, 4)
    loc = torch.tensor([[[1., -1., -1.], [-1., 1., -1.], [-1., -1., 1.]]])
    assert trilinear_read(h, loc)[0, :, 0].tolist() == [3., 8., 12.]
    idx = coord_to_index(P, (2, 3, 4))
    assert torch.allclose(idx[1, 2, 3], torch.tensor([3., 2., 1.]))
    assert torch.allclose(index_to_coord(idx, (2, 3, 4)), P)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(2, 5), st.integers(2, 5), st.integers(2, 5), st.integers(1, 4), st.integers(0, 10_000))
def test_trilinear_matches_loop(B, C, D, H, W, N, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, C, D, H, W, dtype=torch.float64, generator=g)
    loc = torch.rand(B, N, 3, dtype=torch.float64, generator=g) * 2.4 - 1.2
    r = trilinear_read(h, loc)
    assert r.shape == (B, N, C)
    ref = torch.stack([torch.stack([trilinear_loop(h[b], loc[b, n]) for n in range(N)]) for b in range(B)])
    torch.testing.assert_close(r, ref, rtol=0, atol=1e-12)


def test_trilinear_at_centres_is_exact_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, 2, 4, 5, 6, dtype=torch.float64, generator=g)
    P = voxel_centres((4, 5, 6), torch.float64)
    torch.testing.assert_close(trilinear_read(h, P[2, 3, 1].view(1, 1, 3))[0, 0], h[0, :, 2, 3, 1])
    idx = torch.randint(0, 3, (1, 6, 3), generator=g) + 0.2 + 0.6 * torch.rand(1, 6, 3, dtype=torch.float64, generator=g)
    loc = index_to_coord(idx, (4, 5, 6)).requires_grad_()
    assert torch.autograd.gradcheck(lambda l: trilinear_read(h, l), (loc,))
    assert torch.autograd.gradcheck(lambda hh: trilinear_read(hh, loc.detach()), (h.clone().requires_grad_(),))


def test_trilinear_bad_input():
    h = torch.zeros(1, 2, 3, 3, 3)
    with pytest.raises(ValueError, match='`loc` must have last dim 3'): trilinear_read(h, torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match='`h` must have 5 dims'): trilinear_read(h[0], torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match='batch'): trilinear_read(h, torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match='NaN'): trilinear_read(h, torch.full((1, 1, 3), float('nan')))


def test_dense_write_matches_formula_and_adds():
    g = torch.Generator().manual_seed(1)
    c = torch.randn(2, 3, 2, dtype=torch.float64, generator=g)
    l = torch.rand(2, 3, 3, dtype=torch.float64, generator=g) * 2 - 1
    s = torch.rand(2, 3, dtype=torch.float64, generator=g) * 0.5
    out = soft_write_dense(c, l, s, (3, 4, 5))
    assert out.shape == (2, 2, 3, 4, 5)
    for b in range(2):
        torch.testing.assert_close(out[b], write_loop(c[b], l[b], s[b], (3, 4, 5)), rtol=0, atol=1e-12)
    torch.testing.assert_close(soft_write_separable(c, l, s, (3, 4, 5)), out, rtol=0, atol=1e-12)
    torch.testing.assert_close(soft_write_dense(c[:, :1], l[:, :1], s[:, :1], (3, 4, 5)) + soft_write_dense(c[:, 1:], l[:, 1:], s[:, 1:], (3, 4, 5)), out)


_c, _l, _s = torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 2)
BAD_WRITES = [  # (keyword overrides of (content, loc, sigma, grid, mode, radius), error, message naming the argument)
    (dict(sigma=_s[:, :1]), ValueError, '`sigma` must be'), (dict(sigma=-_s), ValueError, '`sigma` must be >= 0'),
    (dict(sigma=_s * float('nan')), ValueError, '`sigma` contains NaN'), (dict(sigma=_s * float('inf')), ValueError, '`sigma` contains NaN or Inf'),
    (dict(content=_c[:, :1]), ValueError, 'disagree'), (dict(mode='fast'), ValueError, '`mode` must be'),
    (dict(grid=(4, 1, 4)), ValueError, 'grid'), (dict(content=_c.long()), TypeError, '`content` must be a floating'),
    (dict(loc=_l[..., :2]), ValueError, '`loc` must have last dim 3'), (dict(loc=_l * float('nan')), ValueError, '`loc` contains NaN'),
    (dict(radius=-1), ValueError, '`radius` must be a finite number > 0'), (dict(radius=0), ValueError, '`radius`'),
    (dict(radius=float('nan')), ValueError, '`radius`'), (dict(radius=float('inf')), ValueError, '`radius`'),
    (dict(radius='3'), ValueError, '`radius`'), (dict(radius=True), ValueError, '`radius`'),
    (dict(loc=_l.to('meta')), ValueError, '`loc` is on the meta device'), (dict(content=_c.to('meta')), ValueError, '`content` is on the meta device'),
]


@pytest.mark.parametrize('mode', ['auto', 'local', 'separable', 'dense'])
@pytest.mark.parametrize('kw, err, msg', BAD_WRITES)
def test_write_bad_input(kw, err, msg, mode):
    a = dict(content=_c, loc=_l, sigma=_s, grid=4, mode=mode, radius=3.0) | kw
    with pytest.raises(err, match=msg): soft_write(a['content'], a['loc'], a['sigma'], a['grid'], a['mode'], a['radius'])
    if 'mode' not in kw:
        with pytest.raises(err, match=msg): soft_write_local(a['content'], a['loc'], a['sigma'], a['grid'], a['radius'])


@pytest.mark.parametrize('mode', ['auto', 'local', 'separable', 'dense'])
def test_edge_sigmas_give_the_dense_result(mode):
    "σ = 0 (a nearly hard write), σ far above the grid, centres far outside: every form agrees with the formula."
    c = torch.randn(1, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    l = torch.tensor([[[0., 0., 0.], [0.5001, -1., 1.], [40., -3., 0.2]]], dtype=torch.float64)
    for s in (0.0, 1e-4, 0.3, 1e4):
        sig = torch.full((1, 3), s, dtype=torch.float64)
        out = soft_write(c, l, sig, 5, mode=mode, radius=40.)
        torch.testing.assert_close(out, soft_write_dense(c, l, sig, 5), rtol=0, atol=1e-12)
    v = soft_write(torch.ones(1, 1, 1), torch.zeros(1, 1, 3), torch.zeros(1, 1), 5, mode=mode)[0, 0]   # σ = 0 on a centre
    assert v[2, 2, 2] == 1 and v.sum() == 1


def test_work_is_bounded_by_the_grid():
    assert local_reach(1e4, (4, 6, 9))[1] == [8, 5, 3] and local_reach(1e30, 5)[1] == [4, 4, 4]
    assert len(local_offsets(1e4, 6)) == 11 ** 3 and len(local_offsets(1e30, (2, 3, 4))) == 3 * 5 * 7
    c, l = torch.randn(1, 4, 8), torch.rand(1, 4, 3) * 2 - 1
    for s in (1e4, 1e30):                                                         # (2·10⁵)³ offsets before
        out = soft_write_local(c, l, torch.full((1, 4), s), 16)
        torch.testing.assert_close(out, soft_write_separable(c, l, torch.full((1, 4), s), 16))


@settings(max_examples=10, deadline=None)
@given(st.floats(0.05, 0.5), st.floats(-0.9, 0.9), st.floats(-0.9, 0.9), st.floats(-0.9, 0.9), st.sampled_from([(5, 6, 7), (4, 4, 9), 6]))
def test_mass_and_centre_of_mass_exact(sigma, x, y, z, grid):
    loc, s = torch.tensor([[[x, y, z]]], dtype=torch.float64), torch.tensor([[sigma]], dtype=torch.float64)
    v = soft_write_dense(torch.ones(1, 1, 1, dtype=torch.float64), loc, s, grid)[0, 0]
    M, com = write_mass(loc[0, 0], s[0, 0], grid)
    torch.testing.assert_close(v.sum(), M, rtol=1e-10, atol=0)
    torch.testing.assert_close((v[..., None] * voxel_centres(grid, torch.float64)).sum((0, 1, 2)) / v.sum(), com, rtol=0, atol=1e-10)


def test_mass_grows_like_sigma_cubed_and_com_is_mu_in_interior():
    dx = 2 / 32
    sig = torch.tensor([1.0, 1.5, 2.0, 3.0], dtype=torch.float64) * dx
    mu = torch.tensor([0.013, -0.02, 0.031], dtype=torch.float64)
    M, com = write_mass(mu.expand(4, 3), sig, 33)
    torch.testing.assert_close(M, (2 * math.pi * (sig ** 2 + 5e-7)) ** 1.5 / dx ** 3, rtol=1e-6, atol=0)
    torch.testing.assert_close(com, mu.expand(4, 3), rtol=0, atol=1e-7)
    # near a face mass is lost and the centre of mass moves inward, more so for broader writes
    Mb, comb = write_mass(torch.tensor([[0.99, 0., 0.]] * 2, dtype=torch.float64), torch.tensor([0.1, 0.2], dtype=torch.float64), 33)
    M0, _ = write_mass(torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0.1, 0.2], dtype=torch.float64), 33)
    assert (Mb < 0.7 * M0).all() and (Mb > 0.4 * M0).all() and comb[1, 0] < comb[0, 0] < 0.99


def test_local_offsets():
    assert local_offsets(0.0, 5).tolist() == [[0, 0, 0]]
    o = local_offsets(1.5 * 2 / 15, 16)
    assert o.abs().max() == 5 and 500 < len(o) < 16 ** 3 / 4
    # every cell within 3σ of any μ inside the nearest cell's box is covered
    sp = 2 / 15
    frac = torch.rand(2000, 3, generator=torch.Generator().manual_seed(0)) - 0.5
    cube = torch.stack(torch.meshgrid(*[torch.arange(-7, 8)] * 3, indexing='ij'), -1).view(-1, 3)
    inside = (((cube[None] - frac[:, None]) * sp) ** 2).sum(-1) <= (3 * 1.5 * sp) ** 2
    covered = {tuple(t) for t in o.tolist()}
    assert {tuple(t) for t in cube[inside.any(0)].tolist()} <= covered


@settings(max_examples=12, deadline=None)
@given(st.sampled_from([0.2, 0.5, 1.0, 1.5]), st.sampled_from([8, (6, 9, 10), 12]), st.integers(0, 10_000))
def test_local_equals_dense_within_truncation_bound(cells, grid, seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(2, 5, 3, dtype=torch.float64, generator=g)
    l = torch.rand(2, 5, 3, dtype=torch.float64, generator=g) * 2.2 - 1.1
    s = cells * min(cell_size(grid)) * (0.5 + torch.rand(2, 5, dtype=torch.float64, generator=g))
    dense, local = soft_write_dense(c, l, s, grid), soft_write_local(c, l, s, grid)
    assert (dense - local).abs().max() <= math.exp(-4.5) * c.abs().sum(1).max()
    torch.testing.assert_close(soft_write_local(c, l, s, grid, radius=10.), dense, rtol=0, atol=1e-12)


def test_local_truncation_is_real():
    "A cell just past 3σ is dropped by the local form and kept by the dense one."
    loc, s = torch.zeros(1, 1, 3), torch.tensor([[0.1]])
    d, lo = soft_write_dense(torch.ones(1, 1, 1), loc, s, 9)[0, 0], soft_write_local(torch.ones(1, 1, 1), loc, s, 9)[0, 0]
    # centre index 4, spacing 0.25: the cell 2 steps away sits at 0.5 > 3σ = 0.3
    assert d[4, 4, 6] > 0 and lo[4, 4, 6] == 0 and lo[4, 4, 5] == d[4, 4, 5]


def test_local_gradcheck():
    g = torch.Generator().manual_seed(5)
    c = torch.randn(1, 3, 2, dtype=torch.float64, generator=g).requires_grad_()
    l = (torch.rand(1, 3, 3, dtype=torch.float64, generator=g) * 1.6 - 0.8).requires_grad_()
    s = (0.15 + 0.1 * torch.rand(1, 3, dtype=torch.float64, generator=g)).requires_grad_()
    for f in (soft_write_local, soft_write_dense, soft_write_separable):
        assert torch.autograd.gradcheck(lambda c, l, s: f(c, l, s, 5), (c, l, s))


def test_auto_picks_and_hard_write():
    g = torch.Generator().manual_seed(6)
    c, l = torch.randn(2, 5, 3, generator=g), torch.rand(2, 5, 3, generator=g) * 2 - 1
    small, big = torch.full((2, 5), 0.5 * 2 / 15), torch.full((2, 5), 0.8)
    assert torch.equal(soft_write(c, l, small, 16), soft_write_local(c, l, small, 16))
    assert torch.equal(soft_write(c, l, big, 16), soft_write_separable(c, l, big, 16))
    assert torch.equal(soft_write(c, l, big, 16, mode='dense'), soft_write_dense(c, l, big, 16))
    assert torch.equal(soft_write(c, l, small, 16, mode='separable'), soft_write_separable(c, l, small, 16))
    hw = hard_write(c, l, 16)
    torch.testing.assert_close(hw.sum((2, 3, 4)), c.sum(1))
    centres = index_to_coord(coord_to_index(l, 16).round(), 16)
    torch.testing.assert_close(soft_write_dense(c, centres, torch.zeros(2, 5), 16), hw, rtol=0, atol=1e-5)
    assert hard_write(c, torch.full((2, 5, 3), 3.0), 4)[:, :, 3, 3, 3].sub(c.sum(1)).abs().max() < 1e-5  # clamped into the grid



def test_local_write_sigma_grad_finite_at_grid_edge():
    "Regression: a write near a face used an infinite distance for off-grid cells, and inf·0 made dL/dσ NaN."
    torch.manual_seed(0)
    content = torch.randn(1, 2, 4, dtype=torch.float64)
    loc = torch.tensor([[[0.98, 0., 0.], [-0.5, 0.2, 0.1]]], dtype=torch.float64)
    sigma = torch.full((1, 2), 0.1, dtype=torch.float64, requires_grad=True)
    soft_write_local(content, loc, sigma, 8).square().sum().backward()
    assert torch.isfinite(sigma.grad).all(), sigma.grad
    s2 = sigma.detach().clone().requires_grad_(True)
    soft_write_local(content, loc, s2, 8, radius=50.).square().sum().backward()
    s3 = sigma.detach().clone().requires_grad_(True)
    soft_write_dense(content, loc, s3, 8).square().sum().backward()
    torch.testing.assert_close(s2.grad, s3.grad, rtol=1e-9, atol=1e-9)   # untruncated local == dense, gradients too


def test_read_refuses_meta_and_nan():
    h = torch.zeros(1, 2, 3, 3, 3)
    with pytest.raises(ValueError, match='`loc` is on the meta device'): trilinear_read(h, torch.zeros(1, 4, 3, device='meta'))
    with pytest.raises(ValueError, match='`h` is on the meta device'): trilinear_read(h.to('meta'), torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match='`loc` contains NaN'): trilinear_read(h, torch.full((1, 4, 3), float('nan')))
