"""Pairs sorted by expert and padded to blocks: the routing step of both fused MoE paths (as vLLM's
``moe_align_block_size``).

A pair is one (token, expert) choice of the router, numbered ``token * k +
j``.  The kernels take blocks of ``block_m`` pairs of one expert:
``ids[b * block_m + i]`` is the i-th pair of block b (or ``A``, the number
of pairs, for padding) and ``blk[b]`` the block's expert (-1 past the last
block).  The number of blocks is bounded on the host, without
synchronising, so that a whole layer can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, next_power_of_2

#: Largest number of pairs the one-program kernel sorts; more go through torch's sort.
ALIGN_KERNEL_MAX = 4096


@triton.jit
def sort_pairs(topk_ptr, ids_ptr, blk_ptr, A, E, BM: tl.constexpr, BA: tl.constexpr, NB: tl.constexpr):
    """Write ``ids`` and ``blk`` for the ``A`` expert choices at ``topk_ptr``, in one program.

    Loops over experts with prefix sums, so it costs O(E * A): meant for
    decode and modest batches (``ALIGN_KERNEL_MAX``).  A device function, so
    that a kernel with other work for the same layer can sort in one of its
    programs (``fragment_moe._prepare_kernel``).
    """
    i = tl.arange(0, BA)
    ok = i < A
    ex = tl.load(topk_ptr + i, mask=ok, other=-1).to(tl.int32)
    b = tl.arange(0, NB)
    pos = tl.zeros([BA], tl.int32)
    blk = tl.full([NB], -1, tl.int32)
    start = tl.zeros([], tl.int32)
    for e in range(E):
        m = (ex == e).to(tl.int32)
        pos = tl.where(m != 0, start * BM + tl.cumsum(m, 0) - 1, pos)
        n_blk = (tl.sum(m, 0) + BM - 1) // BM
        blk = tl.where((b >= start) & (b < start + n_blk), e, blk)
        start += n_blk
    tl.store(ids_ptr + tl.arange(0, NB * BM), A)
    tl.debug_barrier()
    tl.store(ids_ptr + pos, i, mask=ok)
    tl.store(blk_ptr + b, blk)


@triton.jit
def _align_kernel(topk_ptr, ids_ptr, blk_ptr, A, E, BM: tl.constexpr, BA: tl.constexpr, NB: tl.constexpr):
    sort_pairs(topk_ptr, ids_ptr, blk_ptr, A, E, BM, BA, NB)


def block_bound(pairs: int, num_experts: int, block_m: int) -> int:
    """Most blocks ``pairs`` can need: each expert's last block may be partial."""
    return min(pairs, cdiv(pairs, block_m) + num_experts)


def kernel_buffers(pairs: int, num_experts: int, block_m: int, device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``ids`` and ``blk`` for ``sort_pairs`` (sized to its power-of-two block count) and its constexprs."""
    nb = next_power_of_2(block_bound(pairs, num_experts, block_m))
    ids = torch.empty(nb * block_m, dtype=torch.int32, device=device)
    blk = torch.empty(nb, dtype=torch.int32, device=device)
    return ids, blk, dict(BM=block_m, BA=next_power_of_2(pairs), NB=nb)


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sorted pair ids [n_blocks*BM] padded with A, expert of each block [n_blocks] or -1, n_blocks)."""
    flat = topk_ids.reshape(-1)
    a = flat.numel()
    bound = block_bound(a, num_experts, block_m)
    if a <= ALIGN_KERNEL_MAX:
        ids, blk, meta = kernel_buffers(a, num_experts, block_m, flat.device)
        launch(_align_kernel, (1,), flat, ids, blk, a, num_experts, **meta, num_warps=8)
        return ids, blk, bound
    flat = flat.long()
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    blocks = (counts + block_m - 1) // block_m
    ends = torch.cumsum(blocks, 0)
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    rank = torch.arange(a, device=flat.device) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    ids = torch.full((bound * block_m,), a, dtype=torch.int32, device=flat.device)
    ids[(ends - blocks)[sorted_e] * block_m + rank] = order.to(torch.int32)
    blk = torch.searchsorted(ends, torch.arange(bound, device=flat.device), right=True)
    blk = torch.where(blk < num_experts, blk, -1).to(torch.int32)
    return ids, blk, bound
