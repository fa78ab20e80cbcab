"""GPTQ for the format's INT schemes: error-feedback quantization of a stack of expert matrices.

GPTQ (Frantar et al., 2022) quantizes a weight ``W [rows, cols]`` column by
column and spreads each column's rounding error over the not-yet-quantized
columns so that the layer output on calibration inputs ``X`` (summarised by
``H = X^T X``) changes as little as possible.  Rows are independent given
``H``, so one call handles a whole stack ``[n, rows, cols]`` (one projection
of all experts of a layer) with batched linear algebra; the only Python loop is GPTQ's inherent sweep over columns.

The result is exactly the format's int tensors: group scales and zero points
come from :func:`moeconv.quant.intq.group_params`, codes from
``float_codes`` (``quantize_codes`` without the uint8 round trip) and bytes
from ``pack_codes``, and the error feedback uses the format's float32
dequantization formula, so ``dequantize(parts)`` is the very matrix GPTQ
optimized against.  Without act-order the group parameters of
a group are computed when the sweep reaches its first column, from the
error-updated weights (as in the reference GPTQ).  With act-order the columns
are visited by decreasing Hessian diagonal; since the format has no ``g_idx``,
the groups stay the natural contiguous ones and their parameters are computed
before the sweep from the original weights ("static groups").  With
``clip=True`` each group's range is the min/max rule applied to the group
shrunk by the factor (from ``CLIP_SHRINK``) of least output error on its
diagonal Hessian block: the format stores any float16 scale and zero point,
and at 2-3 bits the full min/max range wastes levels (on moe-tiny-mixtral
this takes GPTQ INT2 g64 from ppl 11.9 to 7.7).

An all-zero or non-positive-definite Hessian never crashes: dead input
channels get a unit diagonal, damping grows tenfold until the Cholesky
factorization succeeds, and a Hessian that cannot be factorized is replaced by
the identity, for which GPTQ is exactly round-to-nearest (a property the
tests check).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from moeconv.quant import QuantSpec
from moeconv.quant.intq import float_codes, group_params, pack_codes
from moeconv_numpy.schemes import scheme_info

__all__ = [
    "IntQuantized", "gptq_quantize", "int_rtn", "hessian_error", "int_spec", "clipped_params", "diagonal_blocks",
    "group_error", "CLIP_SHRINK",
]

_MAX_DAMP_RETRIES = 6


def int_spec(spec: QuantSpec) -> tuple[int, bool, int]:
    """(bits, symmetric, group size) of an INT-family spec; other families raise naming the scheme."""
    info = scheme_info(spec.scheme)
    if info.family != "int":
        raise ValueError(
            f"GPTQ produces the int family only (int2/3/4/8[-sym]); scheme {spec.scheme!r} is {info.family}")
    return info.bits, info.symmetric, spec.group_size or info.default_group_size


@dataclass
class IntQuantized:
    """Group-wise INT codes of a stack of matrices ``[..., rows, cols]``, in the format's terms.

    ``codes`` uint8 ``[..., rows, n_groups*g]`` (padding columns 0), ``scale`` and
    ``zero`` float32 ``[..., rows, n_groups]`` holding float16 values (``zero``
    is None for symmetric schemes).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: QuantSpec
    cols: int

    def dequantize(self) -> torch.Tensor:
        """Float32 ``[..., rows, cols]``: the format's formula ``(c - z) * s`` (asym) or ``(c - 2^(b-1)) * s``."""
        bits, symmetric, g = int_spec(self.spec)
        *lead, kp = self.codes.shape
        c = self.codes.float().reshape(*lead, kp // g, g)
        offset = float(2 ** (bits - 1)) if symmetric else self.zero[..., None]
        return ((c - offset) * self.scale[..., None]).reshape(*lead, kp)[..., : self.cols]

    def parts(self, index: int | tuple = ()) -> dict[str, torch.Tensor]:
        """The format tensors (``qweight``, ``scales``, ``zeros``) of the matrix at ``index`` of the stack."""
        bits, symmetric, _ = int_spec(self.spec)
        out = {"qweight": pack_codes(self.codes[index].contiguous(), bits),
               "scales": self.scale[index].half().contiguous()}
        if not symmetric:
            out["zeros"] = self.zero[index].half().contiguous()
        return out


def _params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scale and zero point over the last dim of ``w``, shaped ``w.shape[:-1]``."""
    scale, zero = group_params(w, bits, symmetric)
    return scale.reshape(w.shape[:-1]), zero.reshape(w.shape[:-1])


def _static_params(w: torch.Tensor, bits: int, symmetric: bool, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameters of every natural group of ``w [..., cols]`` -> ``[..., n_groups]``.

    A short last group is padded with zeros, which changes neither ``min(w, 0)``,
    ``max(w, 0)`` nor the largest magnitude, so it gets the parameters of its real columns.
    """
    padded = torch.nn.functional.pad(w, (0, -w.shape[-1] % g))
    return _params(padded.reshape(*w.shape[:-1], -1, g), bits, symmetric)


def _fake(w: torch.Tensor, scale, zero, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, dequantized float32) of ``w`` with group parameters broadcastable to it: ``(c - z) * s``.

    ``group_params`` returns ``z = 2^(b-1)`` for symmetric schemes, so one formula serves both.
    The codes are integer-valued float32 (exact in uint8 storage).
    """
    codes = float_codes(w, scale, zero, bits, symmetric)
    return codes, (codes - zero) * scale


#: Range shrink factors tried by the clipping search; 1.0 is the plain min/max rule of round-to-nearest.
CLIP_SHRINK = tuple(1.0 - 0.05 * k for k in range(11))


def diagonal_blocks(hessian: torch.Tensor, g: int) -> torch.Tensor:
    """The ``[n, G, g, g]`` diagonal blocks of ``[n, cols, cols]`` Hessians, zero-padded to whole groups."""
    pad = -hessian.shape[-1] % g
    h = torch.nn.functional.pad(hessian, (0, pad, 0, pad))
    n, groups = h.shape[0], h.shape[-1] // g
    return h.view(n, groups, g, groups, g).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)


def group_error(delta: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``d H_block d^T`` per group: ``delta [..., G, g]``, blocks broadcasting to ``[..., G, g, g]`` -> ``[..., G]``."""
    return ((delta[..., None, :] @ blocks).squeeze(-2) * delta).sum(-1)


def clipped_params(
    w: torch.Tensor, blocks: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group parameters of ``w [..., G, g]`` with the range shrink (``CLIP_SHRINK``) of least output error per group.

    The error of a group is measured with its own diagonal Hessian block
    (``blocks``), as AWQ's clipping search does; the parameters still come
    from :func:`group_params` (of the clipped group), so they are format values.
    """
    low, high = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
    best = None
    for shrink in CLIP_SHRINK:
        scale, zero = _params(torch.minimum(torch.maximum(w, low * shrink), high * shrink), bits, symmetric)
        err = group_error(w - _fake(w, scale[..., None], zero[..., None], bits, symmetric)[1], blocks)
        if best is None:
            best = (err, scale, zero)
        else:
            better = err < best[0]
            best = tuple(torch.where(better, new, old) for new, old in zip((err, scale, zero), best))
    return best[1], best[2]


def int_rtn(weight: torch.Tensor, spec: QuantSpec) -> IntQuantized:
    """Round-to-nearest of a stack ``[..., rows, cols]`` (what GPTQ reduces to with an identity Hessian)."""
    bits, symmetric, g = int_spec(spec)
    w = weight.float()
    scale, zero = _static_params(w, bits, symmetric, g)
    padded = torch.nn.functional.pad(w, (0, -w.shape[-1] % g))
    codes, _ = _fake(padded.reshape(*scale.shape, g), scale[..., None], zero[..., None], bits, symmetric)
    codes = codes.reshape(padded.shape).to(torch.uint8)
    codes[..., w.shape[-1]:] = 0
    return IntQuantized(codes, scale, None if symmetric else zero, spec, w.shape[-1])


def _upper_inverse_cholesky(h: torch.Tensor, percdamp: float, names: list[str]) -> torch.Tensor:
    """``U`` with ``U^T U = (H + damp I)^-1`` for a batch of Hessians, in float64, never failing.

    Damping starts at ``percdamp`` times the mean diagonal and grows tenfold for
    the matrices whose factorization fails; after ``_MAX_DAMP_RETRIES`` such a
    matrix is replaced by the identity (GPTQ == RTN) with a warning naming it.
    """
    h = h.double()
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    mean_diag = h.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-12)
    damp = percdamp * mean_diag
    todo = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    upper = torch.empty_like(h)
    for _ in range(_MAX_DAMP_RETRIES):
        hd = h[todo] + damp[todo, None, None] * eye
        chol, info = torch.linalg.cholesky_ex(hd)
        inverse = torch.cholesky_inverse(chol)
        u, info_u = torch.linalg.cholesky_ex(inverse, upper=True)
        ok = (info == 0) & (info_u == 0) & torch.isfinite(u).all(dim=(-2, -1))
        idx = todo.nonzero().squeeze(1)
        upper[idx[ok]] = u[ok]
        todo[idx[ok]] = False
        if not todo.any():
            return upper
        damp = torch.where(todo, damp * 10, damp)
    bad = todo.nonzero().squeeze(1).tolist()
    warnings.warn(f"GPTQ: Hessian of {', '.join(names[i] for i in bad)} cannot be factorized; "
                  "using round-to-nearest", stacklevel=3)
    upper[todo] = eye
    return upper


def _live_hessian(hessian: torch.Tensor) -> torch.Tensor:
    """A float32 ``[n, cols, cols]`` copy whose dead input channels (diagonal <= 0) have a diagonal of 1."""
    h = hessian.to(torch.float32).reshape(-1, *hessian.shape[-2:]).clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    diag.masked_fill_(diag <= 0, 1.0)  # dead input channels: no information, no error feedback through them
    return h


def hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01, names: list[str] | None = None) -> torch.Tensor:
    """The factor GPTQ derives from ``hessian`` (``U^T U = (H + damp I)^-1``, float32 ``[n, cols, cols]``).

    It depends on the Hessian alone, so callers that run GPTQ with several
    specs on one Hessian (the sensitivity allocator) compute it once and pass
    it as ``gptq_quantize(..., factor=...)``.
    """
    h = _live_hessian(hessian)
    return _upper_inverse_cholesky(h, percdamp, names or [f"matrix {i}" for i in range(h.shape[0])]).float()


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    percdamp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    clip: bool = False,
    names: list[str] | None = None,
    factor: torch.Tensor | None = None,
) -> IntQuantized:
    """GPTQ of ``weight`` ``[rows, cols]`` / ``[n, rows, cols]``, ``hessian`` ``[cols, cols]`` / ``[n, cols, cols]``.

    ``hessian`` is ``sum x x^T`` over the calibration inputs of each matrix (any
    positive scale: damping is relative).  ``clip`` chooses each group's range
    by :func:`clipped_params` instead of the plain min/max.  ``names`` label
    the stack's matrices in warnings.  ``factor`` is :func:`hessian_factor` of
    the same Hessian and ``percdamp``, computed once for several calls (not
    with ``act_order``, which permutes the Hessian).  Runs on the weight's device.
    """
    bits, symmetric, g = int_spec(spec)
    single = weight.dim() == 2
    w = weight.float().clone().reshape(-1, *weight.shape[-2:])
    h = _live_hessian(hessian.to(w.device))
    n, rows, cols = w.shape
    if h.shape != (n, cols, cols):
        raise ValueError(f"GPTQ: Hessian shape {list(hessian.shape)} does not fit weight shape {list(weight.shape)}")
    if not torch.isfinite(w).all() or not torch.isfinite(h).all():
        raise ValueError(f"GPTQ: NaN/Inf in the weight or Hessian of {names or 'the stack'}")
    if factor is not None and (act_order or factor.shape != h.shape):
        raise ValueError("GPTQ: a precomputed factor needs act_order=False and the Hessian's shape")
    names = names or [f"matrix {i}" for i in range(n)]
    diag = h.diagonal(dim1=-2, dim2=-1)
    n_groups = math.ceil(cols / g)
    static = act_order
    if static and clip:
        padded = torch.nn.functional.pad(w, (0, -cols % g)).reshape(n, rows, n_groups, g)
        scale, zero = clipped_params(padded, diagonal_blocks(h, g)[:, None], bits, symmetric)
    elif static:
        scale, zero = _static_params(w, bits, symmetric, g)
    else:
        scale = torch.empty(n, rows, n_groups, device=w.device)
        zero = torch.empty_like(scale)
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True)
        w = w.gather(-1, perm[:, None, :].expand(-1, rows, -1))
        h = h.gather(-1, perm[:, None, :].expand(-1, cols, -1)).gather(-2, perm[:, :, None].expand(-1, -1, cols))
        column_group = perm // g
    if factor is None:
        factor = _upper_inverse_cholesky(h, percdamp, names)
    upper = factor.to(w.device, torch.float32)

    codes = torch.zeros(n, rows, n_groups * g, dtype=torch.uint8, device=w.device)
    step = g * max(1, block_size // g)  # blocks hold whole groups, so a group's parameters see updated columns
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        block = w[:, :, i1:i2]
        errors = torch.zeros_like(block)
        for i in range(i2 - i1):
            j = i1 + i
            if static:
                grp = column_group[:, j, None].expand(-1, rows)[..., None]
                s, z = scale.gather(-1, grp)[..., 0], zero.gather(-1, grp)[..., 0]
            else:
                if j % g == 0 and clip:
                    blocks = h[:, None, None, j : j + g, j : j + g]
                    params = clipped_params(block[:, :, None, i : i + g], blocks, bits, symmetric)
                    scale[:, :, j // g], zero[:, :, j // g] = (p[..., 0] for p in params)
                elif j % g == 0:
                    scale[:, :, j // g], zero[:, :, j // g] = _params(block[:, :, i : i + g], bits, symmetric)
                s, z = scale[:, :, j // g], zero[:, :, j // g]
            column = block[:, :, i]
            c, q = _fake(column, s, z, bits, symmetric)
            codes[:, :, j] = c
            err = (column - q) / upper[:, j, j, None]
            block[:, :, i:] -= err[:, :, None] * upper[:, None, j, j:i2]
            errors[:, :, i] = err
        w[:, :, i2:] -= errors @ upper[:, i1:i2, i2:]
    if act_order:
        inverse = torch.argsort(perm, dim=-1)
        codes[:, :, :cols] = codes[:, :, :cols].gather(-1, inverse[:, None, :].expand(-1, rows, -1))
    result = IntQuantized(codes, scale, None if symmetric else zero, spec, cols)
    if single:
        result = IntQuantized(codes[0], scale[0], None if symmetric else zero[0], spec, cols)
    return result


def hessian_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``tr((W - Q) H (W - Q)^T)`` per matrix of a stack: squared output error summed over the calibration tokens."""
    delta = (weight.float() - approx.float()).reshape(-1, *weight.shape[-2:])
    h = hessian.float().reshape(-1, *hessian.shape[-2:])
    return ((delta @ h) * delta).sum(dim=(-2, -1))
