"""GPTQ: hand-checkable properties, format consistency, starved experts, and a win over RTN on a real layer."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import tiny_models as tm

from moeconv.calib import CalibConfig, iterate_moe_layers, quantize_moe
from moeconv.calib.gptq import (clipped_params, diagonal_blocks, gptq_quantize, group_error, hessian_error,
                                hessian_factor, int_rtn)
from moeconv.quant import QuantSpec, dequantize, quantize
from moeconv.quant.intq import group_params, quantize_codes
from moeconv_numpy.schemes import tensor_layout

SHARED_MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "moe-tiny-mixtral"
INT_SCHEMES = ["int2", "int3", "int4", "int8", "int3-sym", "int4-sym"]


def correlated_inputs(n: int, tokens: int, cols: int, seed: int) -> torch.Tensor:
    """Hessians [n, cols, cols] of inputs with correlated channels of very different magnitudes."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(n, tokens, cols, generator=g) @ mix * (torch.rand(cols, generator=g) * 4 + 0.1)
    return x.transpose(1, 2) @ x


@pytest.mark.parametrize("scheme", INT_SCHEMES)
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_is_round_to_nearest(scheme, act_order):
    spec = QuantSpec(scheme, 32)
    w = torch.randn(3, 24, 100, generator=torch.Generator().manual_seed(0))  # 100 cols: a short last group
    q = gptq_quantize(w, torch.eye(100).expand(3, 100, 100), spec, act_order=act_order)
    for i in range(3):
        expected = quantize(w[i], spec)
        got = q.parts(i)
        assert got.keys() == expected.keys()
        for suffix in expected:
            assert torch.equal(got[suffix], expected[suffix]), suffix


@pytest.mark.parametrize("scheme", INT_SCHEMES)
@pytest.mark.parametrize("act_order,clip", [(False, False), (True, False), (False, True), (True, True)])
def test_parts_are_the_format_and_dequantize_to_what_gptq_optimized(scheme, act_order, clip):
    spec = QuantSpec(scheme, 32)
    w = torch.randn(2, 16, 72, generator=torch.Generator().manual_seed(1))
    q = gptq_quantize(w, correlated_inputs(2, 400, 72, seed=2), spec, act_order=act_order, clip=clip)
    deq = q.dequantize()
    for i in range(2):
        parts = q.parts(i)
        layout = tensor_layout(scheme, (16, 72), 32)
        assert {k: (str(v.dtype), tuple(v.shape)) for k, v in parts.items()} == {
            k: ({"U8": "torch.uint8", "F16": "torch.float16"}[d], s) for k, (d, s) in layout.items()}
        assert torch.equal(dequantize(parts, spec, (16, 72)), deq[i])


def test_act_order_uses_static_groups_of_the_original_weight():
    spec = QuantSpec("int4", 16)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    q = gptq_quantize(w, correlated_inputs(1, 300, 64, seed=4)[0], spec, act_order=True)
    rtn = int_rtn(w, spec)
    assert torch.equal(q.scale, rtn.scale) and torch.equal(q.zero, rtn.zero)
    assert not torch.equal(q.codes, rtn.codes)  # error feedback moved some codes


def test_two_columns_by_hand():
    """H = [[1, r], [r, 1]], no damping: column 2 absorbs r times column 1's rounding error, then rounds."""
    r, bits = 0.6, 3
    w = torch.tensor([[0.37, -0.81], [1.3, 0.05], [-0.4, 0.9]])
    h = torch.tensor([[1.0, r], [r, 1.0]])
    q = gptq_quantize(w, h, QuantSpec("int3", 2), percdamp=0.0)
    scale, zero = group_params(w, bits, False)  # the group starts at column 0: parameters of the original w
    scale, zero = scale[:, None], zero[:, None]
    c1 = quantize_codes(w[:, :1], scale, zero, bits, False)
    q1 = (c1.float() - zero) * scale
    c2 = quantize_codes(w[:, 1:] + r * (w[:, :1] - q1), scale, zero, bits, False)
    assert torch.equal(q.codes[:, :2], torch.cat([c1, c2], dim=1))


@pytest.mark.parametrize("scheme", ["int2", "int3-sym"])
def test_clipping_never_loses_on_its_group_objective(scheme):
    bits, symmetric = int(scheme[3]), scheme.endswith("sym")
    w = torch.randn(3, 10, 4, 32, generator=torch.Generator().manual_seed(9))  # [n, rows, groups, g]
    blocks = diagonal_blocks(correlated_inputs(3, 200, 128, seed=10), 32)[:, None]
    scale, zero = clipped_params(w, blocks, bits, symmetric)
    plain = group_params(w, bits, symmetric)

    def err(s, z):
        return group_error(w - (quantize_codes(w, s[..., None], z[..., None], bits, symmetric).float() - z[..., None])
                           * s[..., None], blocks)

    assert torch.all(err(scale, zero) <= err(*plain))
    assert (err(scale, zero) < err(*plain)).float().mean() > 0.3  # at low bits, shrinking the range usually pays


def test_gptq_lowers_the_output_error_it_optimizes():
    spec = QuantSpec("int3", 32)
    w = torch.randn(4, 32, 96, generator=torch.Generator().manual_seed(5))
    h = correlated_inputs(4, 500, 96, seed=6)
    gptq = hessian_error(w, gptq_quantize(w, h, spec).dequantize(), h)
    rtn = hessian_error(w, int_rtn(w, spec).dequantize(), h)
    assert torch.all(gptq < 0.95 * rtn)
    clipped = hessian_error(w, gptq_quantize(w, h, spec, clip=True).dequantize(), h)
    assert clipped.sum() < gptq.sum()


