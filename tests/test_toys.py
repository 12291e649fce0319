"Tests of tensormem.toys: the seeded generators (shapes, ranges, determinism, labels recomputed independently), the four backbones and the trainer."
import pytest, torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st
from tensormem.toys import (VELOCITIES, ball_paths, render_balls, quadrant, occlusion_task, map_task, binding_task, counter_task,
                            digit_images, moving_digits_task, ToyNet, SlotMemory, KINDS, make_backbone, match_width, n_params,
                            TASKS, train_toy, evaluate, memory_gates, memory_share, run_suite, summarize, results_table, cond_name,
                            stream_occlusion_task, revisit_task, stream_binding_task, window_recall_task, attention_reach,
                            MEMORY_SUITE, SUITE_WINDOW, SUITE_STEPS, suite_kw, main)
from tensormem.core import UsageError

FAST = settings(max_examples=8, deadline=None)

NET = dict(d_model=16, n_layers=2, n_heads=2)
MEM = dict(channels=4, grid=4, chunk_size=2)

# ---------------------------------------------------------------- independent re-derivations of the labels
def _ball_frame(r, c, size=16):
    f = [[0] * size for _ in range(size)]
    for dr in (0, 1):
        for dc in (0, 1): f[(r + dr) % size][(c + dc) % size] = 1
    return f

