"""Fused MoE layer on packed experts: y[t] = sum_j w[t,j] * down_e(silu(gate_e x[t]) * up_e x[t]), e = ids[t,j].

Two kernels, each one launch for every expert whatever its scheme:

* ``_moe_up_kernel``: per (block of routed tokens of one expert, block of the
  intermediate dim): gate and up products with weights dequantized inside the
  K loop, SiLU(gate) * up in the epilogue, written to ``h`` (activation dtype).
* ``_moe_down_kernel``: per (token block, hidden block, K split): the down
  product over ``h``, scaled by the router weight of each (token, expert)
  pair in the epilogue and atomically added to a float32 output.

Mixed precision: each expert's weights carry a variant number.  A kernel is
compiled with the spec codes of up to ``MAX_VARIANTS`` variants as constants
and branches on the block's variant once, outside the K loop, so each branch
is a loop specialised to one scheme; ``MoeConfig.variants_per_launch`` says
how many variants one launch takes (1: one launch per scheme group, whose
programs for other experts exit at once; up to 4: one launch for all).

Two paths, chosen by the number of (token, expert) pairs:

* ``gemv`` (decode): one program per pair and N block, no routing
  preprocessing (the pair list is ``topk_ids`` itself); products are
  multiply-adds of planes of the codes with the matching activations
  (``tiles.gemv_tile``: codes read as 32-bit words, activations and the
  intermediate ``h`` in float32) into float32 partial sums reduced once after
  the loop; the down projection is split along K to fill the GPU.
* ``dot`` (batches, prefill): pairs sorted by expert and padded to blocks of
  BM (as vLLM's ``moe_align_block_size``), tensor-core ``tl.dot`` on
  dequantized BF16/FP16 tiles.

Experts stored in the fragment layout are not run here: ``fused_moe`` hands
them to ``fragment_moe`` and adds both shares into one output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .align import align_pairs
from .dequant import tables
from .experts import PackedExperts
from .fragment_moe import FragmentConfig, choose_fragment_config, run_fragments
from .launch import cdiv, launch
from .tiles import dequant_tile, gemv_bounds, gemv_tile, gemv_width, mma, one_bits, round_to

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Variants compiled into one launch (more take further launches).
MAX_VARIANTS = 4


@dataclass(frozen=True)
class MoeConfig:
    """Tiling of one ``fused_moe`` call; ``choose_config`` picks it, benchmarks may override."""

    mode: str  # "gemv" or "dot"
    block_m: int
    up_block_n: int
    down_block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    unroll: int = 4  # gemv: K tiles per loop step
    variants_per_launch: int = MAX_VARIANTS


def choose_config(num_pairs: int, experts: PackedExperts, num_sms: int) -> MoeConfig:
    """Tiling by the number of (token, expert) pairs: the best configurations of the H100 sweeps.

    benchmarks/moe_kernels.py --sweep measured them (Mixtral shapes): gemv
    with 32/64-wide N blocks and 4 K tiles per step for one token; tensor-core
    blocks of 16 tokens for batches of 16; 128 x 64 tiles for prefill.  All
    schemes of a layer share one launch per stage, which beat one launch per
    scheme group (the measured alternative) at every batch size.
    """
    e, hidden, inter = experts.num_experts, experts.hidden, experts.intermediate
    if num_pairs <= 8:
        split = _split_for(num_pairs * cdiv(hidden, 64), inter, 64 * 4, num_sms)
        return MoeConfig("gemv", 1, 32, 64, 64, split, 4, 3, unroll=4)
    per_expert = num_pairs / e
    if per_expert <= 16:
        bm, bn = 16, 32
    elif per_expert <= 64:
        bm, bn = 64, 64
    else:
        bm, bn = 128, 64
    blocks = min(num_pairs, cdiv(num_pairs, bm) + e)
    split = _split_for(blocks * cdiv(hidden, bn), inter, 64, num_sms)
    return MoeConfig("dot", bm, bn, bn, 64, split, 4, 3)


def _split_for(programs: int, k: int, step: int, num_sms: int) -> int:
    """K splits that bring the down projection to about four programs per multiprocessor (>= 4 steps each)."""
    want = cdiv(4 * num_sms, max(programs, 1))
    return max(1, min(want, cdiv(k, 4 * step)))


def k_step(cfg: MoeConfig) -> int:
    """Columns one K loop step covers at most; K splits are multiples of it, so no step straddles two."""
    return cfg.block_k * (cfg.unroll if cfg.mode == "gemv" else 1)


@triton.jit
def _weight_ptrs(off_ptr, u8_ptr, f16_ptr, f32_ptr, row):
    """Base pointers (q, s, z, fa, fb, b) of one projection of one expert, from row ``row`` of the offsets."""
    q = u8_ptr + tl.multiple_of(tl.load(off_ptr + row), 16)
    s = f16_ptr + tl.load(off_ptr + row + 1)
    z = f16_ptr + tl.load(off_ptr + row + 2)
    fa = f32_ptr + tl.load(off_ptr + row + 3)
    fb = f32_ptr + tl.load(off_ptr + row + 4)
    b = u8_ptr + tl.load(off_ptr + row + 5)
    return q, s, z, fa, fb, b


@triton.jit
def _gate_up(x_ptr, stride_x, tok, valid, H, gq, gs, gz, gfa, gfb, gb, uq, us, uz, ufa, ufb, ub, tab_ptr, one, n, n_ok,
             GSPEC: tl.constexpr, USPEC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK_MAX: tl.constexpr,
             UNROLL: tl.constexpr, USE_DOT: tl.constexpr, ACT_BF16: tl.constexpr, INTERPRET: tl.constexpr,
             BOUNDS: tl.constexpr):
    """gate and up products [BM, BN] (float32) of the block's tokens with one variant's weights."""
    GG: tl.constexpr = GSPEC // 256
    GU: tl.constexpr = USPEC // 256
    PG: tl.constexpr = GG & -GG
    PU: tl.constexpr = GU & -GU
    P: tl.constexpr = PG if PG < PU else PU
    BK: tl.constexpr = P if P < BK_MAX else BK_MAX
    if USE_DOT:
        acc_g = tl.zeros([BM, BN], tl.float32)
        acc_u = tl.zeros([BM, BN], tl.float32)
    else:
        acc_g = tl.zeros([BN, gemv_width(GSPEC, BK)], tl.float32)
        acc_u = tl.zeros([BN, gemv_width(USPEC, BK)], tl.float32)
    x_rows = x_ptr + tok.to(tl.int64)[:, None] * stride_x
    if USE_DOT:
        for k0 in range(0, H, BK):
            kk = k0 + tl.arange(0, BK)
            xa = tl.load(x_rows + kk[None, :], mask=valid[:, None] & (kk < H)[None, :], other=0.0)
            wg = dequant_tile(gq, gs, gz, gfa, gfb, gb, tab_ptr, n, n_ok, k0, H, GSPEC, BK)
            wu = dequant_tile(uq, us, uz, ufa, ufb, ub, tab_ptr, n, n_ok, k0, H, USPEC, BK)
            acc_g = mma(xa, tl.trans(round_to(wg, ACT_BF16, INTERPRET)), acc_g, INTERPRET)
            acc_u = mma(xa, tl.trans(round_to(wu, ACT_BF16, INTERPRET)), acc_u, INTERPRET)
    else:
        # UNROLL independent tiles per step keep more packed bytes in flight per thread.
        for k0 in range(0, H, BK * UNROLL):
            for r in tl.static_range(UNROLL):
                acc_g = gemv_tile(acc_g, x_rows, valid[:, None], gq, gs, gz, gfa, gfb, gb, tab_ptr, one, n, n_ok,
                                  k0 + r * BK, H, GSPEC, BK, BOUNDS)
                acc_u = gemv_tile(acc_u, x_rows, valid[:, None], uq, us, uz, ufa, ufb, ub, tab_ptr, one, n, n_ok,
                                  k0 + r * BK, H, USPEC, BK, BOUNDS)
    if not USE_DOT:
        acc_g = tl.sum(acc_g, axis=1)[None, :]
        acc_u = tl.sum(acc_u, axis=1)[None, :]
    return acc_g, acc_u


@triton.jit
def _down(h_ptr, slot, valid, I, k_lo, k_hi, q, s, z, fa, fb, b, tab_ptr, one, n, n_ok,
          SPEC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK_MAX: tl.constexpr,
          UNROLL: tl.constexpr, USE_DOT: tl.constexpr, ACT_BF16: tl.constexpr, INTERPRET: tl.constexpr,
          BOUNDS: tl.constexpr):
    """Down product [BM, BN] (float32) over columns [k_lo, k_hi) of the block's rows of ``h``."""
    G: tl.constexpr = SPEC // 256
    P: tl.constexpr = G & -G
    BK: tl.constexpr = P if P < BK_MAX else BK_MAX
    if USE_DOT:
        acc = tl.zeros([BM, BN], tl.float32)
    else:
        acc = tl.zeros([BN, gemv_width(SPEC, BK)], tl.float32)
    h_rows = h_ptr + slot.to(tl.int64)[:, None] * I
    if USE_DOT:
        for k0 in range(k_lo, k_hi, BK):
            kk = k0 + tl.arange(0, BK)
            a = tl.load(h_rows + kk[None, :], mask=valid[:, None] & (kk < I)[None, :], other=0.0)
            w = dequant_tile(q, s, z, fa, fb, b, tab_ptr, n, n_ok, k0, I, SPEC, BK)
            acc = mma(a, tl.trans(round_to(w, ACT_BF16, INTERPRET)), acc, INTERPRET)
    else:
        for k0 in range(k_lo, k_hi, BK * UNROLL):
            for r in tl.static_range(UNROLL):
                # K splits are multiples of the unrolled step, so no step crosses into the next split.
                acc = gemv_tile(acc, h_rows, valid[:, None], q, s, z, fa, fb, b, tab_ptr, one, n, n_ok, k0 + r * BK, I,
                                SPEC, BK, BOUNDS)
    if not USE_DOT:
        acc = tl.sum(acc, axis=1)[None, :]
    return acc


