"""Bad and unusual inputs to the quantizer modules (quaternion, quant, hqmq, baselines, eval_hqmq), table-driven.

Each row: an id, a callable, and either the error it must raise (type + a substring naming what was wrong) or a check
of its result. Every row comes from an audit of the public API: none may return a silently wrong result."""
import math
import pytest, torch
from tensormem.core import UsageError
from tensormem.quaternion import qnorm, qinv, nearest_hurwitz, hurwitz_units
from tensormem.quant import pack_bits, unpack_bits, outlier_mask, kv_cache_bytes, synthetic_kv, codes_equal, check_kv
from tensormem.hqmq import HQMQ, HQMQPacked, secondary_codebooks
from tensormem.baselines import NaiveInt, IntPacked, KIVI, TurboQuantLike

def _eval(name):
    "`eval_hqmq` needs the hf extra: import it when a row runs, and skip that row without the extra."
    pytest.importorskip('transformers', reason='needs the hf extra: pip install "tensormem[hf]"')
    import tensormem.eval_hqmq as m
    return getattr(m, name)
def parse_options(argv): return _eval('parse_options')(argv)
def target_verdict(rows): return _eval('target_verdict')(rows)

X = synthetic_kv(2, 3, 6, 16, seed=0)                  # [B, H, T, d]
HQ = HQMQ(24, 3, 2, 3, 16)
HQM = HQMQ(24, 3, 2, 3, 16, outliers='med_token')

def _padded_row_codes_equal_alone(q):
    "A left-padded row of a batch gets the codes it gets alone (per-row Med3×)."
    x = torch.cat([synthetic_kv(1, 3, 6, 16, seed=1), synthetic_kv(1, 3, 6, 16, seed=2)])
    x[1, :, :2] = 50.                                  # junk in the pad positions of row 1
    valid = torch.ones(2, 6, dtype=torch.bool); valid[1, :2] = False
    both, alone = q.quantize(x, 0, 'k', valid=valid), q.quantize(x[1:, :, 2:], 0, 'k')
    fl = unpack_bits(both.flags[1:, :, 2:], 1, 4)
    return torch.equal(fl, unpack_bits(alone.flags, 1, 4))

def _pads_ignored(q):
    "Loud values in pad positions leave the real tokens' reconstruction unchanged."
    x = X.clone(); x[0, :, :3] *= 50; valid = torch.ones(2, 6, dtype=torch.bool); valid[0, :3] = False
    return torch.equal(q.fake_quant(x, 0, 'k', valid=valid)[:, :, 3:], q.fake_quant(X, 0, 'k', valid=valid)[:, :, 3:])

def _cat_empty_first_keeps_outliers():
    x = synthetic_kv(1, 3, 6, 16, seed=0, scale=40); full = HQM.quantize(x, 0, 'k')
    return len(full.outliers) > 0 and all(codes_equal(HQMQPacked.cat(p), full) for p in
                                          ([HQM.quantize(x[:, :, :0], 0, 'k'), full], [full, HQM.quantize(x[:, :, :0], 0, 'k')]))

def _one_window_rows(tokens):
    "fp16 and one method on one window of `tokens` predicted tokens (what `--windows 1 --length tokens+1` gives)."
    r = lambda n, f, b, nll: dict(name=n, family=f, measured=b, nll=[nll], tokens=[tokens], ppl=math.exp(nll / tokens), gap=0.)
    return [r('fp16', 'fp16', 16., 2. * tokens), r('s96r4', 'HQMQ', 4.1, 2. * tokens)]

