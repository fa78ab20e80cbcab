"""Fused MoE kernels for the experts in the fragment layout (int2/3/4/8, nf4, fp4; see ``fragments``).

The same two stages as ``moe`` (gate and up with SiLU, then down with the
router weights and an atomic add into the float32 output), on pairs sorted by
expert and padded to blocks of ``block_m`` (``align``), for every
number of tokens.  The products are turned around: a weight tile is the
tensor cores' A operand (its rows are M) and the block's tokens are N, so a
decode step (one token per expert, padded to mma.sync's smallest N of 8) wastes
tensor-core work, which is free, instead of weight bandwidth.  Weights come
from ``fragment_tiles``: dequantized in the registers where the product reads
them, nothing through shared memory.  Decode multiplies the raw codes and
applies each row's scale to the float32 product instead
(``FragmentConfig.scale_after_product``, ``_product``), which needs the sums
of each 64 activations: ``_prepare_kernel`` makes them for x, and the
kernels that write h store them beside it.

Mixed precision works as in ``moe``: each launch is compiled for up to
``MAX_VARIANTS`` (gate, up) or down spec codes and branches on the block's
variant once, outside the K loop.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .align import ALIGN_KERNEL_MAX, align_pairs, block_bound, kernel_buffers, sort_pairs
from .dequant import tables
from .experts import PackedExperts
from .fragment_tiles import (FRAGMENT_ASM_MARK, fragment_codes, fragment_tile, row_scale_values, row_scale_words,
                             row_scales, tile_scales)
from .fragments import TILE_K
from .launch import cdiv, launch
from .specs import FAM_INT
from .tiles import mma, round_to

#: Variants compiled into one launch (more take further launches).
MAX_VARIANTS = 4


@dataclass(frozen=True)
class FragmentConfig:
    """Tiling of the fragment kernels; ``choose_fragment_config`` picks it, benchmarks may override."""

    block_m: int  # tokens per block: the products' N (>= 8, mma.sync's narrowest)
    up_block_n: int  # gate/up rows per program (a multiple of 16; 64 per four warps for wgmma)
    down_block_n: int  # down rows per program
    split_k: int  # K pieces of the down projection
    num_warps: int
    num_stages: int
    up_split_k: int = 1  # K pieces of gate/up (more programs for few tokens; the last piece to finish applies SiLU)
    split_gate_up: bool = False  # gate and up in separate programs (``_fragment_projection_kernel``)
    variants_per_launch: int = MAX_VARIANTS
    k_step: int = 1  # K tiles per loop step (1, 2 or 4) whose scales load together (``_gate_up``); 1 if scales_ahead
    warp_mma: bool = False  # products by warps' mma.sync rather than Hopper's wgmma (``_warp_mma``)
    max_registers: int | None = None  # registers per thread the compiler may use (Triton's ``maxnreg``)
    scale_after_product: bool = False  # groups of whole tiles: scales applied to products, not weights (``_product``)
    scales_ahead: bool = False  # with scale_after_product, groups of whole tiles: row scales and sums loaded a tile
    # ahead (``_gate_up_ahead``)

    def __post_init__(self):
        """Refuse tilings the kernels cannot run correctly, naming the field.

        Also refused, though the interpreter computes them right: eight warps
        (two warp groups); on wgmma (without ``warp_mma``) products of more
        than 8,192 outputs a program (over 64 float32 accumulator registers a
        thread); and on wgmma, down programs of 128 rows or more for blocks of
        64 tokens or more.  On an H200, 128-row down programs gave products
        21-24x the reference's norm with 128-token blocks at three or four
        stages (right at one or two, and with two K tiles a loop step), and
        infinite or NaN products with 64-token blocks at three or four stages
        (0.5% off at two); 128-row programs of 256-token blocks on eight warps
        were 29% off.  Right on the same GPU: 128-row down programs of 8, 16
        or 32 tokens, 256 rows of 32, 64-row programs of 128 tokens, 128-row
        gate/up programs of 64 tokens, and mma.sync programs of 128 rows.  In
        the compiled kernels the right and wrong tilings have the same wgmma
        waits (three groups in flight in the down loop), so the cause is
        below Triton's IR and not found; benchmarks/NOTES.md has the runs.
        """
        if self.block_m < 8 or self.block_m & (self.block_m - 1):
            raise ValueError(f"FragmentConfig.block_m must be a power of two >= 8, got {self.block_m}")
        for name in ("up_block_n", "down_block_n"):
            rows = getattr(self, name)
            if rows < 16 or rows & (rows - 1):
                raise ValueError(f"FragmentConfig.{name} must be a power of two >= 16, got {rows}")
        if self.num_warps != 4:
            raise ValueError(f"FragmentConfig.num_warps must be 4 (one warp group), got {self.num_warps}")
        for name in ("up_block_n", "down_block_n"):
            if not self.warp_mma and getattr(self, name) * self.block_m > 8192:
                raise ValueError(f"FragmentConfig.{name} times block_m must be <= 8192 on wgmma (warp_mma=False), "
                                 f"got {getattr(self, name)} x {self.block_m}")
        if not self.warp_mma and self.down_block_n >= 128 and self.block_m >= 64:
            raise ValueError("FragmentConfig.down_block_n must be <= 64 on wgmma (warp_mma=False) for blocks of 64 "
                             f"tokens or more, got {self.down_block_n} rows of {self.block_m}")
        if self.k_step not in (1, 2, 4):
            raise ValueError(f"FragmentConfig.k_step must be 1, 2 or 4, got {self.k_step}")
        if self.scale_after_product and self.up_block_n % 64:
            raise ValueError("FragmentConfig.up_block_n must be a multiple of 64 with scale_after_product "
                             f"(the down projection's tiles of h), got {self.up_block_n}")
        for name in ("split_k", "up_split_k", "num_stages", "variants_per_launch"):
            if getattr(self, name) < 1:
                raise ValueError(f"FragmentConfig.{name} must be >= 1, got {getattr(self, name)}")


def choose_fragment_config(num_pairs: int, experts: PackedExperts, num_sms: int) -> FragmentConfig:
    """Tiling by (token, expert) pairs per expert: the best of the H200 sweeps (benchmarks/moe_kernels.py).

    Few tokens: 8-token blocks (mma.sync's narrowest product, which halves
    the tensor-core work and float32 scaling of 16-token blocks and lets the
    compiler hold gate/up in about 70 registers, seven programs a
    multiprocessor), 64-row gate/up programs and 128-row down programs,
    scales applied to the products (``_product``) and loaded a tile ahead
    (``scales_ahead``), the down projection split along K to fill the GPU.
    One token an expert: gate/up in two K pieces, the down projection in
    about six programs a multiprocessor (int4 75 us, nf4 118 us on Mixtral
    shapes; 64-row down programs 77 and 122, one K piece of gate/up 81 and
    131, three pieces 75 and 120, two or four stages 77-81 and 122-128).
    More: about sixteen (int4 257 us, nf4 429 us at 16 tokens, against 275
    and 436).  128-row gate/up programs, which spend
    fewer instructions a weight, timed slower (int4 87 us at one token): six
    programs fit a multiprocessor.  Prefill: 128-token blocks, wgmma,
    weights scaled before the product.  (256-token blocks on eight warps
    with gate and up in separate programs timed faster in one sweep, but
    computed wrong products, so ``FragmentConfig`` refuses eight warps.)
    Letting the down kernel start while gate/up ends (Hopper's programmatic
    dependent launch, its blocks and weight offsets read before it waits)
    timed the same: int4 75.3 us without, 75.4 with at one token, 254 and
    252 at 16.
    """
    per_expert = num_pairs / experts.num_experts
    if per_expert > 32:
        return FragmentConfig(128, 64, 64, 1, 4, 3)
    blocks = min(num_pairs, cdiv(num_pairs, 8) + experts.num_experts)
    per_sm = 6 if per_expert <= 1 else 16
    split = max(1, min(cdiv(per_sm * num_sms, blocks * cdiv(experts.hidden, 128)),
                       experts.intermediate // TILE_K // 8))
    return FragmentConfig(8, 64, 128, split, 4, 3, up_split_k=2 if per_expert <= 1 else 1, warp_mma=True,
                          scale_after_product=True, scales_ahead=True)


@triton.jit
def _weight(off_ptr, lane_base, pair_base, row):
    """(lanes, scale pairs) of one projection of one expert, from row ``row`` of the fragment offsets.

    Both offsets are multiples of 32 elements (``PackedExperts._lanes``), which
    lets the lane loads be 16-byte copies.
    """
    lanes = lane_base + tl.multiple_of(tl.load(off_ptr + row), 32)
    return lanes, pair_base + tl.multiple_of(tl.load(off_ptr + row + 1), 32)


@triton.jit
def _block(ids_ptr, blk_ptr, var_ptr, pid_m, A, VBASE, NUM_V: tl.constexpr, TOPK: tl.constexpr, BM: tl.constexpr):
    """Expert, local variant (-1: not this launch's), row slots, pair ids, validity and tokens of a block."""
    e = tl.load(blk_ptr + pid_m).to(tl.int32)
    v = tl.load(var_ptr + tl.maximum(e, 0)) - VBASE
    v = tl.where((e < 0) | (v < 0) | (v >= NUM_V), -1, v)
    slot = pid_m * BM + tl.arange(0, BM)
    aid = tl.load(ids_ptr + slot)
    valid = aid < A
    return e, v, slot, aid, valid, aid // TOPK


@triton.jit
def _scales(sz_ptr, mt0, kt, row_blocks, SPEC: tl.constexpr, BN: tl.constexpr, POST: tl.constexpr,
            ACT_BF16: tl.constexpr):
    """The scales ``_product`` takes for tile ``kt``: per row (``row_scales``) or per weight (``tile_scales``)."""
    if POST and SPEC // 256 % 64 == 0:
        s, z = row_scales(sz_ptr, mt0, kt, row_blocks, SPEC, BN, ACT_BF16)
    else:
        s, z = tile_scales(sz_ptr, mt0, kt, row_blocks, SPEC, BN)
    return s, z


@triton.jit
def _product(lanes, s, z, xt, xs, acc, tab_ptr, mt0, kt, row_blocks, row_tiles, SPEC: tl.constexpr,
             BN: tl.constexpr, POST: tl.constexpr, ACT_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc`` plus one weight tile times ``xt`` [64, BM]; ``s``, ``z`` from ``_scales``, ``xs`` the sums of ``xt``.

    With ``POST`` (and groups of whole tiles), the tensor cores multiply the
    raw codes and the scales apply to the float32 product:
    ``acc + s (codes . x) + z sum(x)``.  That spends two float32 multiply-adds
    per output element of the tile instead of two packed ones per weight
    pair, which pays with few tokens (16 outputs per 64 weights a row); it is
    also exact up to float32 where scaled weights round to the activation
    dtype.  Otherwise the weights are scaled before the product.
    """
    if POST and SPEC // 256 % 64 == 0:
        w = fragment_codes(lanes, tab_ptr, mt0, kt, row_blocks, row_tiles, SPEC, BN, ACT_BF16, INTERPRET, True)
        acc = acc + mma(w, xt, tl.zeros_like(acc), INTERPRET) * s[:, None]
        if SPEC % 4 == 0:  # int codes: their offset and raw bias (tables have neither)
            acc = acc + z[:, None] * xs[None, :]
    else:
        w = fragment_tile(lanes, s, z, tab_ptr, mt0, kt, row_blocks, row_tiles, SPEC, BN, ACT_BF16, INTERPRET)
        acc = mma(w, xt, acc, INTERPRET)
    return acc


@triton.jit
def _activations(rows, sum_rows, valid, kt, POST: tl.constexpr):
    """Tile ``kt`` of the block's activations, transposed to [64, BM], and (with ``POST``) their sums [BM]."""
    return _tile(rows, valid, kt), _sums(sum_rows, valid, kt, POST)


@triton.jit
def _tile(rows, valid, kt):
    """Tile ``kt`` of the block's activations, transposed to [64, BM]: the products' B operand."""
    return tl.trans(tl.load(rows + kt * 64 + tl.arange(0, 64)[None, :], mask=valid[:, None], other=0.0))


@triton.jit
def _sums(sum_rows, valid, kt, POST: tl.constexpr):
    """The sums [BM] of tile ``kt`` of the block's activations that ``_product`` takes with ``POST``; else 0."""
    if POST:
        xs = tl.load(sum_rows + kt, mask=valid, other=0.0)
    else:
        xs = 0.0
    return xs


@triton.jit
def _gate_up_tile(x_rows, xs_rows, valid, kt, gs, gz, us, uz, acc_g, acc_u, H, I, gl, ul, tab_ptr, mt0,
                  GSPEC: tl.constexpr, USPEC: tl.constexpr, BN: tl.constexpr, POST: tl.constexpr,
                  ACT_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc_g``, ``acc_u`` plus the products of storage tile ``kt``, given its scales (``_scales``)."""
    xt, xs = _activations(x_rows, xs_rows, valid, kt, POST)
    acc_g = _product(gl, gs, gz, xt, xs, acc_g, tab_ptr, mt0, kt, I // 16, H // 64, GSPEC, BN, POST, ACT_BF16,
                     INTERPRET)
    acc_u = _product(ul, us, uz, xt, xs, acc_u, tab_ptr, mt0, kt, I // 16, H // 64, USPEC, BN, POST, ACT_BF16,
                     INTERPRET)
    return acc_g, acc_u


@triton.jit
def _raw_product(wl, word, xt, xs, acc, tab_ptr, mt0, kt, row_blocks, row_tiles, SPEC: tl.constexpr, BN: tl.constexpr,
                 ACT_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """``_product`` scaled after the product, from the row scales' words (``row_scale_words``)."""
    s, z = row_scale_values(word, SPEC, ACT_BF16)
    return _product(wl, s, z, xt, xs, acc, tab_ptr, mt0, kt, row_blocks, row_tiles, SPEC, BN, True, ACT_BF16,
                    INTERPRET)


@triton.jit
def _gate_up_ahead(x_rows, xs_rows, valid, H, I, kt_lo, kt_hi, gl, gp, ul, up, tab_ptr, mt0, GSPEC: tl.constexpr,
                   USPEC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, ACT_BF16: tl.constexpr,
                   INTERPRET: tl.constexpr):
    """``_gate_up`` scaled after the product, each tile's row scales and sums loaded a loop step before it.

    The pipeline copies codes and activations ahead but leaves these small
    loads in the loop, and a loop step that loads and uses them waits a
    memory latency for them.  Loaded at the end of the step before, after
    the last use of the words they replace (so that the compiler need not
    copy them, which would wait for the load), they have one step's work to
    arrive in: int4 at one token took 82 us against 86 on an H200 (64-row
    down programs both).  Asking L2 for tiles further ahead
    (``prefetch.global.L2``) timed far slower (125 us).
    """
    acc_g = tl.zeros([BN, BM], tl.float32)
    acc_u = tl.zeros([BN, BM], tl.float32)
    rb = I // 16
    gw = row_scale_words(gp, mt0, kt_lo, rb, GSPEC, BN)
    uw = row_scale_words(up, mt0, kt_lo, rb, USPEC, BN)
    xs = _sums(xs_rows, valid, kt_lo, True)
    for kt in range(kt_lo, kt_hi):
        xt = _tile(x_rows, valid, kt)
        acc_g = _raw_product(gl, gw, xt, xs, acc_g, tab_ptr, mt0, kt, rb, H // 64, GSPEC, BN, ACT_BF16, INTERPRET)
        acc_u = _raw_product(ul, uw, xt, xs, acc_u, tab_ptr, mt0, kt, rb, H // 64, USPEC, BN, ACT_BF16, INTERPRET)
        nxt = tl.minimum(kt + 1, kt_hi - 1)
        gw = row_scale_words(gp, mt0, nxt, rb, GSPEC, BN)
        uw = row_scale_words(up, mt0, nxt, rb, USPEC, BN)
        xs = _sums(xs_rows, valid, nxt, True)
    return acc_g, acc_u


@triton.jit
def _down_ahead(h_rows, hs_rows, valid, H, I, kt_lo, kt_hi, dl, dp, tab_ptr, mt0, SPEC: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, ACT_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """``_down`` with the loads of ``_gate_up_ahead``: each tile's words loaded a loop step before it."""
    acc = tl.zeros([BN, BM], tl.float32)
    rb = H // 16
    w = row_scale_words(dp, mt0, kt_lo, rb, SPEC, BN)
    hs = _sums(hs_rows, valid, kt_lo, True)
    for kt in range(kt_lo, kt_hi):
        acc = _raw_product(dl, w, _tile(h_rows, valid, kt), hs, acc, tab_ptr, mt0, kt, rb, I // 64, SPEC, BN,
                           ACT_BF16, INTERPRET)
        nxt = tl.minimum(kt + 1, kt_hi - 1)
        w = row_scale_words(dp, mt0, nxt, rb, SPEC, BN)
        hs = _sums(hs_rows, valid, nxt, True)
    return acc


@triton.jit
def _gate_up(x_ptr, stride_x, xsum_ptr, tok, valid, H, I, kt_lo, kt_hi, gl, gp, ul, up, tab_ptr, mt0,
             GSPEC: tl.constexpr, USPEC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, STEP: tl.constexpr,
             POST: tl.constexpr, AHEAD: tl.constexpr, ACT_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """Gate and up products [BN, BM] (float32) over storage tiles [kt_lo, kt_hi), one variant's weights.

    A loop step takes ``STEP`` tiles (1, 2 or 4) and loads all their scales
    first.  Triton's software pipeline copies the codes and activations
    ahead, but not the scale loads: with the weights scaled before the
    product each step waits one memory latency for them (16-bit loads, too
    narrow for its asynchronous copies), so the more tiles share that wait
    the better; scaled after it, they are needed only once the product is
    done.  (Loading per-weight scales a step ahead, or as 32-bit pairs that
    the pipeline takes, made Triton give them layouts that copy every scale
    into every thread.)  The tiles past the last whole step go one at a
    time.  With ``AHEAD``, row scales (``POST``, groups of whole tiles) go
    through ``_gate_up_ahead`` instead, one tile a step.
    """
    x_rows = x_ptr + tok.to(tl.int64)[:, None] * stride_x
    xs_rows = xsum_ptr + tok.to(tl.int64) * (H // 64)
    if AHEAD and POST and GSPEC // 256 % 64 == 0 and USPEC // 256 % 64 == 0:
        return _gate_up_ahead(x_rows, xs_rows, valid, H, I, kt_lo, kt_hi, gl, gp, ul, up, tab_ptr, mt0, GSPEC, USPEC,
                              BM, BN, ACT_BF16, INTERPRET)
    acc_g = tl.zeros([BN, BM], tl.float32)
    acc_u = tl.zeros([BN, BM], tl.float32)
    rb = I // 16
    whole = kt_lo + (kt_hi - kt_lo) // STEP * STEP
    for kt in range(kt_lo, whole, STEP):
        gs0, gz0 = _scales(gp, mt0, kt, rb, GSPEC, BN, POST, ACT_BF16)
        us0, uz0 = _scales(up, mt0, kt, rb, USPEC, BN, POST, ACT_BF16)
        if STEP > 1:
            gs1, gz1 = _scales(gp, mt0, kt + 1, rb, GSPEC, BN, POST, ACT_BF16)
            us1, uz1 = _scales(up, mt0, kt + 1, rb, USPEC, BN, POST, ACT_BF16)
        if STEP > 2:
            gs2, gz2 = _scales(gp, mt0, kt + 2, rb, GSPEC, BN, POST, ACT_BF16)
            us2, uz2 = _scales(up, mt0, kt + 2, rb, USPEC, BN, POST, ACT_BF16)
            gs3, gz3 = _scales(gp, mt0, kt + 3, rb, GSPEC, BN, POST, ACT_BF16)
            us3, uz3 = _scales(up, mt0, kt + 3, rb, USPEC, BN, POST, ACT_BF16)
        acc_g, acc_u = _gate_up_tile(x_rows, xs_rows, valid, kt, gs0, gz0, us0, uz0, acc_g, acc_u, H, I, gl, ul,
                                     tab_ptr, mt0, GSPEC, USPEC, BN, POST, ACT_BF16, INTERPRET)
        if STEP > 1:
            acc_g, acc_u = _gate_up_tile(x_rows, xs_rows, valid, kt + 1, gs1, gz1, us1, uz1, acc_g, acc_u, H,
                                         I, gl, ul, tab_ptr, mt0, GSPEC, USPEC, BN, POST, ACT_BF16, INTERPRET)
        if STEP > 2:
            acc_g, acc_u = _gate_up_tile(x_rows, xs_rows, valid, kt + 2, gs2, gz2, us2, uz2, acc_g, acc_u, H,
                                         I, gl, ul, tab_ptr, mt0, GSPEC, USPEC, BN, POST, ACT_BF16, INTERPRET)
            acc_g, acc_u = _gate_up_tile(x_rows, xs_rows, valid, kt + 3, gs3, gz3, us3, uz3, acc_g, acc_u, H,
                                         I, gl, ul, tab_ptr, mt0, GSPEC, USPEC, BN, POST, ACT_BF16, INTERPRET)
    for kt in range(whole, kt_hi):
        gs0, gz0 = _scales(gp, mt0, kt, rb, GSPEC, BN, POST, ACT_BF16)
        us0, uz0 = _scales(up, mt0, kt, rb, USPEC, BN, POST, ACT_BF16)
        acc_g, acc_u = _gate_up_tile(x_rows, xs_rows, valid, kt, gs0, gz0, us0, uz0, acc_g, acc_u, H, I, gl, ul,
                                     tab_ptr, mt0, GSPEC, USPEC, BN, POST, ACT_BF16, INTERPRET)
    return acc_g, acc_u


@triton.jit
def _projection(x_ptr, stride_x, xsum_ptr, tok, valid, H, I, kt_lo, kt_hi, wl, wp, tab_ptr, mt0,
                SPEC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, POST: tl.constexpr, ACT_BF16: tl.constexpr,
                INTERPRET: tl.constexpr):
    """One of gate or up [BN, BM] (float32) over storage tiles [kt_lo, kt_hi)."""
    acc = tl.zeros([BN, BM], tl.float32)
    x_rows = x_ptr + tok.to(tl.int64)[:, None] * stride_x
    xs_rows = xsum_ptr + tok.to(tl.int64) * (H // 64)
    for kt in range(kt_lo, kt_hi):
        ws, wz = _scales(wp, mt0, kt, I // 16, SPEC, BN, POST, ACT_BF16)
        xt, xs = _activations(x_rows, xs_rows, valid, kt, POST)
        acc = _product(wl, ws, wz, xt, xs, acc, tab_ptr, mt0, kt, I // 16, H // 64, SPEC, BN, POST, ACT_BF16,
                       INTERPRET)
    return acc


@triton.jit
def _down_tile(h_rows, hs_rows, valid, kt, ds, dz, acc, H, I, dl, tab_ptr, mt0, SPEC: tl.constexpr,
               BN: tl.constexpr, POST: tl.constexpr, ACT_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc`` plus the down product of storage tile ``kt``, whose scales are ``ds``, ``dz`` (``_scales``)."""
    ht, hs = _activations(h_rows, hs_rows, valid, kt, POST)
    return _product(dl, ds, dz, ht, hs, acc, tab_ptr, mt0, kt, H // 16, I // 64, SPEC, BN, POST, ACT_BF16, INTERPRET)


@triton.jit
def _down(h_ptr, hsum_ptr, slot, valid, H, I, kt_lo, kt_hi, dl, dp, tab_ptr, mt0,
          SPEC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, STEP: tl.constexpr, POST: tl.constexpr,
          AHEAD: tl.constexpr, ACT_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """Down product [BN, BM] (float32) over storage tiles [kt_lo, kt_hi) of the block's rows of ``h``.

    ``STEP`` tiles (1, 2 or 4) a loop step, with all their scales loaded first
    (see ``_gate_up``); the tiles past the last whole step go one at a time.
    With ``AHEAD``, row scales go through ``_down_ahead`` instead.
    """
    h_rows = h_ptr + slot.to(tl.int64)[:, None] * I
    hs_rows = hsum_ptr + slot.to(tl.int64) * (I // 64)
    if AHEAD and POST and SPEC // 256 % 64 == 0:
        return _down_ahead(h_rows, hs_rows, valid, H, I, kt_lo, kt_hi, dl, dp, tab_ptr, mt0, SPEC, BM, BN, ACT_BF16,
                           INTERPRET)
    acc = tl.zeros([BN, BM], tl.float32)
    rb = H // 16
    whole = kt_lo + (kt_hi - kt_lo) // STEP * STEP
    for kt in range(kt_lo, whole, STEP):
        s0, z0 = _scales(dp, mt0, kt, rb, SPEC, BN, POST, ACT_BF16)
        if STEP > 1:
            s1, z1 = _scales(dp, mt0, kt + 1, rb, SPEC, BN, POST, ACT_BF16)
        if STEP > 2:
            s2, z2 = _scales(dp, mt0, kt + 2, rb, SPEC, BN, POST, ACT_BF16)
            s3, z3 = _scales(dp, mt0, kt + 3, rb, SPEC, BN, POST, ACT_BF16)
        acc = _down_tile(h_rows, hs_rows, valid, kt, s0, z0, acc, H, I, dl, tab_ptr, mt0, SPEC, BN, POST, ACT_BF16,
                         INTERPRET)
        if STEP > 1:
            acc = _down_tile(h_rows, hs_rows, valid, kt + 1, s1, z1, acc, H, I, dl, tab_ptr, mt0, SPEC, BN,
                             POST, ACT_BF16, INTERPRET)
        if STEP > 2:
            acc = _down_tile(h_rows, hs_rows, valid, kt + 2, s2, z2, acc, H, I, dl, tab_ptr, mt0, SPEC, BN,
                             POST, ACT_BF16, INTERPRET)
            acc = _down_tile(h_rows, hs_rows, valid, kt + 3, s3, z3, acc, H, I, dl, tab_ptr, mt0, SPEC, BN,
                             POST, ACT_BF16, INTERPRET)
    for kt in range(whole, kt_hi):
        s0, z0 = _scales(dp, mt0, kt, rb, SPEC, BN, POST, ACT_BF16)
        acc = _down_tile(h_rows, hs_rows, valid, kt, s0, z0, acc, H, I, dl, tab_ptr, mt0, SPEC, BN, POST, ACT_BF16,
                         INTERPRET)
    return acc


@triton.jit
def _prepare_kernel(x_ptr, stride_x, sum_ptr, out_ptr, ticket_ptr, H, tickets, topk_ptr, ids_ptr, blk_ptr, A, E,
                    SUMS: tl.constexpr, TILES: tl.constexpr, SORT: tl.constexpr, BM: tl.constexpr,
                    BA: tl.constexpr, NB: tl.constexpr):
    """Everything the layer's products need first, in one launch: zero ``out`` [T, H] (float32, which the down
    kernels add into) and the ``tickets`` int32 counters (``_finish_pieces``); with ``SUMS``, write the float32
    sums of each 64 entries of x [T, H], which ``_product`` takes out of raw-code products; with ``SORT``,
    program 0 also sorts the pairs into blocks (``align.sort_pairs``).

    At one token each of these costs more in launching than in work: as
    separate launches, the sums and zeroing took 1.3 us and the sort 1.4 us
    of a 78.5 us int4 decode step on an H200.
    """
    t = tl.program_id(0)
    if SORT:
        if t + tl.program_id(1) == 0:
            sort_pairs(topk_ptr, ids_ptr, blk_ptr, A, E, BM, BA, NB)
    program = t * tl.num_programs(1) + tl.program_id(1)
    stride = tl.num_programs(0) * tl.num_programs(1) * 1024
    for start in range(program * 1024, tickets, stride):
        at = start + tl.arange(0, 1024)
        tl.store(ticket_ptr + at, tl.zeros([1024], tl.int32), mask=at < tickets)
    j = tl.program_id(1) * TILES + tl.arange(0, TILES)
    ok = j < H // 64
    cols = j[:, None] * 64 + tl.arange(0, 64)[None, :]
    tl.store(out_ptr + t.to(tl.int64) * H + cols, tl.zeros([TILES, 64], tl.float32), mask=ok[:, None])
    if SUMS:
        x = tl.load(x_ptr + t.to(tl.int64) * stride_x + cols, mask=ok[:, None], other=0.0)
        tl.store(sum_ptr + t.to(tl.int64) * (H // 64) + j, tl.sum(x.to(tl.float32), 1), mask=ok)


@triton.jit
def _store_h(h_ptr, hsum_ptr, offs, mask, slot, valid, n0, h, I, SUMS: tl.constexpr, TILES: tl.constexpr,
             COLS: tl.constexpr):
    """Store ``h`` [TILES * 64 entries of I, COLS slots] and, with ``SUMS``, the sums of each of its 64 entries.

    The down projection's ``_product`` needs, per slot, the sum of each 64
    consecutive entries of h as stored (rounded); ``h`` covers ``TILES`` of
    them from entry ``n0`` (a multiple of 64).
    """
    tl.store(h_ptr + offs, h, mask=mask)
    if SUMS:
        sums = tl.sum(tl.reshape(h.to(tl.float32), [TILES, 64, COLS]), 1)  # [TILES, COLS]
        tile = n0 // 64 + tl.arange(0, TILES)
        ok = (tile < I // 64)[:, None] & valid[None, :]
        tl.store(hsum_ptr + slot.to(tl.int64)[None, :] * (I // 64) + tile[:, None], sums, mask=ok)


@triton.jit
def _gated_kernel(g_ptr, u_ptr, ids_ptr, h_ptr, hsum_ptr, A, I, parts_stride,
                  PARTS: tl.constexpr, BLOCK: tl.constexpr, SUMS: tl.constexpr, ACT_BF16: tl.constexpr,
                  INTERPRET: tl.constexpr):
    """h = silu(sum of the gate pieces) * (sum of the up pieces) for one row slot, in the activation dtype."""
    slot = tl.program_id(0)
    if tl.load(ids_ptr + slot) >= A:  # padding slot
        return
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    offs = slot.to(tl.int64) * I + n
    ok = n < I
    g = tl.zeros([BLOCK], tl.float32)
    u = tl.zeros([BLOCK], tl.float32)
    for p in tl.static_range(PARTS):
        g += tl.load(g_ptr + p * parts_stride + offs, mask=ok, other=0.0)
        u += tl.load(u_ptr + p * parts_stride + offs, mask=ok, other=0.0)
    h = round_to(g / (1.0 + tl.exp(-g)) * u, ACT_BF16, INTERPRET)
    n0 = tl.program_id(1) * BLOCK
    slots = slot + tl.zeros([1], tl.int32)  # as a one-column block, the layout ``_store_h`` takes
    _store_h(h_ptr, hsum_ptr, offs[:, None], ok[:, None], slots, slots >= 0, n0, h[:, None], I, SUMS, BLOCK // 64, 1)


@triton.jit
def _finish_pieces(g_ptr, u_ptr, ticket_ptr, h_ptr, hsum_ptr, offs, mask, slot, valid, n0, acc_g, acc_u, I,
                   parts_stride, PARTS: tl.constexpr, SUMS: tl.constexpr, TILES: tl.constexpr, BM: tl.constexpr,
                   ACT_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """Store this K piece's float32 gate and up products; the last of the ``PARTS`` pieces of a tile to get here
    sums them all, in piece order, and writes h.

    Each tile has a ticket counter (zeroed by ``_prepare_kernel``): the
    barrier puts all of a program's stores before its increment, which
    releases them at GPU scope, and the program that draws the last ticket
    acquires them and reads the pieces from L2.  This replaces a separate
    launch that joined the pieces (2.6 us of a 78.5 us int4 decode step on
    an H200).  The fixed summation order keeps h bitwise reproducible.
    """
    piece = tl.program_id(2)
    tl.store(g_ptr + piece * parts_stride + offs, acc_g, mask=mask)
    tl.store(u_ptr + piece * parts_stride + offs, acc_u, mask=mask)
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), 1, sem="acq_rel")
    if ticket == PARTS - 1:
        g = tl.zeros_like(acc_g)
        u = tl.zeros_like(acc_u)
        for p in tl.static_range(PARTS):
            g += tl.load(g_ptr + p * parts_stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
            u += tl.load(u_ptr + p * parts_stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
        h = round_to(g / (1.0 + tl.exp(-g)) * u, ACT_BF16, INTERPRET)
        _store_h(h_ptr, hsum_ptr, offs, mask, slot, valid, n0, h, I, SUMS, TILES, BM)


@triton.jit
def _fragment_up_kernel(x_ptr, stride_x, xsum_ptr, ids_ptr, blk_ptr, var_ptr, off_ptr, lane_ptr, pair_ptr, tab_ptr,
                        h_ptr, hsum_ptr, g_ptr, u_ptr, ticket_ptr,
                        A, H, I, E, VBASE, k_tiles, parts_stride,
                        G0: tl.constexpr, U0: tl.constexpr, G1: tl.constexpr, U1: tl.constexpr,
                        G2: tl.constexpr, U2: tl.constexpr, G3: tl.constexpr, U3: tl.constexpr,
                        NUM_V: tl.constexpr, TOPK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        PARTS: tl.constexpr, STEP: tl.constexpr, POST: tl.constexpr, AHEAD: tl.constexpr,
                        WARP_MMA: tl.constexpr, ACT_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    e, v, slot, aid, valid, tok = _block(ids_ptr, blk_ptr, var_ptr, tl.program_id(0), A, VBASE, NUM_V, TOPK, BM)
    if v < 0:
        return
    mt0 = tl.program_id(1) * (BN // 16)
    kt_lo = tl.program_id(2) * k_tiles
    kt_hi = tl.minimum(kt_lo + k_tiles, H // 64)
    gl, gp = _weight(off_ptr, lane_ptr, pair_ptr, e * 2)
    ul, up = _weight(off_ptr, lane_ptr, pair_ptr, (E + e) * 2)
    acc_g = tl.zeros([BN, BM], tl.float32)
    acc_u = tl.zeros([BN, BM], tl.float32)
    if v == 0:
        acc_g, acc_u = _gate_up(x_ptr, stride_x, xsum_ptr, tok, valid, H, I, kt_lo, kt_hi, gl, gp, ul, up,
                                tab_ptr, mt0, G0, U0, BM, BN, STEP, POST, AHEAD, ACT_BF16, INTERPRET)
    if NUM_V > 1:
        if v == 1:
            acc_g, acc_u = _gate_up(x_ptr, stride_x, xsum_ptr, tok, valid, H, I, kt_lo, kt_hi, gl, gp, ul, up,
                                    tab_ptr, mt0, G1, U1, BM, BN, STEP, POST, AHEAD, ACT_BF16, INTERPRET)
    if NUM_V > 2:
        if v == 2:
            acc_g, acc_u = _gate_up(x_ptr, stride_x, xsum_ptr, tok, valid, H, I, kt_lo, kt_hi, gl, gp, ul, up,
                                    tab_ptr, mt0, G2, U2, BM, BN, STEP, POST, AHEAD, ACT_BF16, INTERPRET)
    if NUM_V > 3:
        if v == 3:
            acc_g, acc_u = _gate_up(x_ptr, stride_x, xsum_ptr, tok, valid, H, I, kt_lo, kt_hi, gl, gp, ul, up,
                                    tab_ptr, mt0, G3, U3, BM, BN, STEP, POST, AHEAD, ACT_BF16, INTERPRET)
    n = mt0 * 16 + tl.arange(0, BN)
    offs = slot.to(tl.int64)[None, :] * I + n[:, None]
    mask = valid[None, :] & (n < I)[:, None]
    if PARTS == 1:
        h = round_to(acc_g / (1.0 + tl.exp(-acc_g)) * acc_u, ACT_BF16, INTERPRET)
        _store_h(h_ptr, hsum_ptr, offs, mask, slot, valid, mt0 * 16, h, I, POST, BN // 64, BM)
    else:
        _finish_pieces(g_ptr, u_ptr, ticket_ptr, h_ptr, hsum_ptr, offs, mask, slot, valid, mt0 * 16, acc_g, acc_u, I,
                       parts_stride, PARTS, POST, BN // 64, BM, ACT_BF16, INTERPRET)


@triton.jit
def _fragment_projection_kernel(x_ptr, stride_x, xsum_ptr, ids_ptr, blk_ptr, var_ptr, off_ptr, lane_ptr, pair_ptr,
                                tab_ptr, g_ptr, u_ptr,
                                A, H, I, E, VBASE, k_tiles, parts_stride,
                                S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
                                NUM_V: tl.constexpr, TOPK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                POST: tl.constexpr, WARP_MMA: tl.constexpr, ACT_BF16: tl.constexpr,
                                INTERPRET: tl.constexpr):
    """Gate or up alone (odd N blocks: up), for experts whose gate and up share a scheme.

    Half the accumulators of ``_fragment_up_kernel`` let a program take
    twice the tokens, so each dequantized tile feeds twice the products;
    ``_gated_kernel`` joins the two halves.
    """
    e, v, slot, aid, valid, tok = _block(ids_ptr, blk_ptr, var_ptr, tl.program_id(0), A, VBASE, NUM_V, TOPK, BM)
    if v < 0:
        return
    which = tl.program_id(1) % 2
    mt0 = tl.program_id(1) // 2 * (BN // 16)
    kt_lo = tl.program_id(2) * k_tiles
    kt_hi = tl.minimum(kt_lo + k_tiles, H // 64)
    wl, wp = _weight(off_ptr, lane_ptr, pair_ptr, (which * E + e) * 2)
    acc = tl.zeros([BN, BM], tl.float32)
    if v == 0:
        acc = _projection(x_ptr, stride_x, xsum_ptr, tok, valid, H, I, kt_lo, kt_hi, wl, wp, tab_ptr, mt0, S0, BM,
                          BN, POST, ACT_BF16, INTERPRET)
    if NUM_V > 1:
        if v == 1:
            acc = _projection(x_ptr, stride_x, xsum_ptr, tok, valid, H, I, kt_lo, kt_hi, wl, wp, tab_ptr, mt0, S1, BM,
                              BN, POST, ACT_BF16, INTERPRET)
    if NUM_V > 2:
        if v == 2:
            acc = _projection(x_ptr, stride_x, xsum_ptr, tok, valid, H, I, kt_lo, kt_hi, wl, wp, tab_ptr, mt0, S2, BM,
                              BN, POST, ACT_BF16, INTERPRET)
    if NUM_V > 3:
        if v == 3:
            acc = _projection(x_ptr, stride_x, xsum_ptr, tok, valid, H, I, kt_lo, kt_hi, wl, wp, tab_ptr, mt0, S3, BM,
                              BN, POST, ACT_BF16, INTERPRET)
    n = mt0 * 16 + tl.arange(0, BN)
    offs = tl.program_id(2) * parts_stride + slot.to(tl.int64)[None, :] * I + n[:, None]
    mask = valid[None, :] & (n < I)[:, None]
    out = g_ptr if which == 0 else u_ptr
    tl.store(out + offs, acc, mask=mask)


@triton.jit
def _fragment_down_kernel(h_ptr, hsum_ptr, ids_ptr, blk_ptr, var_ptr, off_ptr, lane_ptr, pair_ptr, tab_ptr, wt_ptr,
                          out_ptr, A, H, I, E, VBASE, k_tiles,
                          D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
                          NUM_V: tl.constexpr, TOPK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          STEP: tl.constexpr, POST: tl.constexpr, AHEAD: tl.constexpr, WARP_MMA: tl.constexpr,
                          ACT_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    e, v, slot, aid, valid, tok = _block(ids_ptr, blk_ptr, var_ptr + E, tl.program_id(0), A, VBASE, NUM_V, TOPK, BM)
    if v < 0:
        return
    mt0 = tl.program_id(1) * (BN // 16)
    dl, dp = _weight(off_ptr, lane_ptr, pair_ptr, (2 * E + e) * 2)
    kt_lo = tl.program_id(2) * k_tiles
    kt_hi = tl.minimum(kt_lo + k_tiles, I // 64)
    acc = tl.zeros([BN, BM], tl.float32)
    if v == 0:
        acc = _down(h_ptr, hsum_ptr, slot, valid, H, I, kt_lo, kt_hi, dl, dp, tab_ptr, mt0, D0, BM, BN, STEP, POST,
                    AHEAD, ACT_BF16, INTERPRET)
    if NUM_V > 1:
        if v == 1:
            acc = _down(h_ptr, hsum_ptr, slot, valid, H, I, kt_lo, kt_hi, dl, dp, tab_ptr, mt0, D1, BM, BN, STEP, POST,
                        AHEAD, ACT_BF16, INTERPRET)
    if NUM_V > 2:
        if v == 2:
            acc = _down(h_ptr, hsum_ptr, slot, valid, H, I, kt_lo, kt_hi, dl, dp, tab_ptr, mt0, D2, BM, BN, STEP, POST,
                        AHEAD, ACT_BF16, INTERPRET)
    if NUM_V > 3:
        if v == 3:
            acc = _down(h_ptr, hsum_ptr, slot, valid, H, I, kt_lo, kt_hi, dl, dp, tab_ptr, mt0, D3, BM, BN, STEP, POST,
                        AHEAD, ACT_BF16, INTERPRET)
    wt = tl.load(wt_ptr + aid, mask=valid, other=0.0).to(tl.float32)
    n = mt0 * 16 + tl.arange(0, BN)
    tl.atomic_add(out_ptr + tok.to(tl.int64)[None, :] * H + n[:, None], acc * wt[None, :],
                  mask=valid[None, :] & (n < H)[:, None])


_CHECKED: set[int] = set()


def _check_operand_layout(compiled) -> None:
    """Refuse a compiled fragment kernel whose code conversion is not in the tensor-core operand's layout.

    The conversion asm reads a code's position in its lane word from the
    layout, which holds only where Triton applies it to the dot operand's
    registers (``fragment_tiles``); anywhere else it would silently give
    wrong products.  Checked once per compiled kernel, on its TTGIR (the
    interpreter compiles nothing).
    """
    if compiled is None or id(compiled) in _CHECKED:
        return
    asm_lines = [line for line in compiled.asm.get("ttgir", "").splitlines()
                 if "tt.elementwise_inline_asm" in line and FRAGMENT_ASM_MARK in line]
    if not asm_lines or any("#ttg.dot_op<{opIdx = 0" not in line.rsplit("->", 1)[-1] for line in asm_lines):
        raise RuntimeError(f"Triton {triton.__version__} moved the fragment kernels' code conversion out of the "
                           "tensor-core operand layout, where it would compute wrong products; "
                           "set MOECONV_FRAGMENTS=0 to run these experts in the other kernels")
    _CHECKED.add(id(compiled))


def run_fragments(x: torch.Tensor, flat_ids: torch.Tensor, weights: torch.Tensor, topk: int,
                  experts: PackedExperts, cfg: FragmentConfig, out: torch.Tensor, interpret: bool) -> None:
    """Write the fragment experts' share of the layer to ``out`` (float32 [T, H], zeroed here; other kernels may
    add to it afterwards)."""
    pairs, hid, inter, e = flat_ids.numel(), experts.hidden, experts.intermediate, experts.num_experts
    sort = pairs <= ALIGN_KERNEL_MAX  # in ``_prepare_kernel``; more pairs go through torch's sort first
    if sort:
        ids, blk, sort_meta = kernel_buffers(pairs, e, cfg.block_m, x.device)
        n_blocks = block_bound(pairs, e, cfg.block_m)
    else:
        ids, blk, n_blocks = align_pairs(flat_ids, e, cfg.block_m)
        sort_meta = dict(BM=cfg.block_m, BA=1, NB=1)
    slots = n_blocks * cfg.block_m
    up_tiles, down_tiles = hid // TILE_K, inter // TILE_K
    up_chunk = cdiv(up_tiles, max(1, min(cfg.up_split_k, up_tiles)))
    parts = cdiv(up_tiles, up_chunk)
    separate = cfg.split_gate_up and all(gate == up for gate, up in experts.fragment_up_variants)
    h = torch.empty(slots, inter, dtype=x.dtype, device=x.device)
    g = u = h
    if parts > 1 or separate:  # float32 gate and up products, one per K piece
        g, u = torch.empty(2, parts, slots, inter, dtype=torch.float32, device=x.device)
    post = cfg.scale_after_product
    xsum = hsum = out  # unread unless ``post``
    if post:  # the sums of each 64 activations of x and of h, for ``_product``
        xsum = torch.empty(x.shape[0], up_tiles, dtype=torch.float32, device=x.device)
        hsum = torch.empty(slots, down_tiles, dtype=torch.float32, device=x.device)
    sums = post and any(_needs_sums(code) for pair in experts.fragment_up_variants for code in pair)
    n_blocks_up = cdiv(inter, cfg.up_block_n)
    tickets = n_blocks * n_blocks_up if parts > 1 and not separate else 0  # one counter per gate/up tile
    ticket = torch.empty(max(tickets, 1), dtype=torch.int32, device=x.device)
    launch(_prepare_kernel, (x.shape[0], cdiv(up_tiles, 16)), x, x.stride(0), xsum, out, ticket, hid, tickets,
           flat_ids, ids, blk, pairs, e, SUMS=sums, TILES=16, SORT=sort, **sort_meta, num_warps=8)
    store = (experts.fragment_offsets, experts.lanes, experts.scale_pairs(x.dtype), tables(x.device))
    act_bf16 = x.dtype == torch.bfloat16
    common = dict(TOPK=topk, BM=cfg.block_m, POST=post, ACT_BF16=act_bf16, INTERPRET=interpret,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.max_registers is not None and not interpret:
        common["maxnreg"] = cfg.max_registers
    # WARP_MMA: a compiled kernel per choice
    step = dict(STEP=cfg.k_step, AHEAD=cfg.scales_ahead, WARP_MMA=cfg.warp_mma)
    per_launch = max(1, min(cfg.variants_per_launch, MAX_VARIANTS))
    variant = experts.fragment_variant
    with _warp_mma(cfg.warp_mma and not interpret):
        for base in range(0, len(experts.fragment_up_variants), per_launch):
            chunk = experts.fragment_up_variants[base:base + per_launch]
            padded = chunk + (chunk[0],) * (MAX_VARIANTS - len(chunk))
            specs_kw = {f"{name}{i}": code for i, pair in enumerate(padded) for name, code in zip("GU", pair)}
            if separate:
                grid = (n_blocks, 2 * n_blocks_up, parts)
                compiled = launch(
                    _fragment_projection_kernel, grid, x, x.stride(0), xsum, ids, blk, variant, *store, g, u, pairs,
                    hid, inter, e, base, up_chunk, slots * inter, NUM_V=len(chunk), BN=cfg.up_block_n,
                    WARP_MMA=cfg.warp_mma, **{f"S{i}": pair[0] for i, pair in enumerate(padded)}, **common)
            else:
                compiled = launch(
                    _fragment_up_kernel, (n_blocks, n_blocks_up, parts), x, x.stride(0), xsum, ids, blk, variant,
                    *store, h, hsum, g, u, ticket, pairs, hid, inter, e, base, up_chunk, slots * inter,
                    NUM_V=len(chunk), BN=cfg.up_block_n, PARTS=parts, **step, **specs_kw, **common)
            _check_operand_layout(compiled)
        if separate:
            launch(_gated_kernel, (slots, cdiv(inter, 1024)), g, u, ids, h, hsum, pairs, inter, slots * inter,
                   PARTS=parts, BLOCK=1024, SUMS=post, ACT_BF16=act_bf16, INTERPRET=interpret)
        down_chunk = cdiv(down_tiles, max(1, min(cfg.split_k, down_tiles)))
        for base in range(0, len(experts.fragment_down_variants), per_launch):
            chunk = experts.fragment_down_variants[base:base + per_launch]
            padded = chunk + (chunk[0],) * (MAX_VARIANTS - len(chunk))
            grid = (n_blocks, cdiv(hid, cfg.down_block_n), cdiv(down_tiles, down_chunk))
            _check_operand_layout(launch(_fragment_down_kernel, grid, h, hsum, ids, blk, variant, *store, weights, out,
                                         pairs, hid, inter, e, base, down_chunk, NUM_V=len(chunk), BN=cfg.down_block_n,
                                         **step, **{f"D{i}": code for i, code in enumerate(padded)}, **common))


def _needs_sums(code: int) -> bool:
    """Whether ``_product`` with ``scale_after_product`` reads the activations' sums for a spec code
    (``specs.spec_code``): int codes in groups of whole tiles."""
    return code % 4 == FAM_INT and (code >> 8) % TILE_K == 0


@contextlib.contextmanager
def _warp_mma(enabled: bool):
    """Kernels compiled inside use warps' ``mma.sync`` instead of Hopper's wgmma (Triton's ``DISABLE_MMA_V3``).

    With 16 tokens a block a K tile is a chain of the smallest wgmma, which
    the warp group waits for before the next tile's codes; mma.sync measured
    1.04x faster at one token and 1.06x at 16 on an H200 (0.57x at 2,048
    tokens, so prefill keeps wgmma).  Both read the same operand layout, which
    ``_check_operand_layout`` checks either way.  Triton reads the variable
    when it compiles and keys its disk cache on it; the kernels take the
    choice as a constexpr (``WARP_MMA``), so its in-process cache keeps one
    compiled kernel per choice.  While set the variable is process-wide: a
    kernel another thread compiles at that moment also gets mma.sync, which
    is slower for it, never wrong.
    """
    if not enabled or _NO_WGMMA in os.environ:
        yield
        return
    os.environ[_NO_WGMMA] = "1"
    try:
        yield
    finally:
        del os.environ[_NO_WGMMA]


_NO_WGMMA = "DISABLE_MMA_V3"
