"""FP8 block-scaled source weights (DeepSeek-V3 style), dequantized on the fly.

DeepSeek-V3 and several "-FP8" releases store a linear weight as
``float8_e4m3fn`` plus ``weight_scale_inv``: one float32 multiplier per block
of 128 x 128 weights (``quantization_config.weight_block_size``).  moeconv
never writes FP8, so such weights are widened to float32 when read and then
quantized (routed experts) or stored as BF16 (everything else).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

#: Suffix of the scale tensor that accompanies an FP8 weight (``<name>_scale_inv``).
SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)


def fp8_block_size(config: Mapping[str, Any]) -> tuple[int, int]:
    """The (rows, cols) scale block of an FP8 checkpoint, from its quantization_config."""
    block = (config.get("quantization_config") or {}).get("weight_block_size") or DEFAULT_BLOCK
    return int(block[0]), int(block[1])


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 ``weight * scale_inv`` with each scale broadcast over its block (edge blocks may be short).

    Done as one broadcast multiply on a ``[row blocks, bo, col blocks, bi]`` view,
    padding the weight to whole blocks only when its shape needs it.
    """
    rows, cols = weight.shape
    bo, bi = block
    nbo, nbi = math.ceil(rows / bo), math.ceil(cols / bi)
    w = weight.to(torch.float32)
    if (rows, cols) != (nbo * bo, nbi * bi):
        w = F.pad(w, (0, nbi * bi - cols, 0, nbo * bo - rows))
    w = w.view(nbo, bo, nbi, bi).mul_(scale_inv.to(torch.float32)[:, None, :, None])
    w = w.view(nbo * bo, nbi * bi)
    return w if w.shape == (rows, cols) else w[:rows, :cols].contiguous()