ERRORS = [   # id, callable, exception type(s), substring of the message
    ('dequantize other seed', lambda: HQMQ(24, 3, 2, 3, 16, seed=7).dequantize(HQ.quantize(X, 0, 'k')), ValueError, 'another quantizer configuration'),
    ('dequantize other geometry', lambda: HQMQ(24, 3, 5, 3, 16).dequantize(HQ.quantize(X, 0, 'k')), ValueError, 'another quantizer configuration'),
    ('dequantize other type', lambda: HQ.dequantize(NaiveInt(4).quantize(X, 0, 'k')), TypeError, '`p` must be a HQMQPacked'),
    ('NaiveInt C=-1', lambda: NaiveInt(4, 'med', C=-1), ValueError, '`C` must be a finite number > 0, got -1'),
    ('NaiveInt C=nan', lambda: NaiveInt(4, 'med', C=float('nan')), ValueError, '`C` must be a finite number > 0'),
    ('HQMQ C=inf', lambda: HQMQ(24, 3, 1, 1, 8, C=float('inf')), ValueError, '`C` must be a finite number > 0'),
    ('outlier_mask C=0', lambda: outlier_mask(torch.ones(1, 1, 2, 4), 'med', C=0), ValueError, '`C` must be a finite number > 0'),
    ('HQMQ x·1e-8', lambda: HQ.quantize(X * 1e-8, 0, 'k'), ValueError, 'below 6.1e-05'),
    ('NaiveInt x·1e-8', lambda: NaiveInt(4).quantize(X * 1e-8, 0, 'k'), ValueError, 'below 6.1e-05'),
    ('TurboQuant x·1e-8', lambda: TurboQuantLike(3).quantize(X * 1e-8, 0, 'k'), ValueError, 'vector norms below 6.1e-05'),
    ('HQMQ x·1e5', lambda: HQ.quantize(X * 1e5, 0, 'k'), ValueError, 'beyond the fp16 range'),
    ('hurwitz_units int64', lambda: hurwitz_units(torch.int64), TypeError, '`dtype` must be a floating dtype'),
    ('qinv overflow', lambda: qinv(torch.tensor([1e-40, 0., 0., 0.])), ValueError, 'inverse overflows'),
    ('qinv zero', lambda: qinv(torch.zeros(4)), ValueError, 'zero quaternion'),
    ('kv_cache_bytes tokens<0', lambda: kv_cache_bytes(30, 3, 64, -5, 16), ValueError, '`tokens` must be an int ≥ 0, got -5'),
    ('kv_cache_bytes bits nan', lambda: kv_cache_bytes(30, 3, 64, 5, float('nan')), ValueError, '`bits_per_element`'),
    ('HQMQ outlier_frac 1.5', lambda: HQ.bits_per_element(outlier_frac=1.5), ValueError, '`outlier_frac` must be a fraction in [0, 1], got 1.5'),
    ('NaiveInt outlier_frac 1.5', lambda: NaiveInt(4, 'med').bits_per_element(64, outlier_frac=1.5), ValueError, '`outlier_frac`'),
    ('pack 300 in 8 bits', lambda: pack_bits(torch.tensor([300]), 8), ValueError, '`codes` must lie in [0, 255]'),
    ('pack negative', lambda: pack_bits(torch.tensor([-1, 0]), 2), ValueError, '`codes` must lie in [0, 3]'),
    ('pack float codes', lambda: pack_bits(torch.tensor([1.]), 2), TypeError, 'integer or bool'),
    ('unpack wrong length', lambda: unpack_bits(torch.zeros(2, dtype=torch.uint8), 8, 3), ValueError, '`packed` must have last dim 3'),
    ('meta x HQMQ', lambda: HQ.quantize(X.to('meta'), 0, 'k'), ValueError, 'meta device'),
    ('meta x NaiveInt', lambda: NaiveInt(4, 'med').quantize(X.to('meta'), 0, 'k'), ValueError, 'meta device'),
    ('meta x KIVI', lambda: KIVI(2).quantize(X.to('meta'), 0, 'k'), ValueError, 'meta device'),
    ('seed 1.5 HQMQ', lambda: HQMQ(24, 3, 1, 1, 8, seed=1.5), ValueError, '`seed` must be an int'),
    ('seed str codebooks', lambda: secondary_codebooks(1, 1, 24, seed='42'), ValueError, '`seed` must be an int'),
    ('seed 0.5 TurboQuant', lambda: TurboQuantLike(3, seed=0.5), ValueError, '`seed` must be an int'),
    ('seed -1 synthetic', lambda: synthetic_kv(1, 1, 2, 4, seed=-1), ValueError, '`seed` must be an int ≥ 0'),
    ('runaway codebooks', lambda: HQMQ(4096, 3, 10**5, 64, 128), ValueError, 'exceed 2**26'),
    ('valid wrong shape', lambda: HQM.quantize(X, 0, 'k', valid=torch.ones(6, 2, dtype=torch.bool)), ValueError, '`valid` must have shape [B, T] = (2, 6)'),
    ('valid not bool', lambda: NaiveInt(4, 'med').quantize(X, 0, 'k', valid=torch.ones(2, 6)), TypeError, '`valid` must be a bool tensor'),
    ('cat nothing', lambda: HQMQPacked.cat([]), ValueError, '`pieces` must be a non-empty list of HQMQPacked'),
    ('cat mixed types', lambda: IntPacked.cat([NaiveInt(4).quantize(X, 0, 'k'), HQ.quantize(X, 0, 'k')]), TypeError, '`pieces` must all be IntPacked'),
    ('check_kv NaN', lambda: check_kv(X.masked_fill(X > 1, float('nan')), 0, 'k'), ValueError, '`x` contains NaN or Inf'),
    ('eval --windows 0', lambda: parse_options(['--windows', '0']), UsageError, '--windows must be ≥ 1, got 0'),
    ('eval --length 1', lambda: parse_options(['--length', '1']), UsageError, '--length must be ≥ 2, got 1'),
    ('eval --length x', lambda: parse_options(['--length', 'x']), UsageError, "argument --length: invalid int value: 'x'"),
    ('eval --methods', lambda: parse_options(['--methods', 'fp16,int9']), UsageError, "unknown method(s) ['int9']"),
    ('eval unknown flag', lambda: parse_options(['--window', '2']), UsageError, 'unrecognized arguments'),
]

