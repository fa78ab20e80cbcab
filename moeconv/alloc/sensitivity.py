"""Our allocator: measure what every candidate does to every expert, then solve the knapsack exactly.

The damage of candidate c for expert e is

    D_e(c) = (T_e / n_e) * sum_t q_t * || E_c(x_t) - E(x_t) ||^2

over a uniform sample of ``n_e`` of the ``N_e`` calibration tokens routed to
``e`` (``moeconv.alloc.calibration``): ``E`` is the expert (gate, up, down with
the model's activation), ``E_c`` the same expert with all three projections
quantized by c (round-to-nearest, or GPTQ cross-fitted on halves of the sample), and
``q_t`` the token's routing weight squared times the squared norm of the
loss gradient at the block output.  Damages add up over experts, so the
allocation minimizing the total under the bit budget is a multiple-choice
knapsack, solved exactly across all layers at once.

``T_e`` is the number of tokens the expert is expected to receive on other
text (``expected_tokens``), not the calibration count ``N_e``: the mean of
``N_e`` and the router's probability mass scaled to the layer's routed
slots.  Hard counts of experts near the top-k threshold do not carry over
from one text to another, the probability mass does: on moe-tiny-mixtral,
layer 0 expert 6 gets 177 of 65,536 routed slots on the calibration text but
4,377 on the evaluation text, while its mass-based count only moves from
5,086 to 6,859.  With ``N_e`` alone GPTQ put that expert at INT2 and lost to
uniform on the evaluation text (3.0 code bits: ppl 6.566 vs INT3's 6.555;
4.25 bits: 6.310 vs INT4 g128's 6.227); with ``T_e`` it wins (6.479, 6.200).
On two other slices of the same file, routed like the calibration text, the
two counts give perplexities within 0.7% of each other, either way.
"""

from __future__ import annotations

import numpy as np
import torch

from moeconv.quant import QuantSpec, dequantize, quantize

from .budget import cost_matrix
from .calibration import CalibrationStats, RoutedSample
from .knapsack import solve_mckp
from .source import ExpertSource

__all__ = ["activation", "expert_forward", "quantized_weights", "layer_damages", "expected_tokens", "allocate"]


def activation(config: dict):
    """The expert activation named in a transformers config (``hidden_act``; ``dense_act_fn`` for Switch)."""
    from transformers.activations import ACT2FN

    return ACT2FN[config.get("hidden_act") or config.get("dense_act_fn") or "silu"]


def _mid(weights, x, act) -> torch.Tensor:
    """The down projection's input: ``act(gate x) * up x``, or ``act(up x)`` for experts without a gate (Switch)."""
    return act(x @ weights["gate"].T) * (x @ weights["up"].T) if "gate" in weights else act(x @ weights["up"].T)


def expert_forward(weights: dict[str, torch.Tensor], x: torch.Tensor, act) -> torch.Tensor:
    """The expert's output on ``x`` ``[n, hidden]``."""
    return _mid(weights, x, act) @ weights["down"].T


def quantized_weights(weights: dict[str, torch.Tensor], spec: QuantSpec, method: str, hessians=None,
                      factors=None) -> dict[str, torch.Tensor]:
    """Projections ``[n, out, in]`` of a stack of experts after quantization with ``spec`` (float32).

    ``method`` ``gptq`` needs ``hessians[proj]`` ``[n, in, in]`` and runs GPTQ
    on the whole stack at once, with ``factors[proj]`` (``hessian_factor``)
    when given; ``rtn`` is the format's round-to-nearest.
    """
    if method == "gptq":
        from moeconv.calib import gptq_quantize

        factors = factors or {}
        return {proj: gptq_quantize(w, hessians[proj], spec, factor=factors.get(proj)).dequantize()
                for proj, w in weights.items()}
    return {proj: torch.stack([dequantize(quantize(m, spec), spec, tuple(m.shape)) for m in w]) for proj, w in weights.items()}


