"Fused HQMQ decode in transformers (11_fused_decode): the append-only store, the kernel over it, generate() through it."
import ast, math, subprocess, sys, pytest, torch
from hypothesis import given, settings, strategies as st
pytest.importorskip('transformers', reason='needs the hf extra: pip install "tensormem[hf]"')
pytest.importorskip('transformers', reason='needs the hf extra: pip install "tensormem[hf]"')
from tensormem.hf_cache import tiny_llama
from tensormem.hqmq import HQMQ, HQMQPacked
from tensormem.quant import synthetic_kv, codes_equal, unpack_bits
from tensormem.hf_cache import QuantizedKVCache
from tensormem.ops.hqmq import decode_attention_sources
import tensormem.fused as fused
from tensormem.fused import HQMQStore, FusedHQMQCache, FusedKV, enable_fused_hqmq, left_padding_starts


def test_fused_loads_no_tensor_cache_module():
    "The HQMQ decode path does not drag in Tensor Cache: no tensor_cache, fastweight, lm or ops.dla module is imported."
    code = "import sys, tensormem.fused; print(sorted(m for m in sys.modules if m.startswith('tensormem')))"
    mods = ast.literal_eval(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    assert 'tensormem.fused' in mods and 'tensormem.ops.hqmq' in mods
    bad = [m for m in mods if m.split('.')[-1] in ('tensor_cache', 'fastweight', 'lm', 'dla', 'tensor_memory', 'voxel')]
    assert not bad, bad


def test_padded_sinks_attend_matches_reference():
    "Left padding with sinks: each row's sinks are its own first real tokens (exact), the rest attended through the kernel."
    hq = HQMQ(6, 3, 1, 2, 8, outliers='med')
    lay = fused.FusedHQMQLayer(hq, 0, sink_tokens=2, backend='triton')
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    pos = torch.tensor([list(range(9)), [1] * 4 + list(range(5))])
    lay.update(k, v, position_ids=pos)
    assert lay.starts.tolist() == [0, 4] and (lay.packed_start, lay.plain_end) == (2, 6)
    for t in range(2):
        h, _ = lay.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
        assert isinstance(h, FusedKV)
    T = lay.cumulative_length
    mask = (torch.arange(T)[None] >= lay.starts[:, None])[:, None, None]
    q = torch.randn(2, 4, 1, 8, generator=g)
    torch.testing.assert_close(lay.attend(q, mask), lay.attend_reference(q, mask), atol=1e-5, rtol=1e-5)


@settings(max_examples=12, deadline=None)
@given(cfg=st.sampled_from([(6, 3, None), (12, 3, 'med_token'), (96, 4, 'med'), (41, 2, 'med_row'), (7, 5, 'med_token')]),
       d=st.integers(1, 24), B=st.integers(1, 2), H=st.integers(1, 3),
       cuts=st.lists(st.integers(1, 40), min_size=1, max_size=6), block=st.sampled_from([16, 32]), cap=st.integers(1, 70))
def test_store_is_cat_of_writes(cfg, d, B, H, cuts, block, cap):
    S, b, mode = cfg
    hq = HQMQ(S, b, 1, H, d, outliers=mode)
    x = synthetic_kv(B, H, sum(cuts), d, seed=len(cuts))
    pos = [0]
    for c in cuts: pos.append(pos[-1] + c)
    pieces = [hq.quantize(x[:, :, a:e], 0, 'v') for a, e in zip(pos, pos[1:])]
    s = HQMQStore(hq, 0, 'v', B, H, block=block, capacity=cap)
    for p in pieces: s.append(p)
    ref = HQMQPacked.cat(pieces)
    assert len(s) == sum(cuts) and codes_equal(s.packed(), ref)
    assert torch.equal(s.dequantize(), hq.dequantize(ref))
    n_off = 4 * B * H * -(-sum(cuts) // block) if mode else 0
    assert s.nbytes() == ref.nbytes + n_off and s.capacity_nbytes() >= s.nbytes()
    if mode:   # every tile offset points at the row's first outlier of that tile
        cnt = unpack_bits(ref.flags, 1, hq.nc).sum(-1).reshape(B * H, -1); before = torch.cumsum(cnt, 1) - cnt
        assert torch.equal(s.offsets[:, :-(-sum(cuts) // block)].long(), before[:, ::block])


def test_store_errors():
    hq = HQMQ(6, 3, 2, 2, 8)
    s = HQMQStore(hq, 0, 'v', 1, 2)
    x = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="role 'v'"): s.append(hq.quantize(x, 0, 'k'))
    with pytest.raises(ValueError, match='layer 0'): s.append(hq.quantize(x, 1, 'v'))
    with pytest.raises(ValueError, match=r'shape \[1, 2, n, 8\]'): s.append(hq.quantize(torch.randn(2, 2, 3, 8), 0, 'v'))
    with pytest.raises(ValueError, match='outliers'): s.append(HQMQ(6, 3, 2, 2, 8, outliers='med_token').quantize(x, 0, 'v'))
    s.append(hq.quantize(x, 0, 'v'))
    with pytest.raises(ValueError, match='dtype'): s.append(hq.quantize(x.half(), 0, 'v'))
    with pytest.raises(ValueError, match='n_kv_heads'): HQMQStore(hq, 0, 'v', 1, 3)
    with pytest.raises(ValueError, match='power of two'): HQMQStore(hq, 0, 'v', 1, 2, block=48)
    with pytest.raises(ValueError): HQMQStore(hq, 2, 'v', 1, 2)
    with pytest.raises(ValueError, match="'k' or 'v'"): HQMQStore(hq, 0, 'q', 1, 2)
    with pytest.raises(TypeError, match='HQMQ'): HQMQStore(object(), 0, 'v', 1, 2)
    with pytest.raises(ValueError, match='empty'): HQMQStore(hq, 0, 'v', 1, 2).packed()


def test_outlier_capacity_syncs_rarely():
    hq = HQMQ(12, 3, 1, 2, 64, outliers='med_token')
    x = synthetic_kv(1, 2, 600, 64, seed=5)
    s = HQMQStore(hq, 0, 'k', 1, 2)
    s.append(hq.quantize(x[:, :, :100], 0, 'k'))
    for t in range(100, 600): s.append(hq.quantize(x[:, :, t:t + 1], 0, 'k'))
    assert codes_equal(s.packed(), hq.quantize(x, 0, 'k'))   # med_token is per token: one write or 501, the same codes
    assert 1 <= s.n_syncs <= 25, s.n_syncs   # 501 appends, a handful of device reads


@pytest.mark.parametrize('S,b,mode,d,G', [(6, 3, None, 8, 3), (12, 3, 'med_token', 20, 1), (96, 4, 'med', 32, 2)])
def test_kernel_over_store_with_padding_and_lse(S, b, mode, d, G):
    hq = HQMQ(S, b, 2, 2, d, outliers=mode)
    x = synthetic_kv(2, 2, 90, d, seed=2)
    sk, sv = HQMQStore(hq, 1, 'k', 2, 2, block=16, capacity=8), HQMQStore(hq, 1, 'v', 2, 2, block=16, capacity=300)
    for a, e in ((0, 33), (33, 34), (34, 90)):
        sk.append(hq.quantize(x[:, :, a:e], 1, 'k')); sv.append(hq.quantize(x[:, :, a:e].flip(-1), 1, 'v'))
    assert sk.cap != sv.cap                       # different capacities: the kernel takes each role's strides
    q = torch.randn(2, 2 * G, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    first = torch.tensor([17, 0])
    o, lse = decode_attention_sources(q.float(), hq, sk.source(), sv.source(), 90, 2, first=first, return_lse=True, n_split=4, poison=True)
    kk, vv = [s.dequantize().double().repeat_interleave(G, 1) for s in (sk, sv)]
    s = torch.einsum('bhd,bhtd->bht', q, kk) / math.sqrt(d)
    s[0, :, :17] = float('-inf')
    ref = torch.einsum('bht,bhtd->bhd', s.softmax(-1), vv)
    assert (o.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (lse.double() - s.logsumexp(-1)).abs().max() <= 1e-4 * s.logsumexp(-1).abs().max()


def test_left_padding_starts():
    assert left_padding_starts(None, 4) is None
    m = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)[:, None, None]
    assert left_padding_starts(m, 4).tolist() == [0, 3]
    assert left_padding_starts(torch.tensor([[0., 0., -1e9]])[:, None, None].flip(-1), 3).tolist() == [1]
    with pytest.raises(ValueError, match='left padding only'): left_padding_starts(torch.tensor([[1, 0, 1]], dtype=torch.bool)[:, None, None], 3)
    with pytest.raises(ValueError, match='≥5'): left_padding_starts(m, 5)


def _gen(model, cache, ids, am, n=4):
    return model.generate(ids, attention_mask=am, cache=cache, max_new_tokens=n, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, pad_token_id=0)


@pytest.mark.parametrize('sinks,fp_layers,mode,pad', [(0, (), None, False), (2, (), 'med_token', True), (3, (1,), 'med', True)])
def test_generate_on_codes_equals_reference(monkeypatch, sinks, fp_layers, mode, pad):
    "The CPU path (attention scored on the codes) through `generate()`: every decode step of every quantized layer, same tokens."
    model = enable_fused_hqmq(tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2))
    hq = HQMQ(24, 3, 2, 2, 16, outliers=mode)
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(1)); am = torch.ones_like(ids)
    if pad: am[0, :4] = 0
    calls, real = [], fused.code_attention
    monkeypatch.setattr(fused, 'code_attention', lambda *a, **k: calls.append(1) or real(*a, **k))
    fc = FusedHQMQCache(model.config, hq, sink_tokens=sinks, fp_layers=fp_layers, backend='codes')
    out_c = _gen(model, fc, ids, am)
    monkeypatch.undo()
    out_r = _gen(model, QuantizedKVCache(model.config, hq, sink_tokens=sinks, fp_layers=fp_layers), ids, am)
    assert len(calls) == (2 - len(fp_layers)) * 3
    assert torch.equal(out_c.sequences, out_r.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out_c.scores, out_r.scores)) < 1e-4
    assert fc.nbytes() > 0


@pytest.mark.parametrize('sinks,fp_layers,mode,pad', [(0, (), None, False), (2, (), 'med_token', True), (3, (1,), 'med', True)])
def test_generate_through_kernel_equals_reference(monkeypatch, sinks, fp_layers, mode, pad):
    model = enable_fused_hqmq(tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2))
    assert model.config._attn_implementation == fused.ATTN_NAME
    hq = HQMQ(24, 3, 2, 2, 16, outliers=mode)
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(1)); am = torch.ones_like(ids)
    if pad: am[0, :4] = 0
    calls = []
    real = fused.decode_attention_sources
    monkeypatch.setattr(fused, 'decode_attention_sources', lambda *a, **k: calls.append(1) or real(*a, **k))
    fc = FusedHQMQCache(model.config, hq, sink_tokens=sinks, fp_layers=fp_layers, backend='triton')
    out_f = _gen(model, fc, ids, am)
    monkeypatch.undo()
    out_r = _gen(model, QuantizedKVCache(model.config, hq, sink_tokens=sinks, fp_layers=fp_layers), ids, am)
    assert len(calls) == (2 - len(fp_layers)) * 3            # every decode step of every quantized layer
    assert torch.equal(out_f.sequences, out_r.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out_f.scores, out_r.scores)) < 1e-4


