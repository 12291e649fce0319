"Tests for tensormem.tensor_memory: the module, causality, streaming, attach/detach, errors, cost."
import pytest
from conftest import tiny_llama
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from tensormem.tensor_memory import (TensorMemory, MemoryBlock, attach_memory, detach_memory, memory_param_count,
                                     depthwise_taps, soft_write, trilinear_read)
from tensormem.voxel import soft_write_dense



def live(m, seed=0):
    "Give the memory a non-zero out_proj so its reads show in the output."
    with torch.no_grad(): m.out_proj.weight.normal_(generator=torch.Generator().manual_seed(seed))
    return m


def naive(x, m):
    "Per-token recurrence written from SPEC §4 with plain tensors (one batch row, chunk_size 1, dense write)."
    D, H, W = m.grid; C = m.channels
    h = torch.zeros(C, D, H, W, dtype=x.dtype); c = torch.zeros_like(h); ys = []
    for t in range(x.shape[0]):
        mu = torch.tanh(m.loc.weight @ x[t] + m.loc.bias)
        ys.append(torch.sigmoid(m.gate) * (m.out_proj.weight @ trilinear_read(h[None], mu[None, None])[0, 0]))
        v = m.content.weight @ x[t] + m.content.bias
        sig = (F.softplus(m.spread.weight[0] @ x[t] + m.spread.bias[0]) + 1e-4) * m.sigma_scale
        z = torch.cat([soft_write_dense(v[None, None], mu[None, None], sig.view(1, 1), m.grid)[0], h])[None]
        for a, ks in enumerate(((3, 1, 1), (1, 3, 1), (1, 1, 3))):
            z = F.conv3d(z, m.taps[a].view(2 * C, 1, *ks), padding=tuple(k // 2 for k in ks), groups=2 * C)
        i, f, o, g = F.conv3d(z, m.mix.weight, m.mix.bias)[0].chunk(4)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g); h = torch.sigmoid(o) * torch.tanh(c)
    return torch.stack(ys)


def test_matches_naive_recurrence():
    torch.manual_seed(0)
    m = live(TensorMemory(12, channels=3, grid=(3, 4, 5), chunk_size=1, write_impl='dense', sigma_scale=0.3)).double()
    with torch.no_grad(): m.taps.add_(0.1 * torch.randn_like(m.taps))
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
        for b in range(2): torch.testing.assert_close(y[b], naive(x[b], m), rtol=0, atol=1e-10)
    assert y[:, 0].abs().max() == 0          # first chunk reads the zero state
    assert y[:, 1:].abs().max() > 1e-3       # later chunks read something


def test_depthwise_taps_is_conv3d():
    g = torch.Generator().manual_seed(0)
    z, taps = torch.randn(2, 4, 3, 4, 5, generator=g), torch.randn(3, 4, 3, generator=g)
    ref = z
    for a, ks in enumerate(((3, 1, 1), (1, 3, 1), (1, 1, 3))):
        ref = F.conv3d(ref, taps[a].view(4, 1, *ks), padding=tuple(k // 2 for k in ks), groups=4)
    torch.testing.assert_close(depthwise_taps(z, taps), ref)
    m = TensorMemory(8, channels=2)
    assert torch.equal(depthwise_taps(z, m.taps.detach()), z)   # identity init


CONFIGS = [dict(), dict(write='hard'), dict(shared_coords=False), dict(operator='pointwise'), dict(grid=(3, 4, 6)),
           dict(write_impl='local', grid=10), dict(write_impl='dense'), dict(gate_init=-2.0)]


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 2), st.integers(1, 9), st.integers(1, 4), st.sampled_from(range(len(CONFIGS))), st.integers(0, 1000))
def test_causal_shapes_and_future_perturbation(B, N, cs, ci, seed):
    torch.manual_seed(seed)
    m = live(TensorMemory(8, channels=3, chunk_size=cs, **{'grid': 4, **CONFIGS[ci]}), seed)
    x = torch.randn(B, N, 8)
    with torch.no_grad():
        y = m(x)
        assert y.shape == (B, N, 8)
        t = int(torch.randint(0, N, ()))
        x2 = x.clone(); x2[:, t:] = torch.randn_like(x2[:, t:])
        assert torch.equal(m(x2)[:, :t], y[:, :t])


def test_noncausal_sees_the_future_and_causal_does_not():
    torch.manual_seed(1)
    x = torch.randn(2, 10, 8); x2 = x.clone(); x2[:, 6:] += 1.0
    for causal in (True, False):
        m = live(TensorMemory(8, channels=3, grid=4, chunk_size=2, causal=causal))
        with torch.no_grad(): d = (m(x)[:, :6] - m(x2)[:, :6]).abs().max()
        assert (d == 0) if causal else (d > 1e-4)


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 11), st.integers(1, 4), st.integers(0, 1000))
def test_step_equals_forward(N, cs, seed):
    torch.manual_seed(seed)
    m = live(TensorMemory(8, channels=3, grid=5, chunk_size=cs), seed)
    x = torch.randn(2, N, 8)
    with torch.no_grad():
        y, (h, c) = m(x, return_state=True)
        s = m.init_state(2); ys = []
        for i in range(0, N, cs):
            yi, s = m.step(x[:, i:i + cs], s); ys.append(yi)
    torch.testing.assert_close(torch.cat(ys, 1), y)
    torch.testing.assert_close(s[0], h); torch.testing.assert_close(s[1], c)
    # forward from a carried state = forward over the concatenation (chunk-aligned split)
    k = (N // cs) * cs
    if 0 < k < N:
        with torch.no_grad():
            y1, s1 = m(x[:, :k], return_state=True)
            torch.testing.assert_close(torch.cat([y1, m(x[:, k:], state=s1)], 1), y)


def test_gradients_reach_parameters():
    torch.manual_seed(3)
    for kw in CONFIGS:
        m = live(TensorMemory(8, channels=3, chunk_size=2, **{'grid': 5, **kw}))
        m(torch.randn(2, 6, 8)).pow(2).sum().backward()
        dead = {n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().max() == 0}
        assert dead == ({'spread.weight', 'spread.bias'} if kw.get('write') == 'hard' else set()), (kw, dead)
    m = TensorMemory(8, channels=3)   # zero out_proj: only out_proj gets a gradient on the first step
    m(torch.randn(2, 6, 8)).sum().backward()
    assert m.out_proj.weight.grad.abs().max() > 0 and m.loc.weight.grad.abs().max() == 0


def test_bad_input():
    for kw, msg in ((dict(grid=(4, 1, 4)), '>= 2'), (dict(grid=1), '>= 2'), (dict(chunk_size=0), '`chunk_size` must be a positive int'),
                    (dict(chunk_size=-2), 'chunk_size'), (dict(channels=0), '`channels`'), (dict(write='soft'), '`write`'),
                    (dict(operator='full'), '`operator`'), (dict(write_impl='fast'), '`write_impl`')):
        with pytest.raises(ValueError, match=msg): TensorMemory(8, **kw)
    m = TensorMemory(8, chunk_size=2)
    with pytest.raises(ValueError, match=r'`x` must have last dim 8 \(expected \[B, N, E=8\]\)'): m(torch.zeros(1, 4, 6))
    with pytest.raises(ValueError, match='`x` must have 3 dims'): m(torch.zeros(4, 8))
    with pytest.raises(ValueError, match='at least one token'): m(torch.zeros(1, 0, 8))
    with pytest.raises(ValueError, match='more than chunk_size=2'): m.step(torch.zeros(1, 3, 8), m.init_state(1))
    with pytest.raises(ValueError, match='causal'): TensorMemory(8, causal=False).step(torch.zeros(1, 1, 8), m.init_state(1))
    with pytest.raises(ValueError, match='causal'): TensorMemory(8, causal=False).stream(torch.zeros(1, 1, 8))


def test_param_count_pinned():
    assert sum(p.numel() for p in TensorMemory(32, 8).parameters()) == 1341 == memory_param_count(32, 8)
    assert sum(p.numel() for p in TensorMemory(64, 16, grid=6).parameters()) == 4725
    for E, C, sc, op in ((32, 8, False, 'factorised'), (48, 6, True, 'pointwise'), (16, 4, False, 'pointwise')):
        assert sum(p.numel() for p in TensorMemory(E, C, shared_coords=sc, operator=op).parameters()) == memory_param_count(E, C, sc, op)


def test_state_bytes_independent_of_length():
    m = TensorMemory(16, channels=4, grid=(4, 5, 6), chunk_size=3)
    with torch.no_grad():
        sizes = {N: sum(t.nbytes for t in m(torch.randn(2, N, 16), return_state=True)[1]) for N in (1, 7, 60)}
    assert set(sizes.values()) == {m.state_nbytes(2)} == {2 * 2 * 4 * 4 * 5 * 6 * 4}
    assert m.state_nbytes(2, torch.float16) == m.state_nbytes(2) // 2


# ---------- attach / detach ----------

def test_attach_torch_encoder_layer_seq_first():
    torch.manual_seed(4)
    blk = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=False).eval()
    sd = {k: v.clone() for k, v in blk.state_dict().items()}
    x = torch.randn(9, 2, 32); mask = nn.Transformer.generate_square_subsequent_mask(9)
    with torch.no_grad(): ref = blk(x, src_mask=mask, is_causal=True)
    w = attach_memory(blk, channels=4, grid=4, chunk_size=2)
    assert isinstance(w, MemoryBlock) and w.batch_first is False and w.memory.d_model == 32
    with torch.no_grad(): assert torch.equal(w(x, src_mask=mask, is_causal=True), ref)
    live(w.memory)
    with torch.no_grad():
        x2 = x.clone(); x2[5:] = torch.randn_like(x2[5:])
        assert torch.equal(w(x, src_mask=mask, is_causal=True)[:5], w(x2, src_mask=mask, is_causal=True)[:5])
        assert (w(x, src_mask=mask, is_causal=True) - ref).abs().max() > 1e-3
    back = detach_memory(w)
    assert back is blk and set(back.state_dict()) == set(sd)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in sd.items())


