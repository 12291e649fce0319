import math, pytest, torch
pytest.importorskip('transformers', reason='needs the hf extra: pip install "tensormem[hf]"')
from conftest import tiny_llama
from tensormem.eval_hqmq import (Method, geometry, hqmq_method, paper_methods, outlier_fraction, claimed_bits, evaluate_method,
                                 evaluate_model, format_table, target_report, target_verdict, gap_interval, pareto_claims,
                                 pareto_plot, parse_options, main)
from tensormem.core import UsageError
from tensormem.quant import FAMILY_STYLE
from tensormem.hf_cache import QuantizedKVCache, CastQuantizer
from tensormem.hqmq import HQMQ
from tensormem.baselines import NaiveInt

@pytest.fixture(scope='module')
def tiny(): return tiny_llama(vocab=61, hidden=64)

def wins(n=2, L=24): return torch.randint(0, 61, (n, L), generator=torch.Generator().manual_seed(3))

def test_paper_methods_cover_the_table():
    names = [m.name for m in paper_methods()]
    for n in ['fp16', 'int4', 'int3', 'int2', 'int4+med', 's24r3', 's48r4', 's96r4', 's192r4', 's192r6',
              's24r6+med', 's96r6+med', 's192r6+med', 'kivi2', 'kivi4', 'tq3', 'tq4']: assert n in names
    assert len(set(names)) == len(names)

def test_one_vocabulary(tiny):
    "Every paper row is named and grouped exactly like its quantizer, and every family has a plot style."
    for m in paper_methods()[1:]:
        q = m.make(tiny.config); assert (m.name, m.family) == (q.name, q.family) and m.family in FAMILY_STYLE
    for o in (None, 'med', 'med_row', 'med_token'):
        m = hqmq_method(24, 3, o); q = m.make(tiny.config); assert (m.name, m.family) == (q.name, q.family)

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
    rows = evaluate_model(tiny, w, [Method('fp16', 'fp16', lambda c: CastQuantizer()), Method('lossless', 'x', lambda c: CastQuantizer(None)),
                              Method('int2', 'naive int', lambda c: NaiveInt(2))], progress=False)
    assert rows[0]['gap'] == 0 and abs(rows[1]['gap']) < 1e-3 and rows[1]['measured'] == 32.0
    assert rows[2]['gap'] != 0
    t = format_table(rows); assert 'int2' in t and 'measured' in t
    assert rows[0]['tokens'] == [23, 23] and len(rows[2]['nll']) == 2 and 'cannot judge' in target_report(rows)   # 46 tokens: no verdict

def _rows(gaps, n=4, tokens=300, noise=0.):
    "Made-up rows: fp16 with per-window NLL, and rows whose per-window NLL is `gap` above it (± `noise` alternating)."
    base = [tokens * (2.3 + 0.05 * i) for i in range(n)]
    def mk(name, fam, bits, g):
        nll = [b + tokens * math.log1p(g) + (noise * tokens if i % 2 else -noise * tokens) * (g != 0) for i, b in enumerate(base)]
        return dict(name=name, family=fam, measured=bits, nll=nll, tokens=[tokens] * n, ppl=math.exp(sum(nll) / (n * tokens)))
    rows = [mk('fp16', 'fp16', 16, 0.)] + [mk(nm, fam, b, g) for nm, fam, b, g in gaps]
    for r in rows: r['gap'] = r['ppl'] / rows[0]['ppl'] - 1
    return rows

def test_target_report_and_dominance():
    rows = _rows([('int4', 'naive int', 4.25, 0.2), ('s96r4', 'HQMQ', 4.06, 0.005), ('int2', 'naive int', 2.25, 4.)])
    pc = {c['peer']['name']: c for c in pareto_claims(rows)}
    assert (pc['int4']['verdict'], pc['int4']['by']['name'], pc['int2']['verdict']) == ('win', 's96r4', 'no HQMQ row at this cost')
    rep = target_report(rows)
    assert rep.startswith('within 1% of fp16 at ≤ 5.3 bits: YES — s96r4') and 'int2' in rep and 'int4 (4.25 b, +20.00% [' in rep
    assert pareto_claims(_rows([('int4', 'naive int', 4.25, 0.02), ('s96r4', 'HQMQ', 4.3, 0.018)], noise=0.02))[0]['verdict'] == 'lower, intervals overlap'
    assert target_verdict(_rows([('s96r4', 'HQMQ', 4.06, 0.05)])).startswith('within 1% of fp16 at ≤ 5.3 bits: NO — closest s96r4')
    assert 'cannot judge — the 95% intervals' in target_verdict(_rows([('s96r4', 'HQMQ', 4.06, 0.008)], noise=0.02))
    assert 'cannot judge — 1 window(s)' in target_verdict(_rows([('s96r4', 'HQMQ', 4.06, 0.)], n=1, tokens=2000))
    assert 'cannot judge — 4 window(s), 40 predicted tokens' in target_verdict(_rows([('s96r4', 'HQMQ', 4.06, 0.)], tokens=10))
    assert 'no fp16 row' in target_verdict(rows[1:])
    assert pareto_plot(rows).axes[0].get_yscale() == 'log'