def test_backend_choice_and_errors():
    model = enable_fused_hqmq(tiny_llama(hidden=32, layers=1, heads=2, kv_heads=1))
    hq = HQMQ(6, 3, 1, 1, 16)
    ids = torch.randint(1, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    fc = FusedHQMQCache(model.config, hq, backend='torch')    # the reference path: the same numbers as QuantizedKVCache
    qc = QuantizedKVCache(model.config, hq)
    a, b = _gen(model, fc, ids, None, 3), _gen(model, qc, ids, None, 3)
    assert torch.equal(a.sequences, b.sequences) and all(torch.equal(x, y) for x, y in zip(a.scores, b.scores))
    fa = FusedHQMQCache(model.config, hq)                     # 'auto' on CPU: attention on the codes, equal to float rounding
    c = _gen(model, fa, ids, None, 3)
    assert all(l.codes is not None and l.stores is None for l in fa.layers)
    assert torch.equal(c.sequences, b.sequences) and max((x - y).abs().max().item() for x, y in zip(c.scores, b.scores)) < 1e-4
    with pytest.raises(TypeError, match='HQMQ'): FusedHQMQCache(model.config, object())
    with pytest.raises(ValueError, match='backend'): FusedHQMQCache(model.config, hq, backend='cuda')
    plain = tiny_llama(hidden=32, layers=1, heads=2, kv_heads=1)   # handle reaching SDPA: a clear error, not garbage
    with pytest.raises(TypeError, match='enable_fused_hqmq'): _gen(plain, FusedHQMQCache(plain.config, hq, backend='triton'), ids, None, 3)
    with pytest.raises(TypeError, match='enable_fused_hqmq'): FusedKV(None).shape


def test_dense_outliers_append_equals_compact():
    from tensormem.ops.hqmq import hqmq_encode
    for mode in ('med_token', 'med', 'med_row'):
        hq = HQMQ(12, 3, 1, 2, 20, outliers=mode)
        x = synthetic_kv(2, 2, 37, 20, seed=4)
        a, b = HQMQStore(hq, 0, 'k', 2, 2, block=16, capacity=8), HQMQStore(hq, 0, 'k', 2, 2, block=16, capacity=8)
        for s, e in ((0, 20), (20, 21), (21, 37)):
            pd = hqmq_encode(hq, x[:, :, s:e], 0, 'k', backend='triton', dense_outliers=True)
            assert pd.outliers.shape == (2, 2, e - s, hq.nc, 4)
            a.append(pd); b.append(hq.quantize(x[:, :, s:e], 0, 'k'))
        assert codes_equal(a.packed(), b.packed())


@pytest.mark.filterwarnings('ignore::RuntimeWarning')   # the interpreter's fp16 cast of the overflowing value
def test_unchecked_encode_poisons_non_finite_tokens():
    from tensormem.ops.hqmq import hqmq_encode
    hq = HQMQ(6, 3, 1, 2, 8, outliers='med_token')
    x = synthetic_kv(1, 2, 5, 8, seed=1)
    x[0, 1, 3, 2] = float('nan'); x[0, 0, 1, 0] = 1e6          # a NaN, and a norm beyond fp16 (σ would overflow)
    with pytest.raises(ValueError): hqmq_encode(hq, x, 0, 'v', backend='triton')
    p = hqmq_encode(hq, x, 0, 'v', backend='triton', check_values=False)
    bad = torch.zeros(1, 2, 5, dtype=torch.bool); bad[0, 1, 3] = bad[0, 0, 1] = True
    assert torch.equal(p.sigma.isnan(), bad)
    xh = hq.dequantize(p)
    assert xh[bad].isnan().any(-1).all() and xh[~bad].isfinite().all()   # loud where the input was bad, exact elsewhere


def test_dense_attention_output_lse_and_masked_rows():
    from tensormem.fused import dense_attention
    g = torch.Generator().manual_seed(9)
    q, k, v = torch.randn(2, 4, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    o, lse = dense_attention(q, k, v, first=torch.tensor([0, 5]))
    s = torch.einsum('bhd,bhtd->bht', q, k.repeat_interleave(2, 1)) / math.sqrt(8)
    torch.testing.assert_close(o[0], torch.einsum('ht,htd->hd', s[0].softmax(-1), v[0].repeat_interleave(2, 0)))
    torch.testing.assert_close(lse[0], s[0].logsumexp(-1))
    assert torch.equal(o[1], torch.zeros_like(o[1])) and bool((lse[1] == float('-inf')).all())   # every key masked


@pytest.mark.parametrize('backend', ['codes', 'torch'])
@pytest.mark.parametrize('sinks,pad', [(0, False), (2, True)])
def test_beam_search_and_prompt_lookup_equal_reference(backend, sinks, pad):
    "Beam search (rows reordered and repeated) and prompt-lookup decoding (crop) give QuantizedKVCache's tokens: bytes moved, not re-quantized."
    model = enable_fused_hqmq(tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2))
    hq = HQMQ(24, 3, 2, 2, 16, outliers='med_token')
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(3)); am = torch.ones_like(ids)
    if pad: am[0, :3] = 0
    for kw in (dict(num_beams=3), dict(num_beams=2, num_return_sequences=2), dict(prompt_lookup_num_tokens=2)):
        gen = lambda c: model.generate(ids[:1] if 'prompt_lookup_num_tokens' in kw else ids, attention_mask=None if 'prompt_lookup_num_tokens' in kw else am,
                                       cache=c, max_new_tokens=6, do_sample=False, pad_token_id=0, **kw)
        ref = gen(QuantizedKVCache(model.config, hq, sink_tokens=sinks))
        assert torch.equal(gen(FusedHQMQCache(model.config, hq, sink_tokens=sinks, backend=backend)), ref), kw


