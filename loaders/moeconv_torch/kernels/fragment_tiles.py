"""Triton device function of the fragment kernels: one [BN, 64] weight tile from the fragment layout.

``fragment_tile`` returns weights in the activation dtype, ready to be the A
operand of ``tl.dot`` (the weights' rows are the product's M dimension, the
tokens its N).  It loads each lane's codes for a storage tile (see
``fragments``) as a small tensor whose shape names (row block, r0, block,
[kh,] c), broadcasts it over the fragment's other coordinates and reshapes it
to ``[BN, 64]``; Triton then keeps the conversion in the operand's register
layout, where the eight elements a thread holds per 16 x 16 block all come
from one lane word.  On GPUs that word goes through one ``inline_asm`` per
block (``pack=8``: the thread's eight elements of that block):

* each pair of codes ``kl = 0, 1`` is moved by one ``lop3`` into the low
  mantissa bits of a packed pair of halves whose exponent is that of 128
  (bfloat16) or 1024 (float16), which makes them exactly ``M + c``;
* one packed fused multiply-add removes ``M + 2^(bits-1)``, exactly (8-bit
  codes in bfloat16, whose mantissa is too short for them, are assembled
  from two nibbles instead);
* the tile's ``(s, (2^(bits-1) - z) s)`` pairs then give ``(c - z) s``, one
  more packed FMA.  Centring the codes keeps both terms small, so their
  roundings cost little (and nothing for symmetric schemes, where the
  second term is 0).

For products scaled afterwards (``fragment_codes(RAW=True)``, see
``row_scales``) the asm stops after the ``lop3``: the magic number and the
centring come out of the float32 product instead.

The asm takes one operand (Triton moves a conversion into the dot operand's
layout only through single-operand inline asm), so the position of a code
in its word is the same for every thread: the layout put it there.  Under
``TRITON_INTERPRET`` (no asm) the same codes are cut out with shifts by
positions computed from the coordinates; both give the same values up to
the rounding of one product.
"""

import torch
import triton
import triton.language as tl

from moeconv_numpy.schemes import FP4_CODE, NF4_CODE

from .tiles import lookup, round_to


#: A PTX comment that opens every code-conversion asm, by which ``fragment_moe`` finds them in compiled kernels.
FRAGMENT_ASM_MARK = "// moeconv fragment codes"


def _asm(bits: int, bf16: bool, raw: bool = False) -> str:
    """PTX: one lane word (two, for 8 bits) -> the thread's 8 codes of a block minus 2^(bits-1), as 4 half pairs.

    ``raw`` leaves out the subtraction where a code is assembled as ``M + c``
    (``M`` the magic number; 8-bit codes in bfloat16 stay centred): the
    products then carry ``raw_bias`` times the activations' sum, which the
    kernels take out after the product (``row_scales``).
    """
    f = "bf16x2" if bf16 else "f16x2"
    magic, mbias = (0x4300, 128.0) if bf16 else (0x6400, 1024.0)
    lines = [f"mov.b32 one, {_pair(1.0, bf16)};", f"mov.b32 neg, {_pair(-(mbias + (1 << (bits - 1))), bf16)};"]
    if bits == 8:
        # $4..$7 hold word kh=0, $8..$11 word kh=1; register j = rh + 2 kh reads bytes rh, rh + 2 of word kh.
        if bf16:
            lines += [f"mov.b32 sixteen, {_pair(16.0, bf16)};", f"mov.b32 bias, {_pair(-2304.0, bf16)};"]
        for j in range(4):
            word = "$4" if j < 2 else "$8"
            shift = 8 * (j % 2)
            if bf16:  # c - 128 from its two nibbles: (128 + lo) + (16 (128 + hi) - 2304)
                lines += [f"shr.b32 t, {word}, {shift};", f"shr.b32 u, {word}, {shift + 4};",
                          f"lop3.b32 t, t, 0x000F000F, 0x{magic:04X}{magic:04X}, 0xEA;",
                          f"lop3.b32 u, u, 0x000F000F, 0x{magic:04X}{magic:04X}, 0xEA;",
                          f"fma.rn.{f} u, u, sixteen, bias;", f"fma.rn.{f} ${j}, t, one, u;"]
            else:
                lines += [f"shr.b32 t, {word}, {shift};", f"lop3.b32 t, t, 0x00FF00FF, 0x{magic:04X}{magic:04X}, 0xEA;",
                          f"mov.b32 ${j}, t;" if raw else f"fma.rn.{f} ${j}, t, one, neg;"]
    else:  # 2, 3 and 4 bits: one shift and one lop3 a pair (3 bits: a 12-bit field per kl, at bits 0 and 16)
        mask = {2: "0x00030003", 3: "0x00070007", 4: "0x000F000F"}[bits]
        source = "$4"
        if bits == 2:  # a 16-bit lane element: its high byte (the kl = 1 codes) moves to bits 16-23
            lines.append("prmt.b32 w, $4, $4, 0x3120;")
            source = "w"
        for j in range(4):
            lines.append(f"shr.b32 t, {source}, {bits * j};")
            if raw:
                lines.append(f"lop3.b32 ${j}, t, {mask}, 0x{magic:04X}{magic:04X}, 0xEA;")
            else:
                lines += [f"lop3.b32 t, t, {mask}, 0x{magic:04X}{magic:04X}, 0xEA;", f"fma.rn.{f} ${j}, t, one, neg;"]
    return "{\n" + FRAGMENT_ASM_MARK + "\n.reg .b32 t, u, w, one, neg, sixteen, bias;\n" + "\n".join(lines) + "\n}"


