"""AWQ for MoE experts: activation-aware per-input-channel scales searched on routed activations.

AWQ (Lin et al., 2023) multiplies input channel ``c`` of a weight by ``s_c``
before quantization and divides the activation by ``s_c`` (folded into the
preceding operator), so salient channels (large mean ``|x|``) are quantized
with relatively finer steps.  ``s = mean|x|^a / mean|w|^(1-a)`` (or
``mean|x|^a``), normalised to a geometric mean of 1, with ``a`` searched on a
grid.  The search objective here is the exact squared output error of the
quantized projection over the calibration tokens routed to the expert,
``tr(dW H dW^T)`` with ``H = sum x x^T`` from :mod:`.capture` — no activations
are stored, and identity (``s = 1``, plain round-to-nearest) is always a
candidate, so AWQ never does worse than RTN on its calibration data.

Where the scales fold, for a gated expert ``down(act(gate x) * up x)``:

* down: ``s`` on its input folds into the rows of the expert's own ``up``
  (``up / s``), per expert, exactly;
* gate/up: their input is the block input, shared by all experts and the
  router.  ``search_layer_scale`` finds ONE scale for the layer, which folds
  into the norm before the block (``norm / s``); the router (and any other
  reader of the block input) gets ``* s`` on its columns so its logits are
  unchanged.  With ``pow2=True`` the scale is a power of two per channel, so
  both folds are exact in BF16 and the router computes bit-identical logits
  (the stored router bytes do change).  ``search_expert_scales`` gives each
  expert its own input scale, fitted to its own tokens, but it needs a
  per-expert vector the format v1 does not have, so it is for fake-quant
  measurement only (on moe-tiny-mixtral it did not beat the layer scale).

After scaling, :func:`search_clip` shrinks each group's range where that
lowers the output error (AWQ's clipping step), for every scheme.
"""

from __future__ import annotations

import torch

from moeconv.quant import QuantSpec, dequantize, quantize
from moeconv_numpy.schemes import scheme_info

from .gptq import CLIP_SHRINK, diagonal_blocks, group_error, hessian_error, int_rtn

__all__ = [
    "fake_quantize", "candidate_scales", "search_layer_scale", "search_expert_scales", "search_clip",
    "fold_input_scale",
]


