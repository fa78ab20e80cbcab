"""Fused Triton quantizers for NF4/FP4 blocks, MXFP4 rows and INT groups: one pass over the weight on a GPU.

Why this exists: the torch path of :mod:`.blockwise` and :mod:`.mxfp4` is a
chain of about 20 whole-tensor ops over float32 copies of the weight; on an
H100 it quantized only 30-41 GB/s of BF16 input (``benchmarks/quant_throughput.py``),
short of the 50 GB/s aimed at.  A kernel reads each input element once and
writes only the packed bytes and the scales: 315-440 GB/s for NF4, 355-425
for FP4 and 435-550 for MXFP4 on an H100, whole calls, over several runs
(``benchmarks/results/quant_throughput_cuda.json``).  With double
quantization the call is bound by bitsandbytes' offset, a float32 mean that
must be taken on the CPU (:func:`.blockwise.double_quantize`).  The INT
torch path (:func:`.intq.quantize_int`) is a shorter chain but still reached
only 42-64 GB/s, some variants under the aim, so it has a kernel too:
131-467 GB/s over the variants and runs (same file).

What it guarantees: the same bytes as the torch path on the same input, which
stays the CPU path and the definition; ``tests/test_quant_fused.py`` compares
every output tensor bit for bit (in Triton's interpreter on the CPU, compiled
on a GPU).  Weights holding NaN or Inf are not the kernels' business: the
callers detect them from the stored scales and redo such a weight with the
torch path (the INT kernel stores a NaN scale for such a group itself, since
Triton's ``min``/``max`` skip NaN where torch's propagate it; a range beyond
float16 gives an Inf scale by the same arithmetic as torch's).  For finite
input each step is exact or rounds exactly as torch does:

* ``max |x|`` of a block is the integer maximum of the float32 bits with the
  sign cleared (for non-negative floats the bit order is the value order);
  a block of zeros, -0.0 included, gets +0.0 as torch's ``abs`` of its max.
  The clamp to 1e-38 of NF4/FP4 is an integer maximum with the bits of
  float32(1e-38), as torch's ``clamp`` casts the bound to float32.
* NF4/FP4 scale ``1 / absmax``: ``tl.math.div_rn``, IEEE division rounded to
  nearest like torch's ``reciprocal`` (Triton's float32 ``/`` is approximate).
  MXFP4 builds its power of two from bits, as :func:`.mxfp4._pow2` does.
* then one float32 multiply per element, nothing for it to be fused with
  (compiled with ``enable_fp_fusion=False`` all the same), and the code
  ``codes[#(bounds < v)]`` with IEEE comparisons against the float32 bounds
  of the same :class:`.lookup.Codebook` the torch path uses.
* INT follows :func:`.intq.group_params` and :func:`.intq._byte_codes` op for
  op: group min/max (a zero one normalized to +0.0, so which signed zero the
  hardware's ``min`` picks cannot matter; the -0.0 zero point of a zero
  minimum is set on the bits, since compiled float negation and selects
  dropped that sign), every division ``div_rn``,
  float16 rounding by ``cvt.rn`` (ties to even, overflow to Inf, subnormals
  kept, as torch's cast), the symmetric ``+-a`` tie resolved by the first
  position, and the code as the low bits of ``v + 1.5 * 2^23``.
* no flush to zero: Triton emits float32 multiply, compare and ``div.rn``
  without ``.ftz`` (checked in the PTX for sm_90; Triton only flushes inside
  libdevice calls, and none is made),
  so subnormal inputs, subnormal scales (``1 / absmax`` for absmax above
  2^126) and subnormal products keep their values, as they do in torch.

Pairs of codes are packed from an even/odd split of each block
(``tl.reshape`` to ``[..., 2]`` then ``tl.split``), so the input is read with
wide contiguous loads and never reordered through memory; 2- and 3-bit INT
codes repeat the split until a byte (or the 3 bytes of 8 codes) is whole.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .intq import _ROUNDER, fused_group_size
from .lookup import Codebook

__all__ = ["quantize_blocks4", "quantize_mxfp4_rows", "quantize_int_rows",
           "TILE_ELEMENTS", "NUM_WARPS", "MX_ROW_BLOCKS", "INT_ROW_COLUMNS"]

#: Input elements per program and warps per program (module globals, read at
#: each launch, so a tuning sweep can set them).
TILE_ELEMENTS = 4096
NUM_WARPS = 4
#: MXFP4 blocks per row of a tile (more rows fill it): 16 blocks (512 columns)
#: waste few masked lanes on widths that are no power of two (2880 columns:
#: 90 blocks, 96 read).
MX_ROW_BLOCKS = 16
#: Columns of one row in an INT tile (more rows fill it), for the same reason: a
#: 2880-column row in groups of 64 is 45 groups, 48 read.
INT_ROW_COLUMNS = 512

#: float32(1e-38) as bits: the lower clamp of a block's absmax before ``1 / absmax``.
_CLAMP_BITS = int(np.array(1e-38, dtype=np.float32).view(np.int32))
_MX_BLOCK = 32


@triton.jit
def _to_float32(x):
    """Exact widening to float32; bfloat16 through its bits, since Triton's interpreter casts
    bfloat16 subnormals wrongly (the compiled cast is exact either way)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _abs_max(x):
    """The bits of ``max |x|`` along axis 1 of a float32 ``[B, N]`` tile (see the module docs)."""
    return tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)


