"Tests for tensormem.fastweight: per-token writes, the chunked-mean shortcut and the exact weighted-sum scan."
import re, time, statistics
import pytest, torch
from hypothesis import given, settings, strategies as st
from tensormem.fastweight import write_tokens, write_chunk_mean, write_scan, scan_states, decay_weights, check_writes



def _inputs(seed, B, H, T, Dk, Dv, dtype):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, H, Dk, Dv, generator=g, dtype=dtype)
    k, v = torch.randn(B, H, T, Dk, generator=g, dtype=dtype), torch.randn(B, H, T, Dv, generator=g, dtype=dtype)
    lam = torch.rand(H, generator=g, dtype=dtype) * 0.98 + 0.01
    eta = torch.rand(H, generator=g, dtype=dtype) * 0.98 + 0.01
    return A, k, v, lam, eta


def _rel(a, b): return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 3), H=st.integers(1, 4), T=st.integers(1, 70),
       Dk=st.integers(1, 9), Dv=st.integers(1, 9), chunk=st.integers(1, 80))
def test_scan_equals_tokens_float64(seed, B, H, T, Dk, Dv, chunk):
    A, k, v, lam, eta = _inputs(seed, B, H, T, Dk, Dv, torch.float64)
    assert _rel(write_scan(A, k, v, lam, eta, chunk), write_tokens(A, k, v, lam, eta)) < 1e-12


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), T=st.integers(1, 300), chunk=st.integers(1, 128),
       lam=st.floats(0.01, 0.999), eta=st.floats(0.001, 0.99))
def test_scan_equals_tokens_float32(seed, T, chunk, lam, eta):
    A, k, v, _, _ = _inputs(seed, 2, 3, T, 16, 8, torch.float32)
    assert _rel(write_scan(A, k, v, lam, eta, chunk), write_tokens(A, k, v, lam, eta)) < 1e-5


def test_states_are_prefix_states():
    A, k, v, lam, eta = _inputs(0, 2, 3, 29, 5, 4, torch.float64)
    A_end, S = scan_states(A, k, v, lam, eta, 8)
    assert S.shape == (2, 3, 4, 5, 4)
    for n in range(4): torch.testing.assert_close(S[:, :, n], write_tokens(A, k[:, :, :8*n], v[:, :, :8*n], lam, eta))
    torch.testing.assert_close(A_end, write_tokens(A, k, v, lam, eta))
    _, S0 = scan_states(A, k[:, :, :0], v[:, :, :0], lam, eta, 8)
    assert S0.shape == (2, 3, 0, 5, 4)


def test_decay_weights():
    torch.testing.assert_close(decay_weights(torch.tensor([0.5]), 4), torch.tensor([[0.125, 0.25, 0.5, 1.]]))


def test_chunk_mean_is_tokens_only_at_chunk_1():
    A, k, v, lam, eta = _inputs(1, 1, 2, 64, 8, 8, torch.float64)
    ref = write_tokens(A, k, v, lam, eta)
    torch.testing.assert_close(write_chunk_mean(A, k, v, lam, eta, 1), ref)
    for C in (2, 8, 32): assert _rel(write_chunk_mean(A, k, v, lam, eta, C), ref) > 1e-2


def test_chunk_mean_expansion():
    "C² k̄v̄ᵀ = Σ_t k_t v_tᵀ + the C² − C cross products k_i v_jᵀ (i ≠ j), none of them zero."
    g = torch.Generator().manual_seed(3)
    for C in (2, 5, 9):
        kc, vc = torch.randn(2, C, 4, generator=g, dtype=torch.float64)
        cross = [torch.outer(kc[i], vc[j]) for i in range(C) for j in range(C) if i != j]
        assert len(cross) == C*C - C and all(c.abs().max() > 0 for c in cross)
        torch.testing.assert_close(C*C*torch.outer(kc.mean(0), vc.mean(0)), kc.T @ vc + sum(cross))
    # one chunk from A = 0: the shortcut's A is exactly (1/C²)(true + cross), decay error shows from the 2nd chunk on
    A0 = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    k, v = torch.randn(2, 1, 1, 6, 4, generator=g, dtype=torch.float64)
    got = write_chunk_mean(A0, k, v, 0.9, 0.5, 6)[0, 0]
    torch.testing.assert_close(got, 0.5 / 36 * k[0, 0].sum(0)[:, None] * v[0, 0].sum(0)[None])


def test_gradients():
    A, k, v, lam, eta = _inputs(2, 1, 2, 11, 3, 3, torch.float64)
    lam, eta = lam.requires_grad_(), eta.requires_grad_()
    assert torch.autograd.gradcheck(lambda l, e: write_scan(A, k, v, l, e, 4), (lam, eta))


