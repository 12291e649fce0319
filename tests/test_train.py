"The trainer (tensormem.train): world-size-independent data, 2 processes == 1, resume == uninterrupted, a kill during a checkpoint write loses nothing."
import os, shutil, signal, subprocess, sys, textwrap
from pathlib import Path
import pytest, torch
import torch.nn.functional as F
from conftest import tiny_llama
from tensormem.core import UsageError
from tensormem.lm import TinyLM
from tensormem.train import (CKPT, LOG, TokenWindows, atomic_save, attach_memories, cli, fit_batches, global_rows, keep_decay_fp32,
                             load_checkpoint, token_loss, main_lm, make_accelerator, read_log, shard_rows, train_step, LogitsOnly)

import tensormem
PKG = str(Path(tensormem.__file__).resolve().parents[1])   # subprocesses import the same tensormem as these tests
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': os.pathsep.join(p for p in (PKG, os.environ.get('PYTHONPATH')) if p)}
# a tiny Tensor Cache LM with a high learning rate, so that losses of different batches (and wrong averaging) differ clearly
TINY = ['--attention', 'tensor_cache', '--d-model', '32', '--layers', '1', '--heads', '4', '--window', '8',
        '--batch-size', '4', '--seq-len', '32', '--lr', '0.02', '--warmup', '0', '--no-progress']
STEPS = 6

def losses(run): return [r['loss'] for r in read_log(Path(run)/LOG)]

@pytest.fixture(scope='module')
def full(tmp_path_factory):
    "The uninterrupted 1-process reference run: 6 steps, checkpoints at 3 and 6."
    d = tmp_path_factory.mktemp('full')/'run'
    assert main_lm(TINY + ['--steps', str(STEPS), '--ckpt-every', '3', '--out', str(d)]) == 0
    return d

def test_global_batch_is_independent_of_world_size():
    for step in (0, 5, 12):   # 12 crosses into a second epoch of 40 windows
        rows = global_rows(step, 8, 40, seed=3)
        assert rows.tolist() == global_rows(step, 8, 40, seed=3).tolist()   # deterministic
        for W, A in [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (8, 1)]:
            parts = [mb for r in range(W) for mb in shard_rows(rows, r, W, A)]
            assert torch.cat(parts).tolist() == rows.tolist() and {len(p) for p in parts} == {8 // (W * A)}
            mine = [set(torch.cat(shard_rows(rows, r, W, A)).tolist()) for r in range(W)]
            assert all(not (mine[i] & mine[j]) for i in range(W) for j in range(i))   # ranks never overlap
    epoch = torch.cat([global_rows(s, 8, 40, 0) for s in range(5)])
    assert sorted(epoch.tolist()) == list(range(40))
    assert global_rows(0, 8, 40, 0).tolist() != global_rows(0, 8, 40, 1).tolist()
    with pytest.raises(ValueError, match='divisible by processes × grad_accum = 3 × 1'): shard_rows(rows, 0, 3)

def test_windows_and_loss():
    tw = TokenWindows(torch.arange(23), 4)
    x, y = tw.batch(torch.tensor([3]))
    assert x.tolist() == [[15, 16, 17, 18]] and y.tolist() == [[16, 17, 18, 19]]
    with pytest.raises(TypeError, match='integer token ids'): TokenWindows(torch.rand(30), 4)
    lo, tg = torch.randn(4, 5, 7, dtype=torch.float64), torch.randint(0, 7, (4, 5))
    tg = tg.masked_fill(torch.rand(4, 5) < 0.6, -100); tg[0, 0] = 1; n = int((tg != -100).sum())
    halves = (token_loss(lo[:2], tg[:2], 2 / n) + token_loss(lo[2:], tg[2:], 2 / n)) / 2   # what DDP/accumulation average
    assert torch.allclose(halves.double(), F.cross_entropy(lo.flatten(0, 1), tg.flatten(), ignore_index=-100).double(), atol=1e-6)

def test_atomic_save_keeps_the_old_file(tmp_path, monkeypatch):
    atomic_save(dict(step=1), tmp_path/CKPT)
    def dying(obj, f): f.write(b'partial'); raise RuntimeError('killed mid-write')
    monkeypatch.setattr(torch, 'save', dying)
    with pytest.raises(RuntimeError, match='killed mid-write'): atomic_save(dict(step=2), tmp_path/CKPT)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)['step'] == 1 and [p.name for p in tmp_path.iterdir()] == [CKPT]

