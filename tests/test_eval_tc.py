"Tests for tensormem.eval_tc: the MQAR generator, the trainer, NLL helpers, decode scaling, gate report."
import math
import pytest, torch
from hypothesis import given, settings, strategies as st
from tensormem.lm import TinyLM
from tensormem.core import UsageError
from tensormem.eval_tc import (mqar_vocab, mqar_batch, lm_loss, train_lm, mqar_accuracy, recall_vs_pairs, byte_stream,
                               random_crops, position_nll, stratified_nll, decode_scaling, state_bytes_after, gate_report,
                               memory_off, swap_prefix, main, tc_parser, scaling_table, mqar_table, plant_repeat,
                               repeat_crops, copy_nll, recall_gain)



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
    with pytest.raises(ValueError, match='`n_pairs` must be an int in'): mqar_batch(1, 9, 2, n_keys=8)
    with pytest.raises(ValueError, match='`n_queries` must be an int in'): mqar_batch(1, 3, 2, n_keys=8, n_queries=4)
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


EVAL_CASES = {   # name: (call, exception, message)
    'steps = 0': (lambda m: train_lm(m, None, 0), ValueError, '`steps` must be an int ≥ 1, got 0'),
    'float seed in decode_scaling': (lambda m: decode_scaling(m, [32], measure=16, seed=1.5), ValueError, '`seed` must be an int ≥ 0, got 1.5'),
    'str seed in recall_vs_pairs': (lambda m: recall_vs_pairs(m, [1], seed='0'), ValueError, '`seed` must be an int ≥ 0'),
    'float batch in mqar_batch': (lambda m: mqar_batch(2.0, 3, 4), ValueError, '`batch_size` must be an int ≥ 1'),
    'negative gap': (lambda m: mqar_batch(2, 3, -4), ValueError, '`gap` must be an int ≥ 0'),
    'float token ids to position_nll': (lambda m: position_nll(m, torch.zeros(2, 5)), TypeError, '`seqs` must hold integer token ids'),
    'one-token windows to position_nll': (lambda m: position_nll(m, torch.zeros(2, 1, dtype=torch.long)), ValueError, '≥ 2 tokens'),
    'no sequences to position_nll': (lambda m: position_nll(m, torch.zeros(0, 5, dtype=torch.long)), ValueError, '≥ 1 sequence'),
    'out-of-vocabulary ids to position_nll': (lambda m: position_nll(m, torch.full((2, 5), 99)), ValueError, '`idx` holds ids outside [0, 49)'),
    'swap_prefix with one sequence': (lambda m: swap_prefix(torch.zeros(1, 5, dtype=torch.long), 2), ValueError, '`seqs` needs ≥ 2 sequences'),
    'swap_prefix beyond T': (lambda m: swap_prefix(torch.zeros(2, 5, dtype=torch.long), 6), ValueError, '`n` must be an int in [0, 5]'),
    'zero-length crops': (lambda m: random_crops(torch.arange(10), 2, 0), ValueError, '`length` must be an int ≥ 1'),
    'negative T in state_bytes_after': (lambda m: state_bytes_after(m, -1), ValueError, '`T` must be an int ≥ 0'),
    'second copy past the end': (lambda m: plant_repeat(torch.zeros(2, 10, dtype=torch.long), 4, 2, 1), ValueError, 'the second copy ends at 11, beyond the sequence length 10'),
    'control with one sequence': (lambda m: plant_repeat(torch.zeros(1, 10, dtype=torch.long), 2, 1, 0, control=True), ValueError, '`control` needs ≥ 2 sequences'),
    'zero-length passage': (lambda m: plant_repeat(torch.zeros(2, 10, dtype=torch.long), 0, 1, 0), ValueError, '`n` must be an int ≥ 1'),
    'float gap': (lambda m: plant_repeat(torch.zeros(2, 10, dtype=torch.long), 2, 1.5, 0), ValueError, '`gap` must be an int ≥ 0, got 1.5'),
    'max_gap too large for the crop': (lambda m: repeat_crops(torch.arange(100), 2, 20, 5, 11), ValueError, '`max_gap` must be an int in [0, 10]'),
    'frac outside [0, 1]': (lambda m: repeat_crops(torch.arange(100), 2, 20, 5, 3, frac=-0.1), ValueError, '`frac` must be in [0, 1]'),
    'NaN frac': (lambda m: repeat_crops(torch.arange(100), 2, 20, 5, 3, frac=float('nan')), ValueError, '`frac` must be in [0, 1]'),
}


