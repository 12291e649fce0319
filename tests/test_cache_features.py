"The transformers features of `QuantizedKVCache`: beam search, crop, left padding with sinks, continuing, sampling."
import pytest, torch
pytest.importorskip('transformers', reason='needs the hf extra: pip install "tensormem[hf]"')
from hypothesis import given, settings, strategies as st
from transformers import DynamicCache
from tensormem.hf_cache import (tiny_llama, CastQuantizer, QuantizedKVCache, QuantizedKVLayer, packed_select, packed_head,
                                outlier_slots, row_starts, takes_valid)
from tensormem.hqmq import HQMQ
from tensormem.quant import codes_equal, synthetic_kv
from tensormem.baselines import NaiveInt, KIVI, TurboQuantLike

V = 61
@pytest.fixture(scope='module')
def tl(): return tiny_llama(vocab=V, hidden=64, layers=2, heads=4, kv_heads=2, pad_token_id=0)

def batch(pad=(0, 2, 5), T=9, seed=0):
    "Left-padded ids `[B, T]` (row i has `pad[i]` pads) whose second half repeats the first (prompt lookup finds candidates)."
    ids = torch.randint(1, V, (len(pad), T), generator=torch.Generator().manual_seed(seed)); ids[:, 5:] = ids[:, :T - 5]
    am = torch.ones_like(ids)
    for i, p in enumerate(pad): am[i, :p] = 0
    return ids.masked_fill(am == 0, 0), am

def gen(m, ids, am, cache=None, seed=0, **kw):
    torch.manual_seed(seed)
    with torch.no_grad(): return m.generate(ids, attention_mask=am, cache=cache, max_new_tokens=6, **kw)

def lossless(m, sinks=0, fp_layers=()): return QuantizedKVCache(m.config, CastQuantizer(None), sink_tokens=sinks, fp_layers=fp_layers)

def test_tiny_llama_is_the_package_one():
    from conftest import tiny_llama as t      # conftest's lazy wrapper builds the package's model
    assert torch.equal(t(seed=3).lm_head.weight, tiny_llama(seed=3).lm_head.weight)
    m = tiny_llama(heads=4, kv_heads=1, head_dim=16)
    assert (m.config.num_key_value_heads, m.config.head_dim, m.config.hidden_size) == (1, 16, 32)

# ---- generate() against DynamicCache, lossless store: token for token ----
STRATEGIES = {'greedy': {}, 'beam': dict(num_beams=3), 'beam_returns': dict(num_beams=4, num_return_sequences=2),
              'sample': dict(do_sample=True, top_k=0), 'beam_sample': dict(num_beams=2, do_sample=True)}

@pytest.mark.parametrize('sinks', [0, 3])
@pytest.mark.parametrize('name', list(STRATEGIES))
def test_generate_matches_dynamic_cache(tl, name, sinks):
    ids, am = batch()
    ref = gen(tl, ids, am, **STRATEGIES[name])
    out = gen(tl, ids, am, lossless(tl, sinks, fp_layers=(1,) if sinks else ()), **STRATEGIES[name])
    assert torch.equal(out, ref)

@pytest.mark.parametrize('sinks', [0, 2])
def test_prompt_lookup_matches_dynamic_cache_and_crops(tl, sinks, monkeypatch):
    ids, am = batch(pad=(0,))
    crops = []
    orig = QuantizedKVCache.crop
    monkeypatch.setattr(QuantizedKVCache, 'crop', lambda self, n: (crops.append(n), orig(self, n))[1])
    ref = gen(tl, ids, am, prompt_lookup_num_tokens=3)
    out = gen(tl, ids, am, lossless(tl, sinks), prompt_lookup_num_tokens=3)
    assert torch.equal(out, ref) and any(n < 0 for n in crops)       # candidates were rejected and cropped away

def test_prompt_lookup_lossy_equals_plain_greedy_with_hqmq(tl):
    "Greedy with and without prompt lookup gives the same tokens with a per-token HQMQ cache: crop leaves no trace."
    ids, am = batch(pad=(0,))
    hq = HQMQ(24, 3, 2, 2, 16, outliers='med_token')
    a = gen(tl, ids, am, QuantizedKVCache(tl.config, hq, sink_tokens=2))
    b = gen(tl, ids, am, QuantizedKVCache(tl.config, hq, sink_tokens=2), prompt_lookup_num_tokens=3)
    assert torch.equal(a, b)

