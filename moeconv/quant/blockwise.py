"""NF4 / FP4 block-wise quantization with optional double quantization, bit for bit as bitsandbytes.

The target is ``bitsandbytes.functional.quantize_4bit(A, blocksize=g,
quant_type=..., compress_statistics=...)`` of bitsandbytes 0.50 on its CPU
build; bitsandbytes itself is only a test dependency.  What that call does
(read from ``bitsandbytes/backends/default/ops.py``, ``functional.py`` and the
disassembly of ``libbitsandbytes_cpu.so``) and how it is replicated:

* 4-bit codes (``quantize_4bit`` has no CPU kernel; the torch "default" one
  runs): ``absmax = max|x|`` per block of the flattened weight; full blocks
  are scaled by ``x * (1.0 / absmax.clamp(min=1e-38))``, the short last block
  by ``x / am`` with ``am = max|x|.clamp(min=1e-38)`` (and that clamped value
  is what is stored as its absmax); both are clamped to [-1, 1], a no-op for
  the codes (every midpoint lies inside (-1, 1)) that moeconv skips.  The
  code is ``bucketize`` on the midpoints of the sorted table (a value equal
  to a midpoint goes to the lower entry), mapped back through the argsort
  order for FP4, where +0.0 sorts before the -0.0 entry (code 8) -- so tiny
  positive values get code 8.  moeconv does this with the exact table lookup
  of :mod:`.lookup`, ~20x faster than ``bucketize`` on CPU.  Odd ``n`` is
  padded with the code of 0.0 (7 for NF4, 0 for FP4).  Two codes per byte,
  first element in the high nibble.
* double quantization: ``offset = absmax.mean()`` (torch's float32 mean on
  CPU), then ``quantize_blockwise(absmax - offset, blocksize=256)`` whose CPU
  kernel (``quantize_cpu_impl``) is a lookup table, not a nearest search:
  per block ``amax = max|x|``; all-zero blocks get code 0; otherwise
  ``v = clamp(x * (1/amax), -1, 1)``, ``i = (uint16) trunc(fmaf((v + 1) * 0.5,
  65535, 0.5))`` and the code is ``LUT[i]``, where ``LUT[i]`` counts the
  midpoints of DYNAMIC_MAP below ``2i/65535 - 1``.  The fused multiply-add is
  evaluated exactly in float64 and rounded once to float32.

On a CUDA weight (with Triton installed) the whole blocks are quantized by one
fused kernel launch (:mod:`.triton_quant`), bit for bit what the torch code
below computes; that code remains the CPU path and the definition.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from moeconv_numpy.schemes import DOUBLE_QUANT_BLOCK, DYNAMIC_MAP, FP4_CODE, NF4_CODE

from .chunks import chunk_elements, for_each_chunk, use_fused
from .lookup import Codebook

__all__ = [
    "quantize_blockwise4",
    "dequantize_blockwise4",
    "double_quantize",
    "quantize_dynamic",
    "code_tables",
    "codebook",
]

_TABLES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
#: argsort of bitsandbytes' code table (``_get_4bit_quantize_bounds``); identity for NF4.
_ORDER = {
    "nf4": np.arange(16),
    "fp4": np.array([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3]),
}
_LUT_SIZE = 65536


def _dynamic_lut() -> np.ndarray:
    """bitsandbytes' CPU ``build_quantize_lut`` for DYNAMIC_MAP, in float32 like the C code."""
    midpoints = (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) * np.float32(0.5)
    i = np.arange(_LUT_SIZE, dtype=np.float32)
    values = (i + i) / np.float32(_LUT_SIZE - 1) - np.float32(1.0)
    return np.searchsorted(midpoints, values, side="left").astype(np.uint8)


def code_tables(family: str) -> tuple[np.ndarray, np.ndarray]:
    """``(bounds, order)``: midpoints of the sorted code table and the sorted -> code map."""
    order = _ORDER[family]
    sorted_table = _TABLES[family][order]
    bounds = (sorted_table[:-1] + sorted_table[1:]) / np.float32(2)
    return bounds.astype(np.float32), order.astype(np.uint8)


@functools.cache
def codebook(family: str) -> Codebook:
    """bitsandbytes' ``bucketize`` on the midpoints, then the FP4 order map, as a :class:`Codebook`."""
    bounds, order = code_tables(family)
    return Codebook(bounds, None if family == "nf4" else order)


_DEVICE_CACHE: dict[tuple[str, torch.device], torch.Tensor] = {}


def _on(device: torch.device, key: str) -> torch.Tensor:
    """The double-quant lookup table and the dequantization tables, built once per device."""
    found = _DEVICE_CACHE.get((key, device))
    if found is None:
        if key == "dynamic_lut":
            array = _dynamic_lut()
        elif key == "dynamic_map":
            array = DYNAMIC_MAP
        else:
            array = _TABLES[key]
        found = torch.from_numpy(np.array(array)).to(device)
        _DEVICE_CACHE[(key, device)] = found
    return found


def _pack_high_first(codes: torch.Tensor) -> torch.Tensor:
    """Pairs of codes into bytes, the first of each pair in the high nibble (bitsandbytes order)."""
    v = codes.view(torch.int16)  # little-endian lane = c[2j] | c[2j+1] << 8
    return (((v & 0x0F) << 4) | (v >> 8)).to(torch.uint8)


def _block_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """``max |x|`` per row without a full-size ``abs`` temporary (abs of the result keeps -0.0 out)."""
    return torch.maximum(blocks.amax(dim=-1), blocks.amin(dim=-1).neg_()).abs_()


