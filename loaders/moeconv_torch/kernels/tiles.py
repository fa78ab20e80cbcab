"""Triton device functions shared by the kernels: unpack codes, dequantize a tile, round, multiply.

Every kernel reads weights through ``dequant_tile``, so the packing rules of
format v1 (spec/FORMAT.md) live in this one file:

* int family: an LSB-first bit stream per row, one fp16 scale (and zero) per group;
* nf4/fp4: two codes per byte, first element in the HIGH nibble, a float32
  absmax per block, or with double quantization
  ``DYNAMIC_MAP[absmax_q] * absmax_scale[block // 256] + absmax_offset``;
* mxfp4: two codes per byte, first element in the LOW nibble, one E8M0 scale
  per 32 columns.

A tile never crosses a quantization group (its K width divides the group
size), so the scale of a tile is one value per row: loaded once, broadcast.
Codes are unpacked from whole bytes with shifts and put back in natural K
order with ``tl.interleave``, so packed bytes are read with wide, coalesced
loads and activations keep their plain row-major layout.
"""

import os

import triton
import triton.language as tl

from . import specs

INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
TAB_DMAP = tl.constexpr(specs.TAB_DMAP)


@triton.jit
def lookup(ptrs):
    """Code-table reads, one per element, through the read-only cache.

    Written as inline PTX on GPUs so that Triton's software pipeliner leaves
    them alone: as plain ``tl.load`` inside a K loop it turned each 4-byte
    gather into an asynchronous copy through shared memory, which made the
    table-based schemes an order of magnitude slower (measured on an H100).
    """
    if INTERPRET:
        v = tl.load(ptrs)
    else:
        v = tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [ptrs], dtype=tl.float32,
                                      is_pure=True, pack=1)
    return v


