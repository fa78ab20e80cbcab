"""Scheme names, code tables and tensor layouts of moeconv format v1.

This module is the single source of truth for the facts that every reader
and writer of the format must agree on (see ``spec/FORMAT.md``).  It depends
on nothing but the standard library and NumPy so that any runtime can import
it without the converter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SCHEMES",
    "SchemeInfo",
    "NF4_CODE",
    "FP4_CODE",
    "E2M1_VALUES",
    "DYNAMIC_MAP",
    "DOUBLE_QUANT_BLOCK",
    "MX_BLOCK",
    "BLOCKWISE_GROUP_SIZES",
    "scheme_info",
    "tensor_layout",
    "stored_bits",
    "code_bits",
]

#: Block size of the second quantization level of double-quantized scales.
DOUBLE_QUANT_BLOCK = 256
#: Elements sharing one E8M0 scale in MXFP4 (OCP Microscaling v1.0).
MX_BLOCK = 32
#: Block sizes allowed for ``nf4`` and ``fp4`` (the ones bitsandbytes accepts).
BLOCKWISE_GROUP_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class SchemeInfo:
    """What a scheme name means.

    ``family`` selects the packing and dequantization rules: ``int`` (group-wise
    integers with float16 scales), ``nf4``/``fp4`` (block-wise absmax with a
    16-entry code table, bitsandbytes layout) or ``mxfp4`` (OCP MX).
    """

    name: str
    family: str
    bits: int
    symmetric: bool
    default_group_size: int


def _int_schemes() -> dict[str, SchemeInfo]:
    out = {}
    for bits in (2, 3, 4, 8):
        out[f"int{bits}"] = SchemeInfo(f"int{bits}", "int", bits, False, 64)
        out[f"int{bits}-sym"] = SchemeInfo(f"int{bits}-sym", "int", bits, True, 64)
    return out


SCHEMES: dict[str, SchemeInfo] = {
    **_int_schemes(),
    "nf4": SchemeInfo("nf4", "nf4", 4, True, 64),
    "fp4": SchemeInfo("fp4", "fp4", 4, True, 64),
    "mxfp4": SchemeInfo("mxfp4", "mxfp4", 4, True, MX_BLOCK),
}


def scheme_info(name: str) -> SchemeInfo:
    """Look a scheme up by name; unknown names raise ``ValueError`` listing the known ones."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown scheme {name!r}; known schemes: {', '.join(SCHEMES)}") from None


def _f32(values) -> np.ndarray:
    table = np.array([float.fromhex(v) if isinstance(v, str) else v for v in values], dtype=np.float32)
    table.setflags(write=False)
    return table


#: NF4 code table (bitsandbytes ``get_4bit_type("nf4")``), indexed by the 4-bit code.
NF4_CODE = _f32([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])

#: FP4 code table (bitsandbytes ``get_4bit_type("fp4")``), indexed by the 4-bit code.
#: Code 8 is negative zero; it dequantizes to -0.0.
FP4_CODE = _f32([
    0.0, 0.0625 / 12, 8.0 / 12, 1.0, 4.0 / 12, 6.0 / 12, 2.0 / 12, 3.0 / 12,
    -0.0, -0.0625 / 12, -8.0 / 12, -1.0, -4.0 / 12, -6.0 / 12, -2.0 / 12, -3.0 / 12,
])

#: E2M1 (OCP FP4) values indexed by the 4-bit code: bit 3 is the sign.
E2M1_VALUES = _f32([
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
])