def quantize_blockwise4(
    weight: torch.Tensor, family: str, blocksize: int, double_quant: bool, *, fused: bool | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``qweight`` and the absmax tensors of a weight; ``finite`` is False for NaN/Inf input.

    The whole blocks of the flattened weight go through the fused kernel
    (:func:`.chunks.use_fused` decides) or through the torch code in chunks
    of whole blocks (:mod:`.chunks`).  A fused weight whose absmax shows
    NaN/Inf is redone with the torch code, which defines the bytes of such
    (rejected) weights too.
    """
    flat = weight.reshape(-1)
    n = flat.numel()
    device = weight.device
    n_blocks = math.ceil(n / blocksize)
    full = (n // blocksize) * blocksize
    packed = torch.empty(math.ceil(n / 2), dtype=torch.uint8, device=device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=device)
    codes_of = codebook(family)

    def blocks_chunk(a: int, b: int) -> None:
        x = flat[a:b].to(torch.float32, copy=True)
        blocks = x.view(-1, blocksize)
        am = _block_absmax(blocks)
        absmax[a // blocksize : b // blocksize] = am
        blocks.mul_((1.0 / am.clamp(min=1e-38)).unsqueeze(1))
        packed[a // 2 : b // 2] = _pack_high_first(codes_of(x))

    def torch_blocks() -> None:
        for_each_chunk(full, max(1, chunk_elements(device) // blocksize) * blocksize, device, blocks_chunk)

    fused = use_fused(weight, fused) and full > 0
    if fused:
        from .triton_quant import quantize_blocks4

        whole = absmax[: full // blocksize]
        quantize_blocks4(flat[:full].contiguous(), codes_of, blocksize, packed[: full // 2], whole)
    else:
        torch_blocks()
    if full < n:
        tail = flat[full:].float()
        am = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = am
        scaled = tail / am
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        packed[full // 2 :] = _pack_high_first(codes_of(scaled))
    finite = torch.isfinite(absmax).all()
    if fused and not bool(finite):
        torch_blocks()
    if double_quant:
        return {"qweight": packed, **double_quantize(absmax)}, finite
    return {"qweight": packed, "absmax": absmax}, finite


def double_quantize(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """``absmax_q``/``absmax_scale``/``absmax_offset`` exactly as bitsandbytes' ``compress_statistics``.

    The offset is torch's float32 ``mean`` computed on the CPU -- where
    bitsandbytes' CPU build computes it -- so a CUDA run stores the same bits.
    """
    offset = absmax.cpu().mean().to(absmax.device)
    codes, scale = quantize_dynamic(absmax - offset)
    return {"absmax_q": codes, "absmax_scale": scale, "absmax_offset": offset.reshape(1)}


def quantize_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes 0.50 CPU ``quantize_blockwise(x, blocksize=256)`` (DYNAMIC_MAP): ``(codes, absmax)``.

    Replicates ``quantize_cpu_impl``: per block ``amax = max|x|`` (a short last
    block over its real elements; zero padding cannot raise it), all-zero
    blocks get code 0, else ``LUT[trunc(fmaf((clamp(x * (1/amax), -1, 1) + 1) *
    0.5, 65535, 0.5))]``.
    """
    n = x.numel()
    flat = x.reshape(-1)
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    amax = torch.empty(math.ceil(n / DOUBLE_QUANT_BLOCK), dtype=torch.float32, device=x.device)
    lut = _on(x.device, "dynamic_lut")

    def blocks_chunk(a: int, b: int) -> None:
        blocks = torch.nn.functional.pad(flat[a:b], (0, -(b - a) % DOUBLE_QUANT_BLOCK)).view(-1, DOUBLE_QUANT_BLOCK)
        am = blocks.abs().amax(dim=-1)
        v = (blocks * (1.0 / am).unsqueeze(1)).clamp_(-1, 1)
        v = torch.nan_to_num_(v, nan=-1.0)  # 0 * inf of an all-zero block: index 0, LUT[0] == 0, like the C code
        t = (v + 1.0) * 0.5
        # t * 65535 + 0.5 is exact in float64 (t is a multiple of 2**-25 in [0, 1]); one rounding == fmaf
        index = (t.double() * (_LUT_SIZE - 1) + 0.5).float().to(torch.int32)
        codes[a:b] = torch.index_select(lut, 0, index.view(-1))[: b - a]
        amax[a // DOUBLE_QUANT_BLOCK : a // DOUBLE_QUANT_BLOCK + am.numel()] = am

    chunk = max(1, chunk_elements(x.device) // DOUBLE_QUANT_BLOCK) * DOUBLE_QUANT_BLOCK
    for_each_chunk(n, chunk, x.device, blocks_chunk)
    return codes, amax


def _absmax_of(parts: dict[str, torch.Tensor], n_blocks: int) -> torch.Tensor:
    if "absmax" in parts:
        return parts["absmax"]
    block_scale = parts["absmax_scale"].repeat_interleave(DOUBLE_QUANT_BLOCK)[:n_blocks]
    values = _on(block_scale.device, "dynamic_map")[parts["absmax_q"].long()]
    return values * block_scale + parts["absmax_offset"][0]


def dequantize_blockwise4(
    parts: dict[str, torch.Tensor], family: str, shape: tuple[int, int], blocksize: int
) -> torch.Tensor:
    """Float32 ``CODE[c] * absmax[block]`` (the NumPy reference formula, same rounding)."""
    rows, cols = shape
    n = rows * cols
    packed = parts["qweight"]
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1).view(-1)[:n]
    absmax = _absmax_of(parts, math.ceil(n / blocksize))
    w = _on(packed.device, family)[codes.long()] * absmax.repeat_interleave(blocksize)[:n]
    return w.view(rows, cols)