def fake_quantize(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``dequantize(quantize(W))`` of every matrix of a stack ``[..., rows, cols]`` (float32), any scheme."""
    if scheme_info(spec.scheme).family == "int":
        return int_rtn(weight, spec).dequantize()
    flat = weight.float().reshape(-1, *weight.shape[-2:])
    out = torch.stack([dequantize(quantize(w, spec), spec, tuple(w.shape)) for w in flat])
    return out.reshape(weight.shape)


def _weight_mean(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """AWQ's per-input-channel weight magnitude: |w| relative to its group's max, averaged over rows [..., cols]."""
    g = spec.group_size or scheme_info(spec.scheme).default_group_size
    w = weight.float().abs()
    cols = w.shape[-1]
    padded = torch.nn.functional.pad(w, (0, -cols % g)).reshape(*w.shape[:-1], -1, g)
    rel = padded / padded.amax(-1, keepdim=True).clamp(min=1e-12)
    return rel.reshape(*w.shape[:-1], -1)[..., :cols].mean(-2)


def candidate_scales(act_mean: torch.Tensor, weight_mean: torch.Tensor, n_grid: int, pow2: bool) -> torch.Tensor:
    """``[n_candidates, ..., cols]`` scales: identity, then ``x^a`` and ``x^a / w^(1-a)`` for ``a`` in ``[0, 1)``.

    Each candidate is normalised so that ``sqrt(max * min) == 1``; ``pow2``
    rounds ``log2`` to integers (exact folding in any binary float format).
    """
    alpha = torch.arange(n_grid, dtype=torch.float32, device=act_mean.device) / n_grid
    alpha = alpha.reshape(-1, *([1] * act_mean.dim()))
    x = act_mean.float().clamp(min=1e-4)
    w = weight_mean.float().clamp(min=1e-4)
    scales = torch.cat([x ** alpha, x ** alpha / w ** (1 - alpha)]).clamp(min=1e-4)
    scales = scales / (scales.amax(-1, keepdim=True) * scales.amin(-1, keepdim=True)).sqrt()
    if pow2:
        scales = torch.exp2(torch.round(torch.log2(scales)))
    return torch.cat([torch.ones_like(scales[:1]), scales])


def _losses(weight, hessian, scales, spec) -> torch.Tensor:
    """Output error per candidate and matrix ``[n_candidates, n]`` of quantizing ``W * s`` and undoing ``s``."""
    out = []
    for s in scales:
        scaled = weight.float() * s[..., None, :]
        approx = fake_quantize(scaled, spec) / s[..., None, :]
        out.append(hessian_error(weight, approx, hessian))
    return torch.stack(out)


def search_layer_scale(
    weight: torch.Tensor, hessian: torch.Tensor, act_mean: torch.Tensor, spec: QuantSpec,
    *, n_grid: int = 20, pow2: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One input scale ``[cols]`` for a stack ``weight [n, rows, cols]`` sharing an input (all experts of a layer).

    ``hessian [n, cols, cols]`` weights each matrix by its own routed tokens;
    ``act_mean [cols]`` is the mean ``|x|`` of the shared input.  Returns
    (scale, summed output error of the chosen candidate and of RTN ``[2]``).
    """
    weight_mean = _weight_mean(weight, spec).mean(0)
    scales = candidate_scales(act_mean, weight_mean, n_grid, pow2)
    total = _losses(weight, hessian, scales, spec).sum(-1)
    best = int(torch.argmin(total))
    return scales[best], torch.stack([total[best], total[0]])


def search_expert_scales(
    weight: torch.Tensor, hessian: torch.Tensor, act_mean: torch.Tensor, spec: QuantSpec,
    *, n_grid: int = 20, pow2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One input scale per matrix: ``weight [n, rows, cols]``, ``act_mean [n, cols]`` -> (scales, errors [2, n]).

    ``errors`` holds each matrix's output error with its chosen scale and with
    RTN.  Used for the down projection (folds into ``up``) and, in fake
    quantization only, for per-expert gate/up input scales.
    """
    scales = candidate_scales(act_mean, _weight_mean(weight, spec), n_grid, pow2)
    losses = _losses(weight, hessian, scales, spec)
    best = torch.argmin(losses, dim=0)
    chosen = scales.gather(0, best[None, :, None].expand(1, *scales.shape[1:]))[0]
    return chosen, torch.stack([losses.gather(0, best[None])[0], losses[0]])


def search_clip(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """AWQ's clipping: ``weight [n, rows, cols]`` with each group's range shrunk by the factor of least output error.

    Groups are ``g`` consecutive columns of a row (``g`` the scheme's group or
    block size) and each is judged with its diagonal Hessian block, as
    AutoAWQ does.  Clipping only moves values, so the result quantizes
    with the ordinary :func:`~moeconv.quant.quantize` into format tensors.
    NF4/FP4 blocks follow rows only when ``g`` divides ``cols``; otherwise the
    weight is returned unclipped.
    """
    g = spec.group_size or scheme_info(spec.scheme).default_group_size
    n, rows, cols = weight.shape
    if scheme_info(spec.scheme).family in ("nf4", "fp4") and cols % g:
        return weight
    w = torch.nn.functional.pad(weight.float(), (0, -cols % g)).reshape(n, rows, -1, g)
    blocks = diagonal_blocks(hessian.float(), g)[:, None]
    low, high = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
    best, best_err = w, None
    for shrink in CLIP_SHRINK:
        clipped = torch.minimum(torch.maximum(w, low * shrink), high * shrink)
        approx = fake_quantize(clipped.reshape(n, rows, -1)[..., :cols], spec)
        delta = w - torch.nn.functional.pad(approx, (0, -cols % g)).reshape(w.shape)
        err = group_error(delta, blocks)
        if best_err is None:
            best, best_err = clipped, err
        else:
            better = err < best_err
            best, best_err = torch.where(better[..., None], clipped, best), torch.where(better, err, best_err)
    return best.reshape(n, rows, -1)[..., :cols]


def fold_input_scale(norm_weight: torch.Tensor, readers: list[torch.Tensor], scale: torch.Tensor) -> None:
    """In place: ``norm / s`` and ``reader[:, c] * s_c`` for every other weight reading the norm's output.

    With a power-of-two ``scale`` both are exact in the tensors' own dtype.
    """
    s = scale.to(norm_weight.device)
    norm_weight.data = (norm_weight.float() / s).to(norm_weight.dtype)
    for reader in readers:
        reader.data = (reader.float() * s.to(reader.device)).to(reader.dtype)