@pytest.mark.parametrize('sinks', [0, 2])
def test_continue_from_returned_cache(tl, sinks):
    ids, am = batch()
    kw = dict(do_sample=False, return_dict_in_generate=True)
    res = []
    for cache in (DynamicCache(config=tl.config), lossless(tl, sinks)):
        first = gen(tl, ids, am, cache, **kw)
        more = torch.cat([first.sequences, ids[:, :3]], 1); am2 = torch.cat([am, torch.ones(3, 9, dtype=am.dtype)], 1)
        res.append(gen(tl, more, am2, first.cache, **kw))
    assert torch.equal(res[0].sequences, res[1].sequences) and isinstance(res[1].cache, QuantizedKVCache)
    assert res[1].cache.get_seq_length() == res[1].sequences.shape[1] - 1

# ---- left padding: sinks are each row's first real tokens; med_row ignores pads ----
def _scores(m, q, ids, am, i, alone, sinks):
    if alone: ids, am = ids[i:i+1, am[i] == 1], am[i:i+1, am[i] == 1]
    out = gen(m, ids, am, QuantizedKVCache(m.config, q, sink_tokens=sinks), output_scores=True, return_dict_in_generate=True)
    return torch.stack(out.scores, 1)[0 if alone else i]

@pytest.mark.parametrize('sinks', [0, 4])
@pytest.mark.parametrize('outliers', [None, 'med_row', 'med_token'])
def test_padded_row_equals_prompt_alone(tl, sinks, outliers):
    ids, am = batch()
    q = HQMQ(24, 2, 2, 2, 16, outliers=outliers)
    for i in (1, 2):
        torch.testing.assert_close(_scores(tl, q, ids, am, i, False, sinks), _scores(tl, q, ids, am, i, True, sinks), atol=1e-4, rtol=0)

def test_sinks_change_a_lossy_result(tl):
    "The test above can fail: 4 exact sinks move the logits of a 2-bit store well beyond its tolerance."
    ids, am = batch(); q = HQMQ(24, 2, 2, 2, 16)
    assert (_scores(tl, q, ids, am, 2, True, 4) - _scores(tl, q, ids, am, 2, True, 0)).abs().max() > 1e-2

def test_row_starts_and_layout():
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
    assert row_starts(pos, 3, 6).tolist() == [2, 0, 5]
    assert row_starts(pos[None].expand(3, 3, 6), 3, 6).tolist() == [2, 0, 5]     # [3, B, t] (multimodal positions)
    lay = QuantizedKVLayer(CastQuantizer(torch.float16), 0, sink_tokens=2)
    x = torch.randn(3, 2, 6, 4, dtype=torch.float64)
    k, _ = lay.update(x, x, kwargs={'position_ids': pos})
    assert (lay.packed_start, lay.plain_end) == (2, 7)
    exact = (torch.arange(6)[None] < torch.tensor([4, 2, 7])[:, None])[:, None, :, None].expand_as(x)   # pads + own sinks
    assert torch.equal(k[exact], x[exact]) and torch.equal(k[~exact], x.half().double()[~exact])
    k2, _ = lay.update(x[:, :, :2], x[:, :, :2])                          # row 2's second sink arrives while decoding
    assert torch.equal(k2[2, :, 6], x[2, :, 0]) and torch.equal(k2[0, :, 6], x[0, :, 0].half().double())

def test_valid_mask_reaches_the_quantizer():
    seen = []
    class Spy(CastQuantizer):
        def quantize(self, x, layer, role, valid=None): seen.append(valid); return super().quantize(x, layer, role)
    assert takes_valid(Spy()) and not takes_valid(type('Q', (), {'quantize': lambda self, x, layer, role: x})())
    lay = QuantizedKVLayer(Spy(None), 0, sink_tokens=1)
    x = torch.randn(2, 1, 5, 4)
    lay.update(x, x, kwargs={'position_ids': torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])})
    assert seen[0].tolist() == [[True] * 4, [False, False, True, True]]    # positions 1..4: row 1's pads and sink masked
    lay.update(x[:, :, :1], x[:, :, :1]); assert seen[-1] is None           # decode steps: all real, no mask

