"""The sensitivity allocator: routed samples, damages by their definition, and an exact knapsack over them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tiny_models as tm

from moeconv.alloc import plan_allocation
from moeconv.alloc.budget import cost_matrix
from moeconv.alloc.calibration import CalibrationStats, RoutedSample, measure
from moeconv.alloc.sensitivity import activation, expected_tokens, expert_forward, layer_damages
from moeconv.alloc.source import open_source
from moeconv.quant import QuantSpec, dequantize, quantize

CANDIDATES = [QuantSpec("int2", 32), QuantSpec("int3", 32), QuantSpec("int4", 32), QuantSpec("int8", 32)]


def test_routed_sample_keeps_a_uniform_capped_sample():
    sample = RoutedSample.empty(2)
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(20.0).repeat(2, 1).T
    for chunk in range(4):
        rows = slice(5 * chunk, 5 * chunk + 5)
        sample.add(x[rows], torch.ones(5), torch.rand(5, generator=gen), cap=8)
    assert sample.total == 20 and sample.x.shape == (8, 2)
    assert sample.scale == pytest.approx(20 / 8)
    # the kept rows are the 8 with the smallest keys over everything seen
    keys = torch.rand(20, generator=torch.Generator().manual_seed(0))
    assert sorted(sample.x[:, 0].tolist()) == sorted(torch.topk(keys, 8, largest=False).indices.float().tolist())


def test_layer_damages_follow_the_definition():
    gen = torch.Generator().manual_seed(1)
    weights = {"gate": torch.randn(2, 48, 32, generator=gen) * 0.1, "up": torch.randn(2, 48, 32, generator=gen) * 0.1,
               "down": torch.randn(2, 32, 48, generator=gen) * 0.1}
    x = torch.randn(10, 32, generator=gen)
    q = torch.rand(10, generator=gen)
    samples = [RoutedSample(x, q, torch.zeros(10), total=30), RoutedSample.empty(32)]
    act = activation({"hidden_act": "silu"})
    damages = layer_damages(weights, samples, CANDIDATES, act)
    assert damages.shape == (2, 4) and (damages[1] == 0).all()  # no routed token, no damage
    one = {p: w[0] for p, w in weights.items()}
    spec = CANDIDATES[1]
    quantized = {p: dequantize(quantize(w, spec), spec, tuple(w.shape)) for p, w in one.items()}
    error = expert_forward(quantized, x, act) - expert_forward(one, x, act)
    assert damages[0, 1] == pytest.approx(3.0 * float((error.square().sum(-1) * q).sum()), rel=1e-5)
    assert damages[0, 0] > damages[0, 1] > damages[0, 2] > damages[0, 3]  # more bits, less damage
    gptq = layer_damages(weights, samples, CANDIDATES[:2], act, method="gptq")
    assert gptq.shape == (2, 2) and (gptq[0] > 0).all()


def test_expected_tokens_average_routed_and_mass_counts():
    # layer 0: 100 routed slots, mass 50 -> mass-based counts 60 and 40; layer 1 has no mass: routed counts only
    stats = CalibrationStats(tokens={(0, 0): 10.0, (0, 1): 90.0, (1, 0): 4.0, (1, 1): 0.0},
                             mass={(0, 0): 30.0, (0, 1): 20.0, (1, 0): 0.0, (1, 1): 0.0})
    counts = expected_tokens(stats, sorted(stats.tokens))
    assert counts == {(0, 0): pytest.approx(35.0), (0, 1): pytest.approx(65.0), (1, 0): pytest.approx(4.0), (1, 1): 0.0}
    # a layer's expected counts add up to its routed slots
    assert counts[(0, 0)] + counts[(0, 1)] == pytest.approx(100.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tm.build("mixtral", tmp_path_factory.mktemp("tiny") / "mixtral")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    return path, model, ids


def test_measure_sees_every_routed_token(tiny):
    path, model, ids = tiny
    stats = measure(model, ids, loss_weighted=True, max_tokens=20, batch_size=2)
    n_tokens, top_k, n_experts = ids.numel(), model.config.num_experts_per_tok, model.config.num_local_experts
    for layer in range(model.config.num_hidden_layers):
        assert sum(stats.tokens[(layer, e)] for e in range(n_experts)) == n_tokens * top_k
        assert sum(stats.mass[(layer, e)] for e in range(n_experts)) == pytest.approx(n_tokens, rel=1e-4)
        for e in range(n_experts):
            sample = stats.samples[(layer, e)]
            assert sample.total == stats.tokens[(layer, e)] and sample.x.shape[0] == min(20, sample.total)
            # routing weight^2 x loss-gradient norm^2: zero only at a window's last position (it predicts nothing)
            assert (sample.weight >= 0).all() and (sample.weight > 0).float().mean() > 0.8
    assert not any(p.grad is not None for p in model.parameters())


def test_sensitivity_plan_beats_every_uniform_choice_on_its_own_damage(tiny):
    path, model, ids = tiny
    stats = measure(model, ids, loss_weighted=True, batch_size=2)
    source = open_source(path)
    plan = plan_allocation(source, avg_bits=4.5, alloc="sensitivity", calib_stats=stats, candidates=CANDIDATES, device="cpu")
    assert plan.stored_bits <= plan.budget_bits
    damage = np.array([[c.signals[f"damage[{s.scheme}/g32]"] for s in CANDIDATES] for c in plan.choices])
    chosen = sum(damage[i, CANDIDATES.index(c.spec)] for i, c in enumerate(plan.choices))
    costs = cost_matrix(source.experts, CANDIDATES, "stored").sum(axis=0)
    affordable = np.flatnonzero(costs <= plan.budget_bits)
    assert affordable.size >= 2
    for j in affordable:  # every uniform assignment within the budget
        assert chosen <= damage[:, j].sum() * (1 + 1e-9)
    assert len({c.spec for c in plan.choices}) > 1  # at 4.5 bits a mix beats any single spec here
    assert any("exact knapsack" in note for note in plan.notes)
    # damages are measured once and reused by a plan at another budget
    assert len(stats.damages) == 1
    plan_allocation(source, avg_bits=5.0, alloc="sensitivity", calib_stats=stats, candidates=CANDIDATES, device="cpu")
    assert len(stats.damages) == 1


def test_frequency_order_from_routed_counts(tiny):
    path, model, ids = tiny
    stats = measure(model, ids, loss_weighted=False, batch_size=4)
    plan = plan_allocation(open_source(path), avg_bits=3.0, alloc="frequency", budget="code-bits", bit_levels=(4, 2),
                           calib_stats=stats)
    for layer in range(2):
        counts = {c.expert: c.signals["routed_tokens"] for c in plan.choices if c.layer == layer}
        high = [e for e, c in counts.items() if plan.by_expert[(layer, e)].scheme == "int4"]
        low = [e for e, c in counts.items() if plan.by_expert[(layer, e)].scheme == "int2"]
        assert len(high) == len(low) == 2 and min(counts[e] for e in high) >= max(counts[e] for e in low)


def test_damages_scale_to_expected_tokens_and_move_bits_to_likely_experts(tiny):
    path, model, ids = tiny
    stats = measure(model, ids, loss_weighted=True, batch_size=2)
    source = open_source(path)
    keys = [(e.layer, e.expert) for e in source.experts]
    label = f"damage[{CANDIDATES[1].scheme}/g32]"

    def plan():
        stats.damages.clear()
        return plan_allocation(source, avg_bits=4.5, alloc="sensitivity", calib_stats=stats, candidates=CANDIDATES, device="cpu")

    before = plan()
    damage = {(c.layer, c.expert): c.signals[label] for c in before.choices}
    counts = expected_tokens(stats, keys)
    bits = {(c.layer, c.expert): int(c.spec.scheme[3:]) for c in before.choices}
    # the expert given the fewest bits (ties: the least damaged) becomes the one the router expects most tokens on
    low = min((k for k in keys if stats.tokens[k] > 0), key=lambda k: (bits[k], damage[k]))
    layer = [k for k in keys if k[0] == low[0]]
    stats.mass[low] = 100.0 * sum(stats.mass[k] for k in layer)
    after = plan()
    moved = {(c.layer, c.expert): c.signals[label] for c in after.choices}
    new_counts = expected_tokens(stats, keys)
    assert new_counts[low] > 2 * counts[low]
    # damage is the routed-sample damage scaled to the expected count: it moves with the count, the sample is the same
    assert moved[low] == pytest.approx(damage[low] * new_counts[low] / counts[low], rel=1e-6)
    assert int(after.by_expert[low].scheme[3:]) > bits[low]
