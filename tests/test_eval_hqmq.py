import math, pytest, torch
from conftest import tiny_llama
from tensormem.eval_hqmq import (Method, geometry, hqmq_method, paper_methods, outlier_fraction, claimed_bits,
                                 evaluate_method, evaluate, format_table, target_report, dominated_by, pareto_plot, main)
from tensormem.hf_cache import QuantizedKVCache, CastQuantizer
from tensormem.hqmq import HQMQ
from tensormem.baselines import NaiveInt

@pytest.fixture(scope='module')
def tiny(): return tiny_llama(vocab=61, hidden=64)

def wins(n=2, L=24): return torch.randint(0, 61, (n, L), generator=torch.Generator().manual_seed(3))

def test_paper_methods_cover_the_table():
    names = [m.name for m in paper_methods()]
    for n in ['fp16', 'int4', 'int3', 'int2', 'int4+Med3×', 's24r3', 's48r4', 's96r4', 's192r4', 's192r6',
              's24r6+Med3×', 's96r6+Med3×', 's192r6+Med3×', 'KIVI-2', 'KIVI-4', 'TQ-3', 'TQ-4']: assert n in names
    assert len(set(names)) == len(names)

def test_geometry_and_hqmq_method(tiny):
    assert geometry(tiny.config) == (2, 2, 16)
    q = hqmq_method(24, 3, 'med', seed=5).make(tiny.config)
    assert isinstance(q, HQMQ) and q.S == 24 and q.outliers == 'med'

def test_evaluate_method_bits_and_outliers(tiny):
    w = wins()
    r = evaluate_method(tiny, w, hqmq_method(48, 4, 'med'))
    c = QuantizedKVCache(tiny.config, HQMQ(48, 4, 2, 2, 16, outliers='med'))
    with torch.no_grad(): tiny(input_ids=w[:1], cache=c, use_cache=True)
    o, n = outlier_fraction(c)
    assert n == 2 * 2 * 1 * 2 * 24 * 4 and 0 <= o < n          # layers·roles·B·H·T·chunks
    assert 0 <= r['outlier_frac'] < 0.5 and r['ppl'] > 1
    assert r['headline'] < r['true'] <= r['measured'] + 0.5    # headline hides σ and outliers; measured is real bytes
    f = evaluate_method(tiny, w, Method('fp16', 'fp16', lambda cfg: CastQuantizer()))
    assert f['measured'] == f['true'] == 16.0 and f['outlier_frac'] == 0

def test_evaluate_gap_and_lossless_row(tiny):
    w = wins()
    rows = evaluate(tiny, w, [Method('fp16', 'fp16', lambda c: CastQuantizer()), Method('lossless', 'x', lambda c: CastQuantizer(None)),
                              Method('int2', 'naive int', lambda c: NaiveInt(2))], progress=False)
    assert rows[0]['gap'] == 0 and abs(rows[1]['gap']) < 1e-3 and rows[1]['measured'] == 32.0
    assert rows[2]['gap'] != 0
    t = format_table(rows); assert 'int2' in t and 'measured' in t

def test_target_report_and_dominance():
    mk = lambda n, f, b, p: dict(name=n, family=f, measured=b, ppl=p, gap=p / 10 - 1)
    rows = [mk('fp16', 'fp16', 16, 10.), mk('int4', 'naive int', 4.25, 12.), mk('s96r4', 'HQMQ', 4.06, 10.05),
            mk('int2', 'naive int', 2.25, 50.)]
    assert dominated_by(rows[1], rows)['name'] == 's96r4' and dominated_by(rows[3], rows) is None
    rep = target_report(rows)
    assert 'YES' in rep and 's96r4' in rep and 'int2' in rep and 'NOT dominated' in rep
    rows[2]['ppl'], rows[2]['gap'] = 10.5, 0.05
    assert 'NO' in target_report(rows).splitlines()[0]
    assert pareto_plot(rows).axes[0].get_yscale() == 'log'

def test_main_cli(tmp_path, capsys):
    assert main(['--list']) == 0 and 's192r6+Med3×' in capsys.readouterr().out
    with pytest.raises(SystemExit): main(['--methods', 'int9'])
    out = tmp_path / 'p.png'
    assert main(['--windows', '1', '--length', '24', '--methods', 'fp16,int4,s24r3', '--quiet', '--out', str(out)]) == 0
    text = capsys.readouterr().out
    assert out.stat().st_size > 1000 and 's24r3' in text and 'within 1% of fp16' in text