@triton.jit
def _block_rows(ids_ptr, blk_ptr, var_ptr, vrow, pid_m, A, VBASE, NUM_V: tl.constexpr, TOPK: tl.constexpr,
                SORTED: tl.constexpr, BM: tl.constexpr):
    """Expert, local variant, row slots, pair ids, validity and token ids of block ``pid_m``."""
    e = tl.load(blk_ptr + pid_m).to(tl.int32)
    v = tl.load(var_ptr + vrow + tl.maximum(e, 0)) - VBASE
    v = tl.where((e < 0) | (v < 0) | (v >= NUM_V), -1, v)
    slot = pid_m * BM + tl.arange(0, BM)
    if SORTED:
        aid = tl.load(ids_ptr + slot)
    else:
        aid = slot
    valid = aid < A
    return e, v, slot, aid, valid, aid // TOPK


@triton.jit
def _moe_up_kernel(x_ptr, stride_x, ids_ptr, blk_ptr, var_ptr, off_ptr, u8_ptr, f16_ptr, f32_ptr, tab_ptr, h_ptr,
                   A, H, I, E, VBASE,
                   G0: tl.constexpr, U0: tl.constexpr, G1: tl.constexpr, U1: tl.constexpr,
                   G2: tl.constexpr, U2: tl.constexpr, G3: tl.constexpr, U3: tl.constexpr,
                   NUM_V: tl.constexpr, TOPK: tl.constexpr, SORTED: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK_MAX: tl.constexpr, UNROLL: tl.constexpr,
                   USE_DOT: tl.constexpr, ACT_BF16: tl.constexpr, INTERPRET: tl.constexpr, BOUNDS: tl.constexpr):
    pid_m = tl.program_id(0)
    e, v, slot, aid, valid, tok = _block_rows(ids_ptr, blk_ptr, var_ptr, 0, pid_m, A, VBASE, NUM_V, TOPK, SORTED, BM)
    if v < 0:
        return
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = n < I
    gq, gs, gz, gfa, gfb, gb = _weight_ptrs(off_ptr, u8_ptr, f16_ptr, f32_ptr, e * 6)
    uq, us, uz, ufa, ufb, ub = _weight_ptrs(off_ptr, u8_ptr, f16_ptr, f32_ptr, (E + e) * 6)
    one = one_bits(tab_ptr)
    acc_g = tl.zeros([BM, BN], tl.float32)
    acc_u = tl.zeros([BM, BN], tl.float32)
    if v == 0:
        acc_g, acc_u = _gate_up(x_ptr, stride_x, tok, valid, H, gq, gs, gz, gfa, gfb, gb, uq, us, uz, ufa, ufb, ub,
                                tab_ptr, one, n, n_ok, G0, U0, BM, BN, BK_MAX, UNROLL, USE_DOT, ACT_BF16, INTERPRET,
                                BOUNDS)
    if NUM_V > 1:
        if v == 1:
            acc_g, acc_u = _gate_up(x_ptr, stride_x, tok, valid, H, gq, gs, gz, gfa, gfb, gb, uq, us, uz, ufa, ufb,
                                    ub, tab_ptr, one, n, n_ok, G1, U1, BM, BN, BK_MAX, UNROLL, USE_DOT, ACT_BF16,
                                    INTERPRET, BOUNDS)
    if NUM_V > 2:
        if v == 2:
            acc_g, acc_u = _gate_up(x_ptr, stride_x, tok, valid, H, gq, gs, gz, gfa, gfb, gb, uq, us, uz, ufa, ufb,
                                    ub, tab_ptr, one, n, n_ok, G2, U2, BM, BN, BK_MAX, UNROLL, USE_DOT, ACT_BF16,
                                    INTERPRET, BOUNDS)
    if NUM_V > 3:
        if v == 3:
            acc_g, acc_u = _gate_up(x_ptr, stride_x, tok, valid, H, gq, gs, gz, gfa, gfb, gb, uq, us, uz, ufa, ufb,
                                    ub, tab_ptr, one, n, n_ok, G3, U3, BM, BN, BK_MAX, UNROLL, USE_DOT, ACT_BF16,
                                    INTERPRET, BOUNDS)
    hval = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    if USE_DOT:  # the tensor-core down product reads h in the activation dtype; gemv reads float32
        hval = round_to(hval, ACT_BF16, INTERPRET)
    tl.store(h_ptr + slot.to(tl.int64)[:, None] * I + n[None, :], hval, mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _moe_down_kernel(h_ptr, ids_ptr, blk_ptr, var_ptr, off_ptr, u8_ptr, f16_ptr, f32_ptr, tab_ptr, wt_ptr, out_ptr,
                     A, H, I, E, VBASE, k_chunk,
                     D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
                     NUM_V: tl.constexpr, TOPK: tl.constexpr, SORTED: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK_MAX: tl.constexpr, UNROLL: tl.constexpr,
                     USE_DOT: tl.constexpr, ACT_BF16: tl.constexpr, INTERPRET: tl.constexpr, BOUNDS: tl.constexpr):
    pid_m = tl.program_id(0)
    e, v, slot, aid, valid, tok = _block_rows(ids_ptr, blk_ptr, var_ptr, E, pid_m, A, VBASE, NUM_V, TOPK, SORTED, BM)
    if v < 0:
        return
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = n < H
    q, s, z, fa, fb, b = _weight_ptrs(off_ptr, u8_ptr, f16_ptr, f32_ptr, (2 * E + e) * 6)
    one = one_bits(tab_ptr)
    k_lo = tl.program_id(2) * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, I)
    acc = tl.zeros([BM, BN], tl.float32)
    if v == 0:
        acc = _down(h_ptr, slot, valid, I, k_lo, k_hi, q, s, z, fa, fb, b, tab_ptr, one, n, n_ok,
                    D0, BM, BN, BK_MAX, UNROLL, USE_DOT, ACT_BF16, INTERPRET, BOUNDS)
    if NUM_V > 1:
        if v == 1:
            acc = _down(h_ptr, slot, valid, I, k_lo, k_hi, q, s, z, fa, fb, b, tab_ptr, one, n, n_ok,
                        D1, BM, BN, BK_MAX, UNROLL, USE_DOT, ACT_BF16, INTERPRET, BOUNDS)
    if NUM_V > 2:
        if v == 2:
            acc = _down(h_ptr, slot, valid, I, k_lo, k_hi, q, s, z, fa, fb, b, tab_ptr, one, n, n_ok,
                        D2, BM, BN, BK_MAX, UNROLL, USE_DOT, ACT_BF16, INTERPRET, BOUNDS)
    if NUM_V > 3:
        if v == 3:
            acc = _down(h_ptr, slot, valid, I, k_lo, k_hi, q, s, z, fa, fb, b, tab_ptr, one, n, n_ok,
                        D3, BM, BN, BK_MAX, UNROLL, USE_DOT, ACT_BF16, INTERPRET, BOUNDS)
    wt = tl.load(wt_ptr + aid, mask=valid, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + tok.to(tl.int64)[:, None] * H + n[None, :], acc * wt[:, None],
                  mask=valid[:, None] & n_ok[None, :])


