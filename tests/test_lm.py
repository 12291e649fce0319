"Tests for tensormem.lm: shapes, causality, streaming == parallel, pinned parameter counts, bad input."
import importlib.util, math
import pytest, torch
from hypothesis import given, settings, strategies as st
from tensormem.lm import (TinyLM, FullAttention, WindowAttention, InfiniAttention, make_attention,
                          shifted_linear_read, generate, state_nbytes, MODES)
from tensormem.tensor_cache import rope, window_attention
from test_tensor_cache import NoHostTraffic

HAS_TC = importlib.util.find_spec('tensormem.tensor_cache') is not None
OWN = ('full', 'window', 'sinks', 'infini')
ALL = OWN + (('tensor_cache',) if HAS_TC else ())


def stream(m, x):
    "Run a module's streaming step over `x [B, T, E]`."
    st_ = m.init_state(x.shape[0]); ys = []
    for t in range(x.shape[1]):
        y, st_ = m.step(x[:, t], st_); ys.append(y)
    return torch.stack(ys, 1)


def dense_window(q, k, v, window, n_sink):
    "Dense [T, T] reference of window + sink attention on un-rotated q, k (StreamingLLM sink positions)."
    T, D = q.shape[-2:]; R = window - n_sink
    pos = torch.arange(T); t, s = pos[:, None], pos[None]
    qr, kr, qs = rope(q, pos), rope(k, pos), rope(q, pos.clamp(max=window - 1))
    ring = (s >= n_sink) & (t - s >= 0) & (t - s < R); sink = (s < n_sink) & (s <= t)
    sc = torch.where(ring, qr @ kr.transpose(-1, -2), qs @ kr.transpose(-1, -2)) / math.sqrt(D)
    return torch.softmax(sc.masked_fill(~(ring | sink), float('-inf')), -1) @ v


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 45), W=st.integers(1, 12), ns=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_window_attention_with_streamingllm_sinks_matches_dense(T, W, ns, seed):
    "The 'sinks' mode's behaviour, pinned: tensor_cache.window_attention with re-positioned sink queries (q_sink)."
    if ns >= W: ns = 0
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, T, 8, generator=g) for _ in range(3))
    pos = torch.arange(T); qs = rope(q, pos.clamp(max=W - 1)) if ns else None
    got = window_attention(rope(q, pos), rope(k, pos), v, W, ns, q_sink=qs)
    torch.testing.assert_close(got, dense_window(q, k, v, W, ns), rtol=1e-5, atol=1e-5)


