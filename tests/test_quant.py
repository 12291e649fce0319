"Tests of tensormem.quant, the interface every quantizer shares: bit packing, Med3× (with padding), packed objects, fingerprints, cat."
import math
import pytest, torch
from hypothesis import given, settings, strategies as st
import tensormem.hqmq, tensormem.baselines
from tensormem.quant import (ROLES, OUTLIER_MODES, FAMILY_STYLE, MED3_SUFFIX, check_kv, check_valid, check_positive, check_fraction,
                             fp16_scale, fp16_values, Packed, KVQuantizer, pack_bits, unpack_bits, chunk_norms, outlier_mask,
                             merge_outliers, cat_outliers, codes_equal, synthetic_kv, attention_error, kv_cache_bytes)
from tensormem.hqmq import HQMQ, HQMQPacked
from tensormem.baselines import NaiveInt, IntPacked, KIVI, KIVIPacked, TurboQuantLike, TQPacked

FAST = settings(max_examples=12, deadline=None)

def test_interface_names_live_in_quant_only():
    "hqmq and baselines import the shared interface; they do not re-export it."
    shared = {'ROLES', 'check_kv', 'Packed', 'KVQuantizer', 'pack_bits', 'unpack_bits', 'chunk_norms', 'OUTLIER_MODES',
              'outlier_mask', 'merge_outliers', 'codes_equal', 'synthetic_kv', 'attention_error', 'kv_cache_bytes'}
    import tensormem.quant as Q
    assert shared <= set(Q.__all__)
    assert not shared & set(tensormem.hqmq.__all__) and not shared & set(tensormem.baselines.__all__)
    assert ROLES == {'k': 0, 'v': 1} and OUTLIER_MODES == ('med', 'med_row', 'med_token')

@FAST
@given(st.integers(1, 16), st.integers(0, 9), st.integers(0, 2**31))
def test_pack_bits_round_trip(width, n, seed):
    c = torch.randint(0, 2**width, (2, 3, n), generator=torch.Generator().manual_seed(seed))
    p = pack_bits(c, width)
    assert p.dtype == torch.uint8 and p.shape[-1] == -(-n * width // 8) and torch.equal(unpack_bits(p, width, n), c)

@pytest.mark.parametrize('codes,width,msg', [(torch.tensor([300]), 8, '[0, 255] for width 8, got values in [300, 300]'),
    (torch.tensor([2**4]), 4, '[0, 15]'), (torch.tensor([-1]), 3, '[0, 7]'), (torch.tensor([1.5]), 4, 'integer or bool tensor')])
def test_pack_bits_refuses_codes_that_do_not_fit(codes, width, msg):
    with pytest.raises((ValueError, TypeError)) as e: pack_bits(codes, width)
    assert '`codes`' in str(e.value) and msg in str(e.value)

def _median_loop(r, mode, valid):
    "Reference Med3× medians by explicit loops over the scope, real positions only (torch's lower median)."
    B, H, T, nc = r.shape; med = torch.full(r.shape, float('nan'))
    keep = lambda b, t: valid is None or bool(valid[b, t])
    for h in range(H):
        for b in range(B):
            for t in range(T):
                if mode == 'med': vals = [r[b2, h, t2, c] for b2 in range(B) for t2 in range(T) if keep(b2, t2) for c in range(nc)]
                elif mode == 'med_row': vals = [r[b, h, t2, c] for t2 in range(T) if keep(b, t2) for c in range(nc)]
                else: vals = [r[b, h, t, c] for c in range(nc)]
                if vals: med[b, h, t] = sorted(vals)[(len(vals) - 1) // 2]
    return med

@FAST
@given(st.integers(1, 3), st.integers(1, 2), st.integers(1, 6), st.integers(1, 5), st.sampled_from(OUTLIER_MODES),
       st.booleans(), st.integers(0, 2**31))
def test_outlier_mask_against_loops(B, H, T, nc, mode, pad, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(B, H, T, nc, generator=g) * torch.rand(B, H, T, 1, generator=g) * 10
    valid = torch.rand(B, T, generator=g) > 0.3 if pad else None
    want = r > 3 * _median_loop(r, mode, valid)
    if valid is not None: want &= valid[:, None, :, None]
    assert torch.equal(outlier_mask(r, mode, 3.0, valid), want)

def test_outlier_mask_padding_does_not_change_a_row():
    x = synthetic_kv(1, 2, 12, 16, seed=3); r = chunk_norms(x.unflatten(-1, (4, 4)))
    junk = torch.cat([100 * torch.rand(1, 2, 5, 4, generator=torch.Generator().manual_seed(1)), r], 2)
    valid = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 12, dtype=torch.bool)], 1)
    for mode in OUTLIER_MODES:
        m = outlier_mask(junk, mode, valid=valid)
        assert torch.equal(m[:, :, 5:], outlier_mask(r, mode)) and not m[:, :, :5].any()