def test_attach_batch_first_encoder_layer():
    torch.manual_seed(5)
    blk = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 7, 16)
    with torch.no_grad(): ref = blk(x)
    w = attach_memory(blk, grid=4, chunk_size=3)
    assert w.batch_first is True
    with torch.no_grad(): assert torch.equal(w(x), ref)


def test_attach_errors():
    with pytest.raises(ValueError, match='pass `d_model=`'): attach_memory(nn.Identity())
    with pytest.raises(TypeError, match='`block` must be an nn.Module'): attach_memory(lambda x: x, d_model=4)
    with pytest.raises(TypeError, match='must be a MemoryBlock'): detach_memory(nn.Linear(2, 2))
    w = attach_memory(nn.Identity(), d_model=8)
    with pytest.raises(ValueError, match='already has a memory'): attach_memory(w)
    with pytest.raises(ValueError, match='`chunk_size`'): attach_memory(nn.Identity(), d_model=8, chunk_size=0)


class ViTBlock(nn.Module):
    "A small pre-norm ViT-style block (bidirectional attention + MLP) on [B, N, E]."
    def __init__(self, E=32, heads=4):
        super().__init__()
        self.embed_dim = E
        self.n1, self.attn, self.n2 = nn.LayerNorm(E), nn.MultiheadAttention(E, heads, batch_first=True), nn.LayerNorm(E)
        self.mlp = nn.Sequential(nn.Linear(E, 2 * E), nn.GELU(), nn.Linear(2 * E, E))
    def forward(self, x):
        h = self.n1(x); x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.n2(x))