# ---- packed storage by batch row and token ----
QUANTIZERS = {'hqmq': HQMQ(24, 3, 1, 2, 16), 'hqmq_med_token': HQMQ(48, 2, 1, 2, 16, outliers='med_token'),
              'hqmq_med_row': HQMQ(24, 3, 1, 2, 16, outliers='med_row'), 'int4_med_token': NaiveInt(4, 'med_token'),
              'turbo': TurboQuantLike(3), 'kivi': KIVI(2, group=4, residual=4), 'fp16': CastQuantizer(torch.float16)}

@pytest.mark.parametrize('name', list(QUANTIZERS))
def test_packed_select_decodes_selected_rows(name):
    q = QUANTIZERS[name]; x = synthetic_kv(4, 2, 13, 16, seed=5)
    p = q.quantize(x, 0, 'k'); idx = torch.tensor([3, 3, 0, 2])
    assert torch.equal(q.dequantize(packed_select(p, idx)), q.dequantize(p)[idx])
    if name in ('hqmq', 'hqmq_med_token', 'hqmq_med_row', 'int4_med_token', 'turbo'):   # per-row encodings: the rows' own bytes
        assert codes_equal(packed_select(p, idx), q.quantize(x[idx], 0, 'k'))

def test_packed_select_moves_outliers_not_requantizes():
    q = QUANTIZERS['hqmq_med_token']; x = synthetic_kv(3, 2, 9, 16, seed=6); p = q.quantize(x, 0, 'v')
    s = packed_select(p, torch.tensor([2, 1]))
    rows = outlier_slots(p)[[2, 1]]
    assert torch.equal(s.outliers, p.outliers[rows[rows >= 0]])           # the stored fp16 values, moved
    assert torch.equal(s.plain, p.plain[[2, 1]]) and torch.equal(s.sigma, p.sigma[[2, 1]])

@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 35), frac=st.floats(0, 1), S=st.sampled_from([24, 48, 96]), outliers=st.sampled_from([None, 'med_token']))
def test_packed_head_is_the_write_of_the_prefix(T, frac, S, outliers):
    q = HQMQ(S, 3, 1, 2, 16, outliers=outliers); x = synthetic_kv(2, 2, T, 16, seed=T)
    n = int(frac * T)
    assert codes_equal(packed_head(q.quantize(x, 0, 'k'), n), q.quantize(x[:, :, :n], 0, 'k'))

def test_packed_head_kivi_residual_only():
    q = QUANTIZERS['kivi']; x = synthetic_kv(1, 2, 14, 16, seed=7); p = q.quantize(x, 0, 'k')   # 8 quantized + 6 residual
    assert torch.equal(q.dequantize(packed_head(p, 9)), q.dequantize(p)[:, :, :9])
    with pytest.raises(ValueError, match='quantized groups'): packed_head(p, 7)

def test_unknown_packed_type_refused():
    with pytest.raises(TypeError, match='select_batch'): packed_select(object(), torch.tensor([0]))
    with pytest.raises(TypeError, match='head'): packed_head(type('P', (), {'shape': (1, 1, 3, 4)})(), 1)

# ---- beam search on a lossy cache: reordered packed bytes ----
def test_beam_search_with_hqmq_reorders_bytes(tl, monkeypatch):
    hq = HQMQ(24, 3, 2, 2, 16, outliers='med_token'); ids, am = batch()
    c = QuantizedKVCache(tl.config, hq, sink_tokens=2)
    calls = []
    orig = QuantizedKVLayer._index_plan
    def spy(self, idx):
        before = {r: list(ps) for r, ps in self.packed.items()}; apply = orig(self, idx)
        def check():
            apply()
            for r in 'kv':
                for new, old in zip(self.packed[r], before[r]): assert codes_equal(new, packed_select(old, torch.as_tensor(idx)))
            calls.append(1)
        return check
    monkeypatch.setattr(QuantizedKVLayer, '_index_plan', spy)
    gen(tl, ids, am, c, num_beams=3)
    assert calls and c.get_seq_length() == 9 + 6 - 1 and c.layers[0].packed["k"][0].shape[0] == 3 * 3

