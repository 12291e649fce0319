"Tests for tensormem.tensor_cache: parallel forward == streaming step, the written-out function, padding, gradients, errors."
import math
import pytest, torch
from hypothesis import given, settings, strategies as st
from torch.overrides import TorchFunctionMode
from tensormem.tensor_cache import (TensorCacheAttention, TCState, window_attention, ring_attention, evicted_read,
                                    evicted_read_delta, evicted_stream, rope, unit, rope_angles, rotate, scan_read,
                                    scan_values, check_input)
import tensormem.tensor_cache as tc_mod



def _rel(a, b): return ((a - b).abs().max() / b.abs().max()).item()


def naive_l1(q, k, v, W, n_sink=0, valid=None, q_sink=None):
    T = q.shape[2]; R = W - n_sink; i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    allow = (j <= i) & ((j < n_sink) | (j >= torch.clamp(i - R + 1, min=n_sink)))
    if valid is not None: allow = allow & valid[:, None, None, :]
    s = q @ k.transpose(-1, -2)
    if q_sink is not None: s = torch.where(j < n_sink, q_sink @ k.transpose(-1, -2), s)
    s = (s / math.sqrt(q.shape[-1])).masked_fill(~allow, float('-inf'))
    return torch.nan_to_num(s.softmax(-1), nan=0.) @ v


def naive_l2(q, k, v, lam, eta, W, n_sink=0, valid=None):
    "Streaming definition: at step t ≥ W evict token t − R (write before read), r_t = q_t A_t."
    B, H, T, D = q.shape; R = W - n_sink; kh = k / (k.norm(dim=-1, keepdim=True) + 1e-5)
    ok = torch.ones(B, T, dtype=q.dtype) if valid is None else valid.to(q.dtype)
    A, out = torch.zeros(B, H, D, v.shape[-1], dtype=q.dtype), []
    for t in range(T):
        if t >= W:
            e = t - R
            A = lam[:, None, None] * A + eta[:, None, None] * (kh[:, :, e] * ok[:, e, None, None])[..., None] * v[:, :, e, None, :]
        out.append((q[:, :, t, None] @ A)[:, :, 0])
    return torch.stack(out, 2)


def _pad_mask(g, B, T):
    pm = torch.ones(B, T, dtype=torch.bool)
    if B > 1: pm[1, :int(torch.randint(0, T, (1,), generator=g))] = False              # left padding
    if B > 2: pm[2, T - int(torch.randint(0, T, (1,), generator=g)):] = False          # right padding
    if B > 3: pm[3] = torch.rand(T, generator=g) > 0.3                                  # holes
    return pm


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), T=st.integers(1, 48), W=st.integers(1, 12), n_sink=st.integers(0, 3),
       chunk=st.integers(1, 20), B=st.integers(1, 4), use_rope=st.booleans(), pad=st.booleans())
def test_parallel_equals_streaming_fp32(seed, T, W, n_sink, chunk, B, use_rope, pad):
    n_sink = min(n_sink, W - 1)
    torch.manual_seed(seed); g = torch.Generator().manual_seed(seed)
    mod = TensorCacheAttention(32, 4, W, n_sink=n_sink, chunk=chunk, rope=use_rope, gate_init=1.0,
                               lam=0.9 + 0.09*torch.rand(4, generator=g), eta=0.05 + 0.5*torch.rand(4, generator=g))
    x = torch.randn(B, T, 32, generator=g)
    pm = _pad_mask(g, B, T) if pad else None
    with torch.no_grad():
        par, (seq, state) = mod(x, pm), mod.stream(x, pm)
    assert _rel(par, seq) <= 1e-5
    assert state.t == T


def test_parallel_equals_streaming_fp64_and_reference():
    g = torch.Generator().manual_seed(0)
    for W, ns, C, rp in ((1, 0, 4, False), (5, 0, 3, True), (6, 2, 8, True), (50, 3, 7, False)):
        mod = TensorCacheAttention(16, 2, W, n_sink=ns, chunk=C, rope=rp, gate_init=0.5).double()
        x = torch.randn(3, 31, 16, generator=g, dtype=torch.float64)
        pm = _pad_mask(g, 3, 31)
        with torch.no_grad():
            par = mod(x, pm)
            assert _rel(par, mod.stream(x, pm)[0]) < 1e-12
            q, k, v = mod.qkv(x, torch.arange(31))
            ref = mod.fuse(naive_l1(q, k, v, W, ns, pm), naive_l2(q, k, v, mod.lam.double(), mod.eta.double(), W, ns, pm))
            assert _rel(par, ref) < 1e-12