def test_resume_equals_uninterrupted(full, tmp_path):
    d = tmp_path/'cut'
    main_lm(TINY + ['--steps', '3', '--decay-steps', str(STEPS), '--out', str(d)])   # stopped after 3 of 6 steps
    assert load_checkpoint(d)['step'] == 3
    main_lm(['--resume', str(d), '--steps', str(STEPS), '--no-progress'])
    assert losses(d) == losses(full) and len(losses(d)) == STEPS
    ck, ref = load_checkpoint(d), load_checkpoint(full)
    assert all(torch.equal(ck['model'][k], ref['model'][k]) for k in ref['model'])

def test_kill_during_checkpoint_write_loses_nothing(full, tmp_path):
    "SIGKILL a real run in the middle of writing its step-6 checkpoint; the step-3 one survives and the resumed log equals the full run's."
    d = tmp_path/'killed'
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        import tensormem.train as t
        real, calls = torch.save, []
        def save(obj, f):
            calls.append(obj['step'])
            if obj['step'] == {STEPS}: f.write(b'x' * 4096); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
            real(obj, f)
        torch.save = save
        t.main_lm(sys.argv[1:])
    """)
    p = subprocess.run([sys.executable, '-c', script, *TINY, '--steps', str(STEPS), '--ckpt-every', '3', '--out', str(d)],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert load_checkpoint(d)['step'] == 3 and list(d.glob(f'.{CKPT}.*.tmp'))   # old checkpoint intact, the half-written temp left
    assert len(losses(d)) == STEPS                                               # the killed run had logged all its steps
    main_lm(['--resume', str(d), '--no-progress'])
    assert losses(d) == losses(full) and not list(d.glob(f'.{CKPT}.*.tmp')) and load_checkpoint(d)['step'] == STEPS

def test_two_processes_equal_one(full, tmp_path):
    "torchrun, 2 CPU processes (gloo), global batch 4 = 2 × 2; and one process with accumulation 2 × 2."
    two, acc2 = tmp_path/'two', tmp_path/'acc2'
    p = subprocess.run(['torchrun', '--standalone', '--nproc_per_node=2', '-m', 'tensormem.train', 'lm', *TINY, '--steps', str(STEPS),
                        '--ckpt-every', '3', '--out', str(two)], env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert load_checkpoint(two)['world_size'] == 2 and len(losses(two)) == STEPS
    assert torch.allclose(torch.tensor(losses(two)), torch.tensor(losses(full)), rtol=1e-5, atol=1e-6)
    w2, w1 = load_checkpoint(two)['model'], load_checkpoint(full)['model']
    assert all(torch.allclose(w2[k], w1[k], rtol=1e-4, atol=1e-5) for k in w1)
    main_lm(TINY + ['--steps', str(STEPS), '--grad-accum', '2', '--out', str(acc2)])
    assert torch.allclose(torch.tensor(losses(acc2)), torch.tensor(losses(full)), rtol=1e-5, atol=1e-6)

def test_bf16_keeps_tensor_cache_in_fp32(tmp_path):
    m = TinyLM(256, 32, 1, 4, 'tensor_cache', window=8); a = m.blocks[0].attn; x = torch.randn(2, 24, 32)
    with torch.no_grad():
        want = a(x); keep_decay_fp32(m, 'cpu')
        with torch.autocast('cpu', torch.bfloat16): got = a(x)
    assert got.dtype == torch.float32 and torch.equal(got, want) and a.lam_logit.dtype == torch.float32
    main_lm(TINY + ['--steps', '2', '--mixed-precision', 'bf16', '--out', str(tmp_path/'bf16')])
    ck = load_checkpoint(tmp_path/'bf16')
    assert ck['config']['mixed_precision'] == 'bf16' and ck['model']['blocks.0.attn.lam_logit'].dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(losses(tmp_path/'bf16'))))

def test_memory_job_trains_only_the_memory():
    lm = tiny_llama(vocab=64, hidden=32, layers=2)
    model = LogitsOnly(attach_memories(lm, [0, -1], channels=4, grid=4, chunk_size=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    acc = make_accelerator(); opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.); model, opt = acc.prepare(model, opt)
    data = TokenWindows(torch.randint(0, 64, (400,)), 16)
    for s in range(2): train_step(model, opt, sched, acc, *data.batch(global_rows(s, 4, len(data), 0)), 1, 1.0)
    changed = {n for n, p in acc.unwrap_model(model).named_parameters() if not torch.equal(p, before[n])}
    assert changed and all('.memory.' in n for n in changed)
    with pytest.raises(UsageError, match='the model has 2 decoder layers'): attach_memories(tiny_llama(), [2])

def test_fit_batches_masked_targets_accumulation_equals_one_batch():
    "Most targets −100, unevenly per row: only the global-count normalisation makes 4 × 2 equal 8."
    def batch(step, B=8, T=12, V=16):
        g = torch.Generator().manual_seed(step); x = torch.randint(0, V, (B, T), generator=g)
        return x, x.roll(1, 1).masked_fill(torch.rand(B, T, generator=g) < 0.8, -100)
    runs = []
    for accum in (1, 4):
        torch.manual_seed(0); m = TinyLM(16, 32, 1, 4, 'tensor_cache', window=4)
        r = fit_batches(m, batch, 4, lr=1e-2, warmup=0, grad_accum=accum)
        runs.append((torch.tensor(r['losses']), torch.cat([p.detach().flatten() for p in m.parameters()])))
        assert not m.training and len(r['losses']) == 4
    assert torch.allclose(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-6) and torch.allclose(runs[0][1], runs[1][1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match='no scored targets'):
        fit_batches(TinyLM(16, 32, 1, 4, 'full'), lambda s: (torch.zeros(2, 4, dtype=torch.long), torch.full((2, 4), -100)), 1)

def test_usage_errors(tmp_path, full, capsys):
    (tmp_path/'file').write_text('')
    cases = [(['lm', '--out', str(tmp_path/'file')], 'exists and is not a folder'),
             (['lm', '--out', str(tmp_path/'file'/'sub')], 'cannot create the folder'),
             (['lm', '--attention', 'linear', '--out', str(tmp_path/'x')], "invalid choice: 'linear'"),
             (['lm', '--steps', '0', '--out', str(tmp_path/'x')], '--steps: must be ≥ 1, got 0'),
             (['lm', '--steps', '3'], '`--out` DIR is required'),
             (['lm', '--out', str(full)], 'already holds a run'),
             (['lm', '--resume', str(full), '--window', '16'], '`--window` 16 differs from the resumed run'),
             (['lm', '--resume', str(tmp_path)], 'no checkpoint ckpt.pt'),
             (['lm', *TINY, '--grad-accum', '3', '--out', str(tmp_path/'odd')], 'divisible by processes × `--grad-accum` = 1 × 3'),
             (['nope'], 'usage: python -m tensormem.train')]
    for argv, msg in cases:
        assert cli(argv) == 2, argv
        assert msg in capsys.readouterr().err, (argv, msg)
    with pytest.raises(UsageError, match='--lr: must be > 0'): main_lm(['--lr', '-1', '--out', str(tmp_path/'y')])

def test_resume_after_done_is_a_no_op(full, tmp_path, capsys):
    d = tmp_path/'copy'; shutil.copytree(full, d)
    assert main_lm(['--resume', str(d), '--no-progress']) == 0 and 'nothing to do' in capsys.readouterr().out
    assert losses(d) == losses(full)

@pytest.mark.slow
def test_train_memory_on_smollm2(tmp_path):
    from tensormem.train import main_memory
    d = tmp_path/'mem'
    assert main_memory(['--steps', '2', '--seq-len', '32', '--batch-size', '2', '--ckpt-every', '1', '--no-progress', '--out', str(d)]) == 0
    ck = load_checkpoint(d)
    assert ck['step'] == 2 and ck['model'] and all('.memory.' in k for k in ck['model'])   # only the memory is stored
    main_memory(['--resume', str(d), '--steps', '3', '--no-progress'])
    assert len(losses(d)) == 3
