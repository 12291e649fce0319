"Tests of `tensormem.eval_tm`: the exact window masks, the decoder loop against transformers, memory-only training."
import pytest, torch
import torch.nn.functional as F
pytest.importorskip('transformers')
from tensormem.eval_tm import (window_mask, run_layers, WindowedLM, influence, prefix_states, position_nll, bucket_nll,
                               reset_nll, fit_memory, drop_memories, split_windows, memory_experiment, nll_table,
                               bounce, bouncing_digits, next_frame_pairs, FrameNet, frame_nll, fit_frame_memory, digits_experiment)
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


# --- moving digits ---------------------------------------------------------------------------------------------------
def bounce_loop(p, v, T, M):
    out = []
    for _ in range(T):
        out.append(p); p += v
        if p < 0 or p > M: v, p = -v, (-p if p < 0 else 2 * M - p)
    return out

@pytest.fixture
def digits():
    pytest.importorskip('sklearn', reason='the moving digits need scikit-learn (a dev requirement)')
    from tensormem.toys import digit_images
    return digit_images

@pytest.mark.parametrize('p0,v,M', [(6, 1, 8), (0, -1, 8), (3, 1, 3), (5, 0, 8), (2, -1, 5), (1, 1, 1)])
def test_bounce_matches_simulation(p0, v, M):
    assert bounce(p0 + v * torch.arange(40), M).tolist() == bounce_loop(p0, v, 40, M)

def test_bounce_bad_wall():
    with pytest.raises(ValueError, match='`M`'): bounce(torch.arange(4), 0)

def test_bouncing_digits_shapes_canvas_and_occluder(digits):
    x, pos, lab = bouncing_digits(32, T=30, size=12, hide=(5, 9), seed=1)
    assert x.shape == (32, 30, 12, 12) and pos.shape == (32, 30, 2) and lab.shape == (32,)
    assert ((pos >= 0) & (pos <= 4)).all()                                    # the 8×8 digit stays on the 12×12 canvas
    assert (pos[:, 1:] - pos[:, :-1]).abs().max() <= 1                        # one pixel per frame at most, bounces included
    ink = x.flatten(2).sum(-1) > 0
    assert not ink[:, 5:14].any() and ink[:, :5].all() and ink[:, 14:].all()  # blank exactly during `hide`
    imgs, labels = digits('train')
    for n, t in [(0, 0), (3, 20), (31, 29)]:                                  # the digit sits at its top-left cell, nothing else drawn
        r, c = pos[n, t].tolist(); patch = x[n, t, r:r + 8, c:c + 8]
        assert any(torch.equal(patch, im) for im in imgs[labels == lab[n]]) and x[n, t].sum() == patch.sum()

def test_bouncing_digits_seeded_and_split(digits):
    a, b = bouncing_digits(8, seed=4), bouncing_digits(8, seed=4)
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and not torch.equal(a[0], bouncing_digits(8, seed=5)[0])
    assert not torch.equal(a[0], bouncing_digits(8, seed=4, split='test')[0])
    tr, te = digits('train')[0].flatten(1), digits('test')[0].flatten(1)
    assert len(tr) + len(te) == 1797 and (torch.cdist(tr, te) > 0).all()     # no evaluation image is a training image

@pytest.mark.parametrize('kw,arg', [(dict(n=0), '`n`'), (dict(T=1), '`T`'), (dict(size=8), '`size`'), (dict(hide=(50, 1)), 'hide[0]'),
                                    (dict(hide=(30, 20)), 'hide[1]'), (dict(hide=(1, 2, 3)), '`hide`'), (dict(split='val'), '`split`'),
                                    (dict(seed=-1), '`seed`'), (dict(n=2.0), '`n`')])
def test_bouncing_digits_bad_input(digits, kw, arg):
    with pytest.raises(ValueError, match=arg.replace('[', r'\[')): bouncing_digits(**{'n': 2, **kw})

def test_digits_need_sklearn(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, 'sklearn', None); monkeypatch.setitem(sys.modules, 'sklearn.datasets', None)
    with pytest.raises(ImportError, match='scikit-learn'): bouncing_digits(2)