def test_gap_interval_is_a_paired_bootstrap():
    rows = _rows([('a', 'HQMQ', 4., 0.01)])
    assert gap_interval(rows[1], rows[0]) == pytest.approx((0.01, 0.01))     # the same gap on every window: a point
    lo, hi = gap_interval(*_rows([('a', 'HQMQ', 4., 0.01)], noise=0.01)[::-1])
    assert lo < 0.01 < hi and gap_interval(*_rows([('a', 'HQMQ', 4., 0.01)], noise=0.01)[::-1], seed=0) == (lo, hi)
    with pytest.raises(ValueError, match='same windows'): gap_interval(rows[1], _rows([], tokens=7)[0])

@pytest.mark.parametrize('argv,msg', [(['--windows', '0'], '--windows must be ≥ 1'), (['--length', '1'], '--length must be ≥ 2'),
    (['--windows', 'x'], 'invalid int value'), (['--methods', 'int9'], "unknown method(s) ['int9']"), (['--nope'], 'unrecognized arguments'),
    (['--sinks', '-1'], '--sinks must be ≥ 0'), (['--dtype', 'int8'], 'invalid choice')])
def test_bad_flags_raise_usage_error(argv, msg):
    with pytest.raises(UsageError) as e: parse_options(argv)
    assert msg in str(e.value) and '\n' not in str(e.value)

def test_main_cli(tmp_path, capsys):
    assert main(['--list']) == 0 and 's192r6+med' in capsys.readouterr().out
    with pytest.raises(UsageError): main(['--methods', 'int9'])
    out = tmp_path / 'p.png'
    assert main(['--windows', '1', '--length', '2', '--methods', 'fp16,int4,s24r3', '--quiet', '--out', str(out)]) == 0   # the audit's case
    text = capsys.readouterr().out
    assert out.stat().st_size > 1000 and 's24r3' in text and 'within 1% of fp16 at ≤ 5.3 bits: cannot judge' in text   # one predicted-token window

# ---- protocol, HQMQ+ rows and the noise yardstick ----
from tensormem.eval_hqmq import (chunked_perplexity, interval_table, hqmq_plus_method, hqmq_plus_ablation, kv_relmse, uniform_plan, hqmq_plus_v1, hqmq_plus_budgets,
                                 noise_methods, relmse_at_gap, noise_plot, FAMILY_STYLE)
from tensormem.perplexity import perplexity

def test_chunked_equals_prefill_for_lossless_and_window(tiny):
    w = wins(2, 24); mk = lambda c: QuantizedKVCache(c, CastQuantizer(None))
    ref = perplexity(tiny, w, mk, batch_size=2, progress=False)
    for chunk in (1, 5, 24):
        r = chunked_perplexity(tiny, w, mk, chunk); assert abs(r.nll - ref.nll) < 1e-3 and r.tokens == ref.tokens
    r = evaluate_method(tiny, w, Method('w', 'fp16', lambda c: CastQuantizer(None), {'recent_tokens': 4, 'recent_dtype': None}, 4))
    assert abs(sum(r['nll']) - ref.nll) < 1e-3

def test_window_row_counts_window_bytes(tiny):
    w = wins(1, 24)
    a = evaluate_method(tiny, w, Method('a', 'x', lambda c: HQMQ(24, 3, 2, 2, 16)))
    b = evaluate_method(tiny, w, Method('b', 'x', lambda c: HQMQ(24, 3, 2, 2, 16), {'recent_tokens': 8}, 4))
    assert b['measured'] > a['measured'] + 8 / 24 * (16 - a['measured']) - 0.3    # 8 of 24 tokens in fp16
    assert b['ppl'] != a['ppl']

def test_hqmq_plus_rows_and_cli_names(tiny):
    q = hqmq_plus_method(plan=uniform_plan('s24r3', 's24r2', {(0, 'k')})).make(tiny.config).inner
    assert type(q.plan[(0, 'k')]).__name__ == 'CastQuantizer' and type(q.plan[(1, 'v')]).__name__ == 'RotatedHQMQ'
    assert (q.plan[(1, 'k')].inner.S, q.plan[(1, 'v')].inner.radius_bits) == (24, 2)
    assert all(m.family == 'HQMQ+' for m in hqmq_plus_ablation() + hqmq_plus_budgets()) and 'HQMQ+' in FAMILY_STYLE
    _, ms = parse_options(['--methods', 'fp16,hqmq+,s192r6+rot,hqmq+@4.25,hqmq+ v1+c'])
    assert [m.name for m in ms] == ['fp16', 'hqmq+', 's192r6+rot', 'hqmq+@4.25', 'hqmq+ v1+c']
    assert {'hqmq+', 'hqmq+@2.3', 'hqmq+@2.5', 'hqmq+@3.25', 'hqmq+@5.7'} <= {m.name for m in parse_options([])[1]}
    with pytest.raises(ValueError, match='no measured HQMQ\\+ plan'): hqmq_plus_method().make(tiny.config)   # the tiny geometry has none
    v1 = hqmq_plus_v1().make(tiny.config)                       # the first recipe: s768r5 everywhere, no centring
    assert type(v1).__name__ == 'LayerwiseQuantizer' and v1.plan[(1, 'k')].name == 's768r5+rot'

