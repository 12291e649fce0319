"""Tests of tensormem.gpu_bench on CPU: the refusal without a GPU, a smoke run through Triton's interpreter, and the
formatting and target logic on a hand-made record."""
import os
import torch
import pytest
if not torch.cuda.is_available(): os.environ.setdefault('TRITON_INTERPRET', '1')   # before anything imports triton
from tensormem.ops.triton_utils import HAS_CUDA, HAS_TRITON
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason='needs the gpu extra: pip install "tensormem[gpu]"')


def test_gpu_bench_refuses_without_gpu_and_smoke_runs(capsys, tmp_path):
    from tensormem import gpu_bench
    if not HAS_CUDA:
        assert gpu_bench.main(['--out', str(tmp_path)]) == 2
        assert 'no CUDA GPU visible' in capsys.readouterr().err
    assert gpu_bench.main(['--smoke', '--only', 'tc,step', '--out', str(tmp_path)]) == 0
    assert 'all passed' in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []          # a smoke run writes no record


def test_gpu_bench_targets_and_tables(tmp_path):
    "Formatting and target logic on a hand-made record (test fixture numbers, not measurements)."
    from tensormem import gpu_bench
    res = dict(decode=[dict(B=1, T=32768, fused_over_fp16=0.5), dict(B=1, T=131072, fused_over_fp16=0.5)],
               encode=[{'B': 1, 'T': 32768, 'triton_s96r4_GBps': 250.}],
               tensor_cache=[dict(T=65536, ours_over_flex=2.0, full_over_ours=12.)], tc_step=[dict(context=1024, over_first=1.), dict(context=131072, over_first=1.05)])
    t = gpu_bench.targets(res)
    assert t['decode_32k_le_0.6x_fp16']['met'] and t['decode_128k_le_0.45x_fp16']['met'] is False
    assert t['encode_ge_300GBps']['met'] is False and t['tc_64k_le_1.5x_flex']['met'] is False
    assert t['tc_64k_ge_10x_faster_than_full']['met'] and t['tc_step_128k_le_1.1x_1k']['met']
    assert gpu_bench.targets({})['decode_32k_le_0.6x_fp16'] == dict(value=None, limit=0.6, met=None)
    txt = gpu_bench.table([dict(a=1.23456, b=None)], ['a', 'b'])
    assert '1.235' in txt and '—' in txt
    ck = gpu_bench.checks(dict(decode=[dict(B=1, T=8, max_err_vs_dequant_sdpa=0.5)]), smoke=False)
    assert list(ck.values()) == [(0.5, False)]
    (tmp_path / 'bench' / 'records').mkdir(parents=True)
    rec = dict(kind='gpu', env=dict(card='fixture'), results=dict(decode=[dict(B=1, T=8, fp16_sdpa_ms=1., fp16_sdpa_GBps=2.)]), targets=t)
    (tmp_path / 'bench' / 'records' / 'x.json').write_text(__import__('json').dumps(rec))
    (tmp_path / 'bench' / 'records' / 'y.json').write_text(__import__('json').dumps(dict(rec, kind='smoke')))
    found = gpu_bench.find_records(tmp_path)
    assert len(found) == 1 and found[0]['_path'] == 'x.json'
    import matplotlib; matplotlib.use('Agg')
    gpu_bench.show_record(found[0]); gpu_bench.plot_decode(found[0])
