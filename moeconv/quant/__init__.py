"""Quantize one expert weight matrix into the stored tensors of format v1, and back.

``quantize(weight, spec)`` returns ``{suffix: tensor}`` exactly as
``moeconv_numpy.schemes.tensor_layout`` describes (same dtypes and shapes),
on the weight's device; ``dequantize(parts, spec, shape)`` is its float32
inverse and matches the NumPy reference reader bit for bit.  The scheme
families live in their own modules: :mod:`.intq` (group-wise integers),
:mod:`.blockwise` (NF4/FP4, bitsandbytes layout) and :mod:`.mxfp4`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeconv_numpy.schemes import SchemeInfo, scheme_info, tensor_layout

from .blockwise import dequantize_blockwise4, quantize_blockwise4
from .intq import dequantize_int, quantize_int
from .mxfp4 import dequantize_mxfp4, quantize_mxfp4

__all__ = ["QuantSpec", "quantize", "dequantize"]

_TORCH_DTYPES = {"U8": torch.uint8, "F16": torch.float16, "F32": torch.float32}


@dataclass(frozen=True)
class QuantSpec:
    """A scheme with its parameters, normalized so that equal specs mean equal bytes.

    ``group_size=None`` takes the scheme's default; ``double_quant`` only
    applies to ``nf4``/``fp4`` and is forced to False for the other schemes.
    Unknown schemes and group sizes the format does not allow raise
    ``ValueError`` here, before any tensor is touched.
    """

    scheme: str
    group_size: int | None = None
    double_quant: bool = True

    def __post_init__(self) -> None:
        info = scheme_info(self.scheme)
        group_size = info.default_group_size if self.group_size is None else self.group_size
        double_quant = bool(self.double_quant) and info.family in ("nf4", "fp4")
        object.__setattr__(self, "group_size", group_size)
        object.__setattr__(self, "double_quant", double_quant)
        tensor_layout(self.scheme, (1, 1), group_size, double_quant)  # validates the group size

    @property
    def info(self) -> SchemeInfo:
        return scheme_info(self.scheme)

    def layout(self, shape) -> dict[str, tuple[str, tuple[int, ...]]]:
        """``tensor_layout`` of this spec for a weight of ``shape``."""
        return tensor_layout(self.scheme, tuple(int(d) for d in shape), self.group_size, self.double_quant)


def _check_weight(weight, spec: QuantSpec, name: str) -> None:
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight {name!r}: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight {name!r}: only 2-D weights can be quantized, got shape {list(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight {name!r}: expected a floating-point tensor, got {weight.dtype}")
    try:
        spec.layout(weight.shape)
    except ValueError as exc:
        raise ValueError(f"weight {name!r}: {exc}") from None


def _non_finite_error(weight: torch.Tensor, spec: QuantSpec, name: str) -> ValueError:
    bad = (~torch.isfinite(weight)).nonzero()
    if bad.numel():
        row, col = (int(i) for i in bad[0])
        return ValueError(
            f"weight {name!r} contains NaN or Inf ({bad.shape[0]} values, first at [{row}, {col}] = "
            f"{float(weight[row, col])}); refusing to quantize it"
        )
    return ValueError(
        f"weight {name!r}: a group's range overflows the float16 scales of scheme {spec.scheme!r}"
    )


@torch.no_grad()
def quantize(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> dict[str, torch.Tensor]:
    """The stored tensors of a 2-D float ``weight`` ``[out, in]`` under ``spec``, on its device.

    ``weight`` may be an ``nn.Parameter``; nothing is recorded for autograd.
    Raises ``ValueError`` naming ``name`` for a non-2-D or non-float weight, a
    group size the scheme does not allow, or NaN/Inf values.
    """
    _check_weight(weight, spec, name)
    info = spec.info
    if info.family == "int":
        parts, finite = quantize_int(weight, info.bits, info.symmetric, spec.group_size)
    elif info.family == "mxfp4":
        parts, finite = quantize_mxfp4(weight)
    else:
        parts, finite = quantize_blockwise4(weight, info.family, spec.group_size, spec.double_quant)
    if not bool(finite):
        raise _non_finite_error(weight, spec, name)
    return parts


def _check_parts(parts, spec: QuantSpec, shape, name: str) -> tuple[int, int]:
    try:
        layout = spec.layout(shape)
    except ValueError as exc:
        raise ValueError(f"weight {name!r}: {exc}") from None
    if set(parts) != set(layout):
        raise ValueError(f"weight {name!r}: parts {sorted(parts)} do not match {spec.scheme!r}'s {sorted(layout)}")
    for suffix, (dtype, dims) in layout.items():
        part = parts[suffix]
        if not isinstance(part, torch.Tensor) or part.dtype != _TORCH_DTYPES[dtype] or tuple(part.shape) != dims:
            found = f"{part.dtype} {list(part.shape)}" if isinstance(part, torch.Tensor) else type(part).__name__
            raise ValueError(f"weight {name!r}: part {suffix!r} is {found}, expected {dtype} {list(dims)}")
    return tuple(int(d) for d in shape)


@torch.no_grad()
def dequantize(parts: dict[str, torch.Tensor], spec: QuantSpec, shape, name: str = "weight") -> torch.Tensor:
    """The float32 ``[out, in]`` weight that ``parts`` encode (bit-exact with ``moeconv_numpy.dequantize``)."""
    shape = _check_parts(parts, spec, shape, name)
    info = spec.info
    if info.family == "int":
        return dequantize_int(parts, info.bits, info.symmetric, shape, spec.group_size)
    if info.family == "mxfp4":
        return dequantize_mxfp4(parts, shape, name)
    return dequantize_blockwise4(parts, info.family, shape, spec.group_size)
