"""The fragment layout: int codes rearranged so that each GPU thread reads exactly the codes it multiplies.

The fragment kernels (``fragment_tiles``) feed dequantized weights to the
tensor cores straight from registers, as the A operand of a ``[16, 16]``
matrix product per warp.  In that operand, lane ``L = 4 * r0 + c`` of a warp
holds eight elements of each 16 x 16 block: rows ``8 * rh + r0`` and columns
``8 * kh + 2 * c + kl`` for ``rh, kh, kl`` in {0, 1} (the PTX fragment layout
of ``mma.m16n8k16`` and of ``wgmma``'s register operand).  Stored row-major,
those eight codes lie in two rows and four bytes apart; here they are moved,
once at load time, into one lane word, so that a thread turns one load into
its eight weights with a handful of bit operations and no exchange between
threads (the layout Marlin introduced for int4 GEMMs, generalised to 2, 3 and 8
bits).

A weight ``[N, K]`` (N a multiple of 16, K of 64) becomes a tensor of shape
``[N / 16, K / 64, 8 (r0), 4 (c), LANE_WORDS]``: for each 16-row block and
64-column tile, each lane's codes of that tile's four 16 x 16 blocks, in
consecutive memory (one 8- to 32-byte load per thread and tile):

* 4 bits, four int32 words per lane and tile, one per block: code
  ``(rh, kh, kl)`` in nibble ``rh + 2 kh + 4 kl``;
* 8 bits, eight int32 words, two per block (kh = 0, 1): byte ``rh + 2 kl``;
* 2 bits, four uint16 per lane and tile, one per block: bits
  ``2 (rh + 2 kh + 4 kl)``.

In every case code ``(rh, kh, kl)`` of a block sits at bit
``bits * (rh + 2 kh + 4 kl)`` of the lane's bits for that block (for 8 bits,
of word kh, with kh taken out of the index), so that one shift of the lane
word serves a pair ``kl = 0, 1`` that the tensor core reads as one 32-bit
register.

3 bits take three int32 words per lane and tile (``[N / 16, K / 64, 96]``:
the 32 lanes' words A and B, then their words C, so that a thread reads one
8-byte and one 4-byte piece).  A block's codes with the same ``kl`` form a
12-bit field, code ``(rh, kh)`` at bit ``3 (rh + 2 kh)``; word A holds
block 0's fields at bits 0 and 16 (``kl`` = 0, 1), B block 1's, C block 2's,
and block 3's two fields are cut into nibbles that fill the spare bits 12-15
and 28-31 of A (field bits 0-3), B (4-7) and C (8-11).  The kernels put
block 3's word together with three shifts and masks, after which every
block reads like the others: one shift per pair of codes.

Scales travel beside the codes as ``(s, (2^(b-1) - z) s)``
pairs in the activation dtype (``scale_pairs``), so a weight is
``(c - 2^(b-1)) s + (2^(b-1) - z) s``: one fused multiply-add per pair of
weights on codes centred around zero.

This module is plain torch (no Triton): it decides which weights qualify,
and converts between the stored format v1 layout and the fragment layout,
both ways and bit for bit.
"""

from __future__ import annotations

import math
import os

import torch

from moeconv_numpy.schemes import FP4_CODE, NF4_CODE, scheme_info

from ..dequant import blockwise_absmax, unpack_codes

#: Int code widths with a fragment layout.
FRAGMENT_BITS = (2, 3, 4, 8)
#: 4-bit table schemes with a fragment layout (their codes index a 16-entry table).
TABLE_FAMILIES = ("nf4", "fp4")
#: Columns of one storage tile: a lane's codes of four 16 x 16 blocks.
TILE_K = 64
#: Rows of one block.
TILE_N = 16
#: Element type and count of a lane's codes for one storage tile, per width.
LANE_DTYPE = {2: torch.int16, 3: torch.int32, 4: torch.int32, 8: torch.int32}
LANE_WORDS = {2: 4, 3: 3, 4: 4, 8: 8}
#: Where 3-bit lanes keep word C of a tile: after the 32 lanes' words A and B.
_WORD_C = 64


