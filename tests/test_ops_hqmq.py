"""Tests of tensormem.ops.hqmq: the Triton encoder byte for byte against `HQMQ.quantize`, the fused decode against
`dequant_sdpa` (the naive peer exported beside it), and the module boundary (no Tensor Cache import).

Without a GPU the kernels run in Triton's interpreter, on small odd shapes. `cuda` tests run the compiled kernels at
realistic sizes."""
import os
import torch
if not torch.cuda.is_available(): os.environ.setdefault('TRITON_INTERPRET', '1')   # before anything imports triton
import dataclasses, math, subprocess, sys
import pytest
from tensormem.ops.hqmq import hqmq_encode, hqmq_decode_attention, dequant_sdpa, outlier_tile_offsets, decode_bytes, fp16_kv_bytes
from tensormem.ops.triton_utils import HAS_CUDA, HAS_TRITON
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason='needs the gpu extra: pip install "tensormem[gpu]"')
from tensormem.hqmq import HQMQ
from tensormem.quant import synthetic_kv, codes_equal, pack_bits


def test_ops_hqmq_imports_no_tensor_cache():
    code = "import sys, tensormem.ops.hqmq; print(sorted(m for m in sys.modules if m.startswith('tensormem')))"
    mods = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    for bad in ('tensor_cache', 'fastweight', 'tensormem.lm', 'ops.dla'): assert bad not in mods, mods


ENC = [(12, 3, 2, 1, 23, 64, None, True, torch.float32),   # base-9 digits, T not a multiple of 10
       (6, 4, 1, 2, 7, 6, None, True, torch.float16),       # d_h = 6: a padded chunk; fp16 input
       (12, 2, 1, 2, 31, 20, 'med_token', False, torch.float32),  # batch-invariant Med3×, σ without outliers
       (7, 3, 1, 1, 15, 16, 'med', True, torch.float32),    # 24S = 8·21: base-21 digits, 7 per word
       (41, 2, 1, 1, 9, 8, None, True, torch.bfloat16)]     # 24S = 8·123: plain ⌈log2 24S⌉-bit layout


@pytest.mark.parametrize('S,b,B,H,T,d,mode,so,dt', ENC)
def test_encode_identical_bytes(S, b, B, H, T, d, mode, so, dt):
    hq = HQMQ(S, b, 2, H, d, outliers=mode, sigma_outliers=so)
    x = synthetic_kv(B, H, T, d, seed=S).to(dt)
    mine, ref = hqmq_encode(hq, x, 1, 'k', backend='triton', poison=True), hq.quantize(x, 1, 'k')
    assert (mine.digits is None) == (hq.layout.q == 1)
    assert codes_equal(mine, ref)
    assert mine.nbytes == ref.nbytes and mine.shape == ref.shape and mine.dtype == ref.dtype


@pytest.mark.parametrize('mode', ['med', 'med_row', 'med_token'])
def test_encode_valid_mask_matches_quantize(mode):
    "Padding left out of the Med3× medians, as `HQMQ.quantize(valid=...)`; the mask changes the codes for the global modes."
    hq = HQMQ(12, 3, 1, 2, 20, outliers=mode)
    x = synthetic_kv(2, 2, 15, 20, seed=5); x[1, :, :6] *= 4                   # loud pads
    valid = torch.arange(15)[None] >= torch.tensor([[0], [6]])
    assert codes_equal(hqmq_encode(hq, x, 0, 'k', valid=valid, backend='triton', poison=True), hq.quantize(x, 0, 'k', valid=valid))
    if mode == 'med': assert not codes_equal(hqmq_encode(hq, x, 0, 'k', backend='triton'), hq.quantize(x, 0, 'k', valid=valid))
    with pytest.raises(ValueError, match='`valid` must have shape'): hqmq_encode(hq, x, 0, 'k', valid=valid[:, :3], backend='triton')