_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def fused_moe(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: PackedExperts,
              config: MoeConfig | None = None, fragment_config: FragmentConfig | None = None) -> torch.Tensor:
    """The routed-experts output [T, H] of a MoE layer, in ``hidden``'s dtype (bfloat16 or float16).

    Experts in the fragment layout run in ``fragment_moe``'s kernels, the
    others in this module's; both add into one float32 output.
    """
    _check_inputs(hidden, topk_ids, topk_weights, experts)
    t, hid = hidden.shape
    topk = topk_ids.shape[1]
    pairs = t * topk
    if t == 0:
        return hidden.new_empty(0, hid)
    flat_ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    if experts.fragment_up_variants:  # run_fragments zeroes ``out`` in a launch it makes anyway
        out = torch.empty(t, hid, dtype=torch.float32, device=hidden.device)
        fcfg = fragment_config or choose_fragment_config(pairs, experts, _num_sms(hidden.device))
        x = hidden if hidden.stride(1) == 1 else hidden.contiguous()
        run_fragments(x, flat_ids, weights, topk, experts, fcfg, out, INTERPRET)
    else:
        out = torch.zeros(t, hid, dtype=torch.float32, device=hidden.device)
    if experts.up_variants:
        cfg = config or choose_config(pairs, experts, _num_sms(hidden.device))
        _run(hidden, flat_ids, weights, topk, experts, cfg, out)
    return out.to(hidden.dtype)