@triton.jit
def _tile_params(s_ptr, z_ptr, fa_ptr, fb_ptr, b_ptr, tab_ptr, rows, row_ok, k0, K, SPEC: tl.constexpr):
    """Byte offset of each row's tile start from the codes pointer, and the tile's (s, z) per row.

    Every scheme dequantizes as ``(TABLE[c] or c - z) * s`` with one s (and z)
    per row of a tile, since a tile lies inside one quantization group.
    Pointers by role: ``s`` scales, ``z`` zeros (fp16, int family); nf4/fp4:
    ``fa`` absmax (f32), or with double quant ``b`` absmax_q (u8), ``fa``
    absmax_scale and ``fb`` absmax_offset (f32); mxfp4: ``b`` E8M0 scales.
    """
    FAM: tl.constexpr = SPEC % 4
    BITS: tl.constexpr = SPEC // 4 % 16
    SYM: tl.constexpr = SPEC // 64 % 2
    DQ: tl.constexpr = SPEC // 128 % 2
    GS: tl.constexpr = SPEC // 256
    r = rows.to(tl.int64)[:, None]
    ok = row_ok[:, None]
    n_groups = tl.cdiv(K, GS)
    grp = r * n_groups + k0 // GS
    z = 0.0
    if FAM == 0:
        row_bytes = n_groups * (GS * BITS // 8)
        s = tl.load(s_ptr + grp, mask=ok, other=0.0).to(tl.float32)
        if SYM:
            z = (1 << (BITS - 1)) * 1.0
        else:
            z = tl.load(z_ptr + grp, mask=ok, other=0.0).to(tl.float32)
    elif FAM == 3:
        row_bytes = n_groups * (GS // 2)
        e = tl.load(b_ptr + grp, mask=ok, other=0).to(tl.int32)
        # 2^(e-127) built from its bits; e == 0 is the subnormal 2^-127.
        s = tl.where(e == 0, 0x400000, e << 23).to(tl.float32, bitcast=True)
    else:
        row_bytes = (K // GS) * (GS // 2)  # K % GS == 0 here; written so the compiler sees 16-byte rows
        if DQ:
            qa = tl.load(b_ptr + grp, mask=ok, other=0).to(tl.int32)
            s = lookup(tab_ptr + TAB_DMAP + qa) * tl.load(fa_ptr + grp // 256, mask=ok, other=0.0) \
                + tl.load(fb_ptr)
        else:
            s = tl.load(fa_ptr + grp, mask=ok, other=0.0)
    return r * row_bytes + k0 * BITS // 8, s, z


@triton.jit
def _value(c, s, z, tab_ptr, FAM: tl.constexpr):
    """float32 weights of int32 codes ``c`` (one plane of a tile)."""
    if FAM == 0:
        w = (c.to(tl.float32) - z) * s
    else:
        # nf4, fp4 and E2M1 tables sit at 0, 16 and 32 (specs.TAB_*).
        w = lookup(tab_ptr + 16 * (FAM - 1) + c) * s
    return w


@triton.jit
def dequant_tile(q_ptr, s_ptr, z_ptr, fa_ptr, fb_ptr, b_ptr, tab_ptr, rows, row_ok, k0, K,
                 SPEC: tl.constexpr, BK: tl.constexpr):
    """W[rows, k0:k0+BK] of one weight as float32 [rows, BK], by the float32 formulas of the spec.

    ``SPEC`` is ``specs.spec_code``; ``K`` the row length in elements (for the
    flat nf4/fp4 layout a caller may pass rows = blocks and K = block size).
    Codes are unpacked by bit planes (plane i of a b-bit tile holds the codes
    at K offsets i, i + 8/b, ...), each plane is turned into weights where it
    was loaded, and the planes are interleaved back into natural order last.
    Rows where ``row_ok`` is false read as zeros; the mask is per row on
    purpose, constant along K, so the byte loads stay vectorized.
    """
    FAM: tl.constexpr = SPEC % 4
    BITS: tl.constexpr = SPEC // 4 % 16
    byte0, s, z = _tile_params(s_ptr, z_ptr, fa_ptr, fb_ptr, b_ptr, tab_ptr, rows, row_ok, k0, K, SPEC)
    ok = row_ok[:, None]
    if BITS == 8:
        p = tl.load(q_ptr + byte0 + tl.arange(0, BK)[None, :], mask=ok, other=0).to(tl.int32)
        w = _value(p, s, z, tab_ptr, FAM)
    elif BITS == 4:
        p = tl.load(q_ptr + byte0 + tl.arange(0, BK // 2)[None, :], mask=ok, other=0).to(tl.int32)
        lo = _value(p & 15, s, z, tab_ptr, FAM)
        hi = _value(p >> 4, s, z, tab_ptr, FAM)
        if FAM == 1 or FAM == 2:  # bitsandbytes order: first element in the high nibble
            w = tl.interleave(hi, lo)
        else:
            w = tl.interleave(lo, hi)
    elif BITS == 2:
        p = tl.load(q_ptr + byte0 + tl.arange(0, BK // 4)[None, :], mask=ok, other=0).to(tl.int32)
        # code 4j+i sits at bits 2i of byte j; interleaving (c0, c2) with (c1, c3) restores 0,1,2,3.
        w = tl.interleave(tl.interleave(_value(p & 3, s, z, tab_ptr, FAM), _value((p >> 4) & 3, s, z, tab_ptr, FAM)),
                          tl.interleave(_value((p >> 2) & 3, s, z, tab_ptr, FAM), _value(p >> 6, s, z, tab_ptr, FAM)))
    else:
        v = _packs3(q_ptr, byte0, ok, BK)
        # code 8j+i sits at bits 3i of the 24-bit pack j; three interleave levels restore 0..7.
        even = tl.interleave(
            tl.interleave(_value(v & 7, s, z, tab_ptr, FAM), _value((v >> 12) & 7, s, z, tab_ptr, FAM)),
            tl.interleave(_value((v >> 6) & 7, s, z, tab_ptr, FAM), _value((v >> 18) & 7, s, z, tab_ptr, FAM)))
        odd = tl.interleave(
            tl.interleave(_value((v >> 3) & 7, s, z, tab_ptr, FAM), _value((v >> 15) & 7, s, z, tab_ptr, FAM)),
            tl.interleave(_value((v >> 9) & 7, s, z, tab_ptr, FAM), _value(v >> 21, s, z, tab_ptr, FAM)))
        w = tl.interleave(even, odd)
    return w


@triton.jit
def _packs3(q_ptr, byte0, ok, BK: tl.constexpr):
    """The BK/8 24-bit packs of 3-bit codes of a tile, as int32 [rows, BK/8]."""
    j = 3 * tl.arange(0, BK // 8)[None, :]
    b0 = tl.load(q_ptr + byte0 + j, mask=ok, other=0).to(tl.int32)
    b1 = tl.load(q_ptr + byte0 + j + 1, mask=ok, other=0).to(tl.int32)
    b2 = tl.load(q_ptr + byte0 + j + 2, mask=ok, other=0).to(tl.int32)
    return b0 | (b1 << 8) | (b2 << 16)


@triton.jit
def _x_plane(x_row, x_ok, k0, K, I: tl.constexpr, P: tl.constexpr, BK: tl.constexpr):
    """Activations at K offsets k0 + P*j + I (j < BK/P) as float32 [1, BK/P]."""
    kk = k0 + P * tl.arange(0, BK // P)[None, :] + I
    return tl.load(x_row + kk, mask=x_ok & (kk < K), other=0.0).to(tl.float32)


@triton.jit
def gemv_tile(acc, x_row, x_ok, q_ptr, s_ptr, z_ptr, fa_ptr, fb_ptr, b_ptr, tab_ptr, rows, row_ok, k0, K,
              SPEC: tl.constexpr, BK: tl.constexpr):
    """acc + W[rows, k0:k0+BK] * x[k0:k0+BK], kept as partial sums [rows, BK/P] (P codes per byte; 8 for 3-bit).

    The decode path: each bit plane of the codes is multiplied by the
    activations at the same K offsets (``x_row`` is a [1, 1] pointer to one
    token's row), so no tile is ever interleaved or moved between layouts.
    A tile at or past the row end (an unrolled step overshooting K) adds and
    reads nothing.  Reduce ``acc`` over its second axis after the K loop.
    """
    FAM: tl.constexpr = SPEC % 4
    BITS: tl.constexpr = SPEC // 4 % 16
    live = row_ok & (rows * 0 + k0 < K)  # a tensor comparison: stays a boolean mask
    byte0, s, z = _tile_params(s_ptr, z_ptr, fa_ptr, fb_ptr, b_ptr, tab_ptr, rows, live, k0, K, SPEC)
    ok = live[:, None]
    if BITS == 8:
        p = tl.load(q_ptr + byte0 + tl.arange(0, BK)[None, :], mask=ok, other=0).to(tl.int32)
        acc += _value(p, s, z, tab_ptr, FAM) * _x_plane(x_row, x_ok, k0, K, 0, 1, BK)
    elif BITS == 4:
        p = tl.load(q_ptr + byte0 + tl.arange(0, BK // 2)[None, :], mask=ok, other=0).to(tl.int32)
        if FAM == 1 or FAM == 2:
            first, second = p >> 4, p & 15
        else:
            first, second = p & 15, p >> 4
        acc += _value(first, s, z, tab_ptr, FAM) * _x_plane(x_row, x_ok, k0, K, 0, 2, BK)
        acc += _value(second, s, z, tab_ptr, FAM) * _x_plane(x_row, x_ok, k0, K, 1, 2, BK)
    elif BITS == 2:
        p = tl.load(q_ptr + byte0 + tl.arange(0, BK // 4)[None, :], mask=ok, other=0).to(tl.int32)
        for i in tl.static_range(4):
            acc += _value((p >> (2 * i)) & 3, s, z, tab_ptr, FAM) * _x_plane(x_row, x_ok, k0, K, i, 4, BK)
    else:
        v = _packs3(q_ptr, byte0, ok, BK)
        for i in tl.static_range(8):
            acc += _value((v >> (3 * i)) & 7, s, z, tab_ptr, FAM) * _x_plane(x_row, x_ok, k0, K, i, 8, BK)
    return acc


@triton.jit
def round_to(x, TO_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 -> bfloat16 (TO_BF16) or float16, round to nearest even.

    The Triton interpreter's own float32 -> bfloat16 cast truncates, so under
    TRITON_INTERPRET the rounding is done on the bits; on GPUs the hardware
    conversion (cvt.rn) is used.
    """
    if TO_BF16:
        if INTERPRET:
            bits = x.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
            y = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            y = x.to(tl.bfloat16)
    else:
        y = x.to(tl.float16)
    return y


@triton.jit
def mma(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a @ b on the tensor cores; the interpreter's bfloat16 dot is wrong, so it multiplies in float32."""
    if INTERPRET:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc
