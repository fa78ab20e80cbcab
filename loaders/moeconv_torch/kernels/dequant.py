"""Dequantize one stored weight to BF16/FP16 with a Triton kernel, for every scheme of format v1.

Used where a whole expert must be materialised (prefill through dense GEMMs,
export).  The result is the float32 formula of the spec rounded once to the
output dtype, bit for bit: the kernel is compiled without FMA contraction so
that the double-quantized absmax ``DYNAMIC_MAP[q] * scale + offset`` rounds
after the multiply, as the reference does.

The kernel sees every scheme the same way: a flat stream of codes, row after
row (each int or mxfp4 row padded to whole groups, as stored; nf4/fp4 blocks
run across rows, as stored), with one scale per ``group_size`` consecutive
codes.  A program takes ``tile_elems`` consecutive codes, reads them as
*units* (a 32-bit word of 4, 8 or 16 codes, or 32 three-bit codes in three
words), turns each code position of the units into values, and joins those
planes back into stream order in registers (``tl.join``), so each thread
writes runs of consecutive outputs with 16-byte stores and nothing goes
through shared memory.  The output is then contiguous along the stream,
which is the [out, in] matrix itself whenever rows are not padded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeconv_numpy.schemes import scheme_info

from . import specs
from .launch import cdiv, launch
from .tiles import group_scale, lookup, round_to

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TABLES: dict[torch.device, torch.Tensor] = {}


def tables(device: torch.device) -> torch.Tensor:
    """The float32 code tables on ``device``, built once per device."""
    if device not in _TABLES:
        _TABLES[device] = specs.code_tables(device)
    return _TABLES[device]


@triton.jit
def _code(w0, w1, w2, I: tl.constexpr, BITS: tl.constexpr):
    """Code ``I`` of each unit as int32: bits [BITS*I, BITS*I + BITS) of the unit's little-endian words."""
    P: tl.constexpr = BITS * I
    MASK: tl.constexpr = (1 << BITS) - 1
    if P + BITS <= 32:
        c = (w0 >> P) & MASK
    elif P < 32:
        c = ((w0 >> P) & ((1 << (32 - P)) - 1)) | ((w1 << (32 - P)) & MASK)
    elif P + BITS <= 64:
        c = (w1 >> (P - 32)) & MASK
    elif P < 64:
        c = ((w1 >> (P - 32)) & ((1 << (64 - P)) - 1)) | ((w2 << (64 - P)) & MASK)
    else:
        c = (w2 >> (P - 64)) & MASK
    return c


@triton.jit
def _plane(w0, w1, w2, s, z, tab_ptr, I: tl.constexpr, SPEC: tl.constexpr):
    """float32 values of the code at position ``I`` of every unit (int codes LSB-first; a byte's first
    nf4/fp4 code in its high nibble, its first mxfp4 code in the low one)."""
    FAM: tl.constexpr = SPEC % 4
    BITS: tl.constexpr = SPEC // 4 % 16
    if FAM == 0:
        # c as a float without a (quarter-rate) conversion: 2^23 + c from its bits, minus 2^23, exactly.
        c = (_code(w0, w1, w2, I, BITS) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        v = (c - z) * s
    else:
        J: tl.constexpr = I if FAM == 3 else I ^ 1
        v = lookup(tab_ptr + 16 * (FAM - 1) + _code(w0, w0, w0, J, 4)) * s
    return v


@triton.jit
def _tree4(w0, w1, w2, s, z, tab_ptr, I: tl.constexpr, S: tl.constexpr, SPEC: tl.constexpr):
    """Positions I, I+S, I+2S, I+3S of every unit, in that order along two new last axes [..., 2, 2].

    ``tl.join`` adds a new LAST axis, so the outermost join must split the
    positions by their lowest digit (even / odd steps) for the new axes, read
    left to right, to count positions in order.
    """
    return tl.join(tl.join(_plane(w0, w1, w2, s, z, tab_ptr, I, SPEC),
                           _plane(w0, w1, w2, s, z, tab_ptr, I + 2 * S, SPEC)),
                   tl.join(_plane(w0, w1, w2, s, z, tab_ptr, I + S, SPEC),
                           _plane(w0, w1, w2, s, z, tab_ptr, I + 3 * S, SPEC)))


@triton.jit
def _tree8(w0, w1, w2, s, z, tab_ptr, I: tl.constexpr, S: tl.constexpr, SPEC: tl.constexpr):
    """Positions I + kS, k < 8, in order along three new last axes (see ``_tree4``)."""
    return tl.join(_tree4(w0, w1, w2, s, z, tab_ptr, I, 2 * S, SPEC),
                   _tree4(w0, w1, w2, s, z, tab_ptr, I + S, 2 * S, SPEC))


@triton.jit
def _tree16(w0, w1, w2, s, z, tab_ptr, I: tl.constexpr, S: tl.constexpr, SPEC: tl.constexpr):
    """Positions I + kS, k < 16, in order along four new last axes (see ``_tree4``)."""
    return tl.join(_tree8(w0, w1, w2, s, z, tab_ptr, I, 2 * S, SPEC),
                   _tree8(w0, w1, w2, s, z, tab_ptr, I + S, 2 * S, SPEC))


@triton.jit
def _unit_planes(w0, w1, w2, s, z, tab_ptr, SPEC: tl.constexpr, UNIT: tl.constexpr):
    """All ``UNIT`` codes (4, 8, 16 or 32) of every unit as float32, in K order along new last axes of 2."""
    if UNIT == 4:
        v = _tree4(w0, w1, w2, s, z, tab_ptr, 0, 1, SPEC)
    elif UNIT == 8:
        v = _tree8(w0, w1, w2, s, z, tab_ptr, 0, 1, SPEC)
    elif UNIT == 16:
        v = _tree16(w0, w1, w2, s, z, tab_ptr, 0, 1, SPEC)
    else:
        v = tl.join(_tree16(w0, w1, w2, s, z, tab_ptr, 0, 2, SPEC),
                    _tree16(w0, w1, w2, s, z, tab_ptr, 1, 2, SPEC))
    return v


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, z_ptr, fa_ptr, fb_ptr, b_ptr, tab_ptr, out_ptr, n_codes, K, KP,
                    SPEC: tl.constexpr, UNIT: tl.constexpr, UNIT_BYTES: tl.constexpr, BLOCK: tl.constexpr,
                    PADDED: tl.constexpr, TO_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """Codes [pid * BLOCK, (pid + 1) * BLOCK) of the stream, read in units of ``UNIT`` codes.

    A unit is one 32-bit word (``UNIT_BYTES`` 4), three words (12: 32 three-bit
    codes) or three bytes (3: 8 three-bit codes, for groups that are not whole
    32-code packs).  The stream holds ``n_codes`` codes in rows of ``KP``, of
    which the first ``K`` are the matrix's columns (``PADDED`` when K < KP,
    which costs a division per code); codes past the stream or in a row's
    padding are not stored.
    """
    GS: tl.constexpr = SPEC // 256
    NU: tl.constexpr = BLOCK // UNIT
    start = tl.program_id(0).to(tl.int64) * BLOCK
    u = tl.arange(0, NU)
    ok = start + u * UNIT < n_codes
    grp = (start + u * UNIT) // GS
    s, z = group_scale(s_ptr, z_ptr, fa_ptr, fb_ptr, b_ptr, tab_ptr, grp, ok, SPEC)
    if UNIT_BYTES == 3:
        at = q_ptr + start // UNIT * 3 + 3 * u
        w0 = tl.load(at, mask=ok, other=0).to(tl.int32) | (tl.load(at + 1, mask=ok, other=0).to(tl.int32) << 8) \
            | (tl.load(at + 2, mask=ok, other=0).to(tl.int32) << 16)
        w1 = w0
        w2 = w0
    else:
        words = q_ptr.to(tl.pointer_type(tl.int32)) + start // UNIT * (UNIT_BYTES // 4)
        if UNIT_BYTES == 4:
            w0 = tl.load(words + u, mask=ok, other=0)
            w1 = w0
            w2 = w0
        else:
            w0 = tl.load(words + 3 * u, mask=ok, other=0)
            w1 = tl.load(words + 3 * u + 1, mask=ok, other=0)
            w2 = tl.load(words + 3 * u + 2, mask=ok, other=0)
    v = tl.reshape(_unit_planes(w0, w1, w2, s, z, tab_ptr, SPEC, UNIT), [BLOCK])
    v = round_to(v, TO_BF16, INTERPRET)
    f = tl.arange(0, BLOCK)
    if PADDED:
        row = (start + f) // KP
        col = (start + f) - row * KP
        tl.store(out_ptr + row * K + col, v, mask=(start + f < n_codes) & (col < K))
    else:
        tl.store(out_ptr + start + f, v, mask=start + f < n_codes)


@dataclass(frozen=True)
class DequantTiling:
    """Launch shape of the dequant kernel: codes per program and warps."""

    tile_elems: int = 4096
    num_warps: int = 4


def _role_pointers(parts: Mapping[str, torch.Tensor], family: str, filler: torch.Tensor) -> tuple:
    """(q, s, z, fa, fb, b) as the kernels name them; roles a scheme lacks get ``filler`` (never read)."""
    p = dict(parts)
    if family == "int":
        return p["qweight"], p["scales"], p.get("zeros", p["scales"]), filler, filler, p["qweight"]
    if family == "mxfp4":
        return p["qweight"], filler, filler, filler, filler, p["scales"]
    if "absmax_q" in p:
        return p["qweight"], filler, filler, p["absmax_scale"], p["absmax_offset"], p["absmax_q"]
    return p["qweight"], filler, filler, p["absmax"], p["absmax"], p["qweight"]


def dequantize(parts: Mapping[str, torch.Tensor], scheme: str, shape, group_size: int,
               double_quant: bool = False, out_dtype: torch.dtype = torch.bfloat16,
               *, tiling: DequantTiling | None = None) -> torch.Tensor:
    """The logical [out, in] weight in ``out_dtype`` (bfloat16 or float16), computed on the parts' device.

    ``tiling`` is a tuning knob for ``benchmarks/moe_kernels.py``; the default is the measured best.
    """
    if out_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"out_dtype must be torch.bfloat16 or torch.float16, got {out_dtype}")
    tiling = tiling or DequantTiling()
    rows, cols = shape
    reason = specs.unsupported(scheme, (rows, cols), group_size, fused=False)
    if reason:
        raise ValueError(f"dequantize: {reason}")
    parts = specs.check_parts(parts, scheme, (rows, cols), group_size, double_quant)
    family = scheme_info(scheme).family
    unit, unit_bytes = specs.dequant_unit(scheme, group_size)
    if family in ("nf4", "fp4"):  # blocks run across rows: the stream is the matrix
        row_codes = cols
    else:  # rows padded to whole groups
        row_codes = -(-cols // group_size) * group_size
    n_codes = rows * row_codes
    parts["qweight"] = _whole_units(parts["qweight"], -(-n_codes // unit) * unit_bytes, unit_bytes)
    out = torch.empty(rows, cols, dtype=out_dtype, device=parts["qweight"].device)
    block = max(tiling.tile_elems, unit)
    tab = tables(out.device)
    pointers = _role_pointers(parts, family, tab)
    launch(
        _dequant_kernel, (cdiv(n_codes, block),), *pointers, tab, out, n_codes, cols, row_codes,
        SPEC=specs.spec_code(scheme, group_size, double_quant), UNIT=unit, UNIT_BYTES=unit_bytes, BLOCK=block,
        PADDED=row_codes != cols, TO_BF16=out_dtype == torch.bfloat16, INTERPRET=INTERPRET,
        num_warps=tiling.num_warps, enable_fp_fusion=False,
    )
    return out


def _whole_units(qweight: torch.Tensor, nbytes: int, unit_bytes: int) -> torch.Tensor:
    """``qweight`` itself, or a zero-padded copy where the kernel would read past its end or misaligned words.

    Only nf4/fp4 streams whose last 8-code word is partial (rows * columns not a multiple of 8), or
    views that do not start on a 4-byte boundary (a part sliced out of a larger buffer), need the copy.
    """
    aligned = unit_bytes == 3 or qweight.data_ptr() % 4 == 0
    if aligned and qweight.numel() >= nbytes:
        return qweight
    padded = torch.zeros(max(nbytes, qweight.numel()), dtype=torch.uint8, device=qweight.device)
    padded[: qweight.numel()] = qweight.reshape(-1)
    return padded