def _table_asm(table, bf16: bool) -> str:
    """PTX: two lane words of 4-bit table codes -> their 16 table values (8 half pairs), looked up with ``prmt``.

    The 16 entries' low and high bytes sit in eight registers; ``prmt`` picks
    a byte for each of four codes at once among eight (the code's low three
    bits), from entries 0-7 and from 8-15, and the code's high bit chooses
    between the two (a byte mask that ``prmt``'s sign-replicate mode makes).
    Codes sit in nibbles ``kl + 2 rh + 4 kh``: nibbles 0-3 give the pairs of
    a block's registers 0 and 1, nibbles 4-7 those of 2 and 3.  Two blocks
    per asm (``pack=16``: inputs $8 and $16 are their words) halve the cost
    of materialising the table, which ptxas does once per asm.
    """
    halves = torch.tensor([float(v) for v in table], dtype=torch.bfloat16 if bf16 else torch.float16)
    bits = [int(b) & 0xFFFF for b in halves.view(torch.int16).tolist()]
    lines = []
    for name, shift in (("l", 0), ("h", 8)):
        for r in range(4):
            word = sum(((bits[4 * r + i] >> shift) & 0xFF) << (8 * i) for i in range(4))
            lines.append(f"mov.b32 {name}{r}, 0x{word:08X};")
    lines.append("mov.b32 k, 0x00008000;")
    for block, word in enumerate(("$8", "$16")):
        for half in range(2):
            out0, out1 = f"${4 * block + 2 * half}", f"${4 * block + 2 * half + 1}"
            src = word
            if half:
                lines.append(f"shr.b32 u, {word}, 16;")
                src = "u"
            lines += [f"and.b32 s, {src}, 0x7777;", f"shr.b32 t, {src}, 3;", "lop3.b32 m, t, 0x1111, 0x8888, 0xEA;",
                      "prmt.b32 m, k, k, m;",
                      "prmt.b32 a, l0, l1, s;", "prmt.b32 b, l2, l3, s;", "lop3.b32 lo, a, b, m, 0xD8;",
                      "prmt.b32 a, h0, h1, s;", "prmt.b32 b, h2, h3, s;", "lop3.b32 hi, a, b, m, 0xD8;",
                      f"prmt.b32 {out0}, lo, hi, 0x5140;", f"prmt.b32 {out1}, lo, hi, 0x7362;"]
    regs = "t, u, s, m, k, a, b, lo, hi, l0, l1, l2, l3, h0, h1, h2, h3"
    return "{\n" + FRAGMENT_ASM_MARK + "\n.reg .b32 " + regs + ";\n" + "\n".join(lines) + "\n}"


