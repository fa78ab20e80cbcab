"""Budget arithmetic: what a choice costs in stored and code bits, and that plans stay within the budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
from alloc_synthetic import write_checkpoint
from moeconv_numpy.schemes import tensor_layout

from moeconv.alloc import plan_allocation
from moeconv.alloc.budget import budget_bits, cost_matrix, weight_bits
from moeconv.alloc.source import open_source
from moeconv.quant import QuantSpec

_BITS = {"U8": 8, "F16": 16, "F32": 32}


def layout_bits(scheme, shape, group, dq):
    return sum(_BITS[dtype] * math.prod(dims) for dtype, dims in tensor_layout(scheme, shape, group, dq).values())


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return open_source(write_checkpoint(tmp_path_factory.mktemp("ckpt") / "m", n_layers=3, n_experts=8, hidden=128, inter=256))


def test_weight_bits_by_hand():
    # int3 g64 on [384, 256]: 24 code bytes per group of 64 + fp16 scale + fp16 zero = 3.5 bits per weight
    assert weight_bits(QuantSpec("int3", 64), (384, 256), "stored") == 384 * 256 * 3.5
    assert weight_bits(QuantSpec("int3", 64), (384, 256), "code-bits") == 384 * 256 * 3
    # symmetric: no zero points
    assert weight_bits(QuantSpec("int4-sym", 128), (256, 384), "stored") == 256 * 384 * (4 + 16 / 128)
    # nf4 with double quant: 4-bit codes, one 8-bit absmax code per block, 32-bit second-level scale + offset
    n = 384 * 256
    assert weight_bits(QuantSpec("nf4", 64, double_quant=True), (384, 256), "stored") == 4 * n + 8 * (n // 64) + 32 * math.ceil(n / 64 / 256) + 32


def test_cost_matrix_is_the_sum_of_the_layouts(source):
    specs = [QuantSpec("int2", 32), QuantSpec("int8", 128), QuantSpec("nf4", 64, double_quant=False)]
    costs = cost_matrix(source.experts, specs, "stored")
    expert = source.experts[5]
    for j, spec in enumerate(specs):
        want = sum(layout_bits(spec.scheme, it.shape, spec.group_size, spec.double_quant) for it in expert.weights.values())
        assert costs[5, j] == want
    assert budget_bits(source.experts, 3.25) == math.floor(3.25 * sum(e.numel for e in source.experts))


@pytest.mark.parametrize("alloc", ["paper", "maxvar", "random", "uniform"])
@pytest.mark.parametrize("avg", [2.5, 2.8, 3.0, 3.3, 3.5, 3.9, 4.25, 4.5])
def test_plans_never_exceed_the_budget_by_an_expert(source, alloc, avg):
    plan = plan_allocation(source, avg_bits=avg, alloc=alloc)
    one_expert = max(c.stored_bits for c in plan.choices)
    assert plan.stored_bits <= plan.budget_bits + one_expert
    if alloc == "uniform":
        assert plan.stored_bits <= plan.budget_bits
        assert len({c.spec for c in plan.choices}) == 1
    # the plan's totals are the sums of its experts' layouts
    experts = {(e.layer, e.expert): e for e in source.experts}
    total = sum(layout_bits(c.spec.scheme, it.shape, c.spec.group_size, c.spec.double_quant)
                for c in plan.choices for it in experts[(c.layer, c.expert)].weights.values())
    assert plan.stored_bits == total


def test_code_bit_budget_counts_only_codes(source):
    plan = plan_allocation(source, avg_bits=3.0, alloc="paper", budget="code-bits")
    assert plan.code_bits == 3 * plan.numel  # 4/3/2 at 3.0 meets the average exactly
    assert plan.stored_bits == pytest.approx(3.5 * plan.numel)  # every level at g64 stores 0.5 bit more
    assert sorted({c.spec.scheme for c in plan.choices}) == ["int2", "int3", "int4"]


def test_uniform_picks_the_richest_spec_that_fits(source):
    assert {c.spec for c in plan_allocation(source, avg_bits=3.5, alloc="uniform").choices} == {QuantSpec("int3", 64)}
    assert {c.spec for c in plan_allocation(source, avg_bits=4.25, alloc="uniform").choices} == {QuantSpec("int4", 128)}
    assert {c.spec for c in plan_allocation(source, avg_bits=3.0, alloc="uniform").choices} == {QuantSpec("int2", 32)}
    fixed = plan_allocation(source, alloc="uniform", scheme="nf4", group_size=64)
    assert {c.spec for c in fixed.choices} == {QuantSpec("nf4", 64)}


def test_budget_below_the_lowest_level_is_an_error(source):
    with pytest.raises(ValueError, match="below the lowest level"):
        plan_allocation(source, avg_bits=2.0, alloc="paper")
    with pytest.raises(ValueError, match="fits the budget"):
        plan_allocation(source, avg_bits=2.0, alloc="uniform")


def test_symmetric_scheme_and_group_size_reach_the_levels(source):
    plan = plan_allocation(source, avg_bits=3.0, alloc="paper", budget="code-bits", scheme="int4-sym", group_size=128)
    assert {c.spec for c in plan.choices} == {QuantSpec(f"int{b}-sym", 128) for b in (4, 3, 2)}
    assert np.isclose(plan.code_bits / plan.numel, 3.0)