@pytest.mark.filterwarnings('ignore:overflow')
def test_encode_errors_and_auto():
    hq = HQMQ(6, 3, 1, 2, 8)
    with pytest.raises(ValueError, match='KV heads'): hqmq_encode(hq, torch.randn(1, 3, 4, 8), 0, 'k', backend='triton')
    with pytest.raises(ValueError, match='fp16 range'): hqmq_encode(hq, torch.randn(1, 2, 4, 8) * 1e5, 0, 'k', backend='triton')
    x = torch.randn(1, 2, 5, 8)
    if not HAS_CUDA: assert codes_equal(hqmq_encode(hq, x, 0, 'v'), hq.quantize(x, 0, 'v'))


def test_outlier_tile_offsets():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(2, 3, 37, 11, generator=g) > .8
    off = outlier_tile_offsets(pack_bits(m, 1), 11, 16)
    flat = m.flatten().long(); before = torch.cumsum(flat, 0) - flat
    want = before.view(2, 3, 37, 11)[:, :, ::16, 0].reshape(6, -1)
    assert torch.equal(off.long(), want)


DEC = [(12, 3, 2, 2, 3, 45, 32, None, 3, 'fp32'), (6, 4, 1, 1, 2, 70, 6, 'med_token', None, 'fp32'),
       (7, 3, 1, 2, 1, 33, 20, 'med', 2, 'fp32'), (41, 2, 1, 1, 4, 20, 16, 'med_row', 1, 'fp16')]


@pytest.mark.parametrize('S,b,B,Hkv,G,T,d,mode,ns,dot', DEC)
def test_fused_decode_matches_dequant_sdpa(S, b, B, Hkv, G, T, d, mode, ns, dot):
    hq = HQMQ(S, b, 2, Hkv, d, outliers=mode)
    pk, pv = hq.quantize(synthetic_kv(B, Hkv, T, d, seed=3), 1, 'k'), hq.quantize(synthetic_kv(B, Hkv, T, d, seed=4), 1, 'v')
    q = torch.randn(B, Hkv * G, d, generator=torch.Generator().manual_seed(T))
    o = hqmq_decode_attention(q, hq, pk, pv, block=16, n_split=ns, dot=dot, poison=True)
    ref = dequant_sdpa(q, hq, pk, pv, dtype=torch.float64)
    tol = 1e-4 if dot == 'fp32' else 1e-2
    assert (o.double() - ref).abs().max() <= tol * ref.abs().max()
    if mode is not None:   # the outliers matter: dropping them changes the answer
        assert pk.flags is not None and len(pk.outliers) > 0
        z = dataclasses.replace(pk, flags=torch.zeros_like(pk.flags), outliers=pk.outliers[:0])
        assert (dequant_sdpa(q, hq, z, pv, dtype=torch.float64) - ref).abs().max() > 2 * tol * ref.abs().max()


def test_fused_decode_growing_cache_and_errors():
    hq = HQMQ(6, 3, 1, 1, 8)
    x = synthetic_kv(1, 1, 25, 8, seed=0)
    pk = type(hq.quantize(x, 0, 'k')).cat([hq.quantize(x[:, :, :13], 0, 'k')] + [hq.quantize(x[:, :, t:t + 1], 0, 'k') for t in range(13, 25)])
    pv = hq.quantize(x.flip(2), 0, 'v')
    q = torch.randn(1, 2, 8)
    torch.testing.assert_close(hqmq_decode_attention(q, hq, pk, pv, block=16).double(), dequant_sdpa(q, hq, pk, pv, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match='role'): hqmq_decode_attention(q, hq, pv, pk)
    with pytest.raises(ValueError, match='`q` must be'): hqmq_decode_attention(q[:, :, :4], hq, pk, pv)
    assert decode_bytes(pk, pv) == pk.nbytes + pv.nbytes and fp16_kv_bytes(1, 1, 25, 8) == 800


def test_bf16_fused_decode_in_interpreter():
    hq = HQMQ(12, 3, 1, 2, 32, outliers='med_token')
    x = synthetic_kv(2, 2, 50, 32, seed=8)
    pk, pv = hq.quantize(x.bfloat16(), 0, 'k'), hq.quantize(x.flip(2).bfloat16(), 0, 'v')
    q = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3)).bfloat16()
    ref = dequant_sdpa(q, hq, pk, pv, dtype=torch.float64)
    for dot in ('fp16', 'fp32'):
        o = hqmq_decode_attention(q, hq, pk, pv, block=16, dot=dot, poison=True)
        assert o.dtype == torch.bfloat16 and (o.double() - ref).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.cuda