def _pair(value: float, bf16: bool) -> str:
    """A packed pair of ``value`` as a PTX hex literal (exact in both halves dtypes for the constants used)."""
    bits = torch.tensor([value], dtype=torch.bfloat16 if bf16 else torch.float16).view(torch.int16).item() & 0xFFFF
    return f"0x{bits:04X}{bits:04X}"


ASM2_BF16, ASM3_BF16, ASM4_BF16, ASM8_BF16 = (tl.constexpr(_asm(bits, True)) for bits in (2, 3, 4, 8))
ASM2_F16, ASM3_F16, ASM4_F16, ASM8_F16 = (tl.constexpr(_asm(bits, False)) for bits in (2, 3, 4, 8))
RAW2_BF16, RAW3_BF16, RAW4_BF16 = (tl.constexpr(_asm(bits, True, raw=True)) for bits in (2, 3, 4))
RAW2_F16, RAW3_F16, RAW4_F16, RAW8_F16 = (tl.constexpr(_asm(bits, False, raw=True)) for bits in (2, 3, 4, 8))
NF4_BF16, NF4_F16 = (tl.constexpr(_table_asm(NF4_CODE, bf16)) for bf16 in (True, False))
FP4_BF16, FP4_F16 = (tl.constexpr(_table_asm(FP4_CODE, bf16)) for bf16 in (True, False))
#: Four outputs (pairs of halves); eight 32-bit inputs, or four holding two 16-bit elements each.
IO_32 = tl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 8))
IO_16 = tl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 4))
#: The table asm: eight outputs, sixteen 32-bit inputs (two blocks).
IO_TABLE = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 16))


@triton.jit
def _fragment(x, MT: tl.constexpr):
    """[MT, 8 (r0), 4 (block), 4 (c)] -> [MT * 16, 64]: each lane's value at its 8 elements of each block."""
    x7 = tl.broadcast_to(x[:, None, :, :, None, :, None], [MT, 2, 8, 4, 2, 4, 2])
    return tl.reshape(x7, [MT * 16, 64])


@triton.jit
def _fragment_kh(x, MT: tl.constexpr):
    """[MT, 8 (r0), 4 (block), 2 (kh), 4 (c)] -> [MT * 16, 64], for 8-bit codes (a word per kh)."""
    x7 = tl.broadcast_to(x[:, None, :, :, :, :, None], [MT, 2, 8, 4, 2, 4, 2])
    return tl.reshape(x7, [MT * 16, 64])


@triton.jit
def _code_bits(MT: tl.constexpr, BITS: tl.constexpr, TABLE: tl.constexpr):
    """[MT * 16, 64] bit offset of each element's code in its lane word (interpreter path)."""
    rh = tl.arange(0, 2)[None, :, None, None, None, None, None]
    kh = tl.arange(0, 2)[None, None, None, None, :, None, None]
    kl = tl.arange(0, 2)[None, None, None, None, None, None, :]
    if BITS == 8:
        pos = 8 * (rh + 2 * kl) + 0 * kh
    elif BITS == 3:
        pos = 3 * (rh + 2 * kh) + 16 * kl
    elif TABLE:
        pos = 4 * (kl + 2 * rh + 4 * kh)
    else:
        pos = BITS * (rh + 2 * kh + 4 * kl)
    return tl.reshape(tl.broadcast_to(pos, [MT, 2, 8, 4, 2, 4, 2]), [MT * 16, 64])


@triton.jit
def raw_bias(SPEC: tl.constexpr, ACT_BF16: tl.constexpr):
    """What ``fragment_codes(RAW=True)`` adds to every int code's centred value: ``M + 2^(bits-1)``, or 0.

    ``M`` is the magic number whose mantissa the codes are written into
    (128 in bfloat16, 1024 in float16).  8-bit codes in bfloat16 are
    assembled already centred, and table codes are their table values: 0.
    """
    FAM: tl.constexpr = SPEC % 4
    BITS: tl.constexpr = SPEC // 4 % 16
    CENTRED: tl.constexpr = FAM != 0 or (BITS == 8 and ACT_BF16)
    MAGIC: tl.constexpr = 128.0 if ACT_BF16 else 1024.0
    return 0.0 if CENTRED else MAGIC + (1 << (BITS - 1))


