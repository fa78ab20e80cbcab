"""Torch dequantization of moeconv format v1 weights, bit-exact with the reference reader.

The formulas duplicate ``moeconv_numpy``'s (spec/FORMAT.md, "Numerics") in torch so
that the loader can dequantize one expert at a time on any device without a
round trip through NumPy.  Every operation is done in float32 with the same
rounding steps as the reference, so the results are equal bit for bit, which
the tests check against ``moeconv_numpy.dequantize``.  The code tables come
from ``moeconv_numpy.schemes``, the single source of truth of the format.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache

import torch

from moeconv_numpy.schemes import (
    DOUBLE_QUANT_BLOCK,
    DYNAMIC_MAP,
    E2M1_VALUES,
    FP4_CODE,
    MX_BLOCK,
    NF4_CODE,
    scheme_info,
    tensor_layout,
)

__all__ = ["dequantize", "dequantize_unchecked", "unpack_codes", "check_parts", "blockwise_absmax"]

_TABLES = {"nf4": NF4_CODE, "fp4": FP4_CODE, "e2m1": E2M1_VALUES, "dynamic": DYNAMIC_MAP}
_TORCH_DTYPES = {"U8": torch.uint8, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
#: 2**-127, the E8M0 value of exponent byte 0: a float32 subnormal, so it cannot be built from exponent bits.
_E8M0_ZERO = 2.0**-127


@lru_cache(maxsize=None)
def _table(name: str, device: torch.device) -> torch.Tensor:
    """A format code table as a float32 tensor on ``device`` (cached: tables are tiny and read-only)."""
    return torch.tensor(_TABLES[name].tolist(), dtype=torch.float32, device=device)


def unpack_codes(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Codes of an LSB-first bit stream per row: uint8 ``[rows, row_bytes]`` -> uint8 ``[rows, n_codes]``.

    Code ``i`` of a row occupies bits ``[i*bits, (i+1)*bits)`` of the row's stream.
    Widths that divide 8 are split out of each byte directly; other widths (3)
    are read from little-endian words of ``bits`` bytes, which hold exactly 8 codes.
    """
    rows = packed.shape[0]
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(-1) >> shifts) & mask
        return codes.reshape(rows, -1)[:, :n_codes]
    n_words = math.ceil(packed.shape[1] / bits)
    padded = torch.nn.functional.pad(packed, (0, n_words * bits - packed.shape[1]))
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=packed.device)
    words = (padded.view(rows, n_words, bits).to(torch.int64) << byte_shifts).sum(-1)
    code_shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=packed.device)
    codes = ((words.unsqueeze(-1) >> code_shifts) & mask).to(torch.uint8)
    return codes.reshape(rows, -1)[:, :n_codes]


def _dequant_int(parts: Mapping[str, torch.Tensor], bits: int, symmetric: bool, shape, group_size: int) -> torch.Tensor:
    rows, cols = shape
    n_groups = math.ceil(cols / group_size)
    codes = unpack_codes(parts["qweight"], bits, n_groups * group_size).view(rows, n_groups, group_size)
    scales = parts["scales"].float().unsqueeze(-1)
    if symmetric:
        weight = (codes.float() - float(1 << (bits - 1))) * scales
    else:
        weight = (codes.float() - parts["zeros"].float().unsqueeze(-1)) * scales
    return weight.view(rows, n_groups * group_size)[:, :cols].contiguous()


def blockwise_absmax(parts: Mapping[str, torch.Tensor], n_blocks: int, double_quant: bool) -> torch.Tensor:
    """float32 absmax of each nf4/fp4 block, from its stored parts (double-quantized or not)."""
    if not double_quant:
        return parts["absmax"].float()
    n_super = math.ceil(n_blocks / DOUBLE_QUANT_BLOCK)
    dynamic = _table("dynamic", parts["absmax_q"].device)[parts["absmax_q"].long()]
    dynamic = torch.nn.functional.pad(dynamic, (0, n_super * DOUBLE_QUANT_BLOCK - n_blocks))
    scaled = (dynamic.view(n_super, DOUBLE_QUANT_BLOCK) * parts["absmax_scale"].unsqueeze(-1)).view(-1)[:n_blocks]
    return scaled + parts["absmax_offset"]