def test_select_rows_moves_bytes():
    "Selecting rows of the store or the mirror equals the selected rows' own codes."
    from tensormem.fused import _store_rows, _codes_rows, _codes_head
    from tensormem.ops.hqmq_codes import HQMQCodes
    hq = HQMQ(24, 3, 1, 2, 16, outliers='med_token'); x = synthetic_kv(3, 2, 21, 16, seed=9); idx = torch.tensor([2, 0, 2])
    st = HQMQStore(hq, 0, 'k', 3, 2); st.append(hq.quantize(x, 0, 'k'))
    assert codes_equal(_store_rows(st, idx).packed(), hq.quantize(x[idx], 0, 'k'))
    mc = HQMQCodes(hq, 0, 'k', 3, 2).append(hq.quantize(x, 0, 'k'))
    assert torch.equal(_codes_rows(mc, idx).dequantize(), hq.dequantize(hq.quantize(x[idx], 0, 'k')))
    assert torch.equal(_codes_head(mc, 11).dequantize(), hq.dequantize(hq.quantize(x[:, :, :11], 0, 'k')))


def test_sliding_window_layers_keep_the_window():
    "Gemma 3's sliding layers: FusedHQMQCache keeps QuantizedKVCache's sliding layer there (fused on the full layers) and"
    " generates exactly what QuantizedKVCache generates with the same quantizer, beyond the window."
    pytest.importorskip('transformers')
    from tensormem.hf_cache import tiny_gemma3, QuantizedKVCache, QuantizedSlidingKVLayer
    from tensormem.fused import FusedHQMQCache, FusedHQMQLayer, enable_fused_hqmq
    from tensormem.hqmq import HQMQ
    model = tiny_gemma3(sliding_window=6, layers=4, pattern=2)
    cfg = model.config; hq = HQMQ(24, 4, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, outliers='med_token')
    fc = FusedHQMQCache(cfg, hq)
    kinds = [type(l).__name__ for l in fc.layers]
    assert kinds == ['QuantizedSlidingKVLayer', 'FusedHQMQLayer'] * 2, kinds
    ids = torch.randint(1, 64, (1, 9), generator=torch.Generator().manual_seed(0))   # no pad token (0) inside the prompt
    gen = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12)
    ref = model.generate(ids, past_key_values=QuantizedKVCache(cfg, hq), **gen)
    out = enable_fused_hqmq(model).generate(ids, past_key_values=FusedHQMQCache(cfg, hq), **gen)
    assert torch.equal(out, ref)