def test_chunk_does_not_change_result():
    mod = TensorCacheAttention(16, 2, 4, gate_init=2.0).double()
    x = torch.randn(2, 45, 16, dtype=torch.float64)
    with torch.no_grad():
        outs = []
        for C in (1, 2, 7, 16, 45, 100): mod.chunk = C; outs.append(mod(x))
    for o in outs[1:]: assert _rel(o, outs[0]) < 1e-12


@pytest.mark.parametrize('W,ns', [(1, 0), (3, 0), (7, 2), (12, 11), (40, 0), (40, 5)])
def test_window_attention_matches_dense(W, ns):
    g = torch.Generator().manual_seed(W * 10 + ns)
    q, k, v = torch.randn(3, 2, 3, 29, 8, generator=g, dtype=torch.float64)
    valid = torch.rand(2, 29, generator=g) > 0.25
    for val in (None, valid):
        torch.testing.assert_close(window_attention(q, k, v, W, ns, val), naive_l1(q, k, v, W, ns, val), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('W,ns', [(3, 1), (7, 2), (12, 11), (40, 5)])
def test_window_attention_q_sink_matches_dense(W, ns):
    "Separate sink queries (StreamingLLM's re-positioned sinks) score the sink columns only; q_sink=q is the default."
    g = torch.Generator().manual_seed(W * 10 + ns + 1)
    q, k, v, qs = torch.randn(4, 2, 3, 29, 8, generator=g, dtype=torch.float64)
    valid = torch.rand(2, 29, generator=g) > 0.25
    for val in (None, valid):
        torch.testing.assert_close(window_attention(q, k, v, W, ns, val, q_sink=qs), naive_l1(q, k, v, W, ns, val, qs), rtol=1e-12, atol=1e-12)
        assert torch.equal(window_attention(q, k, v, W, ns, val, q_sink=q), window_attention(q, k, v, W, ns, val))
    with pytest.raises(ValueError, match='`q_sink` must have the shape of `q`'): window_attention(q, k, v, W, ns, q_sink=qs[:, :, :5])


def test_window_attention_memory_is_linear_in_T():
    "The largest tensor window_attention creates grows like T·W: far below the T² of a dense score matrix."
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor): self.n = max(getattr(self, 'n', 0), t.numel())
            return out
    sizes = {}
    for T in (1024, 2048):
        q, k, v = torch.randn(3, 1, 2, T, 16)
        with Largest() as m, torch.no_grad(): window_attention(q, k, v, 32)
        sizes[T] = m.n
    assert sizes[2048] <= 2.1 * sizes[1024]
    assert sizes[2048] <= 2 * 2048 * 2 * 32 * 1.05         # B·H·T·2W scores (+ slack), vs T² = 4.2M per head


@pytest.mark.parametrize('W,ns', [(1, 0), (4, 0), (5, 2), (7, 6), (40, 3)])
def test_ring_attention_matches_window_attention_row(W, ns):
    "One query over ring slots (filled as decoding fills them, in slot order) and sinks = that query's row of window_attention."
    g = torch.Generator().manual_seed(W + 100 * ns)
    B, H, T, D, R = 2, 3, 23, 8, W - ns
    q, k, v, qs = torch.randn(4, B, H, T, D, generator=g, dtype=torch.float64)
    valid = torch.rand(B, T, generator=g) > 0.3
    full = window_attention(q, k, v, W, ns, valid, q_sink=qs)
    for t in range(T):
        rk, rv = torch.zeros(2, B, H, R, D, dtype=torch.float64); rok = torch.zeros(B, R, dtype=torch.bool)
        for s in range(max(ns, t - R + 1), t + 1):
            i = (s - ns) % R; rk[:, :, i], rv[:, :, i], rok[:, i] = k[:, :, s], v[:, :, s], valid[:, s]
        sok = valid[:, :ns] & (torch.arange(ns) <= t)
        got = ring_attention(q[:, :, t:t + 1], rk, rv, rok, k[:, :, :ns], v[:, :, :ns], sok, q_sink=qs[:, :, t:t + 1])
        torch.testing.assert_close(got, full[:, :, t:t + 1], rtol=1e-12, atol=1e-12)
    assert ring_attention(q[:, :, :1], k[:, :, :4], v[:, :, :4], torch.zeros(B, 4, dtype=torch.bool)).abs().max() == 0