def enabled(device: torch.device | str) -> bool:
    """Whether experts on ``device`` get the fragment layout by default.

    On CPU tensors (Triton's interpreter, where no asm runs) and on Hopper
    GPUs (compute capability 9.0), where the kernels' reading of the tensor
    cores' register operand was checked; other GPUs keep the other kernels.
    ``MOECONV_FRAGMENTS=0`` turns the layout off everywhere.
    """
    if os.environ.get("MOECONV_FRAGMENTS", "1") == "0":
        return False
    device = torch.device(device)
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def fragment_unsupported(scheme: str, shape: tuple[int, int], group_size: int) -> str | None:
    """Why a weight has no fragment layout (the fragment kernels cannot read it), or None.

    Group sizes must be powers of two of at least 16 (a block's columns share
    one scale) or multiples of ``TILE_K``, so that a storage tile holds whole
    groups or lies inside one.
    """
    info = scheme_info(scheme)
    rows, cols = shape
    if not (info.family in TABLE_FAMILIES or (info.family == "int" and info.bits in FRAGMENT_BITS)):
        return f"{scheme} has no fragment layout (int2/3/4/8, nf4 and fp4 only)"
    if rows % TILE_N or cols % TILE_K:
        return f"shape {list(shape)} is not whole {TILE_N} x {TILE_K} tiles"
    power_of_two = group_size & (group_size - 1) == 0
    if not ((power_of_two and group_size >= TILE_N) or group_size % TILE_K == 0):
        return f"group size {group_size} is neither a power of two >= {TILE_N} nor a multiple of {TILE_K}"
    if info.family in TABLE_FAMILIES and cols % group_size:
        return f"{scheme} blocks of {group_size} straddle rows of {cols} columns"
    return None


def lane_bits(scheme: str) -> int:
    """Code width of a scheme's lanes (the table schemes use 4-bit lanes)."""
    return scheme_info(scheme).bits


def _block_order(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] -> [N/16, K/64, 8 (r0), 4 (c), 4 (block), 2 (kl), 2 (kh), 2 (rh)]."""
    n, k = codes.shape
    blocks = codes.view(n // TILE_N, 2, 8, k // TILE_K, 4, 2, 4, 2)  # mt, rh, r0, kt, block, kh, c, kl
    return blocks.permute(0, 3, 2, 6, 4, 7, 5, 1)


def _join(fields: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Integers from little-endian ``bits``-wide fields along the last axis (int64 arithmetic, then ``dtype``)."""
    shifts = torch.arange(fields.shape[-1], device=fields.device, dtype=torch.int64) * bits
    value = (fields.to(torch.int64) << shifts).sum(-1)
    width = torch.iinfo(dtype).bits
    if width < 64:
        value = torch.where(value >= 1 << (width - 1), value - (1 << width), value)  # two's complement
    return value.to(dtype)