def _hqmq_plus(L=2, H=2, d=16, k=('s4096r5', 'fp16'), v=('s12r3', 's12r3')):
    from tensormem.hqmq_plus import plan_quantizer
    return plan_quantizer({'k': list(k), 'v': list(v)}, L, H, d)


@pytest.mark.parametrize('backend', ['triton', 'codes', 'torch'])
@pytest.mark.parametrize('sinks,pad', [(0, False), (2, True)])
def test_hqmq_plus_generate_equals_reference(monkeypatch, backend, sinks, pad):
    "HQMQ+ (rotation, per-role S/b_r, centred prompt, an fp16 layer) through generate(): QuantizedKVCache's tokens and logits;"
    " the fused layer attends to two pieces (centred prompt, decode tokens) per step. On the codes the keys' table has"
    " 98 304 entries (int32 indices beside the values' int16); the interpreted Triton encoder gets s96r4 (its search costs O(S))."
    model = enable_fused_hqmq(tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2))
    hp = _hqmq_plus(k=('s96r4' if backend == 'triton' else 's4096r5', 'fp16'))
    ids = torch.randint(1, 64, (2, 21), generator=torch.Generator().manual_seed(4)); am = torch.ones_like(ids)
    if pad: am[0, :4] = 0
    calls, name = [], {'triton': 'decode_attention_sources', 'codes': 'code_attention'}.get(backend)
    if name:
        real = getattr(fused, name); monkeypatch.setattr(fused, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    fc = FusedHQMQCache(model.config, hp, sink_tokens=sinks, backend=backend)
    out_f = _gen(model, fc, ids, am)
    monkeypatch.undo()
    out_r = _gen(model, QuantizedKVCache(model.config, hp, sink_tokens=sinks), ids, am)
    assert [type(l).__name__ for l in fc.layers] == ['FusedHQMQLayer', 'QuantizedKVLayer']
    assert len(calls) == (2 * 3 if name else 0)
    assert torch.equal(out_f.sequences, out_r.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out_f.scores, out_r.scores)) < 1e-4
    lay = fc.layers[0]
    assert [c is not None for _, c in lay.pieces['k']] == [True, False] and [c for _, c in lay.pieces['v']] == [None]
    assert lay.nbytes() == sum(s.nbytes() for s in (lay.stores or lay.codes).values()) + 2 * 2 * 16 * 2 + \
        sum(t.numel() * t.element_size() for t in (lay.keys, lay.values))   # packed or mirrored codes + one fp16 centre per row and head + sinks