#: Signed 8-bit dynamic map used for double-quantized block scales
#: (bitsandbytes ``create_dynamic_map(signed=True)``), sorted ascending.
DYNAMIC_MAP = _f32([
    '-0x1.fc66660000000p-1', '-0x1.f533340000000p-1', '-0x1.ee00000000000p-1', '-0x1.e6cccc0000000p-1',
    '-0x1.df999a0000000p-1', '-0x1.d866660000000p-1', '-0x1.d133340000000p-1', '-0x1.ca00000000000p-1',
    '-0x1.c2cccc0000000p-1', '-0x1.bb999a0000000p-1', '-0x1.b466660000000p-1', '-0x1.ad33340000000p-1',
    '-0x1.a600000000000p-1', '-0x1.9ecccc0000000p-1', '-0x1.97999a0000000p-1', '-0x1.9066660000000p-1',
    '-0x1.8933340000000p-1', '-0x1.8200000000000p-1', '-0x1.7acccc0000000p-1', '-0x1.73999a0000000p-1',
    '-0x1.6c66680000000p-1', '-0x1.6533340000000p-1', '-0x1.5e00000000000p-1', '-0x1.56cccc0000000p-1',
    '-0x1.4f999a0000000p-1', '-0x1.4866680000000p-1', '-0x1.4133340000000p-1', '-0x1.3a00000000000p-1',
    '-0x1.32cccc0000000p-1', '-0x1.2b999a0000000p-1', '-0x1.2466680000000p-1', '-0x1.1d33340000000p-1',
    '-0x1.1600000000000p-1', '-0x1.0ecccc0000000p-1', '-0x1.0799980000000p-1', '-0x1.0066660000000p-1',
    '-0x1.f266640000000p-2', '-0x1.e400000000000p-2', '-0x1.d599980000000p-2', '-0x1.c733340000000p-2',
    '-0x1.b8cccc0000000p-2', '-0x1.aa66660000000p-2', '-0x1.9c00000000000p-2', '-0x1.8d99980000000p-2',
    '-0x1.7f33340000000p-2', '-0x1.70cccc0000000p-2', '-0x1.6266660000000p-2', '-0x1.5400000000000p-2',
    '-0x1.4599980000000p-2', '-0x1.3733340000000p-2', '-0x1.28cccc0000000p-2', '-0x1.1a66680000000p-2',
    '-0x1.0c00000000000p-2', '-0x1.fb33320000000p-3', '-0x1.de66660000000p-3', '-0x1.c1999a0000000p-3',
    '-0x1.a4cccc0000000p-3', '-0x1.8800000000000p-3', '-0x1.6b33340000000p-3', '-0x1.4e66660000000p-3',
    '-0x1.31999a0000000p-3', '-0x1.14cccc0000000p-3', '-0x1.f000000000000p-4', '-0x1.b666680000000p-4',
    '-0x1.93d70a0000000p-4', '-0x1.8851ee0000000p-4', '-0x1.7cccce0000000p-4', '-0x1.7147ae0000000p-4',
    '-0x1.65c2900000000p-4', '-0x1.5a3d700000000p-4', '-0x1.4eb8540000000p-4', '-0x1.4333340000000p-4',
    '-0x1.37ae140000000p-4', '-0x1.2c28f60000000p-4', '-0x1.20a3d60000000p-4', '-0x1.151eba0000000p-4',
    '-0x1.09999a0000000p-4', '-0x1.fc28f60000000p-5', '-0x1.e51eba0000000p-5', '-0x1.ce147a0000000p-5',
    '-0x1.b70a3e0000000p-5', '-0x1.a000000000000p-5', '-0x1.88f5c20000000p-5', '-0x1.71eb860000000p-5',
    '-0x1.5ae1460000000p-5', '-0x1.43d70a0000000p-5', '-0x1.2cccce0000000p-5', '-0x1.15c2900000000p-5',
    '-0x1.fd70a40000000p-6', '-0x1.cf5c2a0000000p-6', '-0x1.a147ae0000000p-6', '-0x1.7333340000000p-6',
    '-0x1.451eba0000000p-6', '-0x1.170a3e0000000p-6', '-0x1.d1eb860000000p-7', '-0x1.75c2900000000p-7',
    '-0x1.3e76c80000000p-7', '-0x1.2c08300000000p-7', '-0x1.19999a0000000p-7', '-0x1.072b020000000p-7',
    '-0x1.e978d40000000p-8', '-0x1.c49ba60000000p-8', '-0x1.9fbe760000000p-8', '-0x1.7ae1480000000p-8',
    '-0x1.56041a0000000p-8', '-0x1.3126e80000000p-8', '-0x1.0c49ba0000000p-8', '-0x1.ced9140000000p-9',
    '-0x1.851eb80000000p-9', '-0x1.3b645a0000000p-9', '-0x1.e353f80000000p-10', '-0x1.4fdf3a0000000p-10',
    '-0x1.eecbfe0000000p-11', '-0x1.b3d07c0000000p-11', '-0x1.78d5000000000p-11', '-0x1.3dd9820000000p-11',
    '-0x1.02de020000000p-11', '-0x1.8fc5060000000p-12', '-0x1.19ce0a0000000p-12', '-0x1.47ae160000000p-13',
    '-0x1.743e960000000p-14', '-0x1.15df660000000p-14', '-0x1.6f00680000000p-15', '-0x1.64840c0000000p-16',
    '-0x1.040bfe0000000p-17', '-0x1.b435280000000p-19', '-0x1.27476e0000000p-21', '0x0.0p+0',
    '0x1.27476e0000000p-21', '0x1.b435280000000p-19', '0x1.040bfe0000000p-17', '0x1.64840c0000000p-16',
    '0x1.6f00680000000p-15', '0x1.15df660000000p-14', '0x1.743e960000000p-14', '0x1.47ae160000000p-13',
    '0x1.19ce0a0000000p-12', '0x1.8fc5060000000p-12', '0x1.02de020000000p-11', '0x1.3dd9820000000p-11',
    '0x1.78d5000000000p-11', '0x1.b3d07c0000000p-11', '0x1.eecbfe0000000p-11', '0x1.4fdf3a0000000p-10',
    '0x1.e353f80000000p-10', '0x1.3b645a0000000p-9', '0x1.851eb80000000p-9', '0x1.ced9140000000p-9',
    '0x1.0c49ba0000000p-8', '0x1.3126e80000000p-8', '0x1.56041a0000000p-8', '0x1.7ae1480000000p-8',
    '0x1.9fbe760000000p-8', '0x1.c49ba60000000p-8', '0x1.e978d40000000p-8', '0x1.072b020000000p-7',
    '0x1.19999a0000000p-7', '0x1.2c08300000000p-7', '0x1.3e76c80000000p-7', '0x1.75c2900000000p-7',
    '0x1.d1eb860000000p-7', '0x1.170a3e0000000p-6', '0x1.451eba0000000p-6', '0x1.7333340000000p-6',
    '0x1.a147ae0000000p-6', '0x1.cf5c2a0000000p-6', '0x1.fd70a40000000p-6', '0x1.15c2900000000p-5',
    '0x1.2cccce0000000p-5', '0x1.43d70a0000000p-5', '0x1.5ae1460000000p-5', '0x1.71eb860000000p-5',
    '0x1.88f5c20000000p-5', '0x1.a000000000000p-5', '0x1.b70a3e0000000p-5', '0x1.ce147a0000000p-5',
    '0x1.e51eba0000000p-5', '0x1.fc28f60000000p-5', '0x1.09999a0000000p-4', '0x1.151eba0000000p-4',
    '0x1.20a3d60000000p-4', '0x1.2c28f60000000p-4', '0x1.37ae140000000p-4', '0x1.4333340000000p-4',
    '0x1.4eb8540000000p-4', '0x1.5a3d700000000p-4', '0x1.65c2900000000p-4', '0x1.7147ae0000000p-4',
    '0x1.7cccce0000000p-4', '0x1.8851ee0000000p-4', '0x1.93d70a0000000p-4', '0x1.b666680000000p-4',
    '0x1.f000000000000p-4', '0x1.14cccc0000000p-3', '0x1.31999a0000000p-3', '0x1.4e66660000000p-3',
    '0x1.6b33340000000p-3', '0x1.8800000000000p-3', '0x1.a4cccc0000000p-3', '0x1.c1999a0000000p-3',
    '0x1.de66660000000p-3', '0x1.fb33320000000p-3', '0x1.0c00000000000p-2', '0x1.1a66680000000p-2',
    '0x1.28cccc0000000p-2', '0x1.3733340000000p-2', '0x1.4599980000000p-2', '0x1.5400000000000p-2',
    '0x1.6266660000000p-2', '0x1.70cccc0000000p-2', '0x1.7f33340000000p-2', '0x1.8d99980000000p-2',
    '0x1.9c00000000000p-2', '0x1.aa66660000000p-2', '0x1.b8cccc0000000p-2', '0x1.c733340000000p-2',
    '0x1.d599980000000p-2', '0x1.e400000000000p-2', '0x1.f266640000000p-2', '0x1.0066660000000p-1',
    '0x1.0799980000000p-1', '0x1.0ecccc0000000p-1', '0x1.1600000000000p-1', '0x1.1d33340000000p-1',
    '0x1.2466680000000p-1', '0x1.2b999a0000000p-1', '0x1.32cccc0000000p-1', '0x1.3a00000000000p-1',
    '0x1.4133340000000p-1', '0x1.4866680000000p-1', '0x1.4f999a0000000p-1', '0x1.56cccc0000000p-1',
    '0x1.5e00000000000p-1', '0x1.6533340000000p-1', '0x1.6c66680000000p-1', '0x1.73999a0000000p-1',
    '0x1.7acccc0000000p-1', '0x1.8200000000000p-1', '0x1.8933340000000p-1', '0x1.9066660000000p-1',
    '0x1.97999a0000000p-1', '0x1.9ecccc0000000p-1', '0x1.a600000000000p-1', '0x1.ad33340000000p-1',
    '0x1.b466660000000p-1', '0x1.bb999a0000000p-1', '0x1.c2cccc0000000p-1', '0x1.ca00000000000p-1',
    '0x1.d133340000000p-1', '0x1.d866660000000p-1', '0x1.df999a0000000p-1', '0x1.e6cccc0000000p-1',
    '0x1.ee00000000000p-1', '0x1.f533340000000p-1', '0x1.fc66660000000p-1', '0x1.0000000000000p+0',
])