def test_bad_input():
    A, k, v, lam, eta = _inputs(4, 1, 2, 5, 3, 3, torch.float32)
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match='`lam` must lie strictly inside'): write_scan(A, k, v, bad, eta, 2)
        with pytest.raises(ValueError, match='`eta` must lie strictly inside'): write_tokens(A, k, v, lam, bad)
    with pytest.raises(ValueError, match=r'shape \[H\] = \[2\]'): write_scan(A, k, v, torch.full((3,), 0.5), eta, 2)
    with pytest.raises(ValueError, match='`chunk` must be an int'): write_scan(A, k, v, lam, eta, 0)
    with pytest.raises(ValueError, match='`chunk` must be an int'): write_chunk_mean(A, k, v, lam, eta, 2.0)
    for bad in (True, False, 2.0, 1.5, -1, 0, '2'):
        for f in (write_scan, write_chunk_mean):
            with pytest.raises(ValueError, match=re.escape(f'`chunk` must be an int ≥ 1, got {bad!r}')): f(A, k, v, lam, eta, bad)
    assert check_writes(A, k, v, lam, eta, 1)[0].shape == (2,) and check_writes(A, k, v, lam, eta, None)[0].shape == (2,)   # 1 and None are fine
    with pytest.raises(ValueError, match='`A` must have shape'): write_scan(A[..., :2], k, v, lam, eta, 2)
    with pytest.raises(ValueError, match='must share'): write_tokens(A, k, v[:, :, :4], lam, eta)
    with pytest.raises(ValueError, match='`k` must have 4 dims'): write_tokens(A, k[0], v, lam, eta)
    kn = k.clone(); kn[0, 0, 0, 0] = float('nan')
    with pytest.raises(ValueError, match='`k` contains NaN'): write_scan(A, kn, v, lam, eta, 2)
    with pytest.raises(TypeError, match='`v` must be a torch.Tensor'): check_writes(A, k, v.tolist(), lam, eta)




def test_huge_chunk_is_sized_by_T():
    "`chunk` far above T allocates by T: chunk=10**9 on 6 tokens runs at once (it once asked for ~8 GB)."
    A, k, v, lam, eta = _inputs(5, 1, 2, 6, 3, 3, torch.float64)
    t0 = time.perf_counter()
    for f in (write_scan, lambda *a: scan_states(*a)[0], write_chunk_mean):
        torch.testing.assert_close(f(A, k, v, lam, eta, 10**9), write_tokens(A, k, v, lam, eta) if f is not write_chunk_mean
                                   else write_chunk_mean(A, k, v, lam, eta, 6))
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize('lam', [0.995, 0.999])
@pytest.mark.parametrize('how', ['bf16 inputs', 'fp16 inputs', 'autocast'])
def test_half_precision_keeps_decay(lam, how):
    "λ and η stay float32 under 16-bit activations (bf16 would round 0.995 to 0.99609 and 0.999 to 1.0): compare with fp64."
    g = torch.Generator().manual_seed(0)
    dt = torch.float16 if how == 'fp16 inputs' else torch.bfloat16
    k, v = torch.randn(2, 1, 2, 512, 16, generator=g, dtype=torch.float64).to(dt)
    k = (k.double() / k.double().norm(dim=-1, keepdim=True)).to(dt); A0 = torch.zeros(1, 2, 16, 16, dtype=dt)
    ref = write_tokens(A0.double(), k.double(), v.double(), lam, 0.05)
    rel = lambda a: ((a.double() - ref).norm() / ref.norm()).item()
    if how == 'autocast':
        with torch.autocast('cpu', dtype=torch.bfloat16):
            got = [f(A0.float(), k.float(), v.float(), lam, 0.05, 64) for f in (write_scan, write_chunk_mean)][0]
            loop = write_tokens(A0.float(), k.float(), v.float(), lam, 0.05)
        assert got.dtype == torch.float32
    else:
        got, loop = write_scan(A0, k, v, lam, 0.05, 64), write_tokens(A0, k, v, lam, 0.05)
        assert got.dtype == dt and loop.dtype == dt
    assert rel(got) < 5e-3 and rel(loop) < 5e-3
    assert check_writes(A0, k, v, lam, 0.05)[0].dtype == torch.float32


def test_rates_keep_float64():
    A, k, v, lam, eta = _inputs(6, 1, 2, 5, 3, 3, torch.float64)
    assert all(r.dtype == torch.float64 for r in check_writes(A, k, v, 0.9, 0.1))


@pytest.mark.parametrize('case, call, err, match', [
    ('empty T', lambda A, k, v: write_scan(A, k[:, :, :0], v[:, :, :0], 0.9, 0.1, 4), None, None),
    ('empty B', lambda A, k, v: write_scan(A[:0], k[:0], v[:0], 0.9, 0.1, 4), None, None),
    ('meta inputs', lambda A, k, v: write_scan(A.to('meta'), k.to('meta'), v.to('meta'), 0.9, 0.1, 4), ValueError, '`A` is a meta tensor'),
    ('mixed devices', lambda A, k, v: write_scan(A, k.to('meta'), v, 0.9, 0.1, 4), ValueError, '`k` is on meta, `A` on cpu'),
    ('float chunk', lambda A, k, v: write_scan(A, k, v, 0.9, 0.1, 4.0), ValueError, '`chunk` must be an int'),
    ('nan lam', lambda A, k, v: write_scan(A, k, v, float('nan'), 0.1, 4), ValueError, '`lam` must lie strictly inside'),
    ('int A', lambda A, k, v: write_scan(A.long(), k, v, 0.9, 0.1, 4), TypeError, '`A` must be a floating tensor'),
    ('inf v', lambda A, k, v: write_tokens(A, k, v * float('inf'), 0.9, 0.1), ValueError, '`v` contains NaN or Inf'),
])
def test_bad_or_edge_inputs(case, call, err, match):
    "Table: each unusual input gives a clear error naming the argument, or a correct result."
    A, k, v, _, _ = _inputs(7, 2, 2, 5, 3, 3, torch.float32)
    if err is not None:
        with pytest.raises(err, match=match): call(A, k, v)
        return
    out = call(A, k, v)
    if case == 'empty T': torch.testing.assert_close(out, A)                     # no writes: A unchanged (λ⁰ = 1)
    elif case == 'empty B': assert out.shape == (0, 2, 3, 3)
    else: raise AssertionError(case)
