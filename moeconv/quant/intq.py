"""Group-wise round-to-nearest integers: the ``int`` family of format v1.

The numerics are those of ``spec/FORMAT.md``:
float16-rounded scales, float16 (not integer-rounded) zero points, round half
to even, codes packed into a little-endian bit stream per row.  Every function
is a handful of whole-tensor torch ops on the tensor's own device, so CPU and
CUDA run the same code and give the same bits.  The one exception is
:func:`quantize_int` on a CUDA weight: that chain of ops reached only 42-64
GB/s of BF16 input on an H100, so it launches one fused Triton kernel
(:func:`.triton_quant.quantize_int_rows`) that computes the same bytes step by
step; the torch code stays the definition and the CPU path.

Two details keep CUDA bit-identical to CPU: divisions by constants are done by
a tensor on the device (PyTorch's CUDA kernels turn division by a Python
scalar into multiplication by its reciprocal, which rounds differently), and
multiply/add pairs are separate kernels, so nothing is fused into an FMA.

The building blocks (:func:`group_params`, :func:`quantize_codes`,
:func:`pack_codes`, :func:`unpack_codes`) are public because GPTQ and AWQ
reuse them column by column; :func:`quantize_int` / :func:`dequantize_int`
are the whole-matrix round-to-nearest path.
"""

from __future__ import annotations

import math

import torch

from .chunks import chunk_elements, for_each_chunk, padded_rows, use_fused

__all__ = [
    "group_params",
    "quantize_codes",
    "float_codes",
    "pack_codes",
    "unpack_codes",
    "quantize_int",
    "fused_group_size",
    "dequantize_int",
]


def _div(x: torch.Tensor, constant: float) -> torch.Tensor:
    """``x / constant`` as a true IEEE division on every device (see the module docstring)."""
    return x / torch.tensor(constant, dtype=torch.float32, device=x.device)


def _fp16_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _signed_absmax(w: torch.Tensor) -> torch.Tensor:
    """The element of largest ``|w|`` over the last dim, with its sign; the first one on ties.

    Computed from the group max and min (``amax``/``amin`` are much faster
    than ``aminmax`` or an ``argmax`` over short rows); only groups where
    ``max == -min`` (a positive and a negative element tie) need the
    position, and only those few are resolved with an argmax.
    """
    mn, mx = w.amin(dim=-1), w.amax(dim=-1)
    m = torch.where(mx >= -mn, mx, mn)
    tie = (mx == -mn) & (mx > 0)
    if bool(tie.any()):
        tied = w[tie]
        first = tied.abs().argmax(dim=-1, keepdim=True)  # argmax returns the first maximum
        m[tie] = tied.gather(-1, first).squeeze(-1)
    return m