def test_evicted_read_and_delta():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 2, 3, 26, 5, generator=g, dtype=torch.float64)
    lam, eta = torch.tensor([0.9, 0.5, 0.99], dtype=torch.float64), torch.tensor([0.3, 0.6, 0.1], dtype=torch.float64)
    valid = torch.rand(2, 26, generator=g) > 0.2
    for W, ns in ((1, 0), (4, 0), (6, 3)):
        ref = naive_l2(q, k, v, lam, eta, W, ns, valid)
        for C in (1, 5, 7, 10, 64): torch.testing.assert_close(evicted_read(q, k, v, lam, eta, W, ns, valid, C), ref)
    # delta rule: exact sequential scan of the evicted stream, checked by hand for the first write
    r = evicted_read_delta(q, k, v, lam, eta, 4, 0, None)
    assert r[:, :, :4].abs().max() == 0
    kh = unit(k[:, :, 0]); A = eta[:, None, None] * kh[..., None] * v[:, :, 0, None, :]
    torch.testing.assert_close(r[:, :, 4], (q[:, :, 4, None] @ A)[:, :, 0])
    ks, vs = evicted_stream(k, v, 4, 1, None)
    assert ks[:, :, :4].abs().max() == 0 and ks[:, :, 4].abs().max() > 0     # R = 3: token 0 is a sink (never written), token 1 at step 4


def test_delta_rule_parallel_equals_streaming():
    mod = TensorCacheAttention(16, 2, 5, n_sink=1, rule='delta', rope=True, gate_init=1.0, eta=0.4)
    x = torch.randn(2, 23, 16)
    pm = torch.ones(2, 23, dtype=torch.bool); pm[1, :4] = False
    with torch.no_grad(): assert _rel(mod(x, pm), mod.stream(x, pm)[0]) < 1e-5


def test_l2_starts_exactly_at_window():
    mod = TensorCacheAttention(16, 2, 5, gate_init=3.0).double()
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = mod.qkv(x, torch.arange(12))
        l1 = mod.c_proj(window_attention(q, k, v, 5).transpose(1, 2).reshape(1, 12, 16))
        diff = (mod(x) - l1).abs().amax(-1)[0]
    assert (diff[:5] < 1e-14).all() and (diff[5:] > 1e-8).all()


def test_left_padding_and_masked_writes():
    mod = TensorCacheAttention(16, 2, 4, rope=True, chunk=5, gate_init=1.0).double()
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    junk = torch.randn(1, 6, 16, dtype=torch.float64)
    pm = torch.cat([torch.zeros(1, 6), torch.ones(1, 20)], 1)
    with torch.no_grad():
        ref = mod(x)
        torch.testing.assert_close(mod(torch.cat([junk, x], 1), pm)[:, 6:], ref)
        torch.testing.assert_close(mod(torch.cat([50 * junk, x], 1), pm)[:, 6:], ref)
        torch.testing.assert_close(mod.stream(torch.cat([junk, x], 1), pm)[0][:, 6:], ref)
    # a middle pad token changes nothing it should not see: perturbing it leaves every other position unchanged
    pm2 = torch.ones(1, 20); pm2[0, 3] = 0
    x2 = x.clone(); x2[0, 3] += 10
    with torch.no_grad():
        a, b = mod(x, pm2), mod(x2, pm2)
    keep = torch.arange(20) != 3
    torch.testing.assert_close(a[:, keep], b[:, keep])


