"Tests for tensormem.eval_tc: the MQAR generator, the trainer, NLL helpers, decode scaling, gate report."
import math
import pytest, torch
from hypothesis import given, settings, strategies as st
from tensormem.lm import TinyLM
from tensormem.eval_tc import (mqar_vocab, mqar_batch, lm_loss, train_lm, mqar_accuracy, recall_vs_pairs, byte_stream,
                               random_crops, position_nll, stratified_nll, decode_scaling, state_bytes_after, gate_report)



@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 4), N=st.integers(1, 10), gap=st.integers(0, 12), extra=st.integers(0, 6), nv=st.integers(1, 9),
       seed=st.integers(0, 2**16), data=st.data())
def test_mqar_batch_structure(B, N, gap, extra, nv, seed, data):
    nk = N + extra; nq = data.draw(st.integers(1, N))
    x, y = mqar_batch(B, N, gap, nk, nv, nq, generator=torch.Generator().manual_seed(seed))
    T = 2 * N + gap + 2 * nq
    assert x.shape == y.shape == (B, T) and x.dtype == torch.long
    assert int(x.max()) < mqar_vocab(nk, nv) and int(x.min()) >= 0
    assert (x[:, 2 * N:2 * N + gap] == 0).all()
    for b in range(B):
        keys, vals = x[b, 0:2 * N:2].tolist(), x[b, 1:2 * N:2].tolist()
        assert len(set(keys)) == N and all(1 <= k <= nk for k in keys) and all(nk < v <= nk + nv for v in vals)
        ctx = dict(zip(keys, vals)); q0 = 2 * N + gap
        qs = x[b, q0::2].tolist(); assert len(set(qs)) == nq
        for i, k in enumerate(qs):
            assert y[b, q0 + 2 * i].item() == ctx[k] == x[b, q0 + 2 * i + 1].item()
    assert int((y != -100).sum()) == B * nq


def test_mqar_bad_input():
    with pytest.raises(ValueError, match='`n_pairs` must be in'): mqar_batch(1, 9, 2, n_keys=8)
    with pytest.raises(ValueError, match='`n_queries` must be in'): mqar_batch(1, 3, 2, n_keys=8, n_queries=4)
    with pytest.raises(ValueError, match='`gap` must be'): mqar_batch(1, 3, -1, n_keys=8)


def test_train_lm_learns_previous_token_copy():
    torch.manual_seed(0); m = TinyLM(12, 32, 1, 4, 'window', window=4)
    g = torch.Generator().manual_seed(0)
    def batch(s):
        x = torch.randint(0, 12, (16, 20), generator=g); return x, torch.cat([x[:, :1], x[:, :-1]], 1)
    r = train_lm(m, batch, 80, lr=1e-2)
    assert len(r['losses']) == 80 and r['seconds'] > 0 and not m.training
    x, y = batch(0)
    assert mqar_accuracy(m, x, y) > 0.9            # chance is 1/12
    with pytest.raises(ValueError, match='`steps` must be'): train_lm(m, batch, 0)


def test_mqar_accuracy_counts_only_queries():
    class Oracle(torch.nn.Module):   # predicts the target wherever there is one, token 0 elsewhere
        def __init__(self, y, V): super().__init__(); self.y, self.V = y, V
        def forward(self, x): return torch.nn.functional.one_hot(self.y.clamp(min=0), self.V).float()
    x, y = mqar_batch(3, 4, 5, n_keys=6, n_values=5, generator=torch.Generator().manual_seed(0))
    assert mqar_accuracy(Oracle(y, mqar_vocab(6, 5)), x, y) == 1.0
    y2 = y.clone(); y2[y2 != -100] = 0
    assert mqar_accuracy(Oracle(y2, mqar_vocab(6, 5)), x, y) == 0.0


def test_recall_vs_pairs_shape():
    m = TinyLM(mqar_vocab(8, 4), 32, 1, 4, 'window', window=4).eval()
    r = recall_vs_pairs(m, [1, 3, 8], n_eval=4, gap=2, n_keys=8, n_values=4)
    assert len(r) == 3 and all(0 <= a <= 1 for a in r)


def test_bytes_crops_and_position_nll():
    s = byte_stream('the quick brown fox ' * 20)
    assert s[:3].tolist() == list(b'the') and s.dtype == torch.long
    c = random_crops(s, 5, 17, torch.Generator().manual_seed(0))
    assert c.shape == (5, 17) and all(bytes(r) in bytes(s.tolist()) for r in c.tolist())
    with pytest.raises(ValueError, match='exceeds the stream'): random_crops(s, 1, 10_000)
    with pytest.raises(ValueError, match='non-empty str'): byte_stream('')
    m = TinyLM(256, 32, 1, 4, 'infini', window=4).eval()
    nll = position_nll(m, c, batch_size=2)
    assert nll.shape == (16,)
    torch.testing.assert_close(nll.mean(), lm_loss(m, c[:, :-1], c[:, 1:]), rtol=1e-5, atol=1e-5)


def test_stratified_nll_buckets():
    r = stratified_nll(torch.arange(20.), 4, (1, 2, 8))
    assert r == {'all': 9.5, '<4': 1.5, '≥4': 11.5, '≥8': 13.5}   # 8·4 = 32 ≥ 20 is left out


def test_decode_scaling_flat_for_bounded_linear_for_full():
    for mode in ('window', 'infini', 'tensor_cache'):
        r = decode_scaling(TinyLM(16, 32, 1, 4, mode, window=8).eval(), [64, 256], measure=32)
        assert r[0]['state_bytes'] == r[1]['state_bytes'] and all(d['tok_per_s'] > 0 for d in r)
    r = decode_scaling(TinyLM(16, 32, 1, 4, 'full').eval(), [64, 256], measure=32)
    assert r[1]['state_bytes'] == 4 * r[0]['state_bytes']
    with pytest.raises(ValueError, match='`contexts` must be'): decode_scaling(TinyLM(16, 32, 1, 4), [16], measure=32)


def test_state_bytes_after_matches_formulas():
    L, H, D, W, T = 2, 4, 8, 4, 9
    assert state_bytes_after(TinyLM(10, 32, L, H, 'full'), T) == L * 2 * H * T * D * 4
    assert state_bytes_after(TinyLM(10, 32, L, H, 'window', window=W), T) == L * 2 * H * W * D * 4
    assert state_bytes_after(TinyLM(10, 32, L, H, 'infini', window=W), T) == L * (2 * H * W * D + H * D * D + H * D) * 4
    # Tensor Cache: ring K/V + A (fp32) + one validity byte per ring slot
    assert state_bytes_after(TinyLM(10, 32, L, H, 'tensor_cache', window=W), T) == L * ((2 * H * W * D + H * D * D) * 4 + W)


def test_gate_report_initial_values():
    r = gate_report(TinyLM(10, 32, 2, 4, 'tensor_cache', window=4))
    assert len(r) == 2
    assert math.isclose(r[0]['gate'], 1 / (1 + math.exp(2)), rel_tol=1e-6)
    assert all(math.isclose(v, 0.995, rel_tol=1e-6) for v in r[1]['lam'])
    assert all(math.isclose(v, 0.05, rel_tol=1e-5) for v in r[1]['eta'])
    assert gate_report(TinyLM(10, 32, 1, 4, 'infini', window=4))[0]['gate'] == [0.5] * 4
    assert gate_report(TinyLM(10, 32, 1, 4, 'full')) == []