@pytest.mark.parametrize('backend', ['triton', 'codes'])
def test_hqmq_plus_pieces_attend_equals_reference(backend):
    "Writes in several pieces (two centred chunks of a prompt, short uncentred writes between): attend == attend_reference."
    hp = _hqmq_plus(L=1, H=2, d=16, k=('s96r4',), v=('s24r3',))
    from tensormem.hqmq_plus import CenteredQuantizer
    hp = CenteredQuantizer(hp.inner, 'kv')                                 # values centred too: the output shift is checked
    lay = fused.FusedHQMQLayer(hp, 0, sink_tokens=1, backend=backend)
    g = torch.Generator().manual_seed(6)
    k, v = synthetic_kv(2, 2, 60, 16, seed=1) + 2., synthetic_kv(2, 2, 60, 16, seed=2) - 1.   # off-centre K/V
    pos = torch.tensor([list(range(20)), [1] * 3 + list(range(17))])
    lay.update(k[:, :, :20], v[:, :, :20], position_ids=pos)
    for a, b in ((20, 22), (22, 40), (40, 41), (41, 60)):
        lay.update(k[:, :, a:b], v[:, :, a:b])
    assert [(s, c is not None) for s, c in lay.pieces['k']] == [(0, True), (19, False), (21, True), (39, False), (40, True)]
    T = lay.cumulative_length; mask = (torch.arange(T)[None] >= lay.starts[:, None])[:, None, None]
    q = torch.randn(2, 4, 1, 16, generator=g)
    ref = lay.attend_reference(q, mask)
    torch.testing.assert_close(lay.attend(q, mask), ref, atol=2e-5, rtol=2e-5)
    assert (lay.attend(q, mask) - ref).abs().max() < 1e-4 * ref.abs().max()
    # the centres matter: without them, attention moves far off
    saved = lay.pieces; lay.pieces = {r: [(s, None) for s, _ in ps] for r, ps in saved.items()}
    assert (lay.attend(q, mask) - ref).abs().max() > 1e-2 * ref.abs().max()
    lay.pieces = saved
    lay.crop(-25); assert [s for s, _ in lay.pieces['k']] == [0, 19, 21] and lay.cumulative_length == 35
    lay.batch_select_indices(torch.tensor([1, 1]))
    assert lay.pieces['k'][0][1].shape[0] == 2 and torch.equal(lay.pieces['k'][0][1][0], lay.pieces['k'][0][1][1])