def test_gradients_reach_lam_eta_gate():
    torch.manual_seed(0)
    for rule in ('outer', 'delta'):
        mod = TensorCacheAttention(16, 2, 4, rule=rule)
        x = torch.randn(2, 24, 16)
        mod(x).pow(2).mean().backward()
        for n in ('lam_logit', 'eta_logit', 'gate'):
            gr = getattr(mod, n).grad
            assert gr is not None and torch.isfinite(gr).all() and gr.abs().max() > 0, (rule, n)
    # and through the streaming form, agreeing with the parallel gradients
    mod = TensorCacheAttention(16, 2, 3, n_sink=1).double()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    gp = torch.autograd.grad(mod(x).sum(), [mod.lam_logit, mod.eta_logit, mod.gate])
    gs = torch.autograd.grad(mod.stream(x)[0].sum(), [mod.lam_logit, mod.eta_logit, mod.gate])
    for a, b in zip(gp, gs): torch.testing.assert_close(a, b)


def test_init_values_and_param_count():
    mod = TensorCacheAttention(32, 4, 8)
    torch.testing.assert_close(mod.lam, torch.full((4,), 0.995))
    torch.testing.assert_close(mod.eta, torch.full((4,), 0.05))
    assert mod.gate.item() == -2.0 and mod.W_tc.bias is None
    assert sum(p.numel() for p in mod.parameters()) == 4 * (32*32 + 32) + 32*32 + 4 + 4 + 1


def test_state_is_bounded():
    mod = TensorCacheAttention(32, 4, 8, n_sink=2)
    with torch.no_grad():
        _, s1 = mod.stream(torch.randn(2, 5, 32)); _, s2 = mod.stream(torch.randn(2, 60, 32))
    assert isinstance(s2, TCState) and s1.nbytes() == s2.nbytes() and s2.t == 60
    assert s2.ring_k.shape == (2, 4, 6, 8) and s2.sink_k.shape == (2, 4, 2, 8) and s2.A.shape == (2, 4, 8, 8)
    # continuing from a state equals one long run
    x = torch.randn(1, 30, 32)
    with torch.no_grad():
        y1, st = mod.stream(x[:, :13]); y2, _ = mod.stream(x[:, 13:], state=st)
        torch.testing.assert_close(torch.cat([y1, y2], 1), mod(x), rtol=1e-5, atol=1e-5)


def test_step_in_place_when_decoding_functional_under_autograd():
    torch.manual_seed(2)
    mod = TensorCacheAttention(16, 2, 4, n_sink=1, rope=True, gate_init=1.0)
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        _, st = mod.stream(x[:, :9]); keep = st.clone()
        y1, st1 = mod.step(x[:, 9], st)
    assert st1 is st and st.t == 10 and keep.t == 9
    assert not torch.equal(st.ring_k, keep.ring_k) and not torch.equal(st.A, keep.A)     # slot written, token evicted
    y2, st2 = mod.step(x[:, 9], keep)
    assert st2 is not keep and keep.t == 9 and st2.t == 10
    torch.testing.assert_close(y1, y2.detach())
    for a, b in zip(st1.tensors(), st2.tensors()): assert torch.equal(a, b.detach())


def test_decode_step_allocation_is_flat_and_copies_no_buffer():
    "Under no_grad a step allocates the same bytes at any context and never a tensor the size of the ring buffer."
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    class Alloc(TorchDispatchMode):
        def __enter__(self): self.largest = self.total = 0; return super().__enter__()
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ins = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:   # new memory only: outputs that share no storage with an input (views do)
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in ins:
                    self.largest = max(self.largest, t.numel()); self.total += t.numel() * t.element_size()
            return out
    mod = TensorCacheAttention(32, 4, 64, n_sink=4, rope=True).eval()     # D = 8, ring 60 slots
    x = torch.randn(1, 700, 32); seen = {}
    with torch.no_grad():
        _, st = mod.stream(x[:, :100])
        with Alloc() as a: mod.step(x[:, 100], st)
        seen[100] = (a.largest, a.total)
        _, st = mod.stream(x[:, 101:699], state=st)
        with Alloc() as a: mod.step(x[:, 699], st)
        seen[699] = (a.largest, a.total)
    assert seen[100] == seen[699]
    assert seen[100][0] < st.ring_k.numel() // 2          # no clone / cat of the K or V slots