def _split(values: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The inverse of ``_join``: ``count`` little-endian fields of ``bits`` bits per integer, as uint8."""
    width = torch.iinfo(values.dtype).bits
    unsigned = values.to(torch.int64) & ((1 << width) - 1)
    shifts = torch.arange(count, device=values.device, dtype=torch.int64) * bits
    return ((unsigned.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).to(torch.uint8)


def _codes(qweight: torch.Tensor, scheme: str, shape: tuple[int, int]) -> torch.Tensor:
    """uint8 codes [N, K] of a stored qweight: an int bit stream per row, or nf4/fp4 pairs (first code high)."""
    n, k = shape
    if scheme_info(scheme).family in TABLE_FAMILIES:
        return torch.stack((qweight >> 4, qweight & 15), dim=-1).view(n, k)
    return unpack_codes(qweight.view(n, -1), lane_bits(scheme), k)


def to_fragments(qweight: torch.Tensor, scheme: str, shape: tuple[int, int]) -> torch.Tensor:
    """A stored qweight (format v1) in the fragment layout (``lane_shape``)."""
    bits, table = lane_bits(scheme), scheme_info(scheme).family in TABLE_FAMILIES
    blocks = _block_order(_codes(qweight, scheme, shape).contiguous())
    lead = blocks.shape[:4]
    if bits == 3:
        return _three_bit_lanes(_join(blocks.reshape(*lead, 4, 2, 4), 3, torch.int32))
    if bits == 8:  # two words per block: kh outermost, then the byte index rh + 2 kl
        per_word = blocks.permute(0, 1, 2, 3, 4, 6, 5, 7).reshape(*lead, 4, 2, 4)
        return _join(per_word, 8, torch.int32).reshape(*lead, LANE_WORDS[8])
    if table:  # nibble kl + 2 rh + 4 kh: a register's pair of codes in adjacent nibbles
        blocks = blocks.permute(0, 1, 2, 3, 4, 6, 7, 5)
    return _join(blocks.reshape(*lead, 4, 8), bits, LANE_DTYPE[bits])


def from_fragments(lanes: torch.Tensor, scheme: str, shape: tuple[int, int], qweight_shape) -> torch.Tensor:
    """The inverse of ``to_fragments``: the stored qweight, padding bytes zero as the spec says."""
    n, k = shape
    bits, table = lane_bits(scheme), scheme_info(scheme).family in TABLE_FAMILIES
    lead = lanes.shape[:2] + (8, 4)
    if bits == 3:
        blocks = _split(_three_bit_fields(lanes), 3, 4).view(*lead, 4, 2, 2, 2)  # block, kl, kh, rh
    elif bits == 8:
        per_word = _split(lanes.reshape(*lead, 4, 2), 8, 4)  # block, kh, (kl, rh)
        blocks = per_word.view(*lead, 4, 2, 2, 2).permute(0, 1, 2, 3, 4, 6, 5, 7)
    elif table:
        blocks = _split(lanes, bits, 8).view(*lead, 4, 2, 2, 2).permute(0, 1, 2, 3, 4, 7, 5, 6)
    else:
        blocks = _split(lanes, bits, 8).view(*lead, 4, 2, 2, 2)
    codes = blocks.permute(0, 7, 2, 1, 4, 6, 3, 5).reshape(n, k)  # back to mt, rh, r0, kt, block, kh, c, kl
    if table:
        return ((codes[:, 0::2] << 4) | codes[:, 1::2]).reshape(qweight_shape)
    stream = _split(_join(codes.view(n, k // 8, 8), bits, torch.int64), 8, bits).view(n, k * bits // 8)
    qweight = torch.zeros(qweight_shape, dtype=torch.uint8, device=lanes.device)
    qweight[:, : stream.shape[1]] = stream
    return qweight


def _three_bit_lanes(fields: torch.Tensor) -> torch.Tensor:
    """12-bit fields [N/16, K/64, 8, 4, 4 (block), 2 (kl)] -> 3-bit lanes [N/16, K/64, 96] (module docstring)."""
    f = fields.to(torch.int64)
    words = f[..., :3, 0] | f[..., :3, 1] << 16  # A, B, C: blocks 0-2
    nibble = torch.arange(3, device=f.device) * 4
    words |= ((f[..., 3:, 0] >> nibble) & 15) << 12 | ((f[..., 3:, 1] >> nibble) & 15) << 28
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    lead = words.shape[:2]
    return torch.cat((words[..., :2].reshape(*lead, _WORD_C), words[..., 2].reshape(*lead, 32)), dim=-1)


def _three_bit_fields(lanes: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_three_bit_lanes``: int64 fields [N/16, K/64, 8, 4, 4 (block), 2 (kl)]."""
    lead = lanes.shape[:2]
    unsigned = lanes.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat((unsigned[..., :_WORD_C].view(*lead, 8, 4, 2), unsigned[..., _WORD_C:].view(*lead, 8, 4, 1)), -1)
    low = torch.stack((words & 0xFFF, words >> 16 & 0xFFF), dim=-1)  # [..., 3 (block), 2 (kl)]
    nibble = torch.arange(3, device=lanes.device)[:, None] * 4
    spare = torch.stack((words >> 12 & 15, words >> 28 & 15), dim=-1) << nibble
    return torch.cat((low, spare.sum(-2, keepdim=True)), dim=-2)


def _scales(parts, scheme: str, shape: tuple[int, int], group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (s, offset) [N, groups]: a weight is ``(c - 2^(b-1)) s + offset``, or ``TABLE[c] s`` (offset 0)."""
    info = scheme_info(scheme)
    if info.family in TABLE_FAMILIES:
        n_blocks = shape[0] * shape[1] // group_size
        s = blockwise_absmax(parts, n_blocks, "absmax_q" in parts).view(shape[0], -1)
        return s, torch.zeros_like(s)
    s = parts["scales"].float()
    half = float(1 << (info.bits - 1))
    zeros = parts.get("zeros")
    return s, ((half - zeros.float()) * s if zeros is not None else torch.zeros_like(s))


def scale_pairs(parts, scheme: str, shape: tuple[int, int], group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``[N, groups, 2]`` of ``dtype``: each group's ``(s, offset)`` (``_scales``), each rounded once from float32.

    For int codes the kernels compute ``(c - 2^(b-1)) s + (2^(b-1) - z) s``:
    with codes centred, neither term is much larger than the weight, so the
    activation dtype's rounding of ``s`` and of the offset stays near one
    rounding of the weight (bfloat16: about 0.3%, against about 1% for
    ``c s - z s``).  Symmetric schemes (zero point ``2^(b-1)``) and the
    table schemes have offset 0.
    """
    s, offset = _scales(parts, scheme, shape, group_size)
    return torch.stack((s, offset), dim=-1).to(dtype)


def code_values(scheme: str, dtype: torch.dtype) -> torch.Tensor:
    """float32 [2^b]: the value each code stands for in the kernels, ``dtype``-exact (codes centred for int)."""
    info = scheme_info(scheme)
    if info.family in TABLE_FAMILIES:
        table = NF4_CODE if info.family == "nf4" else FP4_CODE
        return torch.from_numpy(table.copy()).to(dtype).float()
    return torch.arange(1 << info.bits, dtype=torch.float32) - float(1 << (info.bits - 1))


def kernel_weights(parts, scheme: str, shape: tuple[int, int], group_size: int, dtype: torch.dtype,
                   rounded: bool = True) -> torch.Tensor:
    """float32 [N, K]: the weights the fragment kernels multiply by, for tests and error budgets.

    ``v(c) s + offset`` with ``v`` from ``code_values`` and both factors from
    ``scale_pairs`` (in ``dtype``), rounded once to ``dtype`` as the kernels'
    fused multiply-add does when they scale weights before the product.
    Against the spec's float32 weights this is a few roundings of ``dtype``
    (bfloat16: about 0.3% relative), where the other kernels round once.
    ``rounded=False`` gives the unrounded float32 weights that kernels
    scaling after the product (``FragmentConfig.scale_after_product``, groups
    of whole 64-column tiles) multiply by.
    """
    codes = _codes(parts["qweight"], scheme, shape).long()
    values = code_values(scheme, dtype).to(codes.device)[codes]
    pairs = scale_pairs(parts, scheme, shape, group_size, dtype).float()
    s = pairs[..., 0].repeat_interleave(group_size, dim=1)[:, :shape[1]]
    offset = pairs[..., 1].repeat_interleave(group_size, dim=1)[:, :shape[1]]
    weights = values * s + offset
    return weights.to(dtype).float() if rounded else weights


def lane_shape(scheme: str, shape: tuple[int, int]) -> tuple[int, ...]:
    """Shape of a weight's lanes: [N / 16, K / 64, 8 (r0), 4 (c), LANE_WORDS[bits]], or [N / 16, K / 64, 96]
    for 3 bits (whose words A, B and C lie apart)."""
    n, k = shape
    bits = lane_bits(scheme)
    if bits == 3:
        return n // TILE_N, k // TILE_K, 32 * LANE_WORDS[3]
    return n // TILE_N, k // TILE_K, 8, 4, LANE_WORDS[bits]


def lane_elements(scheme: str, shape: tuple[int, int]) -> int:
    """Number of lane elements (``LANE_DTYPE[bits]``) of a weight in the fragment layout."""
    return math.prod(lane_shape(scheme, shape))