@pytest.mark.parametrize('name,f,exc,msg', ERRORS, ids=[e[0] for e in ERRORS])
def test_clear_error(name, f, exc, msg):
    with pytest.raises(exc) as e: f()
    assert msg in str(e.value), str(e.value)

RESULTS = [   # id, callable, check of the result
    ('cat empty then outliers', _cat_empty_first_keeps_outliers, lambda ok: ok),
    ('med_row ignores padding', lambda: _padded_row_codes_equal_alone(HQMQ(24, 3, 1, 3, 16, outliers='med_row')), lambda ok: ok),
    ('NaiveInt med_row ignores padding', lambda: _padded_row_codes_equal_alone(NaiveInt(4, 'med_row')), lambda ok: ok),
    ('nearest_hurwitz fp16 big', lambda: nearest_hurwitz(torch.tensor([6e4, 1e4, 1e4, 1e4]).half())[0].item(), lambda i: i == 0),
    ('qnorm 1e30', lambda: qnorm(torch.tensor([1e30, 0., 0., 0.])).item(), lambda n: math.isclose(n, 1e30, rel_tol=1e-6)),
    ('qnorm 1e-30', lambda: qnorm(torch.tensor([3e-30, 4e-30, 0., 0.])).item(), lambda n: math.isclose(n, 5e-30, rel_tol=1e-5)),
    ('qinv 1e30', lambda: qinv(torch.tensor([1e30, 0., 0., 0.]))[0].item(), lambda v: math.isclose(v, 1e-30, rel_tol=1e-6)),
    ('hurwitz_units float16', lambda: hurwitz_units(torch.float16)[8].tolist(), lambda v: v == [.5, .5, .5, .5]),
    ('HQMQ B=0', lambda: HQM.fake_quant(X[:0], 0, 'k').shape, lambda s: s == (0, 3, 6, 16)),
    ('HQMQ T=0', lambda: HQM.fake_quant(X[:, :, :0], 0, 'k').shape, lambda s: s == (2, 3, 0, 16)),
    ('Med3× med B=0', lambda: outlier_mask(torch.ones(0, 3, 4, 4), 'med').shape, lambda s: s == (0, 3, 4, 4)),
    ('Med3× med_row T=0', lambda: outlier_mask(torch.ones(2, 3, 0, 4), 'med_row').shape, lambda s: s == (2, 3, 0, 4)),
    ('NaiveInt+Med3× B=0', lambda: NaiveInt(4, 'med').fake_quant(X[:0], 0, 'k').shape, lambda s: s == (0, 3, 6, 16)),
    ('NaiveInt+Med3× T=0', lambda: NaiveInt(4, 'med').fake_quant(X[:, :, :0], 0, 'k').shape, lambda s: s == (2, 3, 0, 16)),
    ('NaiveInt T=0 bytes', lambda: NaiveInt(4).quantize(X[:, :, :0], 0, 'k').nbytes, lambda n: n == 0),
    ('zero token HQMQ', lambda: HQ.fake_quant(torch.zeros(1, 3, 2, 16), 0, 'k').abs().sum().item(), lambda s: s == 0),
    ('HQMQ+Med3× pads ignored', lambda: _pads_ignored(HQMQ(24, 3, 2, 3, 16, outliers='med')), lambda ok: ok),
    ('NaiveInt+Med3× pads ignored', lambda: _pads_ignored(NaiveInt(4, 'med')), lambda ok: ok),
    ('verdict 1 window 1 token', lambda: target_verdict(_one_window_rows(1)), lambda s: 'cannot judge' in s and 'YES' not in s),
    ('verdict 1 window 5000 tokens', lambda: target_verdict(_one_window_rows(5000)), lambda s: 'cannot judge — 1 window(s)' in s),
]

@pytest.mark.parametrize('name,f,check', RESULTS, ids=[r[0] for r in RESULTS])
def test_correct_result(name, f, check):
    out = f(); assert check(out), out