def test_bad_input():
    with pytest.raises(ValueError, match='`window` must be an int ≥ 1'): TensorCacheAttention(32, 4, 0)
    with pytest.raises(ValueError, match='`window` must be an int ≥ 1'): TensorCacheAttention(32, 4, -3)
    with pytest.raises(ValueError, match=r'`d_model` \(30\) must be divisible by `n_heads` \(4\)'): TensorCacheAttention(30, 4, 8)
    with pytest.raises(ValueError, match='`n_sink`'): TensorCacheAttention(32, 4, 8, n_sink=8)
    for bad in (0.0, 1.0, 1.2, -0.1):
        with pytest.raises(ValueError, match='`lam` must lie strictly inside'): TensorCacheAttention(32, 4, 8, lam=bad)
        with pytest.raises(ValueError, match='`eta` must lie strictly inside'): TensorCacheAttention(32, 4, 8, eta=bad)
    with pytest.raises(ValueError, match=r'shape \[H\] = \[4\]'): TensorCacheAttention(32, 4, 8, lam=[0.9, 0.9])
    with pytest.raises(ValueError, match='rule'): TensorCacheAttention(32, 4, 8, rule='chunk-start')
    with pytest.raises(ValueError, match='even head dim'): TensorCacheAttention(12, 4, 8, rope=True)
    mod = TensorCacheAttention(32, 4, 8)
    with pytest.raises(ValueError, match='`x` must have last dim 32'): mod(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match='`x` must have 3 dims'): mod(torch.randn(5, 32))
    with pytest.raises(ValueError, match='`pad_mask` must be a tensor of shape'): mod(torch.randn(2, 5, 32), torch.ones(2, 4))
    with pytest.raises(ValueError, match='`x_t` must have 2 dims'): mod.step(torch.randn(2, 1, 32), mod.init_state(2))
    with pytest.raises(ValueError, match='`state` holds batch 2'): mod.step(torch.randn(3, 32), mod.init_state(2))
    with pytest.raises(ValueError, match='`x` contains NaN'): mod(torch.full((1, 3, 32), float('nan')))