@pytest.mark.parametrize('case', list(EVAL_CASES))
def test_bad_input_table(case):
    import re
    call, err, msg = EVAL_CASES[case]
    with pytest.raises(err, match=re.escape(msg)): call(TinyLM(mqar_vocab(32, 16), 32, 1, 4, 'tensor_cache', window=4).eval())


def test_memory_off_closes_and_restores_gates():
    torch.manual_seed(0)
    for mode in ('tensor_cache', 'infini'):
        m = TinyLM(20, 32, 2, 4, mode, window=4, **({'gate_init': 3.0} if mode == 'tensor_cache' else {})).eval()
        x = torch.randint(0, 20, (2, 24))
        with torch.no_grad():
            before = m(x)
            with memory_off(m): off = m(x)
            assert torch.equal(m(x), before)                                  # restored
            for b in m.blocks:                                                # the reference: the memory read zeroed out
                if mode == 'tensor_cache': b.attn.W_tc.weight.zero_()
                else: b.attn.beta.fill_(-math.inf)
            torch.testing.assert_close(off, m(x))
        assert not torch.equal(off, before)                                   # the memory mattered beyond the window


def test_swap_prefix_is_invisible_to_the_window_beyond_its_reach():
    "Replace the first n tokens: a window model's NLL beyond n + L(W−1) is bit-identical, Tensor Cache's may move."
    torch.manual_seed(0); L, W, n = 2, 4, 8
    seqs = torch.randint(0, 30, (4, 40))
    sw = swap_prefix(seqs, n)
    assert torch.equal(sw[:, n:], seqs[:, n:]) and torch.equal(sw[1, :n], seqs[0, :n])
    far = n + L * (W - 1)
    win = TinyLM(30, 32, L, 4, 'window', window=W).eval()
    assert torch.equal(position_nll(win, sw)[far:], position_nll(win, seqs)[far:])
    tc = TinyLM(30, 32, L, 4, 'tensor_cache', window=W, gate_init=3.0).eval()
    assert not torch.equal(position_nll(tc, sw)[far:], position_nll(tc, seqs)[far:])


def test_console_job_runs_small_and_refuses_bad_options(capsys):
    assert main(['--contexts', '16,32', '--measure', '8', '--mqar-steps', '2', '--batch', '2']) == 0
    out = capsys.readouterr().out
    assert 'decode scaling on' in out and 'Infini-style' in out and 'MQAR on' in out and 'tensor_cache W=4' in out
    for bad, msg in ((['--seed', '1.5'], "invalid int value: '1.5'"), (['--seed', '-1'], '--seed must be ≥ 0'),
                     (['--contexts', 'a,b'], 'expected comma-separated ints'), (['--measure', '0'], '--measure must be ≥ 1'),
                     (['--contexts', '8', '--measure', '16'], '--measure (16) must be ≤ the smallest context (8)'),
                     (['--threads', '0'], '--threads must be ≥ 1'), (['--device', 'nonsense'], "unknown --device 'nonsense'"),
                     (['--frobnicate'], 'unrecognized arguments')):
        with pytest.raises(UsageError, match=re_escape(msg)): main(bad)
    with pytest.raises(SystemExit) as e: main(['--help'])
    assert e.value.code == 0 and 'tensormem eval tc' in capsys.readouterr().out


def test_console_job_defaults_are_small():
    a = tc_parser().parse_args([])
    assert max(a.contexts) <= 1024 and a.mqar_steps <= 200 and a.batch <= 16
    assert mqar_table('cpu', 1, 2)[0].startswith('MQAR on cpu') and len(scaling_table('cpu', [8], 4)) == 5