def test_degenerate_hessians_never_crash_or_nan():
    spec = QuantSpec("int4", 32)
    w = torch.randn(3, 8, 64, generator=torch.Generator().manual_seed(7))
    h = torch.zeros(3, 64, 64)  # expert 0: no tokens at all
    h[1] = -torch.eye(64)  # expert 1: not positive definite
    h[2] = correlated_inputs(1, 5, 64, seed=8)[0]  # expert 2: rank 5
    q = gptq_quantize(w, h, spec)
    assert torch.isfinite(q.dequantize()).all()
    assert torch.equal(q.codes[0], int_rtn(w[0], spec).codes)  # nothing known: round-to-nearest
    with pytest.raises(ValueError, match="NaN/Inf"):
        gptq_quantize(w, torch.full((3, 64, 64), float("nan")), spec)
    with pytest.raises(ValueError, match="int family"):
        gptq_quantize(w, h, QuantSpec("nf4", 64))


def test_expert_without_tokens_falls_back_to_rtn_with_a_warning():
    model = tm.mixtral_in_memory(experts=8)
    before = [layer.mlp.experts.gate_up_proj.detach().clone() for layer in model.model.layers]
    ids = torch.randint(0, 64, (1, 3), generator=torch.Generator().manual_seed(1))  # 6 routed slots < 8 experts
    spec = QuantSpec("int4", 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = quantize_moe(model, ids, spec, CalibConfig(method="gptq", min_effective_tokens=2))
    starved = [(i, e) for i, r in result.routing.items() for e in range(8) if r.tokens[e] == 0]
    assert starved, "the setup must leave an expert without tokens"
    for layer, expert in starved:
        assert any(f"layer {layer} expert {expert}:" in str(w.message) for w in caught)
        gate = before[layer][expert, :48]
        assert torch.equal(result.parts[(layer, expert, "gate")][1]["qweight"], quantize(gate, spec)["qweight"])
    for layer in model.model.layers:
        assert all(torch.isfinite(p).all() for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj))
    # the model now holds exactly what the parts decode to (fake quantization)
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(dequantize(result.parts[(1, 3, "up")][1], spec, (48, 32)), gate_up[3, 48:])
    # the pipeline's quantizer hands these parts out by logical name, and RTN for anything else
    quantizer = result.quantizer({"L1.E3.up": (1, 3, "up")})
    assert quantizer(torch.zeros(48, 32), spec, "L1.E3.up") is not None
    assert torch.equal(quantizer(gate_up[3, 48:], spec, "other")["scales"], quantize(gate_up[3, 48:], spec)["scales"])
    with pytest.raises(ValueError, match="calibrated with"):
        quantizer(torch.zeros(48, 32), QuantSpec("int3", 16), "L1.E3.up")


@pytest.mark.skipif(not SHARED_MODEL.is_dir(), reason=f"shared model {SHARED_MODEL} is absent")
def test_gptq_beats_rtn_on_held_out_activations_of_a_real_layer():
    """Layer 0 of moe-tiny-mixtral: calibrate on one stretch of eval.txt, measure the output error on another.

    Both stretches lie after the 32,768 evaluation tokens.  Only experts with
    at least ``max(hidden, intermediate)`` routed calibration tokens are
    compared: below that quantize_moe does not trust their Hessian either.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHARED_MODEL)
    model = AutoModelForCausalLM.from_pretrained(SHARED_MODEL, dtype=torch.float32).eval()
    ids = tokenizer((SHARED_MODEL / "eval.txt").read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]

    def first_layer(window):
        layer = next(iterate_moe_layers(model, window.view(-1, 512), min_tokens=0))
        return layer.stats, layer.weights()

    fit, (gate, up, down) = first_layer(ids[32768 : 32768 + 32 * 512])
    test, _ = first_layer(ids[110000 : 110000 + 16 * 512])
    trusted = fit.tokens >= max(gate.shape[-1], down.shape[-1])
    assert trusted.sum() >= 4
    spec = QuantSpec("int3", 64)
    for weight, h_fit, h_test in ((torch.cat([gate, up], 1), fit.h_in, test.h_in), (down, fit.h_mid, test.h_mid)):
        w = weight.detach().float()[trusted]
        gptq = hessian_error(w, gptq_quantize(w, h_fit[trusted], spec, clip=True).dequantize(), h_test[trusted])
        rtn = hessian_error(w, int_rtn(w, spec).dequantize(), h_test[trusted])
        assert torch.all(gptq < 0.9 * rtn), (gptq / rtn).tolist()


def test_precomputed_factor_gives_the_same_codes():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(3, 16, 64, generator=gen)
    x = torch.randn(3, 200, 64, generator=gen)
    x[0, :, 5] = 0  # a dead input channel
    h = x.transpose(-1, -2) @ x
    factor = hessian_factor(h)
    for spec in (QuantSpec("int2", 32), QuantSpec("int4", 64)):
        want = gptq_quantize(w, h, spec)
        got = gptq_quantize(w, h, spec, factor=factor)
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale)
    with pytest.raises(ValueError, match="act_order"):
        gptq_quantize(w, h, QuantSpec("int4", 64), factor=factor, act_order=True)