def test_rope_is_relative():
    x = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    a, b = rope(x, torch.arange(6)), rope(x, torch.arange(6) + 11)
    torch.testing.assert_close(a @ a.transpose(-1, -2), b @ b.transpose(-1, -2))
    torch.testing.assert_close(a.norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_rope_angles_are_float64(dtype):
    "Far positions rotate as exactly as near ones (float32 angles at 30 000 are off by ~2e-3 rad); output keeps x's dtype."
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 16, generator=g, dtype=torch.float64)
    for pos in (torch.arange(5), torch.arange(5) + 30_000, torch.arange(5) + 1_000_000):
        y = rope(x.to(dtype), pos)
        assert y.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(y.double(), rope(x.to(dtype).double(), pos), rtol=tol, atol=tol)
        torch.testing.assert_close(rope(rope(x, pos), -pos), x, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
def test_parallel_equals_streaming_cuda():
    torch.manual_seed(0)
    mod = TensorCacheAttention(64, 4, 16, n_sink=2, chunk=8, rope=True, gate_init=1.0).cuda()
    x = torch.randn(3, 70, 64, device='cuda')
    pm = torch.ones(3, 70, dtype=torch.bool, device='cuda'); pm[1, :9] = False; pm[2, 60:] = False
    with torch.no_grad(): assert _rel(mod(x, pm), mod.stream(x, pm)[0]) <= 1e-5


class NoHostTraffic(TorchFunctionMode):
    "Fail on host↔device traffic of non-CPU tensors: a value read (`item`, `bool`, ...) or a tensor built or copied from host data."
    READS = {'item', '__bool__', 'tolist', 'cpu', 'numpy', '__float__', '__int__', '__index__'}
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs, name = kwargs or {}, getattr(func, '__name__', '')
        dev = lambda a: isinstance(a, torch.Tensor) and a.device.type != 'cpu'
        host = lambda a: isinstance(a, torch.Tensor) and a.device.type == 'cpu'
        if name in ('tensor', 'as_tensor') and torch.device(kwargs.get('device') or 'cpu').type != 'cpu':
            raise AssertionError(f"host→device copy: torch.{name}(..., device={kwargs['device']})")
        if name in self.READS and args and dev(args[0]): raise AssertionError(f"device→host read: Tensor.{name}")
        if name == 'to' and args and host(args[0]) and any(
                isinstance(a, (str, torch.device)) and torch.device(a).type != 'cpu' for a in (*args[1:], kwargs.get('device'))):
            raise AssertionError("host→device copy: Tensor.to")
        if name in ('copy_', '__setitem__') and args and dev(args[0]) and host(args[-1]):
            raise AssertionError(f"host→device copy: Tensor.{name}")
        return func(*args, **kwargs)


def test_no_host_traffic_guard_catches_syncs_and_copies():
    "The guard itself: each kind of host↔device traffic it is meant to catch raises inside it, device-made tensors do not."
    m = torch.zeros(3, device='meta')
    with NoHostTraffic():
        for bad in (lambda: torch.tensor([3], device='meta'), lambda: bool(m.sum()), lambda: m.sum().item(),
                    lambda: torch.ones(2).to('meta'), lambda: m.copy_(torch.ones(3)), lambda: m.__setitem__(0, torch.ones(()))):
            with pytest.raises(AssertionError): bad()
        torch.arange(3, 4, device='meta'); m[0] = True; torch.tensor([3]); bool(torch.ones(()))   # fine: no traffic


def test_scan_values_decision():
    "The NaN/Inf scan reads values: by default on the CPU only (no sync there); `check_finite` forces it on or off."
    cpu, meta = torch.zeros(2), torch.zeros(2, device='meta')
    assert scan_values(cpu) and not scan_values(meta)
    assert scan_values(meta, True) and not scan_values(cpu, False)
    mod = TensorCacheAttention(32, 4, 8)
    assert mod.check_finite is None and TensorCacheAttention(32, 4, 8, check_finite=True).check_finite is True


@pytest.mark.parametrize('rule', ['outer', 'delta'])
def test_decode_step_reads_no_device_value(rule):
    "On a device whose tensors have no data (meta), steps through sinks, ring wrap and evictions read no value and copy none in."
    mod = TensorCacheAttention(32, 4, 5, n_sink=2, rope=True, rule=rule).to('meta')
    with torch.no_grad(), NoHostTraffic():
        st = mod.init_state(3)
        for t in range(12): y, st = mod.step(torch.empty(3, 32, device='meta'), st, torch.ones(3, dtype=torch.bool, device='meta'))
        y2, _ = mod.stream(torch.empty(3, 4, 32, device='meta'))
    assert y.shape == (3, 32) and y.device.type == 'meta' and st.t == 12 and y2.shape == (3, 4, 32)
    mod.check_finite = True                                               # asked for: the scan reads values
    with torch.no_grad(), NoHostTraffic(), pytest.raises(AssertionError, match='device→host read'):
        mod.step(torch.empty(3, 32, device='meta'), st)


def test_unscanned_nan_propagates_to_its_own_sequence():
    "With the scan off a NaN is neither dropped nor masked: its sequence's outputs turn NaN from that step on, the others stay finite."
    torch.manual_seed(0)
    mod = TensorCacheAttention(16, 2, 4, n_sink=1, rope=True, gate_init=1.0)
    x = torch.randn(3, 12, 16); x[1, 4, 3] = float('nan'); x[2, 6, 0] = float('inf')
    pm = torch.ones(3, 12, dtype=torch.bool)
    with torch.no_grad():
        with pytest.raises(ValueError, match='`x_t` contains NaN or Inf'): mod.step(x[:, 4], mod.init_state(3))
        with pytest.raises(ValueError, match='`x` contains NaN or Inf'): mod(x)
        mod.check_finite = False
        y, _ = mod.stream(x, pm)
    assert y[0].isfinite().all() and y[1, :4].isfinite().all() and y[2, :6].isfinite().all()
    assert y[1, 4:].isnan().all() and not y[2, 6:].isfinite().any()


def test_step_checks_device_against_the_state():
    mod = TensorCacheAttention(32, 4, 8)
    with pytest.raises(ValueError, match='`x_t` is on meta, the layer on cpu'):
        mod.step(torch.empty(2, 32, device='meta'), mod.init_state(2))
    with pytest.raises(TypeError, match='`x` must be a torch.Tensor'): check_input([1.0], 'x')


def test_rope_angles_once_per_step(monkeypatch):
    "q and k of a step share positions: the angles are computed once, and rotating by them equals `rope` bit for bit."
    x, pos = torch.randn(2, 3, 5, 8), torch.arange(5) + 1000
    assert torch.equal(rotate(x, rope_angles(pos, 8, dtype=x.dtype)), rope(x, pos))
    calls = []
    real = tc_mod.rope_angles
    monkeypatch.setattr(tc_mod, 'rope_angles', lambda *a, **k: calls.append(1) or real(*a, **k))
    mod = TensorCacheAttention(32, 4, 6, rope=True)
    with torch.no_grad():
        st = mod.init_state(2)
        for _ in range(5): _, st = mod.step(torch.randn(2, 32), st)
    assert len(calls) == 5


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 40), C=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_scan_read_matches_per_token_loop(T, C, seed):
    "scan_read == the per-token memory A ← λA + η k vᵀ, r = qA, including λ = η = 1 (the Infini memory's plain sum)."
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 3, T, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, T, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, T, 5, generator=g, dtype=torch.float64)
    lam, eta = torch.tensor([1., 0.9, 0.5], dtype=torch.float64), torch.tensor([1., 0.3, 0.7], dtype=torch.float64)
    A, ref = torch.zeros(2, 3, 4, 5, dtype=torch.float64), []
    for t in range(T):
        A = lam[:, None, None] * A + eta[:, None, None] * k[:, :, t, :, None] * v[:, :, t, None, :]; ref.append((q[:, :, t, None] @ A)[:, :, 0])
    torch.testing.assert_close(scan_read(q, k, v, lam, eta, C), torch.stack(ref, 2), rtol=1e-12, atol=1e-12)