def test_attach_vit_block_noncausal_vision_gate():
    torch.manual_seed(6)
    blk = ViTBlock().eval(); x = torch.randn(2, 16, 32)
    with torch.no_grad(): ref = blk(x)
    w = attach_memory(blk, channels=4, grid=4, chunk_size=4, causal=False, gate_init=-2.0)
    assert w.memory.gate.item() == -2.0 and w.embed_dim == 32       # attribute access falls through to the block
    with torch.no_grad(): assert torch.equal(w(x), ref)
    live(w.memory)
    with torch.no_grad(): assert (w(x) - ref).abs().max() > 1e-3
    assert detach_memory(w) is blk


def test_attach_hf_llama_layers_identity_and_causal():
    transformers = pytest.importorskip('transformers')
    lm = tiny_llama(seed=7); layers = list(lm.model.layers)
    sd = {k: v.clone() for k, v in lm.state_dict().items()}
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad(): ref = lm(ids).logits
    for i in range(2): lm.model.layers[i] = attach_memory(lm.model.layers[i], channels=4, grid=4, chunk_size=2)
    assert lm.model.layers[0].memory.d_model == 32
    with torch.no_grad(): assert torch.equal(lm(ids).logits, ref)
    for i in range(2): live(lm.model.layers[i].memory, i)
    ids2 = ids.clone(); ids2[:, 7:] = (ids2[:, 7:] + 1) % 64
    with torch.no_grad():
        a, b = lm(ids).logits, lm(ids2).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-5)   # causal through two layers of memory
    assert (a - ref).abs().max() > 1e-4
    for i in range(2): lm.model.layers[i] = detach_memory(lm.model.layers[i])
    assert all(x is y for x, y in zip(lm.model.layers, layers))
    assert set(lm.state_dict()) == set(sd) and all(torch.equal(lm.state_dict()[k], v) for k, v in sd.items())
    with torch.no_grad(): assert torch.equal(lm(ids).logits, ref)