def test_window_mode_forward_matches_dense():
    "WindowAttention.forward (window and sinks) equals the dense reference on its own projections."
    torch.manual_seed(3)
    for W, ns in ((6, 0), (6, 2), (40, 3)):
        m = WindowAttention(32, 4, W, ns).eval(); x = torch.randn(2, 23, 32)
        with torch.no_grad():
            q, k, v = m.split(x)
            torch.testing.assert_close(m(x), m.merge(dense_window(q, k, v, W, ns)), rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 50), W=st.integers(1, 20), C=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_shifted_linear_read_matches_loop(T, W, C, seed):
    g = torch.Generator().manual_seed(seed)
    phq, phk = (torch.rand(1, 2, T, 4, generator=g) for _ in range(2)); v = torch.randn(1, 2, T, 4, generator=g)
    num, den = shifted_linear_read(phq, phk, v, W, C)
    for t in range(T):
        s = max(t - W + 1, 0)   # keys 0..t-W
        w = (phq[:, :, t, None] * phk[:, :, :s]).sum(-1)   # [1, 2, s]
        torch.testing.assert_close(num[:, :, t], (w[..., None] * v[:, :, :s]).sum(2), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(den[:, :, t], w.sum(-1), rtol=1e-5, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(mode=st.sampled_from(ALL), T=st.integers(1, 40), W=st.integers(2, 10), B=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_streaming_equals_parallel(mode, T, W, B, seed):
    torch.manual_seed(seed)
    m = make_attention(mode, 32, 4, W, n_sink=min(2, W - 1)).eval()
    for p in m.parameters():   # move gates etc. off their init so every path matters
        if p.ndim <= 1: p.data.add_(0.5 * torch.randn_like(p))
    x = torch.randn(B, T, 32)
    with torch.no_grad(): par = m(x)
    torch.testing.assert_close(stream(m, x), par, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('mode', ALL)
def test_lm_shapes_stream_and_causality(mode):
    torch.manual_seed(0)
    m = TinyLM(40, 32, 2, 4, mode, window=6, n_sink=2).eval()
    idx = torch.randint(0, 40, (2, 25))
    with torch.no_grad(): lo = m(idx)
    assert lo.shape == (2, 25, 40)
    st_ = m.init_state(2); out = []
    for t in range(25):
        l, st_ = m.step(idx[:, t], st_); out.append(l)
    torch.testing.assert_close(torch.stack(out, 1), lo, rtol=1e-4, atol=1e-4)
    idx2 = idx.clone(); idx2[:, 15:] = (idx2[:, 15:] + 1) % 40
    with torch.no_grad(): lo2 = m(idx2)
    assert torch.equal(lo[:, :15], lo2[:, :15])          # the past never sees the future
    assert not torch.equal(lo[:, 15:], lo2[:, 15:])


def test_window_is_a_hard_horizon_and_infini_is_not():
    torch.manual_seed(1)
    x = torch.randn(1, 40, 32); x2 = x.clone(); x2[:, 3] += 1
    w, inf = WindowAttention(32, 4, 8).eval(), InfiniAttention(32, 4, 8).eval()
    with torch.no_grad():
        dw = (w(x) - w(x2)).abs().amax(-1)[0]; di = (inf(x) - inf(x2)).abs().amax(-1)[0]
    assert (dw[11:] == 0).all() and (dw[3:11] > 0).all()
    assert (di[11:] > 0).all()


def test_gradients_reach_every_parameter():
    for mode in ALL:
        m = TinyLM(30, 32, 1, 4, mode, window=4, n_sink=1)
        idx = torch.randint(0, 30, (2, 20))
        torch.nn.functional.cross_entropy(m(idx).flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
        missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, (mode, missing)


# pinned: emb 256·64 + 2 blocks × (qkv 3E² + proj E² + 2 LN + MLP 8E²+5E) + final LN; untied adds V·E
PINNED = {'full': (115968, 132352), 'window': (115968, 132352), 'sinks': (115968, 132352), 'infini': (115976, 132360),
          # Tensor Cache adds W_tc (E²), the gate (1) and λ, η logits (2H) per layer
          'tensor_cache': (115968 + 2 * (64 * 64 + 1 + 8), 132352 + 2 * (64 * 64 + 1 + 8))}

@pytest.mark.parametrize('mode', ALL)
def test_parameter_counts_pinned(mode):
    tied = sum(p.numel() for p in TinyLM(256, 64, 2, 4, mode, window=16).parameters())
    untied = sum(p.numel() for p in TinyLM(256, 64, 2, 4, mode, window=16, tie=False).parameters())
    assert (tied, untied) == PINNED[mode]


def test_state_is_bounded_for_bounded_modes_and_grows_for_full():
    sizes = {}
    for mode in ALL:
        m = TinyLM(20, 32, 1, 4, mode, window=8, n_sink=2).eval(); st_ = m.init_state(1); got = []
        for t in range(300):
            _, st_ = m.step(torch.tensor([t % 20]), st_)
            if t + 1 in (100, 300): got.append(state_nbytes(st_))
        sizes[mode] = got
    assert sizes['full'][1] > sizes['full'][0]
    for mode in ALL[1:]: assert sizes[mode][0] == sizes[mode][1], (mode, sizes[mode])
    # window and sinks hold exactly W K/V pairs per head: 2 · B·H·W·D floats
    assert sizes['window'][0] == sizes['sinks'][0] == 2 * 1 * 4 * 8 * 8 * 4


def test_generate_shapes_and_greedy_determinism():
    m = TinyLM(20, 32, 1, 4, 'sinks', window=8, n_sink=2).eval()
    p = torch.randint(0, 20, (2, 4))
    a, b = generate(m, p, 10, temperature=0), generate(m, p, 10, temperature=0)
    assert a.shape == (2, 14) and torch.equal(a, b) and torch.equal(a[:, :4], p)
    s = generate(m, p, 10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert s.shape == (2, 14) and int(s.max()) < 20


def test_bad_input():
    with pytest.raises(ValueError, match='`mode` must be one of'): TinyLM(10, mode='linear')
    with pytest.raises(ValueError, match='divisible by `n_heads`'): FullAttention(30, 4)
    with pytest.raises(ValueError, match='must be even'): FullAttention(12, 4)
    with pytest.raises(ValueError, match='`window` must be an int ≥ 1'): WindowAttention(32, 4, 0)
    with pytest.raises(ValueError, match='`n_sink` must be'): WindowAttention(32, 4, 4, 4)
    with pytest.raises(ValueError, match='`window` must be an int ≥ 1'): InfiniAttention(32, 4, -1)
    with pytest.raises(ValueError, match='`chunk` must be an int'): InfiniAttention(32, 4, 8, chunk=0)
    with pytest.raises(ValueError, match='`x` must have last dim 32'): FullAttention(32, 4)(torch.randn(1, 3, 16))
    with pytest.raises(TypeError, match='`idx` must hold integer token ids'): TinyLM(10)(torch.randn(1, 3))
    with pytest.raises(ValueError, match='`idx` must have 2 dims'): TinyLM(10)(torch.zeros(3, dtype=torch.long))
    assert set(MODES) == {'full', 'window', 'sinks', 'infini', 'tensor_cache'}


@pytest.mark.parametrize('mode', ALL)
def test_decode_step_reads_no_device_value(mode):
    "Every mode's step, on a device whose tensors have no data (meta): past the window, no value read, no host→device copy."
    m = TinyLM(40, 32, 2, 4, mode, window=4, n_sink=1).to('meta').eval()
    with torch.no_grad(), NoHostTraffic():
        st_ = m.init_state(2)
        for t in range(11): lo, st_ = m.step(torch.zeros(2, dtype=torch.long, device='meta'), st_)
    assert lo.shape == (2, 40) and lo.device.type == 'meta'
    for b in m.blocks: b.attn.check_finite = True                          # asked for: the scan reads values
    with torch.no_grad(), NoHostTraffic(), pytest.raises(AssertionError, match='device→host read'):
        m.step(torch.zeros(2, dtype=torch.long, device='meta'), m.init_state(2))


@pytest.mark.parametrize('mode', OWN)
def test_unscanned_nan_shows_in_its_own_sequence(mode):
    "CPU scans by default; with the scan off a NaN input is not masked: its row's output is NaN, the other row's finite."
    torch.manual_seed(0)
    att = make_attention(mode, 32, 4, 4, 1).eval(); x = torch.randn(2, 6, 32); x[0, 2, 7] = float('nan')
    with pytest.raises(ValueError, match='`x_t` contains NaN or Inf'): att.step(x[:, 2], att.init_state(2))
    with pytest.raises(ValueError, match='`x` contains NaN or Inf'): att(x)
    att.check_finite = False
    y = stream(att, x)
    assert y[0, 2].isnan().all() and y[1].isfinite().all() and y[0, :2].isfinite().all()
    with torch.no_grad(): assert att(x)[0, 2].isnan().all()
    with pytest.raises(ValueError, match='`x_t` is on meta, the layer on cpu'):
        att.step(torch.empty(2, 32, device='meta'), att.init_state(2))


def test_infini_read_is_scan_read_and_matches_naive_loop():
    "The Infini memory read (via tensor_cache.scan_read, λ = η = 1) against the streaming loop it unrolls, float64."
    g = torch.Generator().manual_seed(7)
    for T, W, C in ((1, 3, 4), (40, 6, 7), (70, 16, 64), (33, 1, 5)):
        phq, phk = (torch.rand(2, 3, T, 4, generator=g, dtype=torch.float64) for _ in range(2))
        v = torch.randn(2, 3, T, 4, generator=g, dtype=torch.float64)
        M, z, num, den = torch.zeros(2, 3, 4, 4, dtype=torch.float64), torch.zeros(2, 3, 4, dtype=torch.float64), [], []
        for t in range(T):   # streaming: write token t − W, then read
            if t >= W: M = M + phk[:, :, t - W, :, None] * v[:, :, t - W, None]; z = z + phk[:, :, t - W]
            num.append((phq[:, :, t, None] @ M)[:, :, 0]); den.append((phq[:, :, t] * z).sum(-1))
        n, d = shifted_linear_read(phq, phk, v, W, C)
        torch.testing.assert_close(n, torch.stack(num, 2), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(d, torch.stack(den, 2), rtol=1e-12, atol=1e-12)


def _lm(mode='tensor_cache', **kw): return TinyLM(50, 32, 2, 4, mode, window=4, n_sink=1, **kw).eval()


LM_CASES = {   # name: (call, expected exception or None, message or result check)
    'out-of-vocabulary id': (lambda m: m(torch.tensor([[1, 50]])), ValueError, '`idx` holds ids outside [0, 50): min 1, max 50'),
    'negative id': (lambda m: m(torch.tensor([[-1, 2]])), ValueError, '`idx` holds ids outside [0, 50)'),
    'out-of-vocabulary id in step': (lambda m: m.step(torch.tensor([77]), m.init_state(1)), ValueError, '`idx_t` holds ids outside'),
    'float token ids': (lambda m: m(torch.zeros(1, 3)), TypeError, '`idx` must hold integer token ids, got torch.float32'),
    'bool token ids': (lambda m: m.step(torch.zeros(1, dtype=torch.bool), m.init_state(1)), TypeError, '`idx_t` must hold integer token ids'),
    'meta ids, cpu model': (lambda m: m(torch.zeros(1, 3, dtype=torch.long, device='meta')), ValueError, '`idx` is on meta, the model on cpu'),
    'B = 0': (lambda m: m(torch.zeros(0, 5, dtype=torch.long)), None, lambda y: y.shape == (0, 5, 50)),
    'T = 0': (lambda m: m(torch.zeros(2, 0, dtype=torch.long)), None, lambda y: y.shape == (2, 0, 50)),
    'B = 0 step': (lambda m: m.step(torch.zeros(0, dtype=torch.long), m.init_state(0))[0], None, lambda y: y.shape == (0, 50)),
    'empty prompt': (lambda m: generate(m, torch.zeros(1, 0, dtype=torch.long), 3), ValueError, '`prompt` must hold at least one token'),
    'n_new = -1': (lambda m: generate(m, torch.zeros(1, 2, dtype=torch.long), -1), ValueError, '`n_new` must be an int ≥ 0, got -1'),
    'n_new = 2.5': (lambda m: generate(m, torch.zeros(1, 2, dtype=torch.long), 2.5), ValueError, '`n_new` must be an int ≥ 0'),
    'temperature = -1': (lambda m: generate(m, torch.zeros(1, 2, dtype=torch.long), 2, temperature=-1), ValueError, '`temperature` must be a finite number ≥ 0'),
    'temperature = nan': (lambda m: generate(m, torch.zeros(1, 2, dtype=torch.long), 2, temperature=float('nan')), ValueError, '`temperature` must be'),
    'seed instead of generator': (lambda m: generate(m, torch.zeros(1, 2, dtype=torch.long), 2, generator=3), TypeError, '`generator` must be a torch.Generator'),
    'n_new = 0': (lambda m: generate(m, torch.zeros(1, 2, dtype=torch.long), 0), None, lambda y: y.shape == (1, 2)),
    'fp16 input to fp32 attention': (lambda m: m.blocks[0].attn(torch.randn(1, 3, 32).half()), TypeError, '`x` is torch.float16 but the layer is torch.float32'),
    'meta input to cpu attention': (lambda m: m.blocks[0].attn(torch.randn(1, 3, 32, device='meta')), ValueError, '`x` is on meta, the layer on cpu'),
    'window-6 state into window-4 model': (lambda m: m.step(torch.zeros(1, dtype=torch.long), TinyLM(50, 32, 2, 4, 'tensor_cache', window=6).init_state(1)),
                                           ValueError, '`state` was made for n_sink=0, window=6'),
    'vocab_size = 0': (lambda m: TinyLM(0), ValueError, '`vocab_size` must be an int ≥ 1'),
    'batch_size = -1': (lambda m: m.init_state(-1), ValueError, '`batch_size` must be an int ≥ 0'),
}


@pytest.mark.parametrize('mode', ['tensor_cache', 'full', 'window', 'sinks', 'infini'])
@pytest.mark.parametrize('case', list(LM_CASES))
def test_bad_or_unusual_input_table(mode, case):
    "Every unusual input: a clear error naming the argument, or a correct result — in every attention mode."
    import re
    call, err, check = LM_CASES[case]
    if case == 'window-6 state into window-4 model' and mode != 'tensor_cache': pytest.skip('dict states of the other modes carry no geometry')
    m = _lm(mode)
    if err is not None:
        with pytest.raises(err, match=re.escape(check)): call(m)
    else:
        with torch.no_grad(): assert check(call(m))


@pytest.mark.parametrize('mode', ['tensor_cache', 'infini'])
def test_bf16_model_streams_like_parallel(mode):
    "A bfloat16 LM: the memories accumulate in float32 in both forms, so streaming and parallel agree to bf16 rounding."
    torch.manual_seed(0)
    m = TinyLM(50, 32, 2, 4, mode, window=4).to(torch.bfloat16).eval(); idx = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        st = m.init_state(2); out = []
        for t in range(30): lo, st = m.step(idx[:, t], st); out.append(lo)
        par = m(idx)
    rel = ((torch.stack(out, 1).float() - par.float()).norm() / par.float().norm()).item()
    assert rel < 0.05


def test_huge_window_parallel_forward_allocates_by_T():
    import time
    t0 = time.perf_counter()
    for mode in ('window', 'infini', 'tensor_cache'):
        with torch.no_grad(): assert TinyLM(20, 32, 1, 4, mode, window=10**9)(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 20)
    assert time.perf_counter() - t0 < 2.0
