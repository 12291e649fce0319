import dataclasses, math, pytest, torch
from hypothesis import given, strategies as st
pytest.importorskip('transformers', reason='needs the hf extra: pip install "tensormem[hf]"')
from tensormem.hqmq import HQMQ, HQMQPacked
from tensormem.hqmq_plus import RotatedHQMQ, LayerwiseQuantizer, NoiseQuantizer, allocate, water_filling, head_moments, gaussian_relmse, rate_for_relmse
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

# ---------------------------------------------------------------------------------------------- rate–distortion yardsticks
def wf_bisect(lam, R, iters=200):
    "Reference: bisection on the water level θ, where R = (1/n) Σ max(0, ½ log₂(λ/θ)) and D = (1/n) Σ min(θ, λ)."
    n = len(lam); rate = lambda th: sum(max(0., .5 * math.log2(l / th)) for l in lam if l > 0) / n
    lo, hi = 1e-300, max(lam)
    if hi == 0: return 0.
    for _ in range(iters): mid = math.sqrt(lo * hi); lo, hi = (mid, hi) if rate(mid) > R else (lo, mid)
    return sum(min(math.sqrt(lo * hi), l) for l in lam) / n

def test_water_filling_closed_forms():
    "Equal eigenvalues σ²: D = σ²·2^(−2R). Eigenvalues (4, 1) by hand: R = 1/4 → θ = 2, D = 1.5; R = 1/2 → θ = 1, D = 1; R = 2 → θ = 1/8, D = 1/8; R = 0 → the mean, 2.5."
    for s2 in (.5, 2., 7.):
        for R in (.1, 1., 3., 5.3, 7.):
            assert abs(water_filling(torch.full((64,), s2), R).item() - s2 * 2 ** (-2 * R)) <= 1e-12 * s2
    for R, D in ((.25, 1.5), (.5, 1.), (2., .125), (0., 2.5)):
        assert abs(water_filling(torch.tensor([4., 1.]), R).item() - D) < 1e-12
        assert abs(water_filling(torch.tensor([1., 4.]), R).item() - D) < 1e-12      # order does not matter
    out = water_filling(torch.tensor([[4., 1.], [2., 2.], [0., 0.]]), 2.)
    assert out.dtype == torch.float64 and out.shape == (3,) and torch.allclose(out, torch.tensor([.125, 2 / 16, 0.], dtype=torch.float64))

@given(st.lists(st.one_of(st.just(0.), st.floats(1e-6, 1e3)), min_size=1, max_size=16), st.floats(0., 8.))
def test_water_filling_matches_bisection_and_falls_with_rate(lam, R):
    d = water_filling(torch.tensor(lam, dtype=torch.float64), R).item()
    assert abs(d - wf_bisect(lam, R)) <= 1e-9 * (wf_bisect(lam, R) + 1e-12)
    assert water_filling(torch.tensor(lam, dtype=torch.float64), R + .5).item() <= d * (1 + 1e-12)
    assert d <= sum(lam) / len(lam) * (1 + 1e-12)

def test_water_filling_bad_inputs():
    with pytest.raises(ValueError, match='`eigs` must be ≥ 0'): water_filling(torch.tensor([1., -1.]), 1.)
    with pytest.raises(ValueError, match='`eigs` contains NaN'): water_filling(torch.tensor([1., float('nan')]), 1.)
    with pytest.raises(ValueError, match='`eigs` must have a last dim ≥ 1'): water_filling(torch.ones(0), 1.)
    with pytest.raises(TypeError, match='`eigs` must be a floating tensor'): water_filling(torch.ones(3, dtype=torch.long), 1.)
    with pytest.raises(TypeError, match='`eigs` must be a torch.Tensor'): water_filling([1., 2.], 1.)
    for R in (-1., float('inf'), float('nan'), True, '3'):
        with pytest.raises(ValueError, match='`R` must be a finite number ≥ 0'): water_filling(torch.ones(3), R)