def _dequant_4bit_blockwise(
    parts: Mapping[str, torch.Tensor], family: str, shape, group_size: int, double_quant: bool
) -> torch.Tensor:
    rows, cols = shape
    numel = rows * cols
    n_blocks = math.ceil(numel / group_size)
    packed = parts["qweight"]
    # bitsandbytes order: the first element of each pair sits in the high nibble.
    codes = torch.stack((packed >> 4, packed & 15), dim=-1).view(-1)[:numel]
    values = _table(family, packed.device)[codes.long()]
    values = torch.nn.functional.pad(values, (0, n_blocks * group_size - numel))
    absmax = blockwise_absmax(parts, n_blocks, double_quant)
    return (values.view(n_blocks, group_size) * absmax.unsqueeze(-1)).view(-1)[:numel].view(rows, cols)


def _e8m0(scales: torch.Tensor) -> torch.Tensor:
    """2**(e - 127) for E8M0 bytes, exact: normal powers of two are built from their exponent bits."""
    exponent = scales.to(torch.int32)
    powers = (exponent << 23).view(torch.float32)
    return torch.where(exponent == 0, torch.full_like(powers, _E8M0_ZERO), powers)


def _dequant_mxfp4(parts: Mapping[str, torch.Tensor], shape) -> torch.Tensor:
    rows, cols = shape
    packed = parts["qweight"]
    n_blocks = parts["scales"].shape[1]
    # OCP / gpt-oss order: element 2j in the low nibble of byte j.
    codes = torch.stack((packed & 15, packed >> 4), dim=-1).view(rows, n_blocks, MX_BLOCK)
    values = _table("e2m1", packed.device)[codes.long()]
    weight = values * _e8m0(parts["scales"]).unsqueeze(-1)
    return weight.view(rows, n_blocks * MX_BLOCK)[:, :cols].contiguous()


def check_parts(parts: Mapping[str, torch.Tensor], scheme: str, shape, group_size: int, double_quant: bool = False) -> None:
    """Raise ``ValueError`` naming the first part whose name, dtype or shape differs from the format's layout."""
    layout = tensor_layout(scheme, tuple(shape), group_size, double_quant)
    if set(parts) != set(layout):
        raise ValueError(
            f"{scheme} weight of shape {list(shape)} needs parts {sorted(layout)}, got {sorted(parts)}"
        )
    for suffix, (dtype, dims) in layout.items():
        tensor = parts[suffix]
        if tensor.dtype != _TORCH_DTYPES[dtype] or tuple(tensor.shape) != tuple(dims):
            raise ValueError(
                f"part {suffix!r} of a {scheme} weight of shape {list(shape)} must be {dtype} {list(dims)}, "
                f"got {tensor.dtype} {list(tensor.shape)}"
            )


def dequantize(
    parts: Mapping[str, torch.Tensor], scheme: str, shape, group_size: int, double_quant: bool = False
) -> torch.Tensor:
    """Float32 ``[out, in]`` weight from its stored parts, on the parts' device.

    Same arguments and result, bit for bit, as ``moeconv_numpy.dequantize``.
    """
    check_parts(parts, scheme, shape, group_size, double_quant)
    return dequantize_unchecked(parts, scheme, shape, group_size, double_quant)


def dequantize_unchecked(
    parts: Mapping[str, torch.Tensor], scheme: str, shape, group_size: int, double_quant: bool = False
) -> torch.Tensor:
    """:func:`dequantize` without the layout check, for parts validated once when a module was built."""
    info = scheme_info(scheme)
    if info.family == "int":
        return _dequant_int(parts, info.bits, info.symmetric, shape, group_size)
    if info.family == "mxfp4":
        return _dequant_mxfp4(parts, shape)
    return _dequant_4bit_blockwise(parts, info.family, shape, group_size, double_quant)