def _check_group_size(info: SchemeInfo, group_size: int) -> None:
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group size must be a positive integer, got {group_size!r}")
    if info.family in ("nf4", "fp4") and group_size not in BLOCKWISE_GROUP_SIZES:
        raise ValueError(
            f"scheme {info.name!r} needs a block size in {BLOCKWISE_GROUP_SIZES}, got {group_size}"
        )
    if info.family == "mxfp4" and group_size != MX_BLOCK:
        raise ValueError(f"scheme 'mxfp4' has a fixed block size of {MX_BLOCK}, got {group_size}")


def _ceil_div(a: int, b: int) -> int:
    """Exact integer ceil(a / b): float division overflows or rounds for sizes a hostile header may claim."""
    return -(-a // b)


def tensor_layout(
    scheme: str, shape: tuple[int, int], group_size: int, double_quant: bool = False
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The stored tensors of one quantized weight: ``{suffix: (safetensors dtype, shape)}``.

    ``shape`` is the logical ``[out_features, in_features]`` of the weight.  A
    reader checks every stored tensor against this table before touching its
    bytes, so a header that lies about sizes is caught without allocating.
    """
    info = scheme_info(scheme)
    _check_group_size(info, group_size)
    if len(shape) != 2 or any((not isinstance(d, int)) or d < 1 for d in shape):
        raise ValueError(f"a quantized weight must have a 2-D shape of positive sizes, got {list(shape)}")
    if double_quant and info.family not in ("nf4", "fp4"):
        raise ValueError(f"double quantization applies to nf4 and fp4 only, not {scheme!r}")
    rows, cols = shape
    if info.family == "int":
        n_groups = _ceil_div(cols, group_size)
        row_bytes = _ceil_div(n_groups * group_size * info.bits, 8)
        layout = {"qweight": ("U8", (rows, row_bytes)), "scales": ("F16", (rows, n_groups))}
        if not info.symmetric:
            layout["zeros"] = ("F16", (rows, n_groups))
        return layout
    if info.family == "mxfp4":
        n_blocks = _ceil_div(cols, MX_BLOCK)
        return {"qweight": ("U8", (rows, n_blocks * MX_BLOCK // 2)), "scales": ("U8", (rows, n_blocks))}
    numel = rows * cols
    n_blocks = _ceil_div(numel, group_size)
    layout = {"qweight": ("U8", (_ceil_div(numel, 2),))}
    if double_quant:
        layout["absmax_q"] = ("U8", (n_blocks,))
        layout["absmax_scale"] = ("F32", (_ceil_div(n_blocks, DOUBLE_QUANT_BLOCK),))
        layout["absmax_offset"] = ("F32", (1,))
    else:
        layout["absmax"] = ("F32", (n_blocks,))
    return layout


_DTYPE_BITS = {"U8": 8, "F16": 16, "BF16": 16, "F32": 32}


def stored_bits(scheme: str, shape: tuple[int, int], group_size: int, double_quant: bool = False) -> int:
    """Every bit stored for one quantized weight: codes, scales, zero points, double-quant constants."""
    return sum(
        _DTYPE_BITS[dtype] * math.prod(dims)
        for dtype, dims in tensor_layout(scheme, shape, group_size, double_quant).values()
    )


def code_bits(scheme: str, shape: tuple[int, int]) -> int:
    """The nominal bits of the codes alone (``bits`` per logical weight), as papers count them."""
    return scheme_info(scheme).bits * shape[0] * shape[1]
