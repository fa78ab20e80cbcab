"""MXFP4 (OCP Microscaling v1.0): E2M1 elements sharing one E8M0 scale per 32 columns.

Layout, checked against gpt-oss as loaded by transformers
(``transformers/integrations/mxfp4.py``, ``_convert_moe_packed_tensors``):
there ``lut[blocks & 0x0F]`` fills the even output columns and
``lut[blocks >> 4]`` the odd ones, the LUT is E2M1 indexed by the 4-bit code
with bit 3 the sign (our ``E2M1_VALUES``), and the scale is applied as
``ldexp(value, scales - 127)``.  So byte ``j`` of a row holds element ``2j``
in its LOW nibble, the exponent bias is 127, and a gpt-oss block tensor
``[..., rows, n_blocks, 16]`` is our ``qweight [rows, n_blocks * 16]`` after a
reshape -- :func:`from_gpt_oss_blocks` -- with identical bytes.  The tests
compare our dequantization with transformers' function on such blocks.

On a CUDA weight (with Triton installed) one fused kernel launch
(:mod:`.triton_quant`) computes what the torch code of :func:`quantize_mxfp4`
computes, bit for bit; that code remains the CPU path and the definition.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from moeconv_numpy.schemes import E2M1_VALUES, MX_BLOCK

from .chunks import chunk_elements, for_each_chunk, padded_rows, use_fused
from .intq import pack_codes, unpack_codes
from .lookup import Codebook

__all__ = ["quantize_mxfp4", "dequantize_mxfp4", "from_gpt_oss_blocks", "e2m1_codebook", "E8M0_NAN"]

#: E8M0 code reserved for NaN; format v1 never stores it.
E8M0_NAN = 255
#: The largest shared exponent of a finite block: a finite float32 has an
#: exponent field of at most 254; Inf and NaN (255) give 253.
_FINITE_E_MAX = 252


@functools.cache
def e2m1_codebook() -> Codebook:
    """Nearest E2M1 code of a float32 value (already divided by the block scale), as a :class:`Codebook`.

    Magnitude thresholds lie halfway between 0, .5, 1, 1.5, 2, 3, 4, 6; a tie
    goes to the even code (mantissa bit 0): down at 0.25, 1.25, 2.5 and 5, up
    at 0.75, 1.75 and 3.5; beyond 6 saturates.  "Up at t" is ``x > prev(t)``
    for floats.  Negative values -- also those that round to zero -- carry
    the sign bit (code 8 | magnitude); -0.0 itself gets code 0.
    """
    f32 = np.float32
    below = lambda t: np.nextafter(f32(t), f32(-np.inf))  # noqa: E731
    ties_down, ties_up = (0.25, 1.25, 2.5, 5.0), (0.75, 1.75, 3.5)
    positive = [f32(t) for t in ties_down] + [below(t) for t in ties_up]
    negative = [below(-t) for t in ties_down] + [f32(-t) for t in ties_up]
    bounds = np.sort(np.array(negative + [below(0.0)] + positive, dtype=np.float32))
    codes = np.array([15, 14, 13, 12, 11, 10, 9, 8, 0, 1, 2, 3, 4, 5, 6, 7], dtype=np.uint8)
    return Codebook(bounds, codes)


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exactly ``2.0 ** exponent`` in float32 for integer exponents in [-127, 127], built from bits.

    (``torch.ldexp`` goes through ``pow``, whose CUDA version is not
    guaranteed exact; a constructed power of two is.)  2^-127 is subnormal.
    """
    biased = exponent.to(torch.int32) + 127
    bits = torch.where(biased > 0, biased << 23, torch.full_like(biased, 1 << 22))
    return bits.view(torch.float32)