@pytest.mark.parametrize('mode', ['tensor_cache', 'full'])
def test_evaluations_move_inputs_to_the_model_device(mode):
    "A model on `meta` gets its inputs on `meta` (the GPU door): nothing is computed on the CPU by mistake."
    m = TinyLM(mqar_vocab(8, 4), 32, 1, 4, mode, window=4).to('meta').eval()
    x, y = mqar_batch(2, 2, 2, n_keys=8, n_values=4)
    with pytest.raises((RuntimeError, NotImplementedError), match='meta'): mqar_accuracy(m, x, y)   # ran on meta, then read a value


@settings(max_examples=25, deadline=None)
@given(N=st.integers(2, 4), n=st.integers(1, 5), gap=st.integers(0, 6), start=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_plant_repeat_copies_and_control_keeps_the_second_copy(N, n, gap, start, seed):
    seqs = torch.randint(0, 50, (N, start + 2 * n + gap + 3), generator=torch.Generator().manual_seed(seed)); s2 = start + n + gap
    rep, ctl = plant_repeat(seqs, n, gap, start), plant_repeat(seqs, n, gap, start, control=True)
    assert torch.equal(rep[:, s2:s2 + n], seqs[:, start:start + n]) and torch.equal(ctl[:, s2:], rep[:, s2:])
    assert torch.equal(ctl[:, start:start + n], seqs.roll(1, 0)[:, start:start + n])           # other content, same positions
    keep = torch.ones(seqs.shape[1], dtype=torch.bool); keep[s2:s2 + n] = False
    assert torch.equal(rep[:, keep], seqs[:, keep]) and torch.equal(seqs, seqs.clone())           # nothing else moved


def test_repeat_crops_plants_one_repeat_per_chosen_crop():
    s = torch.arange(2000) % 997                                             # no 4-token run recurs within 997 tokens
    x = repeat_crops(s, 16, 50, 4, 12, frac=1.0, generator=torch.Generator().manual_seed(0))
    for row in x.tolist():
        hits = [(i, j) for i in range(47) for j in range(i + 4, min(i + 17, 47)) if row[i:i + 4] == row[j:j + 4]]
        assert len(hits) == 1, hits
    assert torch.equal(repeat_crops(s, 5, 50, 4, 12, frac=0.0, generator=torch.Generator().manual_seed(3)),
                       random_crops(s, 5, 50, torch.Generator().manual_seed(3)))
    half = repeat_crops(s, 400, 50, 4, 12, frac=0.5, generator=torch.Generator().manual_seed(1))
    n_rep = sum(any(r[i:i + 4] == r[j:j + 4] for i in range(47) for j in range(i + 4, min(i + 17, 47))) for r in half.tolist())
    assert 150 < n_rep < 250


class _Lookback(torch.nn.Module):
    "Perfect recall stand-in: predicts that token t + 1 repeats token t + 1 − d."
    def __init__(self, d, V): super().__init__(); self.d, self.V, self.b = d, V, torch.nn.Parameter(torch.zeros(()))
    def forward(self, x): return 8. * torch.nn.functional.one_hot(x.roll(self.d - 1, 1), self.V).float() + self.b


def test_recall_gain_sees_recall_and_is_zero_beyond_a_windows_reach():
    sq = torch.randint(0, 16, (16, 30), generator=torch.Generator().manual_seed(0))
    r = recall_gain(_Lookback(12, 16), sq, 5, 7, 2)
    assert r['gain'] > 5 and r['second'] < 0.01 and r['first'] > 5                   # recalls the copy, not the text before
    nll = position_nll(_Lookback(12, 16), plant_repeat(sq, 5, 7, 2))
    assert r['second'] == copy_nll(nll, 14, 5) and copy_nll(nll, 14, 5) == (nll[14:18].mean() / math.log(2)).item()
    torch.manual_seed(0); L, W = 2, 4
    assert recall_gain(TinyLM(16, 32, L, 4, 'window', window=W).eval(), sq, 5, 7, 2)['gain'] == 0.0   # 12 > L(W−1)
    assert recall_gain(TinyLM(16, 32, L, 4, 'tensor_cache', window=W, gate_init=3.0).eval(), sq, 5, 7, 2)['gain'] != 0.0


def re_escape(s): import re; return re.escape(s)