def test_hqmq_plus_beam_search_equals_reference():
    "Beam search with HQMQ+ (rows reordered: centres follow their rows) gives QuantizedKVCache's tokens."
    model = enable_fused_hqmq(tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2))
    hp = _hqmq_plus(k=('s96r4', 's96r4'))
    ids = torch.randint(1, 64, (2, 18), generator=torch.Generator().manual_seed(8))
    kw = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, cache=QuantizedKVCache(model.config, hp), **kw)
    for backend in ('codes', 'torch'):
        assert torch.equal(model.generate(ids, cache=FusedHQMQCache(model.config, hp, backend=backend), **kw), ref), backend


def test_fused_roles_errors():
    from tensormem.fused import fused_roles
    from tensormem.hqmq_plus import CenteredQuantizer
    from tensormem.baselines import NaiveInt
    hp = _hqmq_plus()
    with pytest.raises(ValueError, match='twice'): fused_roles(CenteredQuantizer(hp, 'k'), 0)
    with pytest.raises(TypeError, match='HQMQ layouts'): FusedHQMQCache(tiny_llama().config, NaiveInt(4))
    with pytest.raises(ValueError, match='fp16'): fused.FusedHQMQLayer(hp, 1)


def test_hqmq_plus_on_sliding_window_model_equals_reference():
    "Gemma 3's layout with HQMQ+: sliding layers stay QuantizedKVCache's, full layers fused; greedy tokens equal QuantizedKVCache's beyond the window."
    from tensormem.hf_cache import tiny_gemma3
    model = tiny_gemma3(sliding_window=6, layers=4, pattern=2)
    cfg = model.config
    hp = _hqmq_plus(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, k=('s96r4',) * 4, v=('s24r3',) * 4)
    fc = FusedHQMQCache(cfg, hp)
    assert [type(l).__name__ for l in fc.layers] == ['QuantizedSlidingKVLayer', 'FusedHQMQLayer'] * 2
    ids = torch.randint(1, 64, (1, 20), generator=torch.Generator().manual_seed(2))   # a centred prompt write (≥ 16 tokens)
    gen = dict(max_new_tokens=10, do_sample=False, min_new_tokens=10)
    ref = model.generate(ids, cache=QuantizedKVCache(cfg, hp), **gen)
    assert torch.equal(enable_fused_hqmq(model).generate(ids, cache=fc, **gen), ref)
    assert fc.layers[1].pieces['k'][0][1] is not None