def _quadrant_from_pixels(f, size=16):
    rows = [i for i in range(size) if any(f[i])]; cols = [j for j in range(size) if any(f[i][j] for i in range(size))]
    r = next(i for i in rows if (i - 1) % size not in rows); c = next(j for j in cols if (j - 1) % size not in cols)
    return 2 * (r >= size // 2) + (c >= size // 2)

@FAST
@given(n=st.integers(1, 12), L=st.sampled_from([0, 2, 4, 6]), seed=st.integers(0, 10**6))
def test_occlusion_shapes_labels_and_occluder(n, L, seed):
    x, y = occlusion_task(n, L=L, seed=seed)
    assert x.shape == (n, 8, 256) and y.shape == (n,) and y.dtype == torch.long
    assert set(x.unique().tolist()) <= {0., 1.} and 0 <= y.min() and y.max() <= 3
    assert (x[:, :8 - L].sum(-1) == 4).all() and (x[:, 8 - L:] == 0).all()
    # label recomputed from scratch: start and velocity from frames 0 and 1 (always visible), walk to frame 7, render, read pixels
    for i in range(n):
        f0, f1 = x[i, 0].view(16, 16), x[i, 1].view(16, 16)
        def topleft(f):
            rows = f.sum(1).nonzero()[:, 0].tolist(); cols = f.sum(0).nonzero()[:, 0].tolist()
            return next(a for a in rows if (a - 1) % 16 not in rows), next(b for b in cols if (b - 1) % 16 not in cols)
        (r0, c0), (r1, c1) = topleft(f0), topleft(f1)
        vr, vc = ((r1 - r0 + 1) % 16) - 1, ((c1 - c0 + 1) % 16) - 1
        assert (vr, vc) != (0, 0) and abs(vr) <= 1 and abs(vc) <= 1
        assert _quadrant_from_pixels(_ball_frame((r0 + 7 * vr) % 16, (c0 + 7 * vc) % 16)) == y[i].item()

def test_occlusion_determinism_and_errors():
    a, b, c = occlusion_task(16, L=2, seed=3), occlusion_task(16, L=2, seed=3), occlusion_task(16, L=2, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    s = torch.get_rng_state(); occlusion_task(4, seed=1); assert torch.equal(s, torch.get_rng_state())   # no global RNG use
    with pytest.raises(ValueError, match=r'`L` must be an int in \[0, T-2\] = \[0, 6\].*got 7'): occlusion_task(4, L=7)
    with pytest.raises(ValueError, match='`n` must be an int ≥ 1, got 0'): occlusion_task(0)
    with pytest.raises(ValueError, match='`seed` must be an int ≥ 0, got -1'): occlusion_task(2, seed=-1)

def test_ball_paths_velocity_set_and_quadrant():
    p = ball_paths(500, seed=0)
    v = (p[:, 1] - p[:, 0] + 1) % 16 - 1
    assert set(map(tuple, v.tolist())) == set(map(tuple, VELOCITIES.tolist()))              # all 8, never (0, 0)
    assert torch.equal((p[:, 0:1] + torch.arange(8)[None, :, None] * v[:, None]) % 16, p)  # constant velocity, wrapping
    f = render_balls(torch.tensor([[15, 3]]))[0]
    assert f.sum() == 4 and f[15, 3] == f[0, 4] == 1
    assert quadrant(torch.tensor([[7, 8], [8, 7]])).tolist() == [1, 2]
    assert torch.bincount(occlusion_task(4000, seed=2)[1], minlength=4).min() > 800         # classes roughly balanced

# every integer argument goes through core.check_int: bools, floats, values below the bound (and L above T-2) are refused
BAD_INTS = [
    (lambda v: occlusion_task(v), '`n` must be an int ≥ 1', (True, 2.0, 0, -3)),
    (lambda v: occlusion_task(2, seed=v), '`seed` must be an int ≥ 0', (True, 1.0, -1)),
    (lambda v: occlusion_task(2, L=v), '`L` must be an int', (True, 2.0, -1, 7, 100)),
    (lambda v: occlusion_task(2, T=v), '`T` must be an int ≥ 2', (True, 8.0, 1, 0)),
    (lambda v: map_task(v), '`n` must be an int ≥ 1', (False, 3.0, 0)),
    (lambda v: map_task(2, T=v), '`T` must be an int ≥ 1', (True, 16.0, 0, -1)),
    (lambda v: binding_task(2, n_writes=v), '`n_writes` must be an int ≥ 1', (True, 5.0, 0, -2)),
    (lambda v: binding_task(2, seed=v), '`seed` must be an int ≥ 0', (False, 0.0, -5)),
    (lambda v: counter_task(v), '`n` must be an int ≥ 1', (True, 1.5, 0)),
    (lambda v: moving_digits_task(v), '`n` must be an int ≥ 1', (True, 2.0, 0)),
    (lambda v: moving_digits_task(2, seed=v), '`seed` must be an int ≥ 0', (True, -1)),
    (lambda v: SlotMemory(8, chunk_size=v), '`chunk_size` must be an int ≥ 1', (True, 2.0, 0, -1)),
    (lambda v: binding_task(2, n_values=v), '`n_values` must be an int ≥ 1', (True, 2.0, 0)),
    (lambda v: counter_task(2, length=v), '`length` must be an int ≥ 1', (True, 2.0, 0)),
    (lambda v: counter_task(2, vocab=v), '`vocab` must be an int ≥ 1', (True, 16.0, 0)),
    (lambda v: make_backbone('base', TASKS['counter'].net_kw(), seed=v), '`seed` must be an int ≥ 0', (True, 0.5, -1)),
    (lambda v: train_toy(_tiny(), TASKS['counter'], steps=v), '`steps` must be an int ≥ 1', (True, 1.0, 0, -1)),
    (lambda v: train_toy(_tiny(), TASKS['counter'], steps=1, bs=v), '`bs` must be an int ≥ 1', (True, 4.0, 0)),
    (lambda v: train_toy(_tiny(), TASKS['counter'], steps=1, bs=2, eval_n=v), '`eval_n` must be an int ≥ 1', (True, 0)),
    (lambda v: train_toy(_tiny(), TASKS['counter'], steps=1, bs=2, eval_n=2, seed=v), '`seed` must be an int ≥ 0', (True, 1.5, -1)),
    (lambda v: evaluate(_tiny(), TASKS['counter'], n=v), '`n` must be an int ≥ 1', (True, 0)),
    (lambda v: run_suite(TASKS['counter'], kinds=('base',), seeds=(v,), steps=1, bs=2, eval_n=2, verbose=False), '`seeds` must be an int ≥ 0', (True, 0.0, -1)),
    (lambda v: run_suite(TASKS['counter'], kinds=('base',), steps=1, bs=2, eval_n=2, verbose=False, workers=v), '`workers` must be an int ≥ 1', (True, 2.0, 0)),
    (lambda v: stream_occlusion_task(2, L=v), '`L` must be an int ≥ 1', (True, 2.0, 0, -1)),
    (lambda v: stream_occlusion_task(2, V=v), '`V` must be an int ≥ 1', (True, 4.0, 0)),
    (lambda v: revisit_task(2, gap=v), '`gap` must be an int ≥ 0', (True, 2.0, -1)),
    (lambda v: revisit_task(2, n_seen=v), '`n_seen` must be an int ≥ 1', (True, 0)),
    (lambda v: revisit_task(2, grid=v), '`grid` must be an int ≥ 3', (True, 2, 8.0)),
    (lambda v: stream_binding_task(2, gap=v), '`gap` must be an int ≥ 0', (True, 1.0, -1)),
    (lambda v: stream_binding_task(2, n_writes=v), '`n_writes` must be an int ≥ 1', (True, 0)),
    (lambda v: attention_reach(v, 2), '`window` must be an int ≥ 1', (True, 4.0, 0)),
    (lambda v: attention_reach(4, v), '`n_layers` must be an int ≥ 1', (True, 2.0, 0)),
]

def _tiny():
    return make_backbone('base', TASKS['counter'].net_kw(d_model=8, n_heads=2))

@pytest.mark.parametrize('call,msg,bad', [(c, m, b) for c, m, bs in BAD_INTS for b in bs])
def test_integer_arguments_are_checked(call, msg, bad):
    with pytest.raises(ValueError, match=msg) as e: call(bad)
    assert repr(bad) in str(e.value)                                   # the message quotes the offending value

def test_integer_bounds_are_inclusive():
    assert occlusion_task(1, L=6)[0].shape == (1, 8, 256) and occlusion_task(1, L=0, T=2)[0].shape == (1, 2, 256)
    assert map_task(1, T=1)[0].shape == (1, 2, 7) and binding_task(1, n_writes=1)[0].shape == (1, 2, 36)
    assert SlotMemory(8, chunk_size=1).chunk_size == 1 and counter_task(1, seed=0)[0].shape == (1, 32)

# ---------------------------------------------------------------- map building
@FAST
@given(n=st.integers(1, 10), T=st.sampled_from([1, 16, 32, 64]), seed=st.integers(0, 10**6))
def test_map_task_labels_from_tokens(n, T, seed):
    x, y = map_task(n, T=T, seed=seed)
    assert x.shape == (n, T + 1, 7) and y.shape == (n,)
    assert (x[:, :-1, 6] == 0).all() and (x[:, -1, 6] == 1).all() and (x[:, -1, :4] == 0).all()
    assert set(x[:, :-1, :4].unique().tolist()) <= {0., 1.} and x[..., 4:6].min() >= 0 and x[:, :-1, 4:6].max() <= 6 / 8 and x[:, -1, 4:6].max() <= 7 / 8
    for i in range(n):
        seen = {}
        for t in x[i, :-1].tolist():
            r, c = round(t[4] * 8), round(t[5] * 8)
            for (dr, dc), v in zip([(0, 0), (0, 1), (1, 0), (1, 1)], t[:4]):
                assert seen.setdefault((r + dr, c + dc), v) == v              # every reveal agrees with one hidden map
        q = x[i, -1].tolist()
        assert seen[(round(q[4] * 8), round(q[5] * 8))] == y[i].item()       # the query asks a revealed cell

def test_map_task_errors_and_determinism():
    assert torch.equal(map_task(5, seed=1)[0], map_task(5, seed=1)[0]) and not torch.equal(map_task(5, seed=1)[0], map_task(5, seed=2)[0])
    with pytest.raises(ValueError, match='`T` must be an int ≥ 1, got 0'): map_task(2, T=0)

# ---------------------------------------------------------------- coordinate binding
@FAST
@given(n=st.integers(1, 10), w=st.sampled_from([1, 5, 10, 20, 50]), sigma=st.sampled_from([0., 0.05, 0.1]), seed=st.integers(0, 10**6))
def test_binding_labels_nearest_key(n, w, sigma, seed):
    x, y = binding_task(n, n_writes=w, sigma=sigma, seed=seed)
    assert x.shape == (n, w + 1, 36) and y.shape == (n,) and 0 <= y.min() and y.max() < 32
    assert x[:, :-1, :3].abs().max() <= 1 and (x[:, :-1, 3:35].sum(-1) == 1).all() and (x[:, -1, 3:35] == 0).all()
    for i in range(n):
        *writes, q = x[i].tolist()
        d = [sum((a - b) ** 2 for a, b in zip(wr[:3], q[:3])) for wr in writes]
        assert writes[d.index(min(d))][3:35].index(1.) == y[i].item()
        if sigma == 0: assert min(d) == 0

def test_binding_errors():
    for bad in (-0.1, float('nan'), float('inf'), '0.1', None, True):
        with pytest.raises(ValueError, match='`sigma` must be a finite number >= 0'): binding_task(2, sigma=bad)
    with pytest.raises(ValueError, match='`n_writes` must be an int ≥ 1, got 0'): binding_task(2, n_writes=0)

# ---------------------------------------------------------------- counter
@FAST
@given(n=st.integers(1, 8), length=st.integers(1, 40), seed=st.integers(0, 10**6))
def test_counter(n, length, seed):
    x, y = counter_task(n, length=length, seed=seed)
    assert x.shape == y.shape == (n, length) and x.max() < 16 and x.min() >= 0
    assert torch.equal(y, (x + 1) % 16) and torch.equal(x[:, 1:], y[:, :-1])

# ---------------------------------------------------------------- moving digits (real data)
def test_digit_split():
    (a, ya), (b, yb) = digit_images('train'), digit_images('test')
    assert len(ya) + len(yb) == 1797 and len(yb) == 360 and a.shape[1:] == (8, 8) and 0 <= a.min() and a.max() <= 1
    flat = {tuple(v.tolist()) for v in a.flatten(1)}
    assert sum(tuple(v.tolist()) in flat for v in b.flatten(1)) < 10          # (near-)disjoint images, not a copy
    with pytest.raises(ValueError, match="`split` must be 'train' or 'test'"): digit_images('val')

@pytest.mark.parametrize('split', ['train', 'test'])
def test_moving_digits_frames_are_the_shifted_digit(split):
    imgs, labels = digit_images(split)
    x, y = moving_digits_task(12, band=0, split=split, seed=5)
    xb, yb = moving_digits_task(12, band=8, split=split, seed=5)
    assert x.shape == (12, 8, 256) and torch.equal(y, yb) and ((xb == x) | (xb == 0)).all()
    for i in range(12):
        f = x[i].view(8, 16, 16)
        placements = [(r, c) for r in range(9) for c in range(9)
                      if (imgs[labels == y[i]] == f[0, r:r + 8, c:c + 8]).all(-1).all(-1).any()]
        assert placements, 'frame 0 is not an image of the labelled class'
        def moves(r, c, dc):    # every frame holds the same 8×8 patch shifted by dc columns per frame, nothing else
            if not 0 <= c + 7 * dc <= 8: return False
            return all(torch.equal(f[t, r:r + 8, c + dc * t:c + dc * t + 8], f[0, r:r + 8, c:c + 8]) and
                       torch.isclose(f[t].sum(), f[0, r:r + 8, c:c + 8].sum()) for t in range(8))
        assert any(moves(r, c, dc) for r, c in placements for dc in (1, -1))
    hidden_cols = (xb.view(12, 8, 16, 16).sum((1, 2)) == 0).sum(-1)
    assert (hidden_cols >= 8).all()                                            # the band hides 8 whole columns
    with pytest.raises(ValueError, match='`size` must be >='): moving_digits_task(2, size=12)

# ---------------------------------------------------------------- backbones
@pytest.mark.parametrize('name', ['occlusion', 'map', 'binding', 'counter', 'digits', *MEMORY_SUITE])
def test_backbones_forward_shapes(name):
    task = TASKS[name]
    x, _ = task.fn(3, seed=0, **task.conds[-1], **task.train_kw)
    for kind in KINDS:
        m = make_backbone(kind, task.net_kw(**NET, window=SUITE_WINDOW.get(name)), MEM).eval()
        with torch.no_grad(): out = m(x)
        assert out.shape == ((3, x.shape[1], task.n_out) if task.per_token else (3, task.n_out)), (kind, out.shape)
        assert torch.isfinite(out).all()

def test_parameter_matching_and_counts():
    for name in ['occlusion', 'binding', 'counter']:
        kw = TASKS[name].net_kw(**NET)
        p = {k: n_params(make_backbone(k, kw, MEM)) for k in KINDS}
        assert abs(p['base_wide'] / p['tensor'] - 1) < 0.03, p
        assert p['base'] < p['tensor'] and p['base_wide'] > p['base']
        from tensormem.tensor_memory import memory_param_count
        assert p['tensor'] - p['base'] == 2 * memory_param_count(16, 4)         # exactly the two attached memories
    kw = dict(d_in=7, n_out=2, d_model=16, max_len=8)
    assert match_width(n_params(ToyNet(**{**kw, 'd_model': 24})), kw) == dict(d_model=24, d_ff=48)      # exact when reachable
    target = n_params(ToyNet(**kw)) + 1000
    got = n_params(ToyNet(**{**kw, **match_width(target, kw)}))
    assert abs(got - target) <= 2 * 17 + 1                                                              # within one d_ff unit

def test_tensor_and_slots_identical_to_base_at_init_and_causal():
    task = TASKS['counter']; kw = task.net_kw(**NET)
    x, _ = task.fn(2, seed=1)
    base = make_backbone('base', kw, MEM, seed=3).eval()
    for kind in ('tensor', 'slots'):
        m = make_backbone(kind, kw, MEM, seed=3).eval()
        with torch.no_grad(): assert torch.equal(m(x), base(x)), kind   # zero-initialised out_proj: nothing changes at attach
        for mod in m.modules():                                         # give the memories something to say
            if hasattr(mod, 'out_proj'): nn.init.normal_(mod.out_proj.weight)
        x2 = x.clone(); x2[:, 20:] = (x2[:, 20:] + 7) % 16
        with torch.no_grad():
            a, b = m(x), m(x2)
            assert torch.allclose(a[:, :20], b[:, :20], atol=1e-5), kind                  # causal
            assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3
            assert (a - base(x)).abs().max() > 1e-3, kind                                  # memory now contributes
    assert len(memory_gates(make_backbone('tensor', kw, MEM))) == 2 and memory_gates(base) == []

def test_bad_backbone_arguments():
    with pytest.raises(ValueError, match='`kind` must be one of'): make_backbone('rnn', TASKS['counter'].net_kw())
    with pytest.raises(ValueError, match='exactly one of'): ToyNet(4, 2, vocab=3)
    with pytest.raises(ValueError, match='`chunk_size` must be an int ≥ 1, got 0'): SlotMemory(8, chunk_size=0)
    with pytest.raises(ValueError, match='exceeds `max_len`'): ToyNet(4, 2, max_len=4)(torch.randn(1, 5, 4))

# ---------------------------------------------------------------- trainer and tables
def test_train_toy_learns_counter_and_is_deterministic():
    task = TASKS['counter']
    r1 = train_toy(make_backbone('base', task.net_kw(**NET), seed=0), task, steps=60, bs=16, eval_n=64, seed=0)
    r2 = train_toy(make_backbone('base', task.net_kw(**NET), seed=0), task, steps=60, bs=16, eval_n=64, seed=0)
    assert r1['losses'] == r2['losses'] and r1['acc'] == r2['acc']
    assert r1['losses'][-1] < 0.5 * r1['losses'][0] and r1['acc']['all'] > 0.5

def test_evaluate_fixed_sets_and_run_suite_records():
    task = TASKS['occlusion']
    m = make_backbone('base', task.net_kw(**NET))
    e1, e2 = evaluate(m, task, n=64), evaluate(m, task, n=64)
    assert e1 == e2 and list(e1) == ['L=0', 'L=2', 'L=4', 'L=6']
    rows = run_suite(task, kinds=('base', 'tensor'), steps=2, bs=4, net_kw=NET, mem_kw=MEM, eval_n=8, verbose=False)
    assert [r['kind'] for r in rows] == ['base', 'tensor'] and rows[1]['gates0'] == [0.5, 0.5]
    assert rows[0]['share'] == [] and len(rows[1]['share']) == 2 and all(v >= 0 for v in rows[1]['share'])
    rows = run_suite(task, steps=1, bs=2, net_kw=NET, mem_kw=MEM, eval_n=4, verbose=False, variants={'hard': dict(write='hard')})
    assert rows[0]['kind'] == 'hard'

def test_summarize_and_table():
    rows = [dict(kind='a', params=5, acc={'x': 0.5, 'y': 1.0}), dict(kind='a', params=5, acc={'x': 0.7, 'y': 1.0}),
            dict(kind='b', params=6, acc={'x': 0.25})]
    s = summarize(rows)
    assert s[('a', 'x')][2] == 2 and abs(s[('a', 'x')][0] - 0.6) < 1e-12 and abs(s[('a', 'x')][1] - 0.02 ** 0.5) < 1e-12   # sample sd
    assert s[('b', 'x')] == (0.25, 0.0, 1)
    t = results_table(rows).splitlines()
    assert t[0] == '| condition | a (5 p) | b (6 p) |' and t[2] == '| x | 60.0 ± 14.1 | 25.0 |' and t[3] == '| y | 100.0 ± 0.0 |  |'
    assert cond_name({'L': 2}) == 'L=2'

def test_memory_share_zero_at_attach_then_positive():
    task = TASKS['binding']; kw = task.net_kw(**NET)
    x, _ = task.fn(8, seed=2, n_writes=10, sigma=0.05)
    m = make_backbone('tensor', kw, MEM)
    assert memory_share(m, x) == [0.0, 0.0]                               # zero out_proj: the memory adds nothing yet
    for mod in m.modules():
        if hasattr(mod, 'out_proj'): nn.init.normal_(mod.out_proj.weight)
    s = memory_share(m, x)
    assert len(s) == 2 and all(v > 0 for v in s) and m.training           # and the training flag is restored
    assert memory_share(make_backbone('base', kw), x) == []

@pytest.mark.parametrize('lr', [0, -1e-3, float('nan'), float('inf'), '3e-3', True])
def test_bad_learning_rate(lr):
    with pytest.raises(ValueError, match='`lr` must be a finite number > 0'): train_toy(_tiny(), TASKS['counter'], steps=1, lr=lr)

def test_device_and_budget_are_recorded_and_printed(capsys):
    from tensormem.core import default_device
    rows = run_suite(TASKS['counter'], kinds=('base',), steps=2, bs=2, net_kw=dict(d_model=8), eval_n=2)
    assert rows[0]['device'] == default_device().type and next(iter(capsys.readouterr().out.splitlines())).count('2 steps × 2 on ')
    assert results_table(rows).splitlines()[-1] == f"budget: 2 steps × batch 2 on {default_device().type}; seeds [0]"
    r = train_toy(_tiny(), TASKS['counter'], steps=1, bs=2, eval_n=2, device='cpu')
    assert r['device'] == 'cpu'

@pytest.mark.cuda
def test_training_uses_the_gpu():
    m = _tiny(); r = train_toy(m, TASKS['counter'], steps=2, bs=2, eval_n=2)
    assert r['device'] == 'cuda' and next(m.parameters()).is_cuda

def test_train_conds_used_for_training_only():
    task = TASKS['ablation']
    assert [c['n_writes'] for c in task.train_conds] == [5, 10, 20] and task.conds == [dict(n_writes=20, sigma=0.05)]
    r = train_toy(make_backbone('base', task.net_kw(**NET)), task, steps=3, bs=4, eval_n=8)
    assert list(r['acc']) == ['n_writes=20,sigma=0.05']

# ---------------------------------------------------------------- the toys built to need a memory (content beyond attention's reach)
def _topleft(f, size=16):
    rows = f.sum(1).nonzero()[:, 0].tolist(); cols = f.sum(0).nonzero()[:, 0].tolist()
    return next(a for a in rows if (a - 1) % size not in rows), next(b for b in cols if (b - 1) % size not in cols)

@FAST
@given(n=st.integers(1, 10), L=st.integers(1, 40), V=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_stream_occlusion_label_is_the_last_sighting(n, L, V, seed):
    x, y = stream_occlusion_task(n, L=L, V=V, seed=seed)
    assert x.shape == (n, V + L, 256) and (x[:, V:] == 0).all() and (x[:, :V].sum(-1) == 4).all()
    for i in range(n):
        r, c = _topleft(x[i, V - 1].view(16, 16))                         # read the ball off the last visible frame's pixels
        assert _quadrant_from_pixels(_ball_frame(r, c)) == y[i].item()
    assert torch.equal(x[:, :V], occlusion_task(n, L=0, T=V, seed=seed)[0]) if V >= 2 else True

@FAST
@given(n=st.integers(1, 10), gap=st.integers(0, 40), n_seen=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_revisit_query_is_answered_only_by_the_early_reveals(n, gap, n_seen, seed):
    x, y = revisit_task(n, gap=gap, n_seen=n_seen, seed=seed)
    assert x.shape == (n, n_seen + gap + 1, 7) and (x[:, -1, 6] == 1).all() and (x[:, :-1, 6] == 0).all()
    for i in range(n):
        seen, q = {}, x[i, -1].tolist()
        qrc = (round(q[4] * 8), round(q[5] * 8))
        for j, t in enumerate(x[i, :-1].tolist()):
            r, c = round(t[4] * 8), round(t[5] * 8)
            cells = [(r + dr, c + dc) for dr in (0, 1) for dc in (0, 1)]
            if j >= n_seen: assert qrc not in cells                      # no later reveal shows the queried cell
            for cell, v in zip(cells, t[:4]): assert seen.setdefault(cell, v) == v   # one consistent map
        assert seen[qrc] == y[i].item()

def test_revisit_later_reveals_cover_every_other_position():
    x, _ = revisit_task(2000, gap=8, seed=1)
    tl = {tuple(v) for v in (x[:, 2:-1, 4:6] * 8).round().long().flatten(0, 1).tolist()}
    assert len(tl) == 49                                                  # uniform over the 7×7 patch positions that miss the query

@FAST
@given(n=st.integers(1, 10), gap=st.integers(0, 40), seed=st.integers(0, 10**6))
def test_stream_binding_is_binding_with_fillers(n, gap, seed):
    x, y = stream_binding_task(n, gap=gap, seed=seed)
    x0, y0 = binding_task(n, n_writes=4, sigma=0.05, n_values=8, seed=seed)
    assert x.shape == (n, 4 + gap + 1, 12) and torch.equal(y, y0) and torch.equal(x[:, :4], x0[:, :4]) and torch.equal(x[:, -1], x0[:, -1])
    assert (x[:, 4:-1, :3] == 0).all() and (x[:, 4:-1, -1] == 0).all()
    for i in range(n):                                                    # nearest written key, recomputed with plain loops
        q = x[i, -1, :3].tolist(); d = [sum((a - b) ** 2 for a, b in zip(x[i, j, :3].tolist(), q)) for j in range(4)]
        assert x[i, d.index(min(d)), 3:11].argmax().item() == y[i].item()

@pytest.mark.parametrize('window,n_layers', [(1, 1), (2, 3), (4, 2), (8, 2), (5, 1)])
def test_attention_reach_is_exact(window, n_layers):
    "Moving input token j changes the last output exactly when j is within `attention_reach` of the last token."
    torch.manual_seed(window * 10 + n_layers)
    net, N = ToyNet(5, 3, d_model=16, n_layers=n_layers, max_len=24, window=window).eval(), 24
    R, x = attention_reach(window, n_layers), torch.randn(4, N, 5)
    for j in range(N):
        x2 = x.clone(); x2[:, j] += 2.
        with torch.no_grad(): changed = not torch.equal(net(x), net(x2))
        assert changed == (j >= N - 1 - R), (j, R)
    assert attention_reach(None, 3) is None

CONTENT = dict(window=1, stream_occlusion=4, revisit=2, stream_binding=4)   # leading tokens holding what must be remembered

@pytest.mark.parametrize('name', MEMORY_SUITE)
def test_window_hides_the_content_from_base_but_not_from_the_memories(name):
    "In the committed suite's configuration, a base backbone cannot see the content at the long gaps, sees it at the short one, and both memories carry it."
    task, (net, mem) = TASKS[name], suite_kw(name)
    mem = {**mem, 'channels': 4}
    R = attention_reach(net['window'], net['n_layers'])
    models = {k: make_backbone(k, task.net_kw(**net), mem, seed=1).eval() for k in KINDS}
    for k in ('slots', 'tensor'):                                      # give the memories something to say
        for mod in models[k].modules():
            if hasattr(mod, 'out_proj'): nn.init.normal_(mod.out_proj.weight, std=0.5)
    far = 0
    for cond in task.conds:
        x, _ = task.fn(32, seed=2, **cond)
        x2 = x.clone(); x2[:, :CONTENT[name]] = x[:, :CONTENT[name]].roll(1, 0)   # another sequence's content, same filler and query
        hidden = x.shape[1] - 1 - R > CONTENT[name] - 1
        with torch.no_grad():
            for k, m in models.items():
                seen = not torch.allclose(m(x), m(x2), atol=1e-6, rtol=0)
                assert seen == (k in ('slots', 'tensor') or not hidden), (name, cond, k)
        far += hidden
    assert 1 <= far < len(task.conds)                                   # a control in reach and at least one condition beyond it

def test_run_suite_workers_give_the_same_records():
    kw = dict(kinds=('base', 'tensor'), seeds=(0, 1), steps=2, bs=4, net_kw=dict(d_model=8, window=4), mem_kw=dict(channels=2, chunk_size=4),
              eval_n=8, verbose=False, device='cpu')
    one, two = run_suite(TASKS['revisit'], **kw), run_suite(TASKS['revisit'], workers=2, **kw)
    assert [(r['kind'], r['seed'], r['params'], r['acc']) for r in one] == [(r['kind'], r['seed'], r['params'], r['acc']) for r in two]
    assert torch.allclose(torch.tensor([r['losses'] for r in one]), torch.tensor([r['losses'] for r in two]), atol=1e-5)

def test_suite_configuration():
    assert set(MEMORY_SUITE) <= set(SUITE_WINDOW) and set(MEMORY_SUITE) <= set(SUITE_STEPS)
    assert suite_kw('revisit')[0]['window'] == 8 and suite_kw('window')[0]['window'] == 4 and 'window' not in suite_kw('binding')[0]
    with pytest.raises(ValueError, match='`name` must be one of'): suite_kw('video')

def test_console_job_runs_the_memory_suite(capsys):
    assert main(['--task', 'revisit', 'stream_binding', '--kinds', 'base', '--seeds', '1', '--steps', '2', '--bs', '4', '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    assert out.count('| gap=2 |') == 2 and out.count('budget: 2 steps × batch 4 on cpu') == 2
    for argv, msg in ((['--steps', '0'], '`--steps` must be ≥ 1, got 0'), (['--workers', '0'], '`--workers` must be ≥ 1, got 0'),
                      (['--seeds', '0'], '`--seeds` must be ≥ 1, got 0')):
        with pytest.raises(UsageError, match=msg): main(argv)
