"""Calibrated per-expert quantization (GPTQ, AWQ) of a transformers MoE model, layer by layer.

Entry point for the converter: :func:`quantize_moe` runs the model on
calibration token ids one decoder layer at a time (:mod:`.capture`), and for
every MoE layer quantizes each routed expert's gate/up/down with GPTQ
(:mod:`.gptq`) or AWQ (:mod:`.awq`) against the statistics of exactly the
tokens routed to it, writes the dequantized weights back into the model (so
the next layer calibrates on the quantized model's activations, and the model
is a fake-quantized copy afterwards), and returns the format tensors of every
expert weight plus what the converter must store differently (AWQ's folded
norm/router scales) and the routing statistics the allocator uses.

Starved experts, in order: fewer than ``min_tokens`` routed tokens (default
4x the larger of hidden and intermediate size) -> the Hessian also gets every
other token weighted by its router probability (capture); fewer than
``min_effective_tokens`` (default 1x) routed plus probability-weighted tokens
-> round-to-nearest for that expert, with a warning naming layer and expert
and the fallback listed in ``CalibResult.fallbacks``.  Never a crash, never a NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from moeconv.quant import QuantSpec, dequantize, quantize

from .awq import fake_quantize, fold_input_scale, search_clip, search_expert_scales, search_layer_scale
from .capture import ARCHS, CalibLayer, LayerStats, MoEArch, arch_for, calibration_ids, iterate_moe_layers
from .gptq import IntQuantized, gptq_quantize, hessian_error, hessian_factor, int_spec

__all__ = [
    "CalibConfig", "CalibResult", "RoutingStats", "quantize_moe", "calibrate_checkpoint", "calibration_ids",
    "iterate_moe_layers",
    "MoEArch", "ARCHS", "arch_for", "LayerStats", "gptq_quantize", "hessian_factor", "IntQuantized", "hessian_error",
]

PROJS = ("gate", "up", "down")
#: spec for (layer, expert, proj): one QuantSpec for all, or a function (mixed precision)
SpecFor = QuantSpec | Callable[[int, int, str], QuantSpec]


@dataclass(frozen=True)
class CalibConfig:
    """Options of calibrated quantization.

    ``method``: ``gptq`` | ``awq`` | ``rtn`` (RTN through the same driver, for
    baselines).  ``awq_input``: where AWQ's gate/up input scale goes — ``norm``
    (one scale per layer folded into the norm, readers compensated: writable in
    format v1), ``expert`` (one per expert; fake-quant measurement only, needs a
    spec addition) or ``none``.  ``awq_pow2``: power-of-two layer scales, so the
    folds are exact and router logits unchanged.  ``min_tokens`` /
    ``min_effective_tokens``: starved-expert thresholds (module docstring;
    None = 4x / 1x the larger of hidden and intermediate size).  ``clip``: choose each
    group's range by the least output error on the calibration tokens
    (GPTQ and AWQ; the stored scales/zeros are then those of the clipped range).
    """

    method: str = "gptq"
    percdamp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    min_tokens: int | None = None
    min_effective_tokens: int | None = None
    awq_input: str = "norm"
    awq_grid: int = 20
    awq_pow2: bool = True
    clip: bool = True
    batch_size: int = 8

    def __post_init__(self):
        if self.method not in ("gptq", "awq", "rtn"):
            raise ValueError(f"calibration method must be gptq, awq or rtn, got {self.method!r}")
        if self.awq_input not in ("norm", "expert", "none"):
            raise ValueError(f"awq_input must be norm, expert or none, got {self.awq_input!r}")
        if not 0 <= self.percdamp < 1:
            raise ValueError(f"percdamp must be in [0, 1), got {self.percdamp}")


@dataclass
class RoutingStats:
    """Routing statistics of one MoE layer on the calibration tokens ([n_experts] float tensors, CPU)."""

    tokens: torch.Tensor
    routed_weight: torch.Tensor
    prob_mass: torch.Tensor
    soft_tokens: torch.Tensor
    n_tokens: int


@dataclass
class CalibResult:
    """What :func:`quantize_moe` produced.

    ``parts[(layer, expert, proj)] = (spec, {suffix: tensor})``: the format
    tensors of every routed expert weight (proj in gate/up/down).
    ``input_scales[layer]``: AWQ's folded gate/up input scale ``[hidden]``; the
    converter must store ``norm / s`` and ``router * s`` (columns) for that
    layer instead of the source tensors (:func:`~.awq.fold_input_scale`; exact
    with power-of-two scales).  ``errors[(layer, proj)] = (method, rtn)``:
    summed output error ``tr(dW H dW^T)`` on the calibration tokens, for
    reports (GPTQ: per projection; AWQ: of the scale searches).
    ``expert_input_scales[layer]`` (AWQ ``expert`` mode, measurement only):
    ``[E, hidden]`` scales the gate/up parts must be divided by — format v1
    cannot store them.  ``fallbacks``: experts quantized with RTN, and why.
    """

    parts: dict[tuple[int, int, str], tuple[QuantSpec, dict[str, torch.Tensor]]] = field(default_factory=dict)
    input_scales: dict[int, torch.Tensor] = field(default_factory=dict)
    expert_input_scales: dict[int, torch.Tensor] = field(default_factory=dict)
    routing: dict[int, RoutingStats] = field(default_factory=dict)
    errors: dict[tuple[int, str], tuple[float, float]] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)

    def quantizer(self, keys: Mapping[str, tuple[int, int, str]], default=quantize):
        """A ``quantizer(weight, spec, name) -> parts`` for the pipeline.

        ``keys`` maps the logical names of routed expert weights to ``(layer,
        expert, proj)``; those return the calibrated parts (the spec must be the
        one they were made with), every other name goes to ``default`` (RTN).
        """
        if self.expert_input_scales:
            raise ValueError("awq_input='expert' needs per-expert input scales, which format v1 cannot store; "
                             "its parts are for fake-quant measurement only")

        def run(weight: torch.Tensor, spec: QuantSpec, name: str) -> dict[str, torch.Tensor]:
            key = keys.get(name)
            if key is None:
                return default(weight, spec, name)
            if key not in self.parts:
                raise KeyError(f"{name}: no calibrated parts for layer {key[0]} expert {key[1]} {key[2]}")
            made_with, parts = self.parts[key]
            if made_with != spec:
                raise ValueError(f"{name}: calibrated with {made_with}, asked for {spec}")
            return {k: v.to(weight.device) for k, v in parts.items()}

        return run


def _spec(spec_for: SpecFor, layer: int, expert: int, proj: str) -> QuantSpec:
    return spec_for(layer, expert, proj) if callable(spec_for) else spec_for


def _weak_experts(layer: CalibLayer, threshold: int | None, result: CalibResult) -> torch.Tensor:
    """Experts whose Hessian rests on too few (effective) tokens: RTN for them, with a warning each."""
    stats = layer.stats
    threshold = max(stats.h_in.shape[-1], stats.h_mid.shape[-1]) if threshold is None else threshold
    weak = stats.effective_tokens < threshold
    for e in weak.nonzero().flatten().tolist():
        msg = (f"layer {layer.index} expert {e}: {int(stats.tokens[e])} routed tokens, "
               f"{float(stats.effective_tokens[e]):.1f} effective with soft routing < {threshold}; "
               "using round-to-nearest")
        warnings.warn(msg, stacklevel=3)
        result.fallbacks.append(msg)
    return weak


def _awq_scales(layer: CalibLayer, gate, up, down, spec: QuantSpec, weak, config: CalibConfig, result: CalibResult):
    """Search AWQ's scales and apply them in place: ``(input scale [E, H], mid scale [E, I])``.

    ``norm`` mode folds one layer scale into the norm and its readers (every
    expert's gate/up gets it, weak ones too: the norm is shared); ``expert``
    mode scales each expert's gate/up, to be divided out after
    dequantization.  Weak experts keep scale 1 wherever the scale is theirs
    alone, and do not steer the shared search.
    """
    stats, idx = layer.stats, layer.index
    h_in = stats.h_in * (~weak)[:, None, None]
    gate_up = torch.cat([gate, up], dim=1).float()
    in_scale = torch.ones(gate.shape[0], gate.shape[-1], device=gate.device)
    if config.awq_input == "norm":
        act_mean = stats.abs_in.sum(0) / stats.effective_tokens.sum().clamp(min=1e-12)
        scale, err = search_layer_scale(gate_up, h_in, act_mean, spec, n_grid=config.awq_grid, pow2=config.awq_pow2)
        norm = layer.layer.get_submodule(layer.arch.norm).weight
        fold_input_scale(norm, [layer.block.get_parameter(name) for name in layer.arch.norm_readers], scale)
        in_scale = in_scale * scale
        result.input_scales[idx] = scale.cpu()
        result.errors[(idx, "gate_up_scale")] = tuple(err.tolist())
    elif config.awq_input == "expert":
        in_scale, err = search_expert_scales(gate_up, h_in, stats.mean_abs_in(), spec, n_grid=config.awq_grid)
        in_scale[weak] = 1.0
        result.expert_input_scales[idx] = in_scale.cpu()
        result.errors[(idx, "gate_up_scale")] = tuple(err.sum(-1).tolist())
    gate.copy_(gate.float() * in_scale[:, None, :])
    up.copy_(up.float() * in_scale[:, None, :])
    mid, err = search_expert_scales(down.float(), stats.h_mid, stats.mean_abs_mid(), spec, n_grid=config.awq_grid)
    mid[weak] = 1.0
    up.copy_(up.float() / mid[:, :, None])
    down.copy_(down.float() * mid[:, None, :])
    result.errors[(idx, "down_scale")] = tuple(err.sum(-1).tolist())
    return in_scale, mid


def _layer_spec(spec_for: SpecFor, idx: int, n_experts: int) -> QuantSpec:
    specs = {_spec(spec_for, idx, e, p) for e in range(n_experts) for p in PROJS}
    if len(specs) != 1:
        raise ValueError(f"layer {idx}: AWQ needs one spec per layer (its gate/up scale is shared), got {len(specs)}")
    return specs.pop()


def _quantize_group(w, hessian, spec, strong, config: CalibConfig, names):
    """(parts list, dequantized stack, (error, RTN error) or None) of one stack of matrices with one spec.

    ``strong`` marks matrices whose Hessian is trusted; the others get plain
    round-to-nearest (the documented fallback for starved experts).
    """
    parts: list = [None] * w.shape[0]
    deq = torch.empty_like(w)
    errors = None
    trusted = strong.nonzero().flatten()
    if config.method == "gptq" and trusted.numel():
        q = gptq_quantize(w[trusted], hessian[trusted], spec, percdamp=config.percdamp, act_order=config.act_order,
                          block_size=config.block_size, clip=config.clip, names=[names[i] for i in trusted])
        deq[trusted] = q.dequantize()
        for k, i in enumerate(trusted.tolist()):
            parts[i] = q.parts(k)
        rtn = fake_quantize(w[trusted], spec)
        errors = (hessian_error(w[trusted], deq[trusted], hessian[trusted]).sum().item(),
                  hessian_error(w[trusted], rtn, hessian[trusted]).sum().item())
    elif config.method == "awq" and config.clip and trusted.numel():
        w = w.clone()
        w[trusted] = search_clip(w[trusted], hessian[trusted], spec)
    for i in range(w.shape[0]):
        if parts[i] is None:
            parts[i] = quantize(w[i], spec, names[i])
            deq[i] = dequantize(parts[i], spec, tuple(w[i].shape))
    return parts, deq, errors


def _quantize_layer(layer: CalibLayer, spec_for: SpecFor, config: CalibConfig, result: CalibResult):
    gate, up, down = layer.weights()
    stats, idx = layer.stats, layer.index
    n_experts = gate.shape[0]
    weak = _weak_experts(layer, config.min_effective_tokens, result)
    h_in, h_mid = stats.h_in, stats.h_mid
    in_scale = None
    if config.method == "awq":
        in_scale, mid = _awq_scales(layer, gate, up, down, _layer_spec(spec_for, idx, n_experts), weak, config, result)
        h_in = h_in / (in_scale[:, :, None] * in_scale[:, None, :])  # the Hessians of the scaled inputs
        h_mid = h_mid / (mid[:, :, None] * mid[:, None, :])
    tensors = {"gate": (gate, h_in), "up": (up, h_in), "down": (down, h_mid)}
    groups: dict[tuple[str, QuantSpec], list[int]] = {}
    for e in range(n_experts):
        for proj in PROJS:
            groups.setdefault((proj, _spec(spec_for, idx, e, proj)), []).append(e)
    for (proj, spec), experts in groups.items():
        weight, hessian = tensors[proj]
        rows = torch.tensor(experts, device=weight.device)
        names = [f"layer {idx} expert {e} {proj}" for e in experts]
        parts, deq, errors = _quantize_group(weight[rows].float(), hessian[rows], spec, ~weak[rows], config, names)
        if errors is not None:
            prev = result.errors.get((idx, proj), (0.0, 0.0))
            result.errors[(idx, proj)] = (prev[0] + errors[0], prev[1] + errors[1])
        for e, p in zip(experts, parts):
            result.parts[(idx, e, proj)] = (spec, {k: v.cpu() for k, v in p.items()})
        if config.awq_input == "expert" and in_scale is not None and proj != "down":
            deq = deq / in_scale[rows][:, None, :]
        weight[rows] = deq.to(weight.dtype)
    result.routing[idx] = RoutingStats(stats.tokens.cpu(), stats.routed_weight.cpu(), stats.prob_mass.cpu(),
                                       stats.soft_tokens.cpu(), stats.n_tokens)


@torch.no_grad()
def quantize_moe(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    spec: SpecFor,
    config: CalibConfig = CalibConfig(),
    *,
    arch: MoEArch | None = None,
) -> CalibResult:
    """Quantize every routed expert of ``model`` with routed calibration on ``input_ids`` [n, seq_len].

    ``spec`` is one :class:`QuantSpec` or ``spec(layer, expert, proj)`` for
    mixed precision (GPTQ/RTN; AWQ needs one spec per layer).  GPTQ needs an
    int scheme; AWQ and RTN take any.  The model is modified in place: its
    expert weights become their dequantized values (and, for AWQ ``norm``
    mode, the norms/routers are folded), i.e. a fake-quantized model on which
    perplexity can be measured directly.
    """
    if config.method == "gptq" and isinstance(spec, QuantSpec):
        int_spec(spec)  # GPTQ makes int schemes only: refuse before calibrating
    result = CalibResult()
    for layer in iterate_moe_layers(model, input_ids, arch=arch, min_tokens=config.min_tokens,
                                    batch_size=config.batch_size):
        _quantize_layer(layer, spec, config, result)
    return result


def calibrate_checkpoint(
    src,
    calib_file,
    spec: SpecFor,
    config: CalibConfig = CalibConfig(),
    *,
    n_samples: int = 128,
    seq_len: int = 512,
    device: str | None = None,
) -> CalibResult:
    """:func:`quantize_moe` on a checkpoint directory: load it with transformers (float32), tokenize ``calib_file``.

    What ``moeconv convert --method gptq|awq --calib FILE`` runs before
    streaming the conversion; the model copy is discarded afterwards.  Runs on
    CUDA when present unless ``device`` says otherwise.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(src)
    ids = calibration_ids(calib_file, tokenizer, n_samples, seq_len)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to(device).eval()
    return quantize_moe(model, ids, spec, config)