def _l2_read(mod, x, streaming=False):
    "The L2 read `r` at every position, as W_tc receives it, in float64."
    got = []; h = mod.W_tc.register_forward_hook(lambda m, i, o: got.append(i[0]))
    with torch.no_grad(): mod.stream(x) if streaming else mod(x)
    h.remove(); return torch.cat([r.reshape(x.shape[0], -1, x.shape[-1]) for r in got], 1).double()


@pytest.mark.parametrize('lam', [0.995, 0.999])
@pytest.mark.parametrize('how', ['bf16 module', 'fp16 module', 'bf16 autocast', 'bf16 streaming'])
@pytest.mark.parametrize('rule', ['outer', 'delta'])
def test_half_precision_l2_read_matches_fp64(lam, how, rule):
    "λ, η and the L2 sums stay in fp32 under 16-bit activations: the read agrees with fp64 to 16-bit rounding (it was 15–24 % off)."
    torch.manual_seed(0)
    T = 40 if rule == 'delta' else 240
    m64 = TensorCacheAttention(32, 2, 8, lam=lam, rope=True, rule=rule).double()
    mod = TensorCacheAttention(32, 2, 8, lam=lam, rope=True, rule=rule); mod.load_state_dict(m64.state_dict())
    dt = torch.float16 if how == 'fp16 module' else torch.bfloat16
    if how != 'bf16 autocast': mod.to(dt)
    assert mod.lam_logit.dtype == torch.float32 and abs(mod.lam[0].item() - lam) < 1e-6
    x = torch.randn(2, T, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _l2_read(m64, x, how == 'bf16 streaming')
    if how == 'bf16 autocast':
        with torch.autocast('cpu', dtype=torch.bfloat16): got = _l2_read(mod, x.float())
    else: got = _l2_read(mod, x.to(dt), how == 'bf16 streaming')
    assert ((got - ref)[:, 8:].norm() / ref[:, 8:].norm()).item() < 0.02


def test_half_state_keeps_A_in_fp32():
    mod = TensorCacheAttention(16, 2, 4).to(torch.bfloat16)
    st = mod.init_state(2)
    assert st.A.dtype == torch.float32 and st.ring_k.dtype == torch.bfloat16
    with torch.no_grad(): y, st = mod.stream(torch.randn(2, 9, 16).bfloat16(), state=st)
    assert y.dtype == torch.bfloat16 and st.A.dtype == torch.float32 and st.A.abs().max() > 0


def _tc_case(case):
    "Build (callable, expected exception or None, match or a result check) for one unusual input."
    mod = TensorCacheAttention(16, 2, 4, n_sink=1, rope=True)
    x = torch.randn(2, 7, 16)
    with torch.no_grad(): _, st6 = TensorCacheAttention(16, 2, 6, n_sink=1).stream(x)
    return {
        'window-6 state into window-4 layer': (lambda: mod.step(x[:, 0], st6), ValueError, '`state` was made for n_sink=1, window=6'),
        'state of another head dim': (lambda: mod.step(x[:, 0], TensorCacheAttention(16, 4, 4, n_sink=1).init_state(2)), ValueError, '4 heads of dim 4'),
        'dict as state': (lambda: mod.step(x[:, 0], {'t': 0}), TypeError, '`state` must be a TCState'),
        'B = 0 forward': (lambda: mod(x[:0]), None, lambda y: y.shape == (0, 7, 16)),
        'T = 0 forward': (lambda: mod(x[:, :0]), None, lambda y: y.shape == (2, 0, 16)),
        'T = 0 stream': (lambda: mod.stream(x[:, :0])[0], None, lambda y: y.shape == (2, 0, 16)),
        'B = 0 stream': (lambda: mod.stream(x[:0])[0], None, lambda y: y.shape == (0, 7, 16)),
        'B = 0 state': (lambda: mod.init_state(0).A, None, lambda A: A.shape == (0, 2, 8, 8)),
        'negative batch_size': (lambda: mod.init_state(-1), ValueError, '`batch_size` must be an int ≥ 0'),
        'meta input, cpu layer': (lambda: mod(x.to('meta')), ValueError, '`x` is on meta, the layer on cpu'),
        'meta input to step': (lambda: mod.step(x[:, 0].to('meta'), mod.init_state(2)), ValueError, '`x_t` is on meta, the layer on cpu'),
        'meta layer and input': (lambda: TensorCacheAttention(16, 2, 4).to('meta')(x.to('meta')), None, lambda y: y.device.type == 'meta'),
        'fp16 input, fp32 layer': (lambda: mod(x.half()), TypeError, '`x` is torch.float16 but the layer is torch.float32'),
        'fp64 input, fp32 layer': (lambda: mod.stream(x.double()), TypeError, '`x` is torch.float64 but the layer is torch.float32'),
        'int input': (lambda: mod(x.long()), TypeError, '`x` must be a floating tensor'),
        'NaN input': (lambda: mod(x * float('nan')), ValueError, '`x` contains NaN or Inf'),
        'wrong width': (lambda: mod(x[..., :15]), ValueError, '`x` must have last dim 16'),
        'pad_mask of wrong shape': (lambda: mod(x, torch.ones(2, 6)), ValueError, '`pad_mask` must be a tensor of shape [2, 7]'),
        'float chunk': (lambda: TensorCacheAttention(16, 2, 4, chunk=8.0), ValueError, '`chunk` must be an int ≥ 1'),
        'λ = 1': (lambda: TensorCacheAttention(16, 2, 4, lam=1.0), ValueError, '`lam` must lie strictly inside (0, 1)'),
    }[case]


@pytest.mark.parametrize('case', ['window-6 state into window-4 layer', 'state of another head dim', 'dict as state', 'B = 0 forward',
                                  'T = 0 forward', 'T = 0 stream', 'B = 0 stream', 'B = 0 state', 'negative batch_size',
                                  'meta input, cpu layer', 'meta input to step', 'meta layer and input', 'fp16 input, fp32 layer',
                                  'fp64 input, fp32 layer', 'int input', 'NaN input', 'wrong width', 'pad_mask of wrong shape',
                                  'float chunk', 'λ = 1'])
def test_bad_or_unusual_input_table(case):
    "Each unusual input: a clear error naming the argument, or a correct result."
    call, err, check = _tc_case(case)
    if err is not None:
        with pytest.raises(err, match=re_escape(check)): call()
    else:
        with torch.no_grad(): assert check(call())


def re_escape(s): import re; return re.escape(s)


def test_huge_window_or_chunk_allocates_by_T():
    "A window or chunk far beyond T is sized by T in the parallel form (a 10⁹ window once padded 10⁹ rows)."
    import time
    x = torch.randn(2, 6, 16)
    t0 = time.perf_counter()
    with torch.no_grad():
        for W, C in ((10**9, 64), (4, 10**9), (10**9, 10**9)):
            mod = TensorCacheAttention(16, 2, W, chunk=C, gate_init=1.0)
            y = mod(x)
            assert y.shape == x.shape and torch.isfinite(y).all()
    assert time.perf_counter() - t0 < 2.0