@triton.jit
def _codes(w, tab_ptr, MT: tl.constexpr, SPEC: tl.constexpr, ACT_BF16: tl.constexpr, INTERPRET: tl.constexpr,
           RAW: tl.constexpr):
    """What the codes of the lane words ``w`` (spread to [BN, 64]) stand for, exact in the activation dtype.

    Int codes minus 2^(bits-1), plus ``raw_bias`` if ``RAW``; nf4/fp4 codes
    as their table entries rounded to the activation dtype (``tab_ptr``:
    ``specs.code_tables``, read by the interpreter only).
    """
    FAM: tl.constexpr = SPEC % 4
    BITS: tl.constexpr = SPEC // 4 % 16
    if INTERPRET:
        c = (w.to(tl.int32) >> _code_bits(MT, BITS, FAM != 0)) & ((1 << BITS) - 1)
        if FAM == 0:
            bias = raw_bias(SPEC, ACT_BF16) if RAW else 0.0
            v = round_to((c - (1 << (BITS - 1))).to(tl.float32) + bias, ACT_BF16, INTERPRET)  # integers: exact
        else:  # nf4, fp4 tables at 0 and 16 (specs.TAB_*)
            v = round_to(lookup(tab_ptr + 16 * (FAM - 1) + c), ACT_BF16, INTERPRET)
    elif ACT_BF16:
        if FAM == 1:
            v = tl.inline_asm_elementwise(NF4_BF16, IO_TABLE, [w], dtype=tl.bfloat16, is_pure=True, pack=16)
        elif FAM == 2:
            v = tl.inline_asm_elementwise(FP4_BF16, IO_TABLE, [w], dtype=tl.bfloat16, is_pure=True, pack=16)
        elif BITS == 8:
            v = tl.inline_asm_elementwise(ASM8_BF16, IO_32, [w], dtype=tl.bfloat16, is_pure=True, pack=8)
        elif BITS == 4:
            v = tl.inline_asm_elementwise(RAW4_BF16 if RAW else ASM4_BF16, IO_32, [w], dtype=tl.bfloat16,
                                          is_pure=True, pack=8)
        elif BITS == 3:
            v = tl.inline_asm_elementwise(RAW3_BF16 if RAW else ASM3_BF16, IO_32, [w], dtype=tl.bfloat16,
                                          is_pure=True, pack=8)
        else:
            v = tl.inline_asm_elementwise(RAW2_BF16 if RAW else ASM2_BF16, IO_16, [w], dtype=tl.bfloat16,
                                          is_pure=True, pack=8)
    else:
        if FAM == 1:
            v = tl.inline_asm_elementwise(NF4_F16, IO_TABLE, [w], dtype=tl.float16, is_pure=True, pack=16)
        elif FAM == 2:
            v = tl.inline_asm_elementwise(FP4_F16, IO_TABLE, [w], dtype=tl.float16, is_pure=True, pack=16)
        elif BITS == 8:
            v = tl.inline_asm_elementwise(RAW8_F16 if RAW else ASM8_F16, IO_32, [w], dtype=tl.float16,
                                          is_pure=True, pack=8)
        elif BITS == 4:
            v = tl.inline_asm_elementwise(RAW4_F16 if RAW else ASM4_F16, IO_32, [w], dtype=tl.float16,
                                          is_pure=True, pack=8)
        elif BITS == 3:
            v = tl.inline_asm_elementwise(RAW3_F16 if RAW else ASM3_F16, IO_32, [w], dtype=tl.float16,
                                          is_pure=True, pack=8)
        else:
            v = tl.inline_asm_elementwise(RAW2_F16 if RAW else ASM2_F16, IO_16, [w], dtype=tl.float16,
                                          is_pure=True, pack=8)
    return v