def _expert(weights: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {proj: w[i] for proj, w in weights.items()}


def _hessians(weights: dict[str, torch.Tensor], inputs: list[torch.Tensor], act):
    """GPTQ's Hessians per expert and their factors: ``X^T X`` for gate/up, ``Z^T Z`` of the down input for down.

    Every candidate spec reuses the factors, and gate and up share theirs, so
    each Hessian is factorized once instead of once per (candidate, projection).
    """
    from moeconv.calib import hessian_factor

    h_in = torch.stack([x.T @ x for x in inputs])
    h_mid = torch.stack([(z := _mid(_expert(weights, i), x, act)).T @ z for i, x in enumerate(inputs)])
    f_in, f_mid = hessian_factor(h_in), hessian_factor(h_mid)
    hessians = {proj: h_mid if proj == "down" else h_in for proj in weights}
    factors = {proj: f_mid if proj == "down" else f_in for proj in weights}
    return hessians, factors


def layer_damages(weights: dict[str, torch.Tensor], samples: list[RoutedSample], candidates: list[QuantSpec], act,
                  method: str = "rtn") -> np.ndarray:
    """``D_e(c)`` ``[n_experts, n_candidates]`` for the stacked experts of one layer (0 where no token was routed).

    GPTQ fits the weights to the tokens it sees, so its error on those same
    tokens flatters low bit-widths.  Its damage is therefore cross-fitted: GPTQ
    on the Hessians of one half of each sample (alternate rows; the sample is
    in random order) is scored on the other half, and the two halves are added.
    """
    folds = [slice(None)] if method != "gptq" else [slice(0, None, 2), slice(1, None, 2)]
    out = np.zeros((len(samples), len(candidates)))
    for fit, score in zip(folds, folds[::-1]):
        hessians, factors = _hessians(weights, [s.x[fit] for s in samples], act) if method == "gptq" else (None, None)
        inputs = [s.x[score] for s in samples]
        references = [expert_forward(_expert(weights, i), x, act) for i, x in enumerate(inputs)]
        for j, spec in enumerate(candidates):
            quantized = quantized_weights(weights, spec, method, hessians, factors)
            for i, (sample, x) in enumerate(zip(samples, inputs)):
                if x.shape[0]:
                    error = expert_forward(_expert(quantized, i), x, act) - references[i]
                    out[i, j] += sample.scale * float((error.square().sum(-1) * sample.weight[score]).sum())
    return out


def expected_tokens(stats: CalibrationStats, keys) -> dict[tuple[int, int], float]:
    """Per expert, the routed-token count its damage is scaled to: ``(N_e + M_e * N_layer / M_layer) / 2``.

    ``N_e`` is the calibration count of tokens routed to the expert and
    ``M_e`` its router probability mass over all tokens, rescaled so that a
    layer's mass-based counts add up to its routed slots (``k`` per token for
    a softmax router).  The mean weighs the routing the calibration text
    produced and the routing the router's probabilities expect equally, the
    same soft-routing model ``moeconv.calib`` uses for starved experts.
    """
    layers: dict[int, list] = {}
    for key in keys:
        layers.setdefault(key[0], []).append(key)
    out = {}
    for members in layers.values():
        hard = sum(stats.tokens.get(k, 0.0) for k in members)
        mass = sum(stats.mass.get(k, 0.0) for k in members)
        for k in members:
            soft = stats.mass.get(k, 0.0) * hard / mass if mass > 0 else stats.tokens.get(k, 0.0)
            out[k] = 0.5 * (stats.tokens.get(k, 0.0) + soft)
    return out


def _measure(source: ExpertSource, stats: CalibrationStats, candidates, method: str, device) -> dict[tuple[int, int], np.ndarray]:
    """Damages of every expert, with one layer's expert weights and samples in memory at a time."""
    act = activation(source.source.config)
    counts = expected_tokens(stats, [(e.layer, e.expert) for e in source.experts])
    damages = {}
    for layer in source.layers:
        experts = [e for e in source.experts if e.layer == layer]
        weights = {proj: torch.stack([source.read(e.weights[proj]) for e in experts]).to(device) for proj in experts[0].weights}
        samples = []
        for e in experts:
            s = stats.samples[(e.layer, e.expert)]
            samples.append(RoutedSample(s.x.to(device), s.weight.to(device), s.key, s.total))
        for e, sample, row in zip(experts, samples, layer_damages(weights, samples, candidates, act, method)):
            key = (e.layer, e.expert)
            damages[key] = row * (counts[key] / sample.total if sample.total else 0.0)
    return damages


def allocate(source: ExpertSource, stats: CalibrationStats, candidates: list[QuantSpec], budget: str, limit: int,
             method: str = "rtn", device: str = "cpu"):
    """Per-expert specs minimizing the summed damage within ``limit`` bits, and the damages behind them."""
    if not candidates:
        raise ValueError("--alloc sensitivity: no candidate scheme left to choose from")
    cache_key = (tuple(candidates), method)
    if cache_key not in stats.damages:
        stats.damages[cache_key] = _measure(source, stats, candidates, method, device)
    damages = stats.damages[cache_key]
    keys = [(e.layer, e.expert) for e in source.experts]
    result = solve_mckp(cost_matrix(source.experts, candidates, budget), np.stack([damages[k] for k in keys]), limit)
    chosen = {key: candidates[j] for key, j in zip(keys, result.choice)}
    return chosen, damages