def test_head_moments_gaussian_relmse_and_rate():
    "E‖x‖² = tr Σ + ‖μ‖²; a known covariance comes back; equal eigenvalues give relMSE 2^(−2R) and the rate −½ log₂(target)."
    sd = torch.tensor([3., 1., .5, .1], dtype=torch.float64); mu = torch.tensor([1., 0., 0., 2.], dtype=torch.float64)
    x = mu + sd * torch.randn(2, 3, 4000, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    e, en = head_moments(x.float())
    assert e.shape == (3, 4) and en.shape == (3,) and e.dtype == en.dtype == torch.float64 and (e >= 0).all()
    assert torch.allclose(e, (sd ** 2).flip(0).expand(3, 4), rtol=0.1, atol=1e-3)
    z = x.transpose(0, 1).flatten(1, 2)
    assert torch.allclose(en, e.sum(-1) + z.mean(1).pow(2).sum(-1), rtol=1e-6)
    eu, enu = head_moments(x, center=False)
    assert torch.allclose(eu.sum(-1), enu, rtol=1e-9) and torch.allclose(enu, en, rtol=1e-6)        # tr E[x xᵀ] = E‖x‖²
    assert (eu.sum(-1) > e.sum(-1) + 4).all()                                                          # E[x xᵀ] holds the mean (‖μ‖² = 5) too
    flat = torch.full((6, 64), 3., dtype=torch.float64)
    for R in (3., 5.3, 7.): assert abs(gaussian_relmse(flat, flat.sum(-1), R) - 2 ** (-2 * R)) < 1e-15
    assert abs(rate_for_relmse(flat, flat.sum(-1), 8e-4) + .5 * math.log2(8e-4)) < 1e-9
    two = torch.tensor([[1., 4.], [2., 2.]], dtype=torch.float64)              # two heads, no mean: Σ err² = 2·(D₁ + D₂)
    assert abs(gaussian_relmse(two, two.sum(-1), 2.) - 2 * (.125 + 2 / 16) / 9) < 1e-15
    r = rate_for_relmse(two, two.sum(-1), 1e-3); assert abs(gaussian_relmse(two, two.sum(-1), r) - 1e-3) < 1e-9
    with pytest.raises(ValueError, match='`x` must have 4 dims'): head_moments(torch.ones(3, 64))
    with pytest.raises(ValueError, match=r'`energy` must have shape \(6,\)'): gaussian_relmse(flat, torch.ones(5), 3.)
    with pytest.raises(ValueError, match='`target` must be a relative MSE in'): rate_for_relmse(flat, flat.sum(-1), 1.)
    with pytest.raises(ValueError, match='`energy` must be ≥ 0 with a positive sum'): gaussian_relmse(flat, -flat.sum(-1), 3.)
    with pytest.raises(ValueError, match='raise `hi`'): rate_for_relmse(flat, flat.sum(-1), 1e-30, hi=8.)


# ---- centred keys ----
from tensormem.hqmq_plus import CenteredQuantizer, CenteredPacked


def test_centered_round_trip_bytes_and_padding():
    "x̂ = inner decode of (x − c) + c; bytes = inner + fp16 centres; padding never moves a row's centre; short writes uncentred."
    from tensormem.hqmq import HQMQ
    from tensormem.quant import synthetic_kv
    hq = HQMQ(96, 4, 2, 3, 64, seed=1); cq = CenteredQuantizer(hq, min_tokens=8)
    x = synthetic_kv(2, 3, 30, 64, seed=0) + 2.
    p = cq.quantize(x, 1, 'k')
    assert isinstance(p, CenteredPacked) and p.center.dtype == torch.float16 and p.center.shape == (2, 3, 1, 64)
    assert p.nbytes == p.inner.nbytes + 2 * 3 * 64 * 2
    torch.testing.assert_close(cq.dequantize(p), hq.dequantize(p.inner).float() + p.center.float())
    err = lambda q: float(((q.fake_quant(x, 1, 'k') - x) ** 2).sum())
    assert err(cq) < err(hq)
    valid = torch.ones(2, 30, dtype=torch.bool); valid[0, :6] = False
    xb = x.clone(); xb[0, :, :6] = -50.
    assert torch.equal(cq.quantize(xb, 1, 'k', valid).center[1], p.center[1])
    assert torch.equal(cq.quantize(xb, 1, 'k', valid).center[0], cq.quantize(x[:1, :, 6:], 1, 'k').center[0])
    assert cq.quantize(x[:, :, :7], 1, 'k').center is None and cq.quantize(x, 1, 'v').center is None
    with pytest.raises(ValueError, match="`roles` must be"): CenteredQuantizer(hq, roles='x')
    with pytest.raises(TypeError): cq.dequantize(hq.quantize(x, 1, 'k'))


def test_centered_in_a_cache_generates():
    "In QuantizedKVCache each write keeps its own centre (a list of pieces); generation runs and the cache counts the centres' bytes."
    pytest.importorskip('transformers')
    from tensormem.hf_cache import tiny_llama, QuantizedKVCache
    from tensormem.hqmq import HQMQ
    model = tiny_llama(); cfg = model.config
    hq = HQMQ(24, 4, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    cq = CenteredQuantizer(hq, min_tokens=4)
    ids = torch.randint(1, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    c = QuantizedKVCache(cfg, cq)
    out = model.generate(ids, past_key_values=c, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, 17)
    lay = c.layers[0]
    assert lay.packed['k'][0].center is not None and all(p.center is None for p in lay.packed['k'][1:])   # prefill centred, decode writes not


def test_centered_with_sliding_window_beam_and_crop():
    "A sliding-window layer cuts the oldest tokens of a centred write (the centre stays); beam rows and crop work through the same protocol."
    pytest.importorskip('transformers')
    from tensormem.hf_cache import tiny_gemma3, QuantizedKVCache, packed_tail, packed_head, packed_select
    from tensormem.hqmq import HQMQ
    model = tiny_gemma3(sliding_window=6, layers=2, pattern=2); cfg = model.config
    cq = CenteredQuantizer(HQMQ(24, 4, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim), min_tokens=4)
    ids = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, past_key_values=QuantizedKVCache(cfg, cq), max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=2)
    assert out.shape == (2, 16)
    from tensormem.quant import synthetic_kv
    x = synthetic_kv(2, cfg.num_key_value_heads, 10, cfg.head_dim, seed=0); p = cq.quantize(x, 0, 'k')
    t, h, s = packed_tail(p, 4), packed_head(p, 3), packed_select(p, torch.tensor([1, 1]))
    assert t.shape[2] == 4 and h.shape[2] == 3 and s.shape[0] == 2
    torch.testing.assert_close(cq.dequantize(t), cq.dequantize(p)[:, :, 6:]); torch.testing.assert_close(cq.dequantize(h), cq.dequantize(p)[:, :, :3])
    torch.testing.assert_close(cq.dequantize(s), cq.dequantize(p)[[1, 1]])

# ---- plans: one configuration per (layer, role), chosen by a budgeted knapsack ----
import itertools
from tensormem.hqmq_plus import (allocate_options, plan_quantizer, plan_errors, plan_for_budget, model_plan, sensitivity,
                                 HQMQ_PLUS_PLANS, HQMQ_PLUS_BUDGETS)

def _brute(rise, bits, budget):
    P, M = rise.shape
    return min(sum(rise[p, m].item() for p, m in enumerate(ch)) for ch in itertools.product(range(M), repeat=P)
               if sum(bits[p, m].item() for p, m in enumerate(ch)) <= budget * P + 1e-9)

@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 10_000))
def test_allocate_options_optimal_for_what_it_spends(P, M, seed):
    g = torch.Generator().manual_seed(seed)
    bits, rise = 3 + 4 * torch.rand(P, M, generator=g, dtype=torch.float64), torch.rand(P, M, generator=g, dtype=torch.float64)
    budget = bits.min(1).values.mean().item() + 2 * torch.rand(1, generator=g).item()
    ch = allocate_options(rise, bits, budget); spent = bits[torch.arange(P), ch].sum().item()
    assert spent <= budget * P + 1e-9
    assert abs(rise[torch.arange(P), ch].sum().item() - _brute(rise, bits, spent / P)) < 1e-12