def test_tuple_output_block():
    class TupleBlock(nn.Module):
        def __init__(self): super().__init__(); self.hidden_size = 8; self.lin = nn.Linear(8, 8)
        def forward(self, x, flag=None): return self.lin(x), 'extra'
    torch.manual_seed(8)
    b = TupleBlock(); x = torch.randn(1, 5, 8)
    w = attach_memory(b)
    out = w(x, flag=1)
    assert isinstance(out, tuple) and out[1] == 'extra' and torch.equal(out[0], b(x)[0])
    live(w.memory); assert not torch.equal(w(x)[0], b(x)[0])


def test_double_dtype_follows_block():
    blk = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).double().eval()
    w = attach_memory(blk, grid=3)
    assert w.memory.loc.weight.dtype == torch.float64
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    with torch.no_grad(): assert torch.equal(w(x), blk(x))


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 4), st.lists(st.integers(1, 5), min_size=1, max_size=5), st.integers(0, 1000))
def test_stream_any_split_equals_forward(cs, parts, seed):
    torch.manual_seed(seed)
    m = live(TensorMemory(8, channels=3, grid=4, chunk_size=cs), seed)
    x = torch.randn(2, sum(parts), 8)
    with torch.no_grad():
        ref, cache, ys, a = m(x), None, [], 0
        for p in parts:
            y, cache = m.stream(x[:, a:a + p], cache); ys.append(y); a += p
    torch.testing.assert_close(torch.cat(ys, 1), ref)
    assert (cache['pending'] is None) == (sum(parts) % cs == 0)


def test_hf_generation_streaming_matches_full_forward():
    pytest.importorskip('transformers')
    lm = tiny_llama(seed=9); ids = torch.randint(0, 64, (2, 12))
    for i in range(2):
        lm.model.layers[i] = attach_memory(lm.model.layers[i], channels=4, grid=4, chunk_size=3); live(lm.model.layers[i].memory, i)
    with torch.no_grad():
        full = lm(ids).logits
        o = lm(ids[:, :8], use_cache=True); no_stream = [o.logits]
        for t in range(8, 12): o = lm(ids[:, t:t + 1], cache=o.cache, use_cache=True); no_stream.append(o.logits)
        for l in lm.model.layers: l.stream()
        o = lm(ids[:, :8], use_cache=True); steps = [o.logits]
        for t in range(8, 12): o = lm(ids[:, t:t + 1], cache=o.cache, use_cache=True); steps.append(o.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    assert (torch.cat(no_stream, 1) - full).abs().max() > 1e-4     # without streaming each decode call starts from zero