def group_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the group formed by the last dim of ``w``.

    ``w`` holds the group's real elements only (no padding).  Returns two
    float32 tensors of shape ``w.shape[:-1]`` that hold float16-representable
    values, exactly what is stored.  Asymmetric: ``s = fp16((max(w,0) -
    min(w,0)) / (2^b - 1))``, ``z = fp16(-min(w,0) / s)``.  Symmetric: ``s =
    fp16(m / -2^(b-1))`` with ``m`` the signed element of largest magnitude,
    and ``zero`` is the constant ``2^(b-1)`` so that ``(c - zero) * s``
    dequantizes both kinds.  A scale that rounds to 0 becomes 1.  Non-finite
    inputs give non-finite scales (callers check).
    """
    w = w.float()
    if symmetric:
        scale = _fp16_round(_div(_signed_absmax(w), -float(2 ** (bits - 1))))
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale, torch.full_like(scale, float(2 ** (bits - 1)))
    # "+ 0.0" turns a -0.0 minimum into +0.0, so z is always -0.0 when mn is zero
    # (whichever signed zero a device's min picks)
    mn = w.amin(dim=-1).clamp_(max=0).add_(0.0)
    mx = w.amax(dim=-1).clamp_(min=0)
    scale = _fp16_round(_div(mx - mn, float(2**bits - 1)))
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = _fp16_round(-mn / scale)
    return scale, zero


def _codes_inplace(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """Overwrite float32 ``w`` with its codes (still float32, integer-valued)."""
    if symmetric:
        half = 2 ** (bits - 1)
        return w.div_(scale).round_().clamp_(-half, half - 1).add_(half)
    return w.div_(scale).add_(zero).round_().clamp_(0, 2**bits - 1)


#: 1.5 * 2^23: adding it to a float32 of magnitude < 2^22 rounds that value to an integer, ties to
#: even (the sum's ulp is 1), and leaves the integer in the low bits of the sum's bit pattern.
_ROUNDER = 12582912.0


def _byte_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """The codes of :func:`_codes_inplace` as uint8, with one pass over the weight fewer (``w`` is overwritten).

    Clamping before rounding gives the same integers, since the bounds are
    integers; the rounding is the addition of ``_ROUNDER`` (plus the
    symmetric offset, an even integer, so ties still go to the even code),
    and the low byte of the sum's pattern is the code.  The quantizers'
    hot loop on a GPU is a chain of whole-tensor passes, so each pass saved
    is throughput.
    """
    if symmetric:
        half = 2 ** (bits - 1)
        w.div_(scale).clamp_(-half, half - 1).add_(_ROUNDER + half)
    else:
        torch.addcdiv(zero, w, scale, out=w).clamp_(0, 2**bits - 1).add_(_ROUNDER)
    return w.view(torch.int32).to(torch.uint8)


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """uint8 codes of ``w`` for the given scale and zero (broadcast against ``w`` by torch rules).

    Asymmetric: ``clamp(round_half_even(w / s + z), 0, 2^b - 1)``; symmetric:
    ``clamp(round_half_even(w / s), -2^(b-1), 2^(b-1) - 1) + 2^(b-1)`` (``zero``
    is then unused; it is always ``2^(b-1)``).  All in float32.
    """
    out = torch.broadcast_to(w, torch.broadcast_shapes(w.shape, scale.shape, zero.shape))
    return float_codes(out, scale.float(), zero.float(), bits, symmetric).to(torch.uint8)


def float_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """:func:`quantize_codes` as a new integer-valued float32 tensor shaped like ``w``.

    For callers that go on computing with the codes (GPTQ's column loop): no
    broadcast to a common shape (``w`` must already have it) and no round
    trip through uint8.
    """
    return _codes_inplace(w.to(torch.float32, copy=True), scale, zero, bits, symmetric)


def _row_bytes(n_codes: int, bits: int) -> int:
    return math.ceil(n_codes * bits / 8)


def _pack_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[rows, n]`` (n a multiple of 8, contiguous) into LSB-first bytes.

    Adjacent codes sit 8 bits apart in the little-endian integer view of the
    row; a few shift-or steps on those wide lanes move each code to its bit
    offset, so every op is a whole-tensor integer op (no strided byte access)
    over as few bytes as the codes themselves.
    """
    rows = codes.shape[0]
    if bits == 8:
        return codes
    if bits == 4:
        v = codes.view(torch.int16)  # c0 | c1 << 8
        return (v | (v >> 4)).to(torch.uint8)
    if bits == 2:
        v = codes.view(torch.int32)  # c0 | c1 << 8 | c2 << 16 | c3 << 24
        v = v | (v >> 6)  # c0 | c1 << 2 at bit 0, c2 | c3 << 2 at bit 16
        return (v | (v >> 12)).to(torch.uint8)
    v = codes.view(torch.int64)  # 3 bits: c0 | c1 << 8 | ... | c7 << 56
    v = (v | (v >> 5)) & 0x003F003F003F003F  # pairs of codes in 6 bits, 16 bits apart
    v = (v | (v >> 10)) & 0x00000FFF00000FFF  # quads in 12 bits, 32 bits apart
    v = v | (v >> 20)  # 8 codes in the low 24 bits
    return v.view(torch.uint8).view(rows, -1, 8)[..., :3].reshape(rows, -1)  # the 3 low (first) bytes


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[rows, n]`` into ``[rows, ceil(n*bits/8)]`` bytes, LSB-first per row.

    Code ``i`` of a row occupies bits ``[i*bits, (i+1)*bits)`` of the row's bit
    stream, stream bit ``k`` being bit ``k % 8`` of byte ``k // 8``.  Eight
    codes always fill exactly ``bits`` bytes, so rows are padded with zero
    codes to a multiple of 8, packed, and cut back.
    """
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise ValueError(f"pack_codes needs a 2-D uint8 tensor, got {codes.dtype} {list(codes.shape)}")
    return _pack(codes, bits)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"codes can be packed with 2, 3, 4 or 8 bits, got {bits}")
    n = codes.shape[1]
    pad = -n % 8
    codes = torch.nn.functional.pad(codes, (0, pad)) if pad else codes.contiguous()
    packed = _pack_bytes(codes, bits)
    row_bytes = _row_bytes(n, bits)
    return packed if packed.shape[1] == row_bytes else packed[:, :row_bytes].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes ``[rows, n_codes]`` from packed rows."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"unpack_codes needs a 2-D uint8 tensor, got {packed.dtype} {list(packed.shape)}")
    rows, row_bytes = packed.shape
    if row_bytes < _row_bytes(n_codes, bits):
        raise ValueError(f"{row_bytes} bytes per row cannot hold {n_codes} codes of {bits} bits")
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.view(rows, -1)[:, :n_codes].contiguous()
    pad = -row_bytes % bits
    if pad:
        packed = torch.nn.functional.pad(packed, (0, pad))
    b = packed.view(rows, -1, bits).to(torch.int32)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
    codes = ((word.unsqueeze(-1) >> shifts) & 7).to(torch.uint8)
    return codes.view(rows, -1)[:, :n_codes].contiguous()


def fused_group_size(group_size: int) -> bool:
    """Whether the fused kernel takes this group size: a power of two from 8 to 4096.

    From 8 up, a group's codes fill whole bytes at every width (8 codes of 3
    bits are 3 bytes), so groups pack independently; a group is one row of a
    kernel tile, held in registers, hence the upper bound (larger groups are
    unusual and take the torch path).
    """
    return 8 <= group_size <= 4096 and group_size & (group_size - 1) == 0


def quantize_int(
    weight: torch.Tensor, bits: int, symmetric: bool, group_size: int, *, fused: bool | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Round-to-nearest quantization of a 2-D weight into ``qweight``/``scales``(/``zeros``).

    Returns ``(parts, finite)`` where ``finite`` is a 0-dim bool tensor, False
    when some scale or zero point is not finite (a NaN/Inf in the weight, or a
    group range beyond float16); the caller turns that into an error that
    names the weight.  Keeping it a tensor avoids a device sync per chunk.

    Where :func:`.chunks.use_fused` says so and :func:`fused_group_size`
    allows, one kernel launch (:func:`.triton_quant.quantize_int_rows`) does
    it all, bit for bit as the torch code below; a weight with any non-finite
    scale or zero point is then redone with the torch code, which defines the
    bytes of such (rejected) weights too.

    The torch code processes rows in chunks (:mod:`.chunks`): each chunk is
    copied once into a float32 buffer padded to whole groups with zeros (which
    cannot change ``min(w, 0)``, ``max(w, 0)`` or the largest magnitude),
    turned into codes in place and packed into its rows of the outputs.
    """
    rows, cols = weight.shape
    n_groups = math.ceil(cols / group_size)
    padded = n_groups * group_size
    device = weight.device
    qweight = torch.empty(rows, _row_bytes(padded, bits), dtype=torch.uint8, device=device)
    scales = torch.empty(rows, n_groups, dtype=torch.float16, device=device)
    zeros = None if symmetric else torch.empty(rows, n_groups, dtype=torch.float16, device=device)
    parts = {"qweight": qweight, "scales": scales}
    if zeros is not None:
        parts["zeros"] = zeros
    if fused_group_size(group_size) and use_fused(weight, fused):
        from .triton_quant import quantize_int_rows

        quantize_int_rows(weight, bits, symmetric, group_size, qweight, scales, zeros)
        finite = torch.stack([torch.isfinite(part).all() for part in (scales, zeros) if part is not None]).all()
        if bool(finite):
            return parts, finite

    def rows_chunk(r0: int, r1: int) -> torch.Tensor:
        buf = padded_rows(weight, r0, r1, padded)
        groups = buf.view(r1 - r0, n_groups, group_size)
        scale, zero = group_params(groups, bits, symmetric)
        codes = _byte_codes(groups, scale.unsqueeze(-1), zero.unsqueeze(-1), bits, symmetric).view(r1 - r0, padded)
        if padded != cols:
            codes[:, cols:] = 0  # padding codes are 0
        qweight[r0:r1] = _pack(codes, bits)
        scales[r0:r1] = scale
        if zeros is not None:
            zeros[r0:r1] = zero
        return torch.isfinite(scale).all() & torch.isfinite(zero).all()

    finite = for_each_chunk(rows, max(1, chunk_elements(device) // padded), device, rows_chunk)
    return parts, torch.stack(finite).all()


def dequantize_int(
    parts: dict[str, torch.Tensor], bits: int, symmetric: bool, shape: tuple[int, int], group_size: int
) -> torch.Tensor:
    """Float32 ``[rows, cols]``: ``(c - z) * s`` (asymmetric) or ``(c - 2^(b-1)) * s`` (symmetric)."""
    rows, cols = shape
    scales = parts["scales"].float().unsqueeze(-1)
    n_groups = scales.shape[1]
    codes = unpack_codes(parts["qweight"], bits, n_groups * group_size)
    c = codes.view(rows, n_groups, group_size).float()
    if symmetric:
        w = (c - float(2 ** (bits - 1))) * scales
    else:
        w = (c - parts["zeros"].float().unsqueeze(-1)) * scales
    return w.view(rows, n_groups * group_size)[:, :cols].contiguous()