@triton.jit
def tile_scales(sz_ptr, mt0, kt, row_blocks, SPEC: tl.constexpr, BN: tl.constexpr):
    """The scale pairs of tile ``kt`` of rows ``16 mt0 ..``: ([MT, 2, 8, NG] s, same for the offsets).

    ``sz_ptr`` holds a weight's pairs group-major (``PackedExperts.scale_pairs``):
    the rows a warp multiplies then share one or two cache lines per group,
    where row-major pairs cost a line per row.
    """
    GS: tl.constexpr = SPEC // 256
    MT: tl.constexpr = BN // 16
    NG: tl.constexpr = 64 // GS if GS < 64 else 1
    mt = mt0 + tl.arange(0, MT)[:, None, None, None]
    rows = mt * 16 + tl.arange(0, 2)[None, :, None, None] * 8 + tl.arange(0, 8)[None, None, :, None]
    grp = (kt * 64) // GS + tl.arange(0, NG)[None, None, None, :]
    pair = sz_ptr + (grp.to(tl.int64) * (row_blocks * 16) + rows) * 2
    ok = mt < row_blocks
    return tl.load(pair, mask=ok, other=0.0), tl.load(pair + 1, mask=ok, other=0.0)


@triton.jit
def row_scales(sz_ptr, mt0, kt, row_blocks, SPEC: tl.constexpr, BN: tl.constexpr, ACT_BF16: tl.constexpr):
    """float32 ``(s, offset - raw_bias * s)`` [BN] of rows ``16 mt0 ..`` for tile ``kt``, whose columns share a group.

    For products of raw codes (``fragment_codes(RAW=True)``) scaled after
    the product: a row's share of a tile is ``s * (raw codes . x) + (offset -
    raw_bias s) * sum(x)``, in float32, so neither the scale nor the magic
    number costs an instruction per weight.
    """
    return row_scale_values(row_scale_words(sz_ptr, mt0, kt, row_blocks, SPEC, BN), SPEC, ACT_BF16)


@triton.jit
def row_scale_words(sz_ptr, mt0, kt, row_blocks, SPEC: tl.constexpr, BN: tl.constexpr):
    """Each row's stored ``(s, offset)`` pair for tile ``kt`` as one int32 [BN] (one 32-bit load a row).

    Apart from ``row_scale_values`` so that a loop can load a later tile's
    words and convert them only where it uses them (``fragment_moe._gate_up_ahead``).
    """
    GS: tl.constexpr = SPEC // 256
    rows = mt0 * 16 + tl.arange(0, BN)
    pairs = sz_ptr.to(tl.pointer_type(tl.int32)) + kt // (GS // 64) * (row_blocks * 16) + rows
    return tl.load(pairs, mask=rows < row_blocks * 16, other=0)