def test_cuda_fused_decode_fp16_llama_layer():
    hq = HQMQ(96, 4, 1, 8, 128)
    g = torch.Generator(device='cuda').manual_seed(0)
    k, v = [torch.randn(2, 8, 4099, 128, device='cuda', generator=g, dtype=torch.float16) for _ in range(2)]
    pk, pv = hqmq_encode(hq, k, 0, 'k'), hqmq_encode(hq, v, 0, 'v')
    q = torch.randn(2, 32, 128, device='cuda', generator=g, dtype=torch.float16)
    o = hqmq_decode_attention(q, hq, pk, pv)
    ref = dequant_sdpa(q, hq, pk, pv, dtype=torch.float32)
    assert (o.float() - ref).abs().max() <= 1e-2


@pytest.mark.cuda
def test_cuda_encode_matches_quantize():
    hq = HQMQ(96, 4, 1, 8, 128, outliers='med_token')
    x = synthetic_kv(1, 8, 1000, 128, seed=0).half().cuda()
    mine, ref = hqmq_encode(hq, x, 0, 'k'), hq.quantize(x, 0, 'k')
    j1, r1 = hq.codes(mine); j2, r2 = hq.codes(ref)
    assert (j1 == j2).float().mean() > 0.999 and (r1 == r2).float().mean() > 0.999   # FMA rounding may flip near-ties
    assert torch.equal(mine.sigma, ref.sigma)


@pytest.mark.parametrize('kcfg,vcfg,start,end,pad', [((48, 4, 'med_token'), (3, 2, None), 0, 75, False), ((3, 2, None), (48, 4, 'med'), 37, 75, True),
                                                      ((12, 3, None), (96, 5, None), 16, 61, False), ((48, 4, 'med_token'), (12, 3, 'med_token'), 50, 51, True)])
def test_fused_decode_two_layouts_and_ranges(kcfg, vcfg, start, end, pad):
    "Keys and values with their own S, b_r, digits and outliers (a (keys, values) pair), over tokens [start, end): == dequantize + SDPA there."
    from tensormem.hf_cache import packed_head
    hk, hv = HQMQ(*kcfg[:2], 2, 2, 20, outliers=kcfg[2]), HQMQ(*vcfg[:2], 2, 2, 20, outliers=vcfg[2])
    pk, pv = hk.quantize(synthetic_kv(2, 2, 75, 20, seed=5), 1, 'k'), hv.quantize(synthetic_kv(2, 2, 75, 20, seed=6), 1, 'v')
    q = torch.randn(2, 6, 20, generator=torch.Generator().manual_seed(start))
    first = torch.tensor([0, start + 3]) if pad else None
    cut = lambda p: packed_head(p, end)
    o, lse = hqmq_decode_attention(q, (hk, hv), cut(pk), cut(pv), block=16, n_split=2, start=start, first=first, return_lse=True, poison=True)
    lo = start if first is None else torch.maximum(first, torch.tensor(start))
    k, v = (h.dequantize(p).double().repeat_interleave(3, 1)[:, :, :end] for h, p in ((hk, pk), (hv, pv)))
    s = torch.einsum('bhd,bhtd->bht', q.double(), k) / math.sqrt(20)
    s = s.masked_fill(torch.arange(end) < torch.as_tensor(lo).reshape(-1, 1, 1), float('-inf'))
    ref = torch.einsum('bht,bhtd->bhd', s.softmax(-1).nan_to_num(0.), v)
    assert (o.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
    fin = s.logsumexp(-1).isfinite()
    assert torch.allclose(lse.double()[fin], s.logsumexp(-1)[fin], atol=1e-4) and bool((lse[~fin] == float('-inf')).all())
    with pytest.raises(ValueError, match='made by'): hqmq_decode_attention(q, (hv, hk), pk, pv)