def _run(hidden: torch.Tensor, flat_ids: torch.Tensor, weights: torch.Tensor, topk: int, experts: PackedExperts,
         cfg: MoeConfig, out: torch.Tensor) -> None:
    """Add the share of the experts outside the fragment layout to ``out`` (float32 [T, H])."""
    pairs, hid = flat_ids.numel(), experts.hidden
    gemv = cfg.mode == "gemv"
    if gemv:  # gemv reads each activation once per code plane: float32 spares a conversion per read
        x = hidden.float()
    else:
        x = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    if gemv:
        if cfg.block_m != 1:
            raise ValueError("the gemv path takes one (token, expert) pair per program: block_m must be 1")
        ids, blk, n_blocks = flat_ids, flat_ids, pairs
    else:
        ids, blk, n_blocks = align_pairs(flat_ids, experts.num_experts, cfg.block_m)
    inter = experts.intermediate
    h = torch.empty(n_blocks * cfg.block_m, inter, dtype=torch.float32 if gemv else hidden.dtype, device=hidden.device)
    tab = tables(hidden.device)
    common = dict(TOPK=topk, SORTED=cfg.mode == "dot", BM=cfg.block_m, BK_MAX=cfg.block_k, UNROLL=cfg.unroll,
                  USE_DOT=not gemv, ACT_BF16=hidden.dtype == torch.bfloat16, INTERPRET=INTERPRET,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    store = (experts.offsets, experts.u8, experts.f16, experts.f32, tab)
    e = experts.num_experts
    per_launch = max(1, min(cfg.variants_per_launch, MAX_VARIANTS))
    for base in range(0, len(experts.up_variants), per_launch):
        chunk = experts.up_variants[base:base + per_launch]
        padded = chunk + (chunk[0],) * (MAX_VARIANTS - len(chunk))
        specs_kw = {f"{name}{i}": code for i, pair in enumerate(padded) for name, code in zip("GU", pair)}
        grid = (n_blocks, cdiv(inter, cfg.up_block_n))
        launch(_moe_up_kernel, grid, x, x.stride(0), ids, blk, experts.variant, *store, h, pairs, hid, inter, e,
               base, NUM_V=len(chunk), BN=cfg.up_block_n,
               BOUNDS=gemv_bounds(inter, cfg.up_block_n, hid, cfg.block_k, cfg.unroll), **specs_kw, **common)
    k_chunk = cdiv(cdiv(inter, cfg.split_k), k_step(cfg)) * k_step(cfg)
    for base in range(0, len(experts.down_variants), per_launch):
        chunk = experts.down_variants[base:base + per_launch]
        padded = chunk + (chunk[0],) * (MAX_VARIANTS - len(chunk))
        grid = (n_blocks, cdiv(hid, cfg.down_block_n), cdiv(inter, k_chunk))
        launch(_moe_down_kernel, grid, h, ids, blk, experts.variant, *store, weights, out, pairs, hid, inter, e,
               base, k_chunk, NUM_V=len(chunk), BN=cfg.down_block_n,
               BOUNDS=gemv_bounds(hid, cfg.down_block_n, inter, cfg.block_k, cfg.unroll),
               **{f"D{i}": code for i, code in enumerate(padded)}, **common)


def _check_inputs(hidden, topk_ids, topk_weights, experts: PackedExperts) -> None:
    if hidden.dim() != 2 or hidden.shape[1] != experts.hidden:
        raise ValueError(f"hidden must be [tokens, {experts.hidden}], got {list(hidden.shape)}")
    if hidden.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"hidden must be bfloat16 or float16, got {hidden.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0] or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids and topk_weights must both be [{hidden.shape[0]}, k], "
                         f"got {list(topk_ids.shape)} and {list(topk_weights.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    for name, t in (("hidden", hidden), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if t.device != experts.device:
            raise ValueError(f"{name} is on {t.device}, the experts on {experts.device}")