def test_allocate_options_bad_inputs_and_monotone():
    r = torch.tensor([[1., .3, .1], [1., .5, .2]]); b = torch.tensor([4., 5., 6.])
    tot = [r[torch.arange(2), allocate_options(r, b, B)].sum().item() for B in (4., 4.5, 5., 5.5, 6.)]
    assert tot == sorted(tot, reverse=True) and tot[-1] == pytest.approx(.3)
    with pytest.raises(ValueError, match='below the cheapest choice'): allocate_options(r, b, 3.9)
    with pytest.raises(ValueError, match='NaN'): allocate_options(torch.tensor([[float('nan'), 1.]]), torch.tensor([4., 5.]), 5.)
    with pytest.raises(ValueError, match='rise'): allocate_options(torch.ones(3), b, 5.)

def test_plan_quantizer_errors_and_budget():
    kv = [(synthetic_kv(1, 2, 32, 16, seed=l) + 1., synthetic_kv(1, 2, 32, 16, seed=5 + l)) for l in range(2)]
    pe = plan_errors(kv, ['s24r3', 's192r4', 'fp16'])
    assert pe['err'].shape == (2, 2, 3) and (pe['bits'][:, 0] < pe['bits'][:, 1]).all()
    sens = torch.tensor([[0.1, 0.01], [0.05, 0.02]], dtype=torch.float64)
    for B in (pe['bits'][:, 0].mean().item(), 6., 20.):
        p = plan_for_budget(sens, pe, 's24r3', B); assert p['bits'] <= B + 1e-9 and len(p['k']) == 2
        q = plan_quantizer({r: p[r] for r in 'kv'}, 2, 2, 16)
        x = kv[1][0]; y = q.dequantize(q.quantize(x, 1, 'k')); assert y.shape == x.shape and torch.isfinite(y).all()
    pr = plan_for_budget(sens.sum(0, keepdim=True), pe, 's24r3', 6.); assert len(set(pr['k'])) == 1 and len(pr['k']) == 2
    with pytest.raises(ValueError, match="a plan entry must be"): plan_quantizer({'k': ['s24', 'fp16'], 'v': ['fp16'] * 2}, 2, 2, 16)
    with pytest.raises(ValueError, match="`plan` must map 'k' and 'v' to 2 entries"): plan_quantizer({'k': ['fp16']}, 2, 2, 16)
    with pytest.raises(ValueError, match='`probe`'): plan_for_budget(sens, pe, 's48r4', 6.)

