"""Dequantize one stored weight to BF16/FP16 with a Triton kernel, for every scheme of format v1.

Used where a whole expert must be materialised (prefill through dense GEMMs,
export).  The result is the float32 formula of the spec rounded once to the
output dtype, bit for bit: the kernel is compiled without FMA contraction so
that the double-quantized absmax ``DYNAMIC_MAP[q] * scale + offset`` rounds
after the multiply, as the reference does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeconv_numpy.schemes import DOUBLE_QUANT_BLOCK, scheme_info

from . import specs
from .tiles import dequant_tile, round_to

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TABLES: dict[torch.device, torch.Tensor] = {}


def tables(device: torch.device) -> torch.Tensor:
    """The float32 code tables on ``device``, built once per device."""
    if device not in _TABLES:
        _TABLES[device] = specs.code_tables(device)
    return _TABLES[device]


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, z_ptr, fa_ptr, fb_ptr, b_ptr, tab_ptr, out_ptr, N, K,
                    SPEC: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, K_FASTEST: tl.constexpr,
                    TO_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """One [BN, BK] tile of the [N, K] view per program, on a 1-D grid.

    ``K_FASTEST``: consecutive programs take consecutive K tiles of the same
    rows (else consecutive row blocks of the same K tile).  Measured on an
    H100 against the same kernel walking several tiles per program in a
    pipelined loop: one tile per program was faster for every scheme (see
    benchmarks/results/moe_kernels_h100.json).
    """
    pid = tl.program_id(0)
    if K_FASTEST:
        n_k = tl.cdiv(K, BK)
        pid_n, pid_k = pid // n_k, pid % n_k
    else:
        n_n = tl.cdiv(N, BN)
        pid_n, pid_k = pid % n_n, pid // n_n
    rows = pid_n * BN + tl.arange(0, BN)
    k0 = pid_k * BK
    ok = rows < N
    w = dequant_tile(q_ptr, s_ptr, z_ptr, fa_ptr, fb_ptr, b_ptr, tab_ptr, rows, ok, k0, K, SPEC, BK)
    cols = k0 + tl.arange(0, BK)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], round_to(w, TO_BF16, INTERPRET),
             mask=ok[:, None] & (cols < K)[None, :])


@dataclass(frozen=True)
class DequantTiling:
    """Launch shape of the dequant kernel: elements per program, warps, and the order tiles are handed out.

    The default is within measurement noise of the best of the H100 sweeps (4096 to 16384 elements, 4 or 8
    warps).  Handing out K tiles first, at this tile size, gained 4-7% for int4, 5-6% for int8 and 3% for
    int3 in two sweeps, and lost 2% and 11% for nf4 with double quant.
    """

    tile_elems: int = 8192
    num_warps: int = 4
    k_fastest: bool = True


def role_pointers(parts: Mapping[str, torch.Tensor], family: str, filler: torch.Tensor) -> tuple:
    """(q, s, z, fa, fb, b) as ``dequant_tile`` names them; roles a scheme lacks get ``filler`` (never read)."""
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
    info = scheme_info(scheme)
    tiling = tiling or DequantTiling()
    rows, cols = shape
    reason = specs.unsupported(scheme, (rows, cols), group_size, fused=False)
    if reason:
        raise ValueError(f"dequantize: {reason}")
    parts = specs.check_parts(parts, scheme, (rows, cols), group_size, double_quant)
    family = info.family
    spec = specs.spec_code(scheme, group_size, double_quant)
    out = torch.empty(rows, cols, dtype=out_dtype, device=parts["qweight"].device)
    if family not in ("nf4", "fp4"):
        _launch(parts, family, spec, out, rows, cols, group_size, tiling)
        return out
    # nf4/fp4: the flat layout seen as rows of one block each; a short last block
    # is dequantized from a zero-padded copy, so the kernel needs no per-byte bounds.
    n = rows * cols
    full = n // group_size
    flat = out.view(-1)
    if full:
        _launch(parts, family, spec, flat, full, group_size, group_size, tiling)
    if full * group_size < n:
        tail = _tail_block(parts, full, group_size)
        block = torch.empty(group_size, dtype=out_dtype, device=out.device)
        _launch(tail, family, spec, block, 1, group_size, group_size, tiling)
        flat[full * group_size:] = block[: n - full * group_size]
    return out


def _tail_block(parts: dict[str, torch.Tensor], block: int, group_size: int) -> dict[str, torch.Tensor]:
    """The parts of nf4/fp4 block ``block`` alone, its codes zero-padded to a whole block."""
    q = parts["qweight"][block * group_size // 2:]
    padded = torch.zeros(group_size // 2, dtype=torch.uint8, device=q.device)
    padded[: q.numel()] = q
    tail = {"qweight": padded}
    if "absmax_q" in parts:
        j = block // DOUBLE_QUANT_BLOCK
        tail.update(absmax_q=parts["absmax_q"][block:block + 1], absmax_scale=parts["absmax_scale"][j:j + 1],
                    absmax_offset=parts["absmax_offset"])
    else:
        tail["absmax"] = parts["absmax"][block:block + 1]
    return tail


def _launch(parts, family, spec, out, n_rows, row_len, group_size, tiling: DequantTiling) -> None:
    """One kernel launch over an [n_rows, row_len] view of the weight, written to ``out`` (contiguous)."""
    tab = tables(parts["qweight"].device)
    bk = specs.tile_k(group_size)
    bn = max(1, min(tiling.tile_elems // bk, triton.next_power_of_2(n_rows)))
    grid = (triton.cdiv(n_rows, bn) * triton.cdiv(row_len, bk),)
    _dequant_kernel[grid](
        *role_pointers(parts, family, tab), tab, out, n_rows, row_len,
        SPEC=spec, BN=bn, BK=bk, K_FASTEST=tiling.k_fastest, TO_BF16=out.dtype == torch.bfloat16, INTERPRET=INTERPRET,
        num_warps=tiling.num_warps, enable_fp_fusion=False,
    )
