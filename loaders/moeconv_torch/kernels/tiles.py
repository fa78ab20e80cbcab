"""Triton device functions of the fused MoE kernels: unpack codes, dequantize a tile, round, multiply.

The fused kernels read weights through ``dequant_tile`` (tensor-core
products) or ``gemv_tile`` (decode), so their reading of the packing rules of
format v1 (spec/FORMAT.md) lives in this one file (the whole-weight dequant
kernel reads the same rules as a flat stream, in ``dequant``):

* int family: an LSB-first bit stream per row, one fp16 scale (and zero) per group;
* nf4/fp4: two codes per byte, first element in the HIGH nibble, a float32
  absmax per block, or with double quantization
  ``DYNAMIC_MAP[absmax_q] * absmax_scale[block // 256] + absmax_offset``;
* mxfp4: two codes per byte, first element in the LOW nibble, one E8M0 scale
  per 32 columns.

A tile never crosses a quantization group (its K width divides the group
size), so the scale of a tile is one value per row: loaded once, broadcast.
``dequant_tile`` unpacks codes from whole bytes with shifts and puts them back
in natural K order with ``tl.interleave``, so packed bytes are read with wide,
coalesced loads and activations keep their plain row-major layout;
``gemv_tile`` never reorders codes: it multiplies each plane of codes by the
activations at the matching K offsets.
"""

import os

import triton
import triton.language as tl

from . import specs

INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
TAB_DMAP = tl.constexpr(specs.TAB_DMAP)
TAB_ONE = tl.constexpr(specs.TAB_ONE)


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
def group_scale(s_ptr, z_ptr, fa_ptr, fb_ptr, b_ptr, tab_ptr, grp, ok, SPEC: tl.constexpr):
    """(s, z) of groups ``grp``: their values are ``(c - z) * s`` or ``TABLE[c] * s``.

    Pointers by role: ``s`` scales, ``z`` zeros (fp16, int family); nf4/fp4
    ``fa`` absmax (f32), or with double quant ``b`` absmax_q (u8), ``fa``
    absmax_scale (f32, one per 256 blocks) and ``fb`` absmax_offset; mxfp4
    ``b`` E8M0 scales (u8).  The float32 operations are the spec's, in its
    order (no FMA: the kernels compile with fusion off).
    """
    FAM: tl.constexpr = SPEC % 4
    BITS: tl.constexpr = SPEC // 4 % 16
    SYM: tl.constexpr = SPEC // 64 % 2
    DQ: tl.constexpr = SPEC // 128 % 2
    z = 0.0
    if FAM == 0:
        s = tl.load(s_ptr + grp, mask=ok, other=0.0).to(tl.float32)
        if SYM:
            z = (1 << (BITS - 1)) * 1.0
        else:
            z = tl.load(z_ptr + grp, mask=ok, other=0.0).to(tl.float32)
    elif FAM == 3:
        e = tl.load(b_ptr + grp, mask=ok, other=0).to(tl.int32)
        s = tl.where(e == 0, 0x400000, e << 23).to(tl.float32, bitcast=True)  # 2^(e-127); e == 0: 2^-127
    elif DQ:
        qa = tl.load(b_ptr + grp, mask=ok, other=0).to(tl.int32)
        s = lookup(tab_ptr + TAB_DMAP + qa) * tl.load(fa_ptr + grp // 256, mask=ok, other=0.0) + tl.load(fb_ptr)
    else:
        s = tl.load(fa_ptr + grp, mask=ok, other=0.0)
    return s, z


@triton.jit
def _tile_params(s_ptr, z_ptr, fa_ptr, fb_ptr, b_ptr, tab_ptr, rows, row_ok, k0, K, SPEC: tl.constexpr):
    """Byte offset of each row's tile start from the codes pointer, and the tile's (s, z) per row.

    Every scheme dequantizes as ``(TABLE[c] or c - z) * s`` with one s (and z)
    per row of a tile, since a tile lies inside one quantization group.
    """
    FAM: tl.constexpr = SPEC % 4
    BITS: tl.constexpr = SPEC // 4 % 16
    GS: tl.constexpr = SPEC // 256
    r = rows.to(tl.int64)[:, None]
    n_groups = tl.cdiv(K, GS)
    s, z = group_scale(s_ptr, z_ptr, fa_ptr, fb_ptr, b_ptr, tab_ptr, r * n_groups + k0 // GS, row_ok[:, None], SPEC)
    if FAM == 0:
        row_bytes = n_groups * (GS * BITS // 8)
    elif FAM == 3:
        row_bytes = n_groups * (GS // 2)
    else:
        row_bytes = (K // GS) * (GS // 2)  # K % GS == 0 here; written so the compiler sees 16-byte rows
    return r * row_bytes + k0 * BITS // 8, s, z


@triton.jit
def _value(c, s, z, tab_ptr, FAM: tl.constexpr):
    """float32 weights of int32 codes ``c`` (one plane of a tile).

    Int codes go through an integer-to-float conversion here: the one-FMA
    form of ``gemv_tile`` (``_unit_code``) made the tensor-core loop slower
    (batch 16: 871 against 697 us on an H100).
    """
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


#: How ``gemv_tile`` guards its reads (a constexpr chosen on the host, ``gemv_bounds``):
#: every row of the block and every K tile of the loop lie inside the weight (no masks,
#: and the token mask ``x_ok`` is not read either: a gemv program's one pair is always a
#: real pair); K is a multiple of the tile width (one predicate per tile); or a compare
#: per element.
BOUNDS_NONE, BOUNDS_TILE, BOUNDS_ELEMENT = 0, 1, 2
_UNGUARDED = tl.constexpr(BOUNDS_NONE)
_TILE_GUARD = tl.constexpr(BOUNDS_TILE)


def gemv_bounds(rows: int, block_n: int, k: int, block_k: int, unroll: int) -> int:
    """The ``BOUNDS_*`` guard a gemv loop over a [rows, k] weight needs, read in N blocks and K steps."""
    if rows % block_n == 0 and k % (block_k * unroll) == 0:
        return BOUNDS_NONE
    return BOUNDS_TILE if k % block_k == 0 else BOUNDS_ELEMENT


@triton.jit
def _x_plane(x_row, x_ok, k0, K, I: tl.constexpr, P: tl.constexpr, BK: tl.constexpr, BOUNDS: tl.constexpr):
    """Activations at K offsets k0 + P*j + I (j < BK/P) as float32 [1, BK/P].

    Unmasked loads need no zeroing of their registers and no predicates,
    which is a measurable share of a decode loop's instructions.
    """
    kk = k0 + P * tl.arange(0, BK // P)[None, :] + I
    if BOUNDS == _UNGUARDED:
        x = tl.load(x_row + kk)
    elif BOUNDS == _TILE_GUARD:
        x = tl.load(x_row + kk, mask=x_ok & (kk * 0 + k0 < K), other=0.0)  # constant along K: one predicate
    else:
        x = tl.load(x_row + kk, mask=x_ok & (kk < K), other=0.0)
    return x.to(tl.float32)


@triton.constexpr_function
def gemv_width(spec, bk):
    """Columns of a ``gemv_tile`` accumulator for a weight of spec code ``spec`` read in K tiles of ``bk``."""
    bits = spec // 4 % 16
    if _word_tiles(spec, bk):
        return bk // 32 if bits == 3 else bk * bits // 32
    return bk // 8  # 3-bit packs of 8 codes


@triton.constexpr_function
def _word_tiles(spec, bk):
    """Whether a tile is read as little-endian 32-bit words: rows and tiles word-aligned.

    Int codes of every width qualify, and the 4-bit table codes (nf4, fp4,
    mxfp4), whose fused layout has whole blocks per row.
    """
    bits, group = spec // 4 % 16, spec // 256
    return group * bits % 32 == 0 and bk * bits % 32 == 0


@triton.jit
def _field(w, P: tl.constexpr, N: tl.constexpr, AT: tl.constexpr):
    """Bits [P, P + N) of int32 ``w`` moved to bits [AT, AT + N), all other bits zero."""
    MASK: tl.constexpr = ((1 << N) - 1) << AT
    if P <= AT:
        f = (w << (AT - P)) & MASK
    else:
        f = (w >> (P - AT)) & MASK
    return f


@triton.jit
def one_bits(tab_ptr):
    """The bits of float32 1.0 as int32, read from the code tables rather than written as a constant.

    Every unpacked code is ``field | bits(1.0)``: one LOP3 when one of its two
    constants sits in a register.  Given the constant, ptxas rematerialised
    it before most of those instructions (about 70 extra moves per 128 codes
    of the decode loop); a value it cannot know stays in one register.  Read
    through ``lookup``, which the pipeliner leaves alone (a plain load in a
    K loop became an asynchronous copy through shared memory every step).
    """
    return lookup(tab_ptr + TAB_ONE).to(tl.int32, bitcast=True)


@triton.jit
def _unit_code(w0, w1, w2, one, I: tl.constexpr, B: tl.constexpr):
    """``1 + c / 2^B`` (float32) for code I of each word (B = 2, 4, 8) or of each 3-word, 32-code pack (B = 3).

    The code's bits become the top of a float32 mantissa under the exponent
    of 1.0 (``one``: ``one_bits``), so no integer-to-float conversion is
    issued (a quarter-rate instruction on Hopper).  A 3-bit code may straddle
    two words; it is assembled from both.
    """
    TOP: tl.constexpr = 23 - B
    P: tl.constexpr = B * I
    if B != 3 or P + 3 <= 32:
        f = _field(w0, P, B, TOP)
    elif P < 32:
        f = _field(w0, P, 32 - P, TOP) | _field(w1, 0, P + 3 - 32, TOP + 32 - P)
    elif P + 3 <= 64:
        f = _field(w1, P - 32, B, TOP)
    elif P < 64:
        f = _field(w1, P - 32, 64 - P, TOP) | _field(w2, 0, P + 3 - 64, TOP + 64 - P)
    else:
        f = _field(w2, P - 64, B, TOP)
    return (f | one).to(tl.float32, bitcast=True)


@triton.jit
def _words_tile(acc, x_row, x_ok, q_ptr, s, z, tab_ptr, one, rows, k0, K, ok, row_words,
                FAM: tl.constexpr, BITS: tl.constexpr, BK: tl.constexpr, BOUNDS: tl.constexpr):
    """``gemv_tile`` for tiles read as 32-bit words.

    Code plane i of the words (code i of each word; of each 3-word pack for
    3-bit) meets the activations at K offsets k0 + i, k0 + i + 32/B, ...  The
    planes are summed unscaled, one FMA per code, and the tile's scale is
    applied once per word column: table codes give ``s * sum T[c] x``; int
    codes, read as ``v = 1 + c/2^B`` (``one``: ``one_bits``),
    give ``s 2^B sum v x - s (2^B + z) sum x`` = ``s sum (c - z) x``.
    """
    words = q_ptr.to(tl.pointer_type(tl.int32)) + rows.to(tl.int64)[:, None] * row_words + k0 * BITS // 32
    if BITS == 3:
        j = 3 * tl.arange(0, BK // 32)[None, :]
        w0 = tl.load(words + j, mask=ok, other=0)
        w1 = tl.load(words + j + 1, mask=ok, other=0)
        w2 = tl.load(words + j + 2, mask=ok, other=0)
        x = _x_plane(x_row, x_ok, k0, K, 0, 32, BK, BOUNDS)
        part = _unit_code(w0, w1, w2, one, 0, 3) * x
        xsum = x
        for i in tl.static_range(1, 32):
            x = _x_plane(x_row, x_ok, k0, K, i, 32, BK, BOUNDS)
            part = tl.fma(_unit_code(w0, w1, w2, one, i, 3), x, part)
            xsum += x
    elif FAM == 0:
        PER_WORD: tl.constexpr = 32 // BITS
        w0 = tl.load(words + tl.arange(0, BK // PER_WORD)[None, :], mask=ok, other=0)
        x = _x_plane(x_row, x_ok, k0, K, 0, PER_WORD, BK, BOUNDS)
        part = _unit_code(w0, w0, w0, one, 0, BITS) * x
        xsum = x
        for i in tl.static_range(1, PER_WORD):
            x = _x_plane(x_row, x_ok, k0, K, i, PER_WORD, BK, BOUNDS)
            part = tl.fma(_unit_code(w0, w0, w0, one, i, BITS), x, part)
            xsum += x
    else:  # 4-bit table codes, element i of a word in nibble i (mxfp4) or i ^ 1 (nf4/fp4: first element high)
        w0 = tl.load(words + tl.arange(0, BK // 8)[None, :], mask=ok, other=0)
        part = tl.zeros(w0.shape, tl.float32)
        for i in tl.static_range(8):
            nibble = (w0 >> (4 * (i ^ (FAM != 3)))) & 15
            part = tl.fma(lookup(tab_ptr + 16 * (FAM - 1) + nibble), _x_plane(x_row, x_ok, k0, K, i, 8, BK, BOUNDS),
                          part)
    if FAM == 0:
        span = 1 << BITS
        acc = tl.fma(part, s * span, acc)
        acc = tl.fma(xsum, -s * (span + z), acc)
    else:
        acc = tl.fma(part, s, acc)
    return acc


@triton.jit
def gemv_tile(acc, x_row, x_ok, q_ptr, s_ptr, z_ptr, fa_ptr, fb_ptr, b_ptr, tab_ptr, one, rows, row_ok, k0, K,
              SPEC: tl.constexpr, BK: tl.constexpr, BOUNDS: tl.constexpr):
    """acc + W[rows, k0:k0+BK] * x[k0:k0+BK], kept as partial sums [rows, gemv_width(SPEC, BK)].

    The decode path: each plane of codes (the codes at one position of every
    word, or of every byte) is multiplied by the activations at the same K
    offsets (``x_row`` is a [1, 1] pointer to one token's row, float32 in
    ``fused_moe``, so it is read without conversion), so no tile is
    ever interleaved or moved between layouts.  Tiles are read as 32-bit
    words (``_words_tile``) except 3-bit codes in groups of other than a
    multiple of 32, read as 3-byte packs.  A tile at or past the row end (an
    unrolled step overshooting K) adds and reads nothing.  ``one`` is
    ``one_bits``, read once per program; ``BOUNDS`` (``gemv_bounds``) says
    how reads are guarded.  Reduce ``acc`` over its second axis after the K
    loop.
    """
    FAM: tl.constexpr = SPEC % 4
    BITS: tl.constexpr = SPEC // 4 % 16
    GS: tl.constexpr = SPEC // 256
    if BOUNDS == _UNGUARDED:
        live = tl.full(rows.shape, True, tl.int1)  # a constant mask: the loads compile without predicates
    else:
        live = row_ok & (rows * 0 + k0 < K)  # a tensor comparison: stays a boolean mask
    byte0, s, z = _tile_params(s_ptr, z_ptr, fa_ptr, fb_ptr, b_ptr, tab_ptr, rows, live, k0, K, SPEC)
    ok = live[:, None]
    if _word_tiles(SPEC, BK):
        acc = _words_tile(acc, x_row, x_ok, q_ptr, s, z, tab_ptr, one, rows, k0, K, ok,
                          tl.cdiv(K, GS) * (GS * BITS // 32), FAM, BITS, BK, BOUNDS)
    else:  # 3-bit codes in groups that are not whole words: 8-code, 3-byte packs
        v = _packs3(q_ptr, byte0, ok, BK)
        for i in tl.static_range(8):
            acc += _value((v >> (3 * i)) & 7, s, z, tab_ptr, FAM) * _x_plane(x_row, x_ok, k0, K, i, 8, BK, BOUNDS)
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