@triton.jit
def _codes(v, bounds_ptr, MAP_LO: tl.constexpr, MAP_HI: tl.constexpr):
    """``codes[#(bounds < v)]`` for the 15 sorted float32 bounds at ``bounds_ptr``.

    The rank is found by binary search: 4 IEEE compares, each against the
    bound picked by the ones before (about half the instructions of 15
    compares).  ``MAP_LO``/``MAP_HI`` hold ``codes[r]`` of ranks 0-7 / 8-15 in
    bits ``[4(r % 8), 4(r % 8) + 4)`` (NF4 too: a table shift compiled to
    fewer instructions than assembling the rank's bits).
    """
    b = bounds_ptr
    b0, b1, b2, b3, b4 = tl.load(b), tl.load(b + 1), tl.load(b + 2), tl.load(b + 3), tl.load(b + 4)
    b5, b6, b7, b8, b9 = tl.load(b + 5), tl.load(b + 6), tl.load(b + 7), tl.load(b + 8), tl.load(b + 9)
    b10, b11, b12, b13, b14 = tl.load(b + 10), tl.load(b + 11), tl.load(b + 12), tl.load(b + 13), tl.load(b + 14)
    upper = v > b7
    fours = v > tl.where(upper, b11, b3)
    twos = v > tl.where(upper, tl.where(fours, b13, b9), tl.where(fours, b5, b1))
    ones = v > tl.where(upper, tl.where(fours, tl.where(twos, b14, b12), tl.where(twos, b10, b8)),
                        tl.where(fours, tl.where(twos, b6, b4), tl.where(twos, b2, b0)))
    shift = fours.to(tl.uint32) * 16 + twos.to(tl.uint32) * 8 + ones.to(tl.uint32) * 4
    table = tl.where(upper, tl.full([], MAP_HI, tl.uint32), tl.full([], MAP_LO, tl.uint32))
    return ((table >> shift) & 15).to(tl.int32)


@triton.jit
def _blocks4_kernel(x_ptr, bounds_ptr, packed_ptr, absmax_ptr, n_blocks,
                    BS: tl.constexpr, BLOCKS: tl.constexpr, CLAMP_BITS: tl.constexpr,
                    MAP_LO: tl.constexpr, MAP_HI: tl.constexpr):
    """``BLOCKS`` whole blocks of ``BS`` elements per program: absmax, codes, two per byte (first one high)."""
    block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    ok = block < n_blocks
    start = block.to(tl.int64) * BS
    x = tl.load(x_ptr + start[:, None] + tl.arange(0, BS)[None, :], mask=ok[:, None], other=0.0)
    first, second = tl.split(tl.reshape(_to_float32(x), [BLOCKS, BS // 2, 2]))
    amax_bits = tl.maximum(_abs_max(first), _abs_max(second))
    tl.store(absmax_ptr + block, amax_bits.to(tl.float32, bitcast=True), mask=ok)
    scale = tl.math.div_rn(tl.full([BLOCKS], 1.0, tl.float32),
                           tl.maximum(amax_bits, CLAMP_BITS).to(tl.float32, bitcast=True))[:, None]
    byte = (_codes(first * scale, bounds_ptr, MAP_LO, MAP_HI) << 4) | _codes(second * scale, bounds_ptr, MAP_LO, MAP_HI)
    offsets = start[:, None] // 2 + tl.arange(0, BS // 2)[None, :]
    tl.store(packed_ptr + offsets, byte.to(tl.uint8), mask=ok[:, None])


@triton.jit
def _mxfp4_kernel(w_ptr, stride_row, stride_col, rows, cols, n_blocks, bounds_ptr, q_ptr, s_ptr,
                  ROWS: tl.constexpr, BLOCKS: tl.constexpr,
                  MAP_LO: tl.constexpr, MAP_HI: tl.constexpr):
    """``BLOCKS`` blocks of 32 columns in each of ``ROWS`` rows per program, one block per tile row:
    E8M0 scales and E2M1 codes, two per byte (first one low).

    Columns past the weight's read as 0.0: the zero padding of a row's last block.
    """
    slot = tl.arange(0, ROWS * BLOCKS)
    row = tl.program_id(0) * ROWS + slot // BLOCKS
    block = tl.program_id(1) * BLOCKS + slot % BLOCKS
    ok = (row < rows) & (block < n_blocks)
    col = block[:, None] * 32 + tl.arange(0, 32)[None, :]
    ptrs = w_ptr + row.to(tl.int64)[:, None] * stride_row + col * stride_col
    x = _to_float32(tl.load(ptrs, mask=ok[:, None] & (col < cols), other=0.0))
    first, second = tl.split(tl.reshape(x, [ROWS * BLOCKS, 16, 2]))
    amax_bits = tl.maximum(_abs_max(first), _abs_max(second))
    e = tl.minimum(tl.maximum((amax_bits >> 23) - 2, 0), 254)
    # 2^(127 - e) from its exponent field 254 - e: at least 1, since e <= 253 (the field of amax is at
    # most 255), so the torch path's subnormal 2^-127 (e = 254) never occurs
    scale = ((254 - e) << 23).to(tl.float32, bitcast=True)[:, None]
    low = _codes(first * scale, bounds_ptr, MAP_LO, MAP_HI)
    byte = low | (_codes(second * scale, bounds_ptr, MAP_LO, MAP_HI) << 4)
    at = row.to(tl.int64) * n_blocks + block
    tl.store(s_ptr + at, e.to(tl.uint8), mask=ok)
    tl.store(q_ptr + at[:, None] * 16 + tl.arange(0, 16)[None, :], byte.to(tl.uint8), mask=ok[:, None])


@triton.jit
def _fp16_round(x):
    """float32 -> the nearest float16, ties to even (overflow to Inf, subnormals kept) -> float32."""
    return x.to(tl.float16).to(tl.float32)


@triton.jit
def _first_of_tie(x, mx, mn, GS: tl.constexpr):
    """Whether ``mn`` occurs before ``mx`` in each group of ``x`` (one minimum over positions:
    ``2i`` where ``x == mx``, ``2i + 1`` where ``x == mn``; meaningful where ``mx > 0 > mn``)."""
    pos = tl.arange(0, GS)[None, :] * 2
    key = tl.where(x == mx[:, None], pos, tl.where(x == mn[:, None], pos + 1, 2 * GS))
    return (tl.min(key, axis=1) & 1) == 1


@triton.jit
def _pack_pairs(codes, T: tl.constexpr, N: tl.constexpr, SHIFT: tl.constexpr):
    """``[T, N]`` -> ``[T, N / 2]``: each even element with the odd one after it shifted up by ``SHIFT``."""
    even, odd = tl.split(tl.reshape(codes, [T, N // 2, 2]))
    return even | (odd << SHIFT)


@triton.jit
def _int_kernel(w_ptr, stride_row, stride_col, rows, cols, n_groups, q_ptr, s_ptr, z_ptr,
                BITS: tl.constexpr, SYMMETRIC: tl.constexpr, GS: tl.constexpr,
                ROWS: tl.constexpr, GROUPS: tl.constexpr, ROUNDER: tl.constexpr):
    """``GROUPS`` groups of ``GS`` columns in each of ``ROWS`` rows per program, one group per tile row:
    float16 scales (and zero points), codes packed LSB-first, step by step as :mod:`.intq` does.

    Columns past the weight's read as 0.0 (the zero padding of a row's last group) and get code 0.
    A group holding NaN or Inf gets a NaN scale: the caller redoes such a weight with the torch path.
    """
    T: tl.constexpr = ROWS * GROUPS
    slot = tl.arange(0, T)
    row = tl.program_id(0) * ROWS + slot // GROUPS
    group = tl.program_id(1) * GROUPS + slot % GROUPS
    ok = (row < rows) & (group < n_groups)
    col = group[:, None] * GS + tl.arange(0, GS)[None, :]
    real = col < cols
    ptrs = w_ptr + row.to(tl.int64)[:, None] * stride_row + col.to(tl.int64) * stride_col
    x = _to_float32(tl.load(ptrs, mask=ok[:, None] & real, other=0.0))
    # Triton's min/max skip NaN where torch's propagate it: non-finite groups are found from the bits
    finite = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1) < 0x7F800000
    mn = tl.min(x, axis=1)
    mx = tl.max(x, axis=1)
    if SYMMETRIC:
        HALF: tl.constexpr = 1 << (BITS - 1)
        m = tl.where(mx >= -mn, mx, mn)
        m = tl.where((mx == -mn) & (mx > 0) & _first_of_tie(x, mx, mn, GS), mn, m)
        scale = _fp16_round(tl.math.div_rn(m, -1.0 * HALF))
        scale = tl.where(scale == 0, 1.0, scale)
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -1.0 * HALF), HALF - 1.0)
        v = v + (ROUNDER + HALF)
    else:
        mn = tl.where(mn < 0, mn, 0.0)  # also turns a -0.0 minimum into +0.0, as the torch path does
        mx = tl.where(mx > 0, mx, 0.0)
        scale = _fp16_round(tl.math.div_rn(mx - mn, (1 << BITS) - 1.0))
        scale = tl.where(scale == 0, 1.0, scale)
        # torch's zero point is -mn / s; for a zero minimum that is -0.0.  The sign is set on the bits:
        # compiled for an H100, float negation and selects lost the sign of a zero (0.0 - x; a select
        # turned into min), so the kernel wrote +0.0 there
        magnitude = _fp16_round(tl.math.div_rn(tl.abs(mn), scale))
        zero_sign = tl.where(mn == 0.0, -2147483648, 0)  # the float32 sign bit, as an int32
        zero = (magnitude.to(tl.int32, bitcast=True) | zero_sign).to(tl.float32, bitcast=True)
        v = zero[:, None] + tl.math.div_rn(x, scale[:, None])
        v = tl.minimum(tl.maximum(v, 0.0), (1 << BITS) - 1.0) + ROUNDER
        tl.store(z_ptr + row.to(tl.int64) * n_groups + group, zero.to(tl.float16), mask=ok)
    nan = tl.full([T], 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    tl.store(s_ptr + row.to(tl.int64) * n_groups + group, tl.where(finite, scale, nan).to(tl.float16), mask=ok)
    codes = tl.where(real, v.to(tl.int32, bitcast=True) & 0xFF, 0)
    if BITS == 4:
        codes = _pack_pairs(codes, T, GS, 4)
    elif BITS == 2:
        codes = _pack_pairs(_pack_pairs(codes, T, GS, 2), T, GS // 2, 4)
    elif BITS == 3:  # 8 codes in the low 24 bits of an int32, stored as 3 bytes
        codes = _pack_pairs(_pack_pairs(_pack_pairs(codes, T, GS, 3), T, GS // 2, 6), T, GS // 4, 12)
    PACKS: tl.constexpr = GS * BITS // 8 if BITS != 3 else GS // 8
    STEP: tl.constexpr = 3 if BITS == 3 else 1
    at = (row.to(tl.int64) * n_groups + group)[:, None] * (GS * BITS // 8) + tl.arange(0, PACKS)[None, :] * STEP
    tl.store(q_ptr + at, codes.to(tl.uint8), mask=ok[:, None])
    if BITS == 3:
        tl.store(q_ptr + at + 1, (codes >> 8).to(tl.uint8), mask=ok[:, None])
        tl.store(q_ptr + at + 2, (codes >> 16).to(tl.uint8), mask=ok[:, None])


_BOUNDS: dict[tuple[Codebook, torch.device], torch.Tensor] = {}


def _bounds_on(codes_of: Codebook, device: torch.device) -> torch.Tensor:
    """The codebook's 15 float32 bounds on ``device``, copied once per codebook and device."""
    key = (codes_of, device)
    if key not in _BOUNDS:
        if codes_of.bounds.shape != (15,):
            raise ValueError(f"the fused quantizers need a 16-code codebook, got {codes_of.bounds.size} bounds")
        _BOUNDS[key] = torch.from_numpy(codes_of.bounds.copy()).to(device)
    return _BOUNDS[key]


def _code_map(codes_of: Codebook) -> dict[str, int]:
    """The kernels' ``MAP_LO``/``MAP_HI``: the codebook's rank -> code table as nibbles."""
    codes = range(16) if codes_of.codes is None else [int(c) for c in codes_of.codes]
    lo, hi = (sum(code << (4 * r) for r, code in enumerate(half)) for half in (codes[:8], codes[8:]))
    return {"MAP_LO": lo, "MAP_HI": hi}


def quantize_blocks4(flat: torch.Tensor, codes_of: Codebook, blocksize: int,
                     packed: torch.Tensor, absmax: torch.Tensor) -> None:
    """Fill ``packed`` (uint8, ``n / 2``) and ``absmax`` (float32, ``n / blocksize``) from the whole
    blocks of a contiguous 1-D float tensor of ``n`` elements, ``n`` a multiple of ``blocksize``.

    The codes are ``codes_of(x * (1 / max(absmax, 1e-38)))`` per block, two per
    byte with the first in the high nibble (:mod:`.blockwise`), for finite ``x``.
    """
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"quantize_blocks4: the block size must be a power of two, got {blocksize}")
    n_blocks = flat.numel() // blocksize
    if flat.dim() != 1 or not flat.is_contiguous() or n_blocks * blocksize != flat.numel():
        raise ValueError(f"quantize_blocks4: need a contiguous 1-D tensor of whole {blocksize}-blocks, "
                         f"got {list(flat.shape)} (contiguous={flat.is_contiguous()})")
    blocks = max(1, TILE_ELEMENTS // blocksize)
    _blocks4_kernel[(triton.cdiv(n_blocks, blocks),)](
        flat, _bounds_on(codes_of, flat.device), packed, absmax, n_blocks,
        BS=blocksize, BLOCKS=blocks, CLAMP_BITS=_CLAMP_BITS, **_code_map(codes_of),
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )


def quantize_mxfp4_rows(weight: torch.Tensor, codes_of: Codebook, qweight: torch.Tensor,
                        scales: torch.Tensor) -> None:
    """Fill ``qweight`` (uint8 ``[rows, n_blocks * 16]``) and ``scales`` (uint8 ``[rows, n_blocks]``)
    from a 2-D float weight of any strides, as :func:`.mxfp4.quantize_mxfp4` defines them.
    """
    rows, cols = weight.shape
    n_blocks = scales.shape[1]
    per_row = min(triton.next_power_of_2(n_blocks), MX_ROW_BLOCKS)
    tile_rows = max(1, TILE_ELEMENTS // (_MX_BLOCK * per_row))
    grid = (triton.cdiv(rows, tile_rows), triton.cdiv(n_blocks, per_row))
    _mxfp4_kernel[grid](
        weight, weight.stride(0), weight.stride(1), rows, cols, n_blocks,
        _bounds_on(codes_of, weight.device), qweight, scales,
        ROWS=tile_rows, BLOCKS=per_row, **_code_map(codes_of),
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )


def quantize_int_rows(weight: torch.Tensor, bits: int, symmetric: bool, group_size: int,
                      qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> None:
    """Fill ``qweight`` (uint8 ``[rows, n_groups * group_size * bits / 8]``), ``scales`` (float16
    ``[rows, n_groups]``) and ``zeros`` (the same; None when ``symmetric``) from a 2-D float weight of
    any strides, as :func:`.intq.quantize_int` defines them, for finite groups; a group holding
    NaN/Inf gets a NaN scale.
    """
    if bits not in (2, 3, 4, 8) or not fused_group_size(group_size):
        raise ValueError(f"quantize_int_rows: no kernel for {bits} bits in groups of {group_size}")
    if (zeros is None) != symmetric:
        raise ValueError("quantize_int_rows: zeros must be None exactly when symmetric")
    rows, cols = weight.shape
    n_groups = scales.shape[1]
    per_row = min(triton.next_power_of_2(n_groups), max(1, INT_ROW_COLUMNS // group_size))
    tile_rows = max(1, TILE_ELEMENTS // (group_size * per_row))
    grid = (triton.cdiv(rows, tile_rows), triton.cdiv(n_groups, per_row))
    _int_kernel[grid](
        weight, weight.stride(0), weight.stride(1), rows, cols, n_groups,
        qweight, scales, scales if zeros is None else zeros,  # (symmetric: no zero point is stored)
        BITS=bits, SYMMETRIC=symmetric, GS=group_size, ROWS=tile_rows, GROUPS=per_row, ROUNDER=_ROUNDER,
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