def test_model_plans_cover_the_budgets():
    for g, plans in HQMQ_PLUS_PLANS.items():
        assert sorted(plans) == sorted(HQMQ_PLUS_BUDGETS)
        for B in HQMQ_PLUS_BUDGETS: p = model_plan(*g, B); assert len(p['k']) == g[0] and len(set(p['k'] + p['v'])) <= 2
    with pytest.raises(ValueError, match='no measured HQMQ\\+ plan'): model_plan(3, 3, 3)

def test_low_bit_plans_stay_within_their_budget():
    "Below 3 bits: a plan at 2.5 (and every other budget < 3) for both geometries, its packed bytes on 512-token writes ≤ the budget, the keys' centre included."
    assert 2.5 in HQMQ_PLUS_BUDGETS and {(30, 3, 64), (18, 1, 256)} <= set(HQMQ_PLUS_PLANS)
    for (L, H, d), plans in HQMQ_PLUS_PLANS.items():
        for B in [b for b in HQMQ_PLUS_BUDGETS if b < 3]:
            k, v = plans[B]; q = plan_quantizer({'k': [k] * 2, 'v': [v] * 2}, 2, H, d)          # two layers of this geometry
            xs = [synthetic_kv(1, H, 512, d, seed=r) + 0.5 for r in (0, 1)]
            ps = [q.quantize(x, 1, r) for x, r in zip(xs, 'kv')]
            assert ps[0].center is not None and ps[1].center is None                           # keys centred, values not
            bits = 8 * sum(p.nbytes for p in ps) / sum(x.numel() for x in xs)
            assert bits <= B + 1e-9, (L, H, d, B, k, v, bits)
            assert all(torch.isfinite(q.dequantize(p)).all() for p in ps)

def test_sensitivity_by_role_is_every_layer_at_once():
    from tensormem.hf_cache import tiny_llama
    from tensormem.hqmq import HQMQ
    m = tiny_llama(layers=2); w = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    s_role = sensitivity(m, w, lambda cfg: HQMQ(24, 2, 2, 2, 8), by='role'); s_pair = sensitivity(m, w, lambda cfg: HQMQ(24, 2, 2, 2, 8))
    assert s_role.shape == (1, 2) and s_pair.shape == (2, 2) and (s_role != 0).all()
    m1 = tiny_llama(layers=1); q1 = lambda cfg: HQMQ(24, 2, 1, 2, 8)               # one layer: a role is its only pair
    assert torch.equal(sensitivity(m1, w, q1, by='role'), sensitivity(m1, w, q1))
    with pytest.raises(ValueError, match="`by` must be 'pair' or 'role'"): sensitivity(m, w, lambda cfg: HQMQ(24, 2, 2, 2, 8), by='layer')
