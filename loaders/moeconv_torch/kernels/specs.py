"""What the Triton kernels need to know about a quantization scheme, as plain Python.

A kernel is specialised at compile time on one integer *spec code* per weight
variant, so that the bit width, packing order, scale kind and group size are
constants the compiler can fold.  This module owns that encoding, the check of
which weights the kernels accept, and the float32 code tables they read.  It
imports no Triton, so the loader can ask ``unsupported`` on any machine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from moeconv_numpy.schemes import DYNAMIC_MAP, E2M1_VALUES, FP4_CODE, MX_BLOCK, NF4_CODE, scheme_info, tensor_layout

#: Family numbers inside a spec code (``code % 4``).
FAM_INT, FAM_NF4, FAM_FP4, FAM_MX = 0, 1, 2, 3
_FAMILIES = {"int": FAM_INT, "nf4": FAM_NF4, "fp4": FAM_FP4, "mxfp4": FAM_MX}

#: Offsets of the code tables inside the float32 table tensor (see ``code_tables``);
#: ``tiles`` relies on nf4, fp4 and E2M1 sitting at 16 * (family - 1).  A 16-entry
#: table is one cache line, so a warp's lookups cost one L1 wavefront: byte-pair
#: tables (2 KB, half the reads) made nf4 decode 1.4x slower on an H100.
TAB_NF4, TAB_FP4, TAB_E2M1, TAB_DMAP = 0, 16, 32, 48
#: Where the tables hold 1.0, which ``tiles`` reads at run time (see ``tiles.one_bits``).
TAB_ONE = TAB_DMAP + 256

#: Widest K tile a kernel reads per step; a group larger than this is read in several steps.
MAX_BLOCK_K = 128

_TORCH_DTYPES = {"U8": torch.uint8, "F16": torch.float16, "F32": torch.float32}


def spec_code(scheme: str, group_size: int, double_quant: bool = False) -> int:
    """Pack (family, bits, symmetric, double quant, group size) into one int: a Triton constexpr.

    Layout: ``family | bits << 2 | symmetric << 6 | double_quant << 7 | group_size << 8``;
    ``moeconv_torch.kernels.tiles.dequant_tile`` decodes it with the same shifts.
    """
    info = scheme_info(scheme)
    dq = bool(double_quant) and info.family in ("nf4", "fp4")
    return _FAMILIES[info.family] | info.bits << 2 | int(info.symmetric) << 6 | int(dq) << 7 | group_size << 8


def tile_k(group_size: int, limit: int = MAX_BLOCK_K) -> int:
    """K tile of a weight: the largest power of two <= ``limit`` that divides its group size."""
    return math.gcd(group_size, limit)


def dequant_unit(scheme: str, group_size: int) -> tuple[int, int]:
    """(codes, bytes) the dequant kernel reads at a time: a 32-bit word of 4, 8 or 16 codes, or three-bit
    codes in 12-byte packs of 32 (groups of whole packs) or 3-byte packs of 8."""
    bits = scheme_info(scheme).bits
    if bits == 3:
        return (32, 12) if group_size % 32 == 0 else (8, 3)
    return 32 // bits, 4


def unsupported(scheme: str, shape: tuple[int, int], group_size: int, fused: bool = True) -> str | None:
    """Why the kernels cannot take this weight, or None when they can.

    ``dequantize`` (``fused=False``) needs each unit it reads (``dequant_unit``)
    to lie in one group.  The fused MoE kernels read one quantization group
    per K tile and need that tile to be a power of two of at least 16
    elements (a tensor-core K step, and whole 3-byte packs of 3-bit codes);
    nf4/fp4 blocks must also not straddle rows, since those kernels address
    blocks per row.
    """
    info = scheme_info(scheme)
    if info.family == "mxfp4":
        return None if group_size == MX_BLOCK else f"mxfp4 needs group size {MX_BLOCK}, got {group_size}"
    if not fused:
        unit = dequant_unit(scheme, group_size)[0]
        return None if group_size % unit == 0 else f"{scheme} groups of {group_size} are not whole {unit}-code units"
    if tile_k(group_size) < 16:
        return f"group size {group_size} has no power-of-two divisor >= 16 (the kernels' K tile)"
    if info.family in ("nf4", "fp4") and shape[1] % group_size:
        return f"{scheme} blocks of {group_size} straddle rows of {shape[1]} columns"
    return None


def code_tables(device: torch.device | str) -> torch.Tensor:
    """One float32 tensor of every table the kernels read, at ``TAB_*``.

    NF4, FP4, E2M1 (16 each), the dynamic map (256), then 1.0.
    """
    table = np.concatenate([NF4_CODE, FP4_CODE, E2M1_VALUES, DYNAMIC_MAP, [1.0]])
    return torch.from_numpy(table.astype(np.float32)).to(device)


def check_parts(parts: Mapping[str, torch.Tensor], scheme: str, shape, group_size: int,
                double_quant: bool, name: str = "weight") -> dict[str, torch.Tensor]:
    """The parts of one weight, checked against ``tensor_layout``: suffixes, dtypes, shapes, one device."""
    layout = tensor_layout(scheme, tuple(shape), group_size, double_quant)
    missing, extra = set(layout) - set(parts), set(parts) - set(layout)
    if missing or extra:
        raise ValueError(f"{name}: {scheme} parts must be {sorted(layout)}; "
                         f"missing {sorted(missing)}, unexpected {sorted(extra)}")
    device = parts["qweight"].device
    for suffix, (dtype, dims) in layout.items():
        t = parts[suffix]
        if t.dtype != _TORCH_DTYPES[dtype] or tuple(t.shape) != dims:
            raise ValueError(f"{name}.{suffix}: expected {dtype} {list(dims)}, got {t.dtype} {list(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name}.{suffix}: on {t.device}, but qweight is on {device}")
    return {suffix: parts[suffix].contiguous() for suffix in layout}
