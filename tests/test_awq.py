"""AWQ: scale candidates, a search that never loses to RTN on its objective, exact folds, starved experts."""

from __future__ import annotations

import warnings

import pytest
import torch
import tiny_models as tm

from moeconv.calib import CalibConfig, quantize_moe
from moeconv.calib.awq import (
    candidate_scales, fake_quantize, fold_input_scale, search_expert_scales, search_layer_scale,
)
from moeconv.calib.gptq import hessian_error
from moeconv.quant import QuantSpec, dequantize, quantize


def salient_inputs(n: int, tokens: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hessians [n, cols, cols], mean |x| [n, cols]) of inputs where a few channels are 20x larger."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.ones(cols)
    magnitude[torch.randperm(cols, generator=g)[: cols // 16]] = 20.0
    x = torch.randn(n, tokens, cols, generator=g) * magnitude
    return x.transpose(1, 2) @ x, x.abs().mean(1)


def test_candidates_start_with_identity_and_are_normalised():
    act = torch.rand(3, 40, generator=torch.Generator().manual_seed(0)) + 0.01
    weight_mean = torch.rand(3, 40, generator=torch.Generator().manual_seed(1)) + 0.01
    free = candidate_scales(act, weight_mean, n_grid=5, pow2=False)
    assert free.shape == (11, 3, 40)
    assert torch.equal(free[0], torch.ones(3, 40))
    torch.testing.assert_close(free.amax(-1) * free.amin(-1), torch.ones(11, 3))
    pow2 = candidate_scales(act, weight_mean, n_grid=5, pow2=True)
    assert torch.equal(torch.exp2(torch.log2(pow2).round()), pow2)


@pytest.mark.parametrize("scheme", ["int3", "int4-sym", "nf4", "mxfp4"])
def test_search_never_loses_to_rtn_and_wins_with_salient_channels(scheme):
    spec = QuantSpec(scheme, 32 if scheme == "mxfp4" else 64)
    w = torch.randn(4, 32, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    h, act = salient_inputs(4, 256, 128, seed=3)
    scales, errors = search_expert_scales(w, h, act, spec, n_grid=10)
    assert torch.all(errors[0] <= errors[1])
    assert errors[0].sum() < 0.95 * errors[1].sum()  # salient channels: scaling must pay
    # the reported error is what the chosen scales really give
    approx = fake_quantize(w * scales[:, None, :], spec) / scales[:, None, :]
    torch.testing.assert_close(hessian_error(w, approx, h), errors[0])
    shared, total = search_layer_scale(w, h, act.mean(0), spec, n_grid=10)
    assert shared.shape == (128,) and total[0] <= total[1]


def test_fake_quantize_is_dequantize_of_quantize():
    w = torch.randn(2, 16, 96, generator=torch.Generator().manual_seed(4))
    for spec in (QuantSpec("int3", 32), QuantSpec("nf4", 64), QuantSpec("mxfp4")):
        expected = torch.stack([dequantize(quantize(m, spec), spec, tuple(m.shape)) for m in w])
        assert torch.equal(fake_quantize(w, spec), expected)


def tiny_mixtral(dtype=torch.bfloat16, experts: int = 4) -> torch.nn.Module:
    return tm.mixtral_in_memory(0, experts, dtype)


@torch.no_grad()
def test_power_of_two_fold_leaves_routers_and_outputs_bit_identical():
    model = tiny_mixtral()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    logits_seen = []
    hook = model.model.layers[0].mlp.gate.register_forward_hook(lambda _m, _a, out: logits_seen.append(out[0]))
    before = model(input_ids=ids).logits
    scale = torch.exp2(torch.randint(-3, 4, (32,), generator=torch.Generator().manual_seed(6)).float())
    block = model.model.layers[0].mlp
    fold_input_scale(model.model.layers[0].post_attention_layernorm.weight, [block.gate.weight], scale)
    block.experts.gate_up_proj.mul_(scale.to(torch.bfloat16))
    after = model(input_ids=ids).logits
    hook.remove()
    assert not torch.equal(block.gate.weight, tiny_mixtral().model.layers[0].mlp.gate.weight)  # stored bytes change
    assert torch.equal(logits_seen[0], logits_seen[1])  # ... but the router computes the same logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("awq_input", ["norm", "expert"])
def test_awq_end_to_end_is_finite_and_parts_match_the_model(awq_input):
    model = tiny_mixtral(torch.float32, experts=8)
    ids = torch.randint(0, 64, (1, 3), generator=torch.Generator().manual_seed(7))  # starves most experts
    spec = QuantSpec("int4", 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = CalibConfig(method="awq", awq_input=awq_input, min_effective_tokens=2)
        result = quantize_moe(model, ids, spec, config)
    zero = [(i, e) for i, r in result.routing.items() for e in range(8) if r.tokens[e] + r.soft_tokens[e] < 2]
    assert zero and len(result.fallbacks) == len(zero)
    assert all(any(f"layer {i} expert {e}:" in str(w.message) for w in caught) for i, e in zero)
    for layer in model.model.layers:
        assert all(torch.isfinite(p).all() for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj))
    down = model.model.layers[1].mlp.experts.down_proj
    assert torch.equal(dequantize(result.parts[(1, 5, "down")][1], spec, (32, 48)), down[5])
    if awq_input == "norm":
        assert set(result.input_scales) == {0, 1} and not result.expert_input_scales
    else:
        scale = result.expert_input_scales[1][5]
        gate = model.model.layers[1].mlp.experts.gate_up_proj[5, :48]
        torch.testing.assert_close(dequantize(result.parts[(1, 5, "gate")][1], spec, (48, 32)) / scale, gate)
