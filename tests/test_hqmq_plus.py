import dataclasses, pytest, torch
pytest.importorskip('transformers', reason='needs the hf extra: pip install "tensormem[hf]"')
from tensormem.hqmq import HQMQ, HQMQPacked
from tensormem.hqmq_plus import RotatedHQMQ, LayerwiseQuantizer, NoiseQuantizer, allocate
from tensormem.baselines import random_rotation
from tensormem.hf_cache import CastQuantizer
from tensormem.quant import synthetic_kv

def kv(B=2, H=2, T=11, d=64, seed=0): return synthetic_kv(B, H, T, d, seed=seed)

def test_rotation_orthogonal_and_scores_preserved():
    rq = RotatedHQMQ(HQMQ(24, 3, 1, 2, 64), seed=4); R = rq.R.double()
    assert torch.allclose(R @ R.T, torch.eye(64, dtype=torch.float64), atol=1e-6)
    q, k = torch.randn(1, 2, 3, 64), kv(1, 2, 5)
    assert torch.allclose(rq.rotate_query(q) @ (k @ rq.R).transpose(-1, -2), q @ k.transpose(-1, -2), atol=1e-4)
    assert not torch.equal(rq.R, RotatedHQMQ(HQMQ(24, 3, 1, 2, 64), seed=5).R)    # seeded

def test_rotated_round_trip_bytes_and_fingerprint():
    hq = HQMQ(48, 4, 2, 2, 64, seed=1); rq = RotatedHQMQ(hq, seed=2); x = kv()
    p = rq.quantize(x, 1, 'v')
    assert isinstance(p, HQMQPacked) and p.fingerprint == rq.fingerprint != hq.fingerprint
    assert torch.allclose(rq.dequantize(p), hq.fake_quant(x @ rq.R, 1, 'v') @ rq.R.T, atol=1e-5)
    assert p.nbytes == hq.quantize(x @ rq.R, 1, 'v').nbytes                    # packed for real: the inner layout's bytes
    err = (rq.dequantize(p) - x).pow(2).sum() / x.pow(2).sum(); assert err < 0.1
    with pytest.raises(ValueError, match='another quantizer configuration'): hq.dequantize(p)
    with pytest.raises(ValueError, match='must be a write of'): rq.dequantize(dataclasses.replace(p, fingerprint=None))
    with pytest.raises(ValueError, match='another quantizer'): RotatedHQMQ(hq, seed=3).dequantize(p)
    assert rq.bits_per_element(64, tokens=11) == hq.bits_per_element(64, tokens=11)

def test_rotated_bad_inputs():
    with pytest.raises(TypeError, match='`inner` must be an HQMQ'): RotatedHQMQ(CastQuantizer())
    with pytest.raises(ValueError, match='power of 2'): RotatedHQMQ(HQMQ(24, 3, 1, 1, 48))
    assert RotatedHQMQ(HQMQ(24, 3, 1, 1, 48), kind='orthogonal').R.shape == (48, 48)
    rq = RotatedHQMQ(HQMQ(24, 3, 1, 2, 64))
    with pytest.raises(ValueError): rq.quantize(kv(H=3), 0, 'k')

def test_layerwise_routes_counts_and_fingerprints():
    a, b = HQMQ(24, 3, 2, 2, 64, seed=1), RotatedHQMQ(HQMQ(96, 6, 2, 2, 64, seed=1))
    plan = {(0, 'k'): b, (0, 'v'): a, (1, 'k'): CastQuantizer(torch.float16), (1, 'v'): a}
    lw = LayerwiseQuantizer(plan, 2); x = kv()
    for (l, r), q in plan.items():
        p = lw.quantize(x, l, r)
        assert torch.equal(lw.dequantize(p), q.dequantize(q.quantize(x, l, r))) and p.nbytes == q.quantize(x, l, r).nbytes
    assert abs(lw.bits_per_element(64)['true'] - (b.bits_per_element(64)['true'] + 2 * a.bits_per_element(64)['true'] + 16) / 4) < 1e-12
    other = LayerwiseQuantizer({**plan, (1, 'v'): b}, 2)
    assert other.fingerprint != lw.fingerprint
    with pytest.raises(ValueError, match='another quantizer'): LayerwiseQuantizer({**plan, (0, 'v'): HQMQ(24, 3, 2, 2, 64, seed=9)}, 2).dequantize(lw.quantize(x, 0, 'v'))
    with pytest.raises(ValueError, match='missing'): LayerwiseQuantizer({(0, 'k'): a}, 1)
    with pytest.raises(ValueError, match='`layer`, `role`'): lw.quantize(x, 0, 'q')
    with pytest.raises(TypeError, match='plan'): LayerwiseQuantizer({(0, 'k'): a, (0, 'v'): object()}, 1)

def test_allocate_takes_most_sensitive_within_budget():
    s = torch.tensor([[0.1, 0.5], [0.3, 0.0]], dtype=torch.float64)
    assert allocate(s, 4., 8., 6.) == {(0, 'v'), (1, 'k')}       # mean (2·4 + 2·8)/4 = 6
    assert allocate(s, 4., 8., 5.99) == {(0, 'v')}
    with pytest.raises(ValueError, match='cheap_bits'): allocate(s, 8., 4., 6.)

def test_noise_quantizer_relmse_seeded():
    x = kv(2, 3, 64); nq = NoiseQuantizer(3e-3, seed=1)
    y = nq.fake_quant(x, 2, 'k'); rel = ((y - x).pow(2).sum() / x.pow(2).sum()).item()
    assert abs(rel - 3e-3) < 3e-4 and torch.equal(NoiseQuantizer(3e-3, seed=1).fake_quant(x, 2, 'k'), y)
    assert not torch.equal(NoiseQuantizer(3e-3, seed=2).fake_quant(x, 2, 'k'), y)
    assert nq.bits_per_element(64)['true'] == 32. and nq.family == 'noise (yardstick)'
    with pytest.raises(ValueError, match='`rel`'): NoiseQuantizer(float('nan'))
    with pytest.raises(TypeError, match='`p` must be a CastPacked'): nq.dequantize(HQMQ(24, 3, 1, 2, 64).quantize(kv(1), 0, 'k'))
