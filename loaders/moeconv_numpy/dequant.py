"""Float32 dequantization of every format v1 scheme, vectorized NumPy.

This is the reference: each function is the formula of ``spec/FORMAT.md``
written with whole-array float32 operations (no fused multiply-add, no Python
loop over rows or groups), so its output is bit-exact with the spec and any
other conforming runtime can be tested against it.
"""

from __future__ import annotations

import numpy as np

from .errors import FormatError
from .schemes import (
    DOUBLE_QUANT_BLOCK, DYNAMIC_MAP, E2M1_VALUES, FP4_CODE, MX_BLOCK, NF4_CODE, scheme_info, tensor_layout,
)

__all__ = ["dequantize", "unpack_int_codes", "check_e8m0", "NUMPY_DTYPES"]

#: safetensors dtype name -> the little-endian NumPy dtype holding the same bytes
NUMPY_DTYPES = {
    "BOOL": np.dtype("u1"), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"), "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"), "F64": np.dtype("<f8"),
}


def unpack_int_codes(qweight: np.ndarray, bits: int, n_codes: int) -> np.ndarray:
    """Codes ``[rows, n_codes]`` (uint8) from rows packed as an LSB-first bit stream of ``bits``-bit codes.

    The loops below run over the few code positions inside a byte (or inside a
    3-byte word), never over rows or groups: each step is one whole-array op.
    """
    rows, row_bytes = qweight.shape
    mask = np.uint8((1 << bits) - 1)
    if bits == 8:
        return qweight[:, :n_codes]
    if 8 % bits == 0:
        # code k of byte j is at bits [k*bits, (k+1)*bits) of the byte
        per_byte = 8 // bits
        codes = np.empty((rows, row_bytes, per_byte), np.uint8)
        for k in range(per_byte):
            np.bitwise_and(qweight >> np.uint8(k * bits), mask, out=codes[:, :, k])
        return codes.reshape(rows, row_bytes * per_byte)[:, :n_codes]
    # otherwise every `bits` bytes hold exactly 8 codes: read them as one little-endian integer
    pad = -row_bytes % bits
    if pad:
        qweight = np.concatenate([qweight, np.zeros((rows, pad), np.uint8)], axis=1)
    words = np.zeros((rows, qweight.shape[1] // bits), np.uint32)
    for i in range(bits):
        words |= qweight[:, i::bits].astype(np.uint32) << np.uint32(8 * i)
    codes = np.empty((rows, words.shape[1], 8), np.uint8)
    for k in range(8):
        codes[:, :, k] = (words >> np.uint32(k * bits)) & mask
    return codes.reshape(rows, -1)[:, :n_codes]


#: 2^(e - 127) for every E8M0 code e = 0..254 (2^-127 is a float32 subnormal, exactly representable)
_POW2 = np.ldexp(np.ones(255, np.float32), np.arange(-127, 128, dtype=np.int32))


def _int(parts, bits: int, symmetric: bool, shape, group_size: int) -> np.ndarray:
    rows, cols = shape
    n_groups = parts["scales"].shape[1]
    codes = unpack_int_codes(parts["qweight"], bits, n_groups * group_size)
    # one float32 allocation, then in-place ops: fresh large arrays cost more than the arithmetic
    w = codes.reshape(rows, n_groups, group_size).astype(np.float32)
    if symmetric:
        np.subtract(w, np.float32(2 ** (bits - 1)), out=w)
    else:
        np.subtract(w, parts["zeros"].astype(np.float32)[:, :, None], out=w)
    np.multiply(w, parts["scales"].astype(np.float32)[:, :, None], out=w)
    return w.reshape(rows, n_groups * group_size)[:, :cols]


def _absmax(parts, n_blocks: int) -> np.ndarray:
    if "absmax" in parts:
        return parts["absmax"]
    block_scale = np.repeat(parts["absmax_scale"], DOUBLE_QUANT_BLOCK)[:n_blocks]
    return DYNAMIC_MAP[parts["absmax_q"]] * block_scale + parts["absmax_offset"][0]


def _blockwise(parts, table: np.ndarray, shape, group_size: int) -> np.ndarray:
    rows, cols = shape
    n = rows * cols
    packed = parts["qweight"]
    codes = np.empty(2 * packed.size, np.uint8)
    codes[0::2] = packed >> 4  # first element of a pair in the HIGH nibble (bitsandbytes order)
    codes[1::2] = packed & 0x0F
    absmax = _absmax(parts, -(-n // group_size))
    w = table[codes[:n]]
    full = n // group_size
    body = w[: full * group_size].reshape(full, group_size)
    np.multiply(body, absmax[:full, None], out=body)
    np.multiply(w[full * group_size :], absmax[full:], out=w[full * group_size :])  # the short last block
    return w.reshape(rows, cols)


def _mxfp4(parts, shape) -> np.ndarray:
    rows, cols = shape
    packed, scales = parts["qweight"], parts["scales"]
    codes = np.empty((rows, 2 * packed.shape[1]), np.uint8)
    codes[:, 0::2] = packed & 0x0F  # element 2j in the LOW nibble (OCP / gpt-oss order)
    codes[:, 1::2] = packed >> 4
    w = E2M1_VALUES[codes].reshape(rows, scales.shape[1], MX_BLOCK)
    # E2M1 values have at most 2 significant bits, so every product below is exact:
    # multiplying by a table of 2^(e-127) gives exactly ldexp(value, e - 127), only faster.
    np.multiply(w, _POW2[scales][:, :, None], out=w)
    return w.reshape(rows, -1)[:, :cols]


def check_e8m0(scales: np.ndarray, name: str, source: str) -> None:
    """E8M0 code 255 means NaN; format v1 forbids it, so a reader refuses it rather than spreading NaN."""
    bad = np.argwhere(scales == 255)
    if bad.size:
        row, block = bad[0]
        raise FormatError(source, f"E8M0 scale 255 (NaN) at row {row}, block {block}", name)


def _check_parts(parts, layout, name: str, source: str) -> None:
    if set(parts) != set(layout):
        raise FormatError(source, f"parts {sorted(parts)} do not match the scheme's {sorted(layout)}", name)
    for suffix, (dtype, shape) in layout.items():
        part = parts[suffix]
        if not isinstance(part, np.ndarray) or part.dtype != NUMPY_DTYPES[dtype] or part.shape != shape:
            found = f"{part.dtype} {list(part.shape)}" if isinstance(part, np.ndarray) else type(part).__name__
            raise FormatError(source, f"is {found}, expected {dtype} {list(shape)}", f"{name}.{suffix}")


def dequantize(
    parts: dict[str, np.ndarray],
    scheme: str,
    shape,
    group_size: int,
    double_quant: bool = False,
    *,
    name: str = "weight",
    source: str = "<arrays>",
) -> np.ndarray:
    """The float32 ``[out, in]`` weight that the stored ``parts`` of ``scheme`` encode.

    ``parts`` maps each suffix of ``tensor_layout(scheme, shape, group_size,
    double_quant)`` to a little-endian array of exactly that dtype and shape;
    anything else raises :class:`FormatError` naming ``source`` (a file) and
    ``name`` (the weight).
    """
    shape = tuple(int(d) for d in shape)
    try:
        info = scheme_info(scheme)
        layout = tensor_layout(scheme, shape, group_size, double_quant)
    except ValueError as exc:
        raise FormatError(source, str(exc), name) from None
    _check_parts(parts, layout, name, source)
    if info.family == "int":
        w = _int(parts, info.bits, info.symmetric, shape, group_size)
    elif info.family == "mxfp4":
        check_e8m0(parts["scales"], f"{name}.scales", source)
        w = _mxfp4(parts, shape)
    else:
        w = _blockwise(parts, NF4_CODE if info.family == "nf4" else FP4_CODE, shape, group_size)
    return np.ascontiguousarray(w, dtype=np.float32)