# ---- crop ----
def _filled(q, T=10, sinks=2, fp_layers=(), B=2, seed=0):
    m = tiny_llama(vocab=V, hidden=64, layers=2, heads=4, kv_heads=2)
    c = QuantizedKVCache(m.config, q, sink_tokens=sinks, fp_layers=fp_layers)
    with torch.no_grad(): m(torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed)), cache=c)
    return m, c

def test_crop_keeps_sinks_cuts_last_and_rewrites():
    hq = HQMQ(24, 3, 2, 2, 16, outliers='med_token')
    m, c = _filled(hq)
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(0))
    k_full = c.layers[0]._history('k', torch.float32)
    c.crop(-7); assert c.get_seq_length() == 3 and c.layers[1].get_seq_length() == 3
    assert torch.equal(c.layers[0]._history('k', torch.float32), k_full[:, :, :3])
    c.crop(-2); assert c.get_seq_length() == 1 and c.layers[0].packed['k'] == [] and c.layers[0].keys.shape[2] == 1   # into the sinks
    with torch.no_grad(): m(ids[:, 1:], cache=c)                     # write the rest again: as if never cropped
    assert torch.equal(c.layers[0]._history('k', torch.float32), k_full)
    assert c.get_mask_sizes(1, 0) == (11, 0)

def test_crop_arguments_and_atomicity():
    _, c = _filled(KIVI(2, group=4, residual=2), T=12, fp_layers=(0,))
    n0 = c.nbytes()
    with pytest.raises(ValueError, match='quantized groups'): c.crop(-5)          # layer 1: KIVI groups of tokens 2..9
    assert [l.get_seq_length() for l in c.layers] == [12, 12] and c.nbytes() == n0   # layer 0 could, but nothing changed
    with pytest.raises(ValueError, match='≤ 0'): c.crop(3)
    with pytest.raises(ValueError, match='holds 12'): c.crop(-13)
    with pytest.raises(ValueError, match='int'): c.crop(-1.0)
    c.crop(0); assert c.get_seq_length() == 12
    c.crop(-1); assert c.get_seq_length() == 11 and c.is_croppable
    c.crop(-11); assert c.get_seq_length() == 0 and c.nbytes() == 0 and c.layers[1].starts is None

def test_index_refusal_is_atomic():
    class Raw(CastQuantizer):                            # a packed type the cache cannot index by batch
        def quantize(self, x, layer, role): return type('Raw', (), {'shape': tuple(x.shape), 'x': x, 'nbytes': 0})()
        def dequantize(self, p): return p.x
    _, c = _filled(Raw(), fp_layers=(0,))
    k0 = c.layers[0].keys.clone()
    with pytest.raises(TypeError, match='select_batch'): c.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(c.layers[0].keys, k0)            # layer 0 (full precision) was not reordered either

def test_subclass_with_own_storage_must_override():
    class Own(QuantizedKVLayer):
        def _write(self, x, role): pass
    lay = Own(CastQuantizer(None), 0)
    assert not lay.is_croppable and QuantizedKVLayer(CastQuantizer(None), 0).is_croppable   # generate() refuses assisted decoding upfront
    with pytest.raises(NotImplementedError, match='_crop_plan'): lay.crop(-1)
    with pytest.raises(NotImplementedError, match='_index_plan'): lay.reorder_cache(torch.tensor([0]))

# ---- one write's K and V must agree ----
def test_update_refuses_mismatched_kv():
    lay = QuantizedKVLayer(CastQuantizer(None), 0)
    with pytest.raises(ValueError, match='must agree in'): lay.update(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match='must agree in'): lay.update(torch.randn(2, 2, 5, 4), torch.randn(1, 2, 5, 4))
    with pytest.raises(ValueError, match='`value_states` must have 4 dims'): lay.update(torch.randn(1, 2, 5, 4), torch.randn(2, 5, 4))
    with pytest.raises(TypeError, match='`key_states` must be a torch.Tensor'): lay.update(None, torch.randn(1, 2, 5, 4))
    assert lay.get_seq_length() == 0 and not lay.is_initialized
    lay.update(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 8))                  # V may have another head dim
    with pytest.raises(ValueError, match='holds \\(1, 2\\)'): lay.update(torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 8))
    assert lay.get_seq_length() == 5