def test_interval_table_prints_intervals(tiny):
    rows = evaluate_model(tiny, wins(3, 24), [Method('fp16', 'fp16', lambda c: CastQuantizer()), hqmq_method(24, 3)], progress=False)
    t = interval_table(rows); assert '95% CI' in t and t.count(']%') == 1

def test_kv_relmse_and_noise_yardstick(tiny):
    w = wins(1, 24); nm = noise_methods((1e-3,))[0]
    assert abs(kv_relmse(tiny, w, nm) - 1e-3) < 3e-4
    assert kv_relmse(tiny, w, Method('l', 'x', lambda c: CastQuantizer(None))) == 0
    assert kv_relmse(tiny, w, hqmq_method(24, 3)) > kv_relmse(tiny, w, hqmq_method(192, 6)) > 0
    rows = [dict(name=f'n{r}', family='noise (yardstick)', relmse=r, gap=g) for r, g in ((1e-4, .002), (1e-3, .02))]
    assert abs(relmse_at_gap(rows, .01) - 5e-4) < 1e-9       # slope 1 in log-log: gap ×5 at relMSE ×5
    fig = noise_plot(rows + [dict(name='m', family='HQMQ', relmse=3e-4, gap=.01)]); assert len(fig.axes) == 1


def test_pareto_plot_gap_axis_clips_and_names():
    "The plot shows the gap to fp16 in % on a log axis; a catastrophic row is drawn at the clip and named with its gap."
    import matplotlib; matplotlib.use('Agg')
    rows = [dict(name='fp16', family='fp16', ppl=10., measured=16.), dict(name='good', family='HQMQ', ppl=10.2, measured=4.),
            dict(name='bad', family='naive int', ppl=80., measured=3.), dict(name='near', family='HQMQ', ppl=10.21, measured=4.05)]
    ax = pareto_plot(rows).axes[0]
    texts = {t.get_text(): t for t in ax.texts}
    assert ax.get_yscale() == 'log' and 'bad (+700 %)' in texts and 'good' in texts
    assert max(float(y) for c in ax.collections for _, y in c.get_offsets()) <= 100
    assert texts['good'].xyann != texts['near'].xyann                      # close points: labels nudged apart
    with pytest.raises(ValueError, match="'fp16' row"): pareto_plot(rows[1:])


# ---- a second model: --model, named HQMQ rows, windows with BOS ----
from tensormem.eval_hqmq import text_windows, named_hqmq
from tensormem.perplexity import windows

class _Tok:
    "A stand-in tokenizer: one id per character (ord % 50 + 3), BOS id 2 when `add_bos_token`."
    def __init__(self, bos): self.add_bos_token, self.bos_token_id = bos, 2
    def __call__(self, text, add_special_tokens=True): return {'input_ids': [ord(c) % 50 + 3 for c in text]}

def test_text_windows_bos_per_window():
    text = 'the quick brown fox jumps over the lazy dog ' * 3
    ids = torch.tensor([ord(c) % 50 + 3 for c in text])
    assert torch.equal(text_windows(_Tok(False), 10, 4, text), windows(ids, 10, 4))
    w = text_windows(_Tok(True), 10, 4, text)
    assert w.shape == (4, 10) and (w[:, 0] == 2).all() and (w[:, 1:] != 2).all()
    assert torch.equal(w[:, 1:].flatten(), ids[:36])                       # <bos> + the next 9 stream tokens, no overlap
    with pytest.raises(ValueError, match='`n`'): text_windows(_Tok(True), 10, 100, text)

def test_model_option_and_named_hqmq_rows():
    assert parse_options([])[0].model == 'smollm2' and parse_options(['--model', 'gemma3'])[0].model == 'gemma3'
    with pytest.raises(UsageError, match=r"--model must be one of \['smollm2', 'gemma3'\], got 'llama'"): parse_options(['--model', 'llama'])
    ms = parse_options(['--methods', 's96r4+med_token,s48r3,fp16'])[1]
    assert [(m.name, m.family) for m in ms] == [('s96r4+med_token', 'HQMQ+Med3×(token)'), ('s48r3', 'HQMQ'), ('fp16', 'fp16')]
    assert named_hqmq('int4') is None and named_hqmq('s24r3+med').make(tiny_llama().config).outliers == 'med'
    with pytest.raises(UsageError, match='`radius_bits`'): parse_options(['--methods', 's96r9'])
    with pytest.raises(UsageError, match=r"unknown method\(s\) \['s96r4\+mad'\]"): parse_options(['--methods', 's96r4+mad'])