def test_next_frame_pairs(digits):
    f = bouncing_digits(4, T=9, hide=(2, 3))[0]; x, y = next_frame_pairs(f)
    assert x.shape == y.shape == (4, 8, 256) and y.dtype == torch.long
    assert torch.equal(x[:, 2], f[:, 2].flatten(1)) and torch.equal(y[:, 2], (f[:, 3].flatten(1) >= 0.5).long())
    with pytest.raises(ValueError, match='`frames`'): next_frame_pairs(f[0])

def test_frame_net_block_horizon_and_reset():
    torch.manual_seed(0); net = FrameNet(16, 4, d_model=8, n_layers=2, n_heads=2).eval(); x = torch.rand(2, 12, 16)
    assert net(x).shape == (2, 12, 16, 2) and (net(x)[..., 0] == 0).all()
    torch.testing.assert_close(net(x, reset=True), net(x), rtol=1e-5, atol=1e-5)
    for at in (0, 5, 11):
        x2 = x.clone(); x2[:, at] = torch.rand(16); d = (net(x2) - net(x)).abs().amax((0, 2, 3))
        end = (at // 4 + 1) * 4
        assert (d[:at] == 0).all() and d[at] > 0 and (d[end:] == 0).all()
    full = FrameNet(16, None, d_model=8, n_layers=2, n_heads=2).eval(); x2 = x.clone(); x2[:, 0] = 0
    assert ((full(x2) - full(x)).abs().amax((0, 2, 3)) > 0).all()            # full attention: frame 0 reaches every position
    with pytest.raises(ValueError, match='must divide'): net(x[:, :10], reset=True)
    with pytest.raises(ValueError, match='`x`'): net(x[..., :5])
    with pytest.raises(ValueError, match='max_len'): net(torch.rand(1, 80, 16))

def test_frame_nll_is_summed_pixel_bce():
    torch.manual_seed(0); net = FrameNet(16, 4, d_model=8, n_layers=1, n_heads=2).eval()
    x, y = torch.rand(3, 8, 16), torch.randint(0, 2, (3, 8, 16))
    z = net(x)[..., 1]
    want = F.binary_cross_entropy_with_logits(z, y.float(), reduction='none').sum(-1).mean(0)
    torch.testing.assert_close(frame_nll(net, x, y, batch=2), want)
    with pytest.raises(ValueError, match='same shape'): frame_nll(net, x, y[:, :4])
    with pytest.raises(TypeError, match='`y`'): frame_nll(net, x, y.float())

def test_fit_frame_memory_trains_only_the_memory():
    torch.manual_seed(0); net = FrameNet(16, 4, d_model=8, n_layers=2, n_heads=2)
    x, y = torch.rand(4, 8, 16), torch.randint(0, 2, (4, 8, 16))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fit = fit_frame_memory(net, lambda s: (x, y), [0, 1], seed=0, steps=3, chunk_size=2, channels=2, grid=4)
    assert len(fit['losses']) == 3 and net.blocks[1].memory.out_proj.weight.abs().sum() > 0
    assert all(torch.equal(v, before[k.replace('.block.', '.')]) for k, v in net.state_dict().items() if '.memory.' not in k)
    assert not torch.allclose(frame_nll(net, x, y, reset=True), frame_nll(net, x, y))   # the memory carries state across blocks
    drop_memories(net)
    assert net.state_dict().keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match='`attach`'): fit_frame_memory(net, lambda s: (x, y), [2], steps=1)
    with pytest.raises(ValueError, match='`attach`'): fit_frame_memory(net, lambda s: (x, y), [], steps=1)

def test_digits_experiment_end_to_end(digits):
    res = digits_experiment(window=4, frames=16, hide=(2, 6), seeds=(0, 1), net_kw=dict(d_model=8, n_layers=2, n_heads=2),
                            pre_steps=3, steps=2, batch=4, n_eval=8, n_show=2, chunk_size=2, channels=2, grid=4)
    assert len(res['memory']) == len(res['reset']) == len(res['fits']) == 2 and res['memory'][0].shape == (16,)
    assert res['full'].shape == res['window'].shape == (16,) and res['same_reset'] < 1e-3
    assert res['shown']['memory'].shape == (2, 16, 256) and res['shown']['truth'].shape == (2, 16, 256)
    assert not torch.allclose(res['memory'][0], res['reset'][0])
    t = nll_table(res, 4); assert 'memory − window' in t and 'nan' in t     # ≥ 4W is empty at 16 frames
    assert 'frame 8' in nll_table(res, 4, {'frame 8': (7, 8)})
