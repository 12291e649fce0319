"Tests of `tensormem.eval_tm`: the exact window masks, the decoder loop against transformers, memory-only training."
import pytest, torch
import torch.nn.functional as F
pytest.importorskip('transformers')
from tensormem.eval_tm import (window_mask, run_layers, WindowedLM, influence, prefix_states, position_nll, bucket_nll,
                               reset_nll, fit_memory, drop_memories, split_windows, memory_experiment, nll_table)
from tensormem.hf_cache import tiny_llama
from tensormem.tensor_memory import MemoryBlock

def naive_mask(T, window, block):
    m = torch.full((T, T), float('-inf'), dtype=torch.float64)
    for i in range(T):
        for j in range(i + 1):
            if window is None or (i // window == j // window if block else i - j < window): m[i, j] = 0.
    return m

@pytest.fixture
def lm(): return tiny_llama(layers=3).requires_grad_(False)

@pytest.fixture
def ids(): return torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))

@pytest.mark.parametrize('T,w,b', [(1, None, False), (7, None, False), (7, 3, False), (7, 3, True), (9, 4, True), (5, 8, True), (6, 1, True)])
def test_window_mask_matches_loop(T, w, b):
    assert torch.equal(window_mask(T, w, b, dtype=torch.float64)[0, 0], naive_mask(T, w, b))

def test_window_mask_bad_input():
    with pytest.raises(ValueError, match='window'): window_mask(8, 0)
    with pytest.raises((ValueError, TypeError), match='T'): window_mask(0, 4)

def test_loop_equals_transformers(lm, ids):
    full = lm(input_ids=ids, use_cache=False).logits
    assert torch.equal(WindowedLM(lm)(ids), full)

@pytest.mark.parametrize('block', [False, True])
def test_windowed_equals_full_below_window(lm, ids, block):
    full = lm(input_ids=ids, use_cache=False).logits
    assert torch.equal(WindowedLM(lm, 24, block)(ids), full)        # T = W
    assert torch.equal(WindowedLM(lm, 100, block)(ids), full)       # T < W

def test_windowed_differs_beyond_window(lm, ids):
    full = lm(input_ids=ids, use_cache=False).logits
    for block in (False, True): assert not torch.allclose(WindowedLM(lm, 4, block)(ids)[:, 4:], full[:, 4:])

def test_block_window_is_a_hard_horizon(lm, ids):
    "With blocks, a token before the current block cannot move a later token's logits, at any depth."
    for at, W in [(0, 4), (5, 4), (3, 8), (10, 6)]:
        d = influence(WindowedLM(lm, W, block=True), ids, at)
        end = (at // W + 1) * W
        assert (d[:at] == 0).all() and d[at] > 0 and (d[end:] == 0).all()

def test_sliding_window_horizon_is_depth_times_window():
    "One layer: nothing beyond W moves the logits. L layers: the reach is L·(W − 1), and it is reached."
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    for L, W in [(1, 4), (3, 4), (2, 6)]:
        d = influence(WindowedLM(tiny_llama(layers=L).requires_grad_(False), W), ids, 0)
        assert (d[L * (W - 1) + 1:] == 0).all() and d[L * (W - 1)] > 0

def test_prefix_then_top_equals_whole(lm, ids):
    for k in (1, 2):
        top = WindowedLM(lm, 4, True, start=k)(prefix_states(lm, ids, k, 4, True, batch=1))
        torch.testing.assert_close(top, WindowedLM(lm, 4, True)(ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='hs'): run_layers(lm, torch.zeros(1, 4, 7))

def test_position_nll_and_buckets(lm, ids):
    pn = position_nll(WindowedLM(lm), ids[:, :-1], ids[:, 1:])
    full = lm(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(pn, F.cross_entropy(full[:, :-1].transpose(1, 2), ids[:, 1:], reduction='none').mean(0))
    assert bucket_nll(torch.arange(10.), 2) == {'< W': 0.5, 'W–2W': 2.5, '2W–4W': 5.5, '≥ 4W': 8.5}
    with pytest.raises(ValueError, match='must agree'): position_nll(WindowedLM(lm), ids, ids[:, 1:])

def test_reset_nll_is_the_same_model_without_memory(lm, ids):
    "Blocks run as their own sequences: relative positions only, so a block-windowed model gives the same NLL."
    m = WindowedLM(lm, 4, True)
    torch.testing.assert_close(reset_nll(m, ids[:, :20], ids[:, 1:21], 4), position_nll(m, ids[:, :20], ids[:, 1:21]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='must divide'): reset_nll(m, ids[:, :-1], ids[:, 1:], 5)

def test_memory_only_training_keeps_pretrained_bits(lm, ids):
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    hs = prefix_states(lm, ids[:, :-1], 1, 8, True)
    model, fit = fit_memory(lm, hs, ids[:, 1:], [1, 2], 8, steps=4, lr=1e-2, chunk_size=4, channels=2, grid=4)
    assert len(fit['losses']) == 4 and isinstance(lm.model.layers[1], MemoryBlock)
    assert lm.model.layers[2].memory.out_proj.weight.abs().sum() > 0        # the memories trained
    after = lm.state_dict()
    assert all(torch.equal(v, before[k.replace('.block.', '.')]) for k, v in after.items() if '.memory.' not in k)
    assert all(not p.requires_grad for n, p in lm.named_parameters() if '.memory.' not in n)
    drop_memories(lm)
    assert lm.state_dict().keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in lm.state_dict().items())
    with pytest.raises(ValueError, match='`attach`'): fit_memory(lm, hs, ids[:, 1:], [7], 8)

def test_split_windows_disjoint():
    tr, ev = split_windows(torch.arange(1000), 9, 5, 3)
    assert tr.shape == (5, 10) and ev.shape == (3, 10) and tr.max() < ev.min()
    with pytest.raises(ValueError, match='the stream holds 100'): split_windows(torch.arange(1000), 9, 98, 3)

def test_memory_experiment_runs(lm):
    stream = torch.randint(0, 64, (2000,), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    res = memory_experiment(lm, stream, window=4, seq=20, attach=[1, 2], seeds=(0, 1), n_train=8, n_eval=4, steps=2,
                            chunk_size=4, channels=2, grid=4)
    assert len(res['memory']) == len(res['reset']) == 2 and res['memory'][0].shape == (20,) and res['tokens'] == 2 * 2 * 20
    assert torch.equal(res['full'][:4], res['window'][:4]) and not torch.allclose(res['full'][4:], res['window'][4:])
    assert all(torch.equal(v, before[k]) for k, v in lm.state_dict().items())
    assert 'memory − window' in nll_table(res, 4)