@triton.jit
def row_scale_values(word, SPEC: tl.constexpr, ACT_BF16: tl.constexpr):
    """``row_scales`` of the words ``row_scale_words`` loaded."""
    if ACT_BF16:  # a bfloat16 is the high half of a float32
        s = (word << 16).to(tl.float32, bitcast=True)
        offset = (word & -65536).to(tl.float32, bitcast=True)
    else:
        s = (word & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        offset = (word >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return s, offset - raw_bias(SPEC, ACT_BF16) * s


@triton.jit
def _three_bit_words(lane_ptr, mt, kt, row_tiles, ok, MT: tl.constexpr):
    """[MT, 8 (r0), 4 (block), 4 (c)]: each lane's word of each block of a 3-bit tile (``fragments``).

    Words A and B are one 8-byte load, C one 4-byte load; block 3's word is
    put together from the nibbles at bits 12-15 and 28-31 of the three, and
    the choice between the four folds away (a thread's block is known per
    register).
    """
    tile = (mt[:, None, None, None] * row_tiles + kt) * 96  # 3 words a lane, word C at 64 (fragments._WORD_C)
    lane = tl.arange(0, 8)[None, :, None, None] * 4 + tl.arange(0, 4)[None, None, None, :]  # [1, 8, 1, 4]
    ab = tl.load(lane_ptr + (tile + lane * 2)[:, :, :, :, None] + tl.arange(0, 2)[None, None, None, None, :],
                 mask=ok[:, :, :, :, None], other=0)
    a, b = tl.split(ab)
    c = tl.load(lane_ptr + tile + 64 + lane, mask=ok, other=0)
    d = ((a >> 12) & 0x000F000F) | ((b >> 8) & 0x00F000F0) | ((c >> 4) & 0x0F000F00)
    block = tl.arange(0, 4)[None, None, :, None]
    return tl.where(block == 0, a, tl.where(block == 1, b, tl.where(block == 2, c, d)))


@triton.jit
def fragment_codes(lane_ptr, tab_ptr, mt0, kt, row_blocks, row_tiles, SPEC: tl.constexpr, BN: tl.constexpr,
                   ACT_BF16: tl.constexpr, INTERPRET: tl.constexpr, RAW: tl.constexpr):
    """What the codes of W[16 mt0 : 16 mt0 + BN, 64 kt : 64 kt + 64] stand for (``_codes``), unscaled, [BN, 64].

    ``lane_ptr`` points at the weight's lane words (int32; int16 for 2-bit
    codes), ``tab_ptr`` at the code tables (interpreter only);
    ``row_blocks`` = rows / 16 and ``row_tiles`` = columns / 64.  Row blocks
    past the weight read as code 0.
    """
    BITS: tl.constexpr = SPEC // 4 % 16
    MT: tl.constexpr = BN // 16
    mt = mt0 + tl.arange(0, MT)
    lane = (mt[:, None, None, None] * row_tiles + kt) * 32 + tl.arange(0, 8)[None, :, None, None] * 4 \
        + tl.arange(0, 4)[None, None, None, :]  # [MT, 8, 1, 4]: lane index of (row block, r0, c)
    ok = (mt < row_blocks)[:, None, None, None]
    block = tl.arange(0, 4)[None, None, :, None]
    if BITS == 8:  # a lane's eight words (block, kh) as one contiguous axis, for two 16-byte loads
        lane8 = (mt[:, None, None, None] * row_tiles + kt) * 32 + tl.arange(0, 8)[None, :, None, None] * 4 \
            + tl.arange(0, 4)[None, None, :, None]  # [MT, 8, 4 (c), 1]
        words = tl.load(lane_ptr + lane8 * 8 + tl.arange(0, 8)[None, None, None, :], mask=ok, other=0)
        w = _fragment_kh(tl.permute(tl.reshape(words, [MT, 8, 4, 4, 2]), [0, 1, 3, 4, 2]), MT)
    elif BITS == 3:
        w = _fragment(_three_bit_words(lane_ptr, mt, kt, row_tiles, ok, MT), MT)
    elif BITS == 4:
        w = _fragment(tl.load(lane_ptr + (lane * 4 + block), mask=ok, other=0), MT)
    else:
        w = _fragment(tl.load(lane_ptr.to(tl.pointer_type(tl.int16)) + (lane * 4 + block), mask=ok, other=0), MT)
    return _codes(w, tab_ptr, MT, SPEC, ACT_BF16, INTERPRET, RAW)


@triton.jit
def fragment_tile(lane_ptr, s4, nz4, tab_ptr, mt0, kt, row_blocks, row_tiles,
                  SPEC: tl.constexpr, BN: tl.constexpr, ACT_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """W[16 mt0 : 16 mt0 + BN, 64 kt : 64 kt + 64] of one weight in the activation dtype, scaled.

    ``s4``/``nz4`` are the tile's scale pairs (``tile_scales``); the other
    arguments as ``fragment_codes``.  Row blocks past the weight read as
    zero weights (their scales are 0).
    """
    GS: tl.constexpr = SPEC // 256
    MT: tl.constexpr = BN // 16
    c = fragment_codes(lane_ptr, tab_ptr, mt0, kt, row_blocks, row_tiles, SPEC, BN, ACT_BF16, INTERPRET, False)
    # One scale pair per (row, group): a tile holds NG whole groups or lies inside one.
    NG: tl.constexpr = 64 // GS if GS < 64 else 1
    WIDTH: tl.constexpr = GS if GS < 64 else 64
    s = tl.reshape(tl.broadcast_to(s4[:, :, :, :, None], [MT, 2, 8, NG, WIDTH]), [BN, 64])
    nz = tl.reshape(tl.broadcast_to(nz4[:, :, :, :, None], [MT, 2, 8, NG, WIDTH]), [BN, 64])
    if INTERPRET:  # one rounding, as the GPU's fused multiply-add
        return round_to(c.to(tl.float32) * s.to(tl.float32) + nz.to(tl.float32), ACT_BF16, INTERPRET)
    return c * s + nz