@pytest.mark.parametrize('shape', [(0, 2, 3, 4), (2, 2, 0, 4), (2, 0, 3, 4)])
def test_outlier_mask_empty(shape):
    for mode in OUTLIER_MODES: assert outlier_mask(torch.ones(shape), mode).shape == shape

def test_fp16_scale_and_values():
    assert fp16_scale(torch.tensor([0., 2.]), 'σ').dtype == torch.float16
    with pytest.raises(ValueError, match='below 6.1e-05'): fp16_scale(torch.tensor([1e-6]), 'σ')
    with pytest.raises(ValueError, match='beyond the fp16 range'): fp16_scale(torch.tensor([1e6]), 'σ')
    with pytest.raises(ValueError, match='beyond the fp16 range'): fp16_values(torch.tensor([-1e6]), 'outliers')
    assert fp16_values(torch.tensor([1e-9]), 'outliers').item() == 0      # tiny values kept exactly enough: absolute error ≤ 6e-8

def test_merge_and_cat_outliers():
    g = torch.Generator().manual_seed(0)
    ma, mb = torch.rand(2, 1, 3, 5, generator=g) > .5, torch.rand(2, 1, 2, 5, generator=g) > .5
    va, vb = torch.randn(int(ma.sum()), 4, generator=g).half(), torch.randn(int(mb.sum()), 4, generator=g).half()
    full = torch.zeros(2, 1, 5, 5, 4).half(); full[:, :, :3][ma] = va; full[:, :, 3:][mb] = vb
    fl, vals = merge_outliers([pack_bits(ma, 1), pack_bits(mb, 1)], [va, vb], 5)
    assert torch.equal(unpack_bits(fl, 1, 5).bool(), torch.cat([ma, mb], 2)) and torch.equal(vals, full[unpack_bits(fl, 1, 5).bool()])

def _quantizers():
    return [HQMQ(24, 3, 2, 3, 20), HQMQ(24, 3, 2, 3, 20, outliers='med_token', sigma_outliers=False),
            HQMQ(48, 2, 2, 3, 20, outliers='med'), NaiveInt(4), NaiveInt(4, 'med_token'), NaiveInt(3, 'med_row'),
            TurboQuantLike(3), KIVI(2, group=4, residual=4)]
PER_TOKEN = (0, 1, 3, 4, 6)   # quantizers whose codes depend only on the token: any split gives the same bytes

@FAST
@given(st.lists(st.integers(0, 4), min_size=1, max_size=5), st.integers(0, 2**31))
def test_cat_over_splits_with_empty_writes(sizes, seed):
    "cat of consecutive writes, empty ones included, decodes to the whole; per-token codes are byte-identical to one write."
    x = synthetic_kv(2, 3, sum(sizes), 20, seed=seed % 1000).half()
    cuts = [0]
    for s in sizes: cuts.append(cuts[-1] + s)
    for i, q in enumerate(_quantizers()):
        pieces = [q.quantize(x[:, :, a:b], 1, 'k') for a, b in zip(cuts, cuts[1:])]
        joined = type(pieces[0]).cat(pieces)
        assert joined.shape == tuple(x.shape) and q.dequantize(joined).shape == x.shape
        if i in PER_TOKEN: assert codes_equal(joined, q.quantize(x, 1, 'k')), q
        nonempty = [p for p in pieces if p.shape[2]] or pieces[:1]
        assert codes_equal(joined, type(pieces[0]).cat(nonempty)), q     # empty writes are neutral