@pytest.mark.parametrize('backend', ['codes', 'triton'])
def test_fp16_sinks_equal_reference(backend):
    "sink_dtype=fp16 on an fp32 model: the fused cache and QuantizedKVCache hold the same fp16 sinks and generate the same tokens."
    model = enable_fused_hqmq(tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2))
    hq = HQMQ(24, 3, 2, 2, 16)
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(5)); am = torch.ones_like(ids); am[0, :2] = 0
    fc = FusedHQMQCache(model.config, hq, sink_tokens=2, backend=backend, sink_dtype=torch.float16)
    rc = QuantizedKVCache(model.config, hq, sink_tokens=2, sink_dtype=torch.float16)
    a, b = _gen(model, fc, ids, am), _gen(model, rc, ids, am)
    assert torch.equal(a.sequences, b.sequences) and max((x - y).abs().max().item() for x, y in zip(a.scores, b.scores)) < 1e-4
    assert fc.layers[0].keys.dtype == torch.float16 and rc.layers[0].keys.dtype == torch.float16
    f32 = FusedHQMQCache(model.config, hq, sink_tokens=2, backend=backend); _gen(model, f32, ids, am)
    assert f32.nbytes() - fc.nbytes() == sum(2 * (l.keys.numel() + l.values.numel()) for l in fc.layers) > 0   # 2 bytes less per kept value