def quantize_mxfp4(weight: torch.Tensor, *, fused: bool | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``qweight``/``scales`` of a 2-D weight; ``finite`` is False for NaN/Inf input.

    Shared exponent ``e = clamp(floor(log2(amax)) - 2 + 127, 0, 254)`` read
    straight from the float32 exponent field of ``amax`` (zero and subnormal
    ``amax`` give ``e = 0``, as the clamp would).  Where
    :func:`.chunks.use_fused` says so, one kernel launch does it all, and a
    weight whose scales show NaN/Inf is redone with the torch code, which
    defines the bytes of such (rejected) weights too.  The torch code processes
    rows in chunks (:mod:`.chunks`), padded with zero columns to whole blocks.
    """
    rows, cols = weight.shape
    n_blocks = math.ceil(cols / MX_BLOCK)
    padded = n_blocks * MX_BLOCK
    device = weight.device
    qweight = torch.empty(rows, padded // 2, dtype=torch.uint8, device=device)
    scales = torch.empty(rows, n_blocks, dtype=torch.uint8, device=device)
    codes_of = e2m1_codebook()
    if use_fused(weight, fused):
        from .triton_quant import quantize_mxfp4_rows

        quantize_mxfp4_rows(weight, codes_of, qweight, scales)
        finite = (scales <= _FINITE_E_MAX).all()
        if bool(finite):
            return {"qweight": qweight, "scales": scales}, finite

    def rows_chunk(r0: int, r1: int) -> torch.Tensor:
        buf = padded_rows(weight, r0, r1, padded)
        blocks = buf.view(r1 - r0, n_blocks, MX_BLOCK)
        amax = torch.maximum(blocks.amax(dim=-1), blocks.amin(dim=-1).neg_()).abs_()
        e = ((amax.view(torch.int32) >> 23) - 2).clamp_(0, 254)
        blocks.mul_(_pow2(127 - e).unsqueeze(-1))
        qweight[r0:r1] = pack_codes(codes_of(buf), 4)
        scales[r0:r1] = e.to(torch.uint8)
        return torch.isfinite(amax).all()

    finite = for_each_chunk(rows, max(1, chunk_elements(device) // padded), device, rows_chunk)
    return {"qweight": qweight, "scales": scales}, torch.stack(finite).all()


def _check_e8m0(scales: torch.Tensor, name: str) -> None:
    bad = (scales == E8M0_NAN).nonzero()
    if bad.numel():
        raise ValueError(f"{name}: E8M0 scale 255 (NaN) at {[int(i) for i in bad[0]]}; format v1 forbids it")


def dequantize_mxfp4(parts: dict[str, torch.Tensor], shape: tuple[int, int], name: str = "weight") -> torch.Tensor:
    """Float32 ``E2M1_VALUES[c] * 2^(e - 127)`` (exact, like ``numpy.ldexp``)."""
    rows, cols = shape
    scales = parts["scales"]
    _check_e8m0(scales, f"{name}.scales")
    codes = unpack_codes(parts["qweight"], 4, scales.shape[1] * MX_BLOCK)
    table = torch.from_numpy(E2M1_VALUES.copy()).to(codes.device)
    values = table[codes.long()].view(rows, -1, MX_BLOCK)
    w = values * _pow2(scales.to(torch.int32) - 127).unsqueeze(-1)
    return w.view(rows, -1)[:, :cols].contiguous()


def from_gpt_oss_blocks(blocks: torch.Tensor, scales: torch.Tensor, name: str = "weight") -> dict[str, torch.Tensor]:
    """Our MXFP4 parts from gpt-oss ``*_blocks`` ``uint8[..., rows, n_blocks, 16]`` and ``*_scales``
    ``uint8[..., rows, n_blocks]``, byte for byte (a reshape, no requantization).

    Leading dims (e.g. experts) are kept: ``qweight [..., rows, n_blocks*16]``,
    ``scales [..., rows, n_blocks]``; index them per expert.  The logical
    weight is ``[rows, n_blocks * 32]`` (``[out, in]``, blocks along ``in``).
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"{name}: gpt-oss blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 3 or blocks.shape[-1] != MX_BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(
            f"{name}: expected blocks [..., rows, n_blocks, {MX_BLOCK // 2}] and scales [..., rows, n_blocks], "
            f"got {list(blocks.shape)} and {list(scales.shape)}"
        )
    _check_e8m0(scales, f"{name}.scales")
    qweight = blocks.reshape(*blocks.shape[:-2], blocks.shape[-2] * blocks.shape[-1])
    return {"qweight": qweight.contiguous(), "scales": scales.contiguous()}