def test_cat_empty_write_then_outliers_keeps_them():
    "The audit's case: an empty write followed by one with outliers (and the reverse) keeps every outlier."
    q = HQMQ(24, 3, 1, 2, 16, outliers='med_token'); x = synthetic_kv(1, 2, 6, 16, seed=0, scale=40)
    e, full = q.quantize(x[:, :, :0], 0, 'v'), q.quantize(x, 0, 'v')
    assert len(full.outliers) > 0
    for pieces in ([e, full], [full, e], [e, full, e]):
        j = HQMQPacked.cat(pieces); assert codes_equal(j, full)
        torch.testing.assert_close(q.dequantize(j), q.dequantize(full))

def test_cat_mixed_outlier_fields():
    "A piece without outlier fields (None) joins one with them as 'nothing flagged'."
    q, qo = NaiveInt(4), NaiveInt(4, 'med_token'); x = synthetic_kv(1, 2, 5, 16, seed=1)
    a, b = q.quantize(x[:, :, :2], 0, 'k'), qo.quantize(x[:, :, 2:], 0, 'k')
    j = IntPacked.cat([a, b]); assert j.flags.shape[2] == 5 and len(j.outliers) == len(b.outliers)
    torch.testing.assert_close(qo.dequantize(j)[:, :, 2:], qo.dequantize(b))

def test_fingerprint_checked_on_decode_and_cat():
    x = synthetic_kv(1, 3, 4, 20, seed=0)
    for q, other in [(HQMQ(24, 3, 2, 3, 20), HQMQ(24, 3, 2, 3, 20, seed=1)), (HQMQ(24, 3, 2, 3, 20), HQMQ(24, 3, 3, 3, 20)),
                     (TurboQuantLike(3), TurboQuantLike(3, seed=5)), (KIVI(2), KIVI(2, group=16)), (NaiveInt(4), NaiveInt(5))]:
        p = q.quantize(x, 0, 'k'); assert p.fingerprint == q.fingerprint != other.fingerprint
        with pytest.raises(ValueError, match='another quantizer configuration'): other.dequantize(p)
        with pytest.raises(ValueError, match='different `fingerprint`'): type(p).cat([p, other.quantize(x, 0, 'k')])
    assert HQMQ(24, 3, 2, 3, 20).fingerprint == HQMQ(24, 3, 2, 3, 20, outliers='med', encoder='brute').fingerprint   # same decoder

def test_packed_metadata_is_not_counted():
    p = NaiveInt(4).quantize(synthetic_kv(1, 1, 3, 8), 0, 'k')
    assert p.nbytes == sum(t.numel() * t.element_size() for t in p.tensors().values()) and isinstance(p.fingerprint, int)

def test_validators():
    assert check_positive(2, 'C') == 2. and check_fraction(0.5, 'p') == 0.5
    for bad in (0, -1, float('nan'), float('inf'), True, None):
        with pytest.raises(ValueError, match='`C` must be a finite number > 0'): check_positive(bad, 'C')
    x = torch.zeros(2, 1, 3, 4)
    with pytest.raises(ValueError, match=r'`valid` must have shape \[B, T\] = \(2, 3\)'): check_valid(torch.ones(3, 2, dtype=torch.bool), x)
    with pytest.raises(ValueError, match='meta device'): check_kv(x.to('meta'), 0, 'k')

def test_kv_cache_bytes_and_attention_error():
    assert kv_cache_bytes(80, 8, 128, 128 * 1024, 16) == 2 * 80 * 8 * 128 * 128 * 1024 * 2
    with pytest.raises(ValueError, match='`tokens` must be an int ≥ 0'): kv_cache_bytes(1, 1, 64, -1, 16)
    k, v = synthetic_kv(1, 2, 8, 8, seed=1), synthetic_kv(1, 2, 8, 8, seed=2); q = torch.randn(1, 4, 2, 8)
    assert attention_error(k, v, k, v, q) == 0 and attention_error(k, v, k, v * 2, q) == pytest.approx(1, rel=1e-5)

def test_family_vocabulary():
    assert set(MED3_SUFFIX) == set(OUTLIER_MODES)
    for q in _quantizers(): assert q.family in FAMILY_STYLE
    assert KVQuantizer().family in FAMILY_STYLE
