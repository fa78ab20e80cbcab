"""Group-wise RTN integers (moeconv.quant.intq) against a literal reading of the format's numerics.

The reference below is written group by group in NumPy float32 straight from
the contract text (deliberately slow and loop-based, on tiny shapes), and the
packing reference builds each row's bit stream as one Python integer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moeconv.quant import QuantSpec, quantize
from moeconv.quant.intq import group_params, pack_codes, quantize_codes, unpack_codes

BITS = (2, 3, 4, 8)


def ref_group(w: np.ndarray, bits: int, symmetric: bool) -> tuple[np.float16, np.float16 | None, np.ndarray]:
    """One group's (scale, zero, codes) exactly as the format text says, in float32."""
    w = w.astype(np.float32)
    if symmetric:
        half = 2 ** (bits - 1)
        m = w[np.argmax(np.abs(w))]  # argmax: first maximum
        s = np.float16(np.float32(m) / np.float32(-half))
        if s == 0:
            s = np.float16(1)
        c = np.clip(np.rint(w / np.float32(s)), -half, half - 1) + half
        return s, None, c.astype(np.uint8)
    mn = min(np.float32(w.min()), np.float32(0)) + np.float32(0)  # a zero minimum is +0, so z = -0.0
    mx = max(np.float32(w.max()), np.float32(0))
    s = np.float16(np.float32(mx - mn) / np.float32(2**bits - 1))
    if s == 0:
        s = np.float16(1)
    z = np.float16(np.float32(-mn) / np.float32(s))
    c = np.clip(np.rint(w / np.float32(s) + np.float32(z)), 0, 2**bits - 1)
    return s, z, c.astype(np.uint8)


def ref_quantize(w: np.ndarray, bits: int, symmetric: bool, g: int) -> dict[str, np.ndarray]:
    rows, cols = w.shape
    n_groups = math.ceil(cols / g)
    codes = np.zeros((rows, n_groups * g), np.uint8)  # padding codes stay 0
    scales = np.zeros((rows, n_groups), np.float16)
    zeros = np.zeros((rows, n_groups), np.float16)
    for r in range(rows):
        for j in range(n_groups):
            s, z, c = ref_group(w[r, j * g : (j + 1) * g], bits, symmetric)
            scales[r, j] = s
            zeros[r, j] = 0 if z is None else z
            codes[r, j * g : j * g + c.size] = c
    out = {"qweight": ref_pack(codes, bits), "scales": scales}
    if not symmetric:
        out["zeros"] = zeros
    return out


def ref_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Each row as one LSB-first integer bit stream, written out little-endian."""
    rows, n = codes.shape
    row_bytes = math.ceil(n * bits / 8)
    out = np.zeros((rows, row_bytes), np.uint8)
    for r in range(rows):
        stream = sum(int(c) << (i * bits) for i, c in enumerate(codes[r]))
        out[r] = np.frombuffer(stream.to_bytes(row_bytes, "little"), np.uint8)
    return out


def _weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen) * 0.1
    w[0, : min(cols, 5)] = 0  # a group that starts with zeros
    if rows > 2:
        w[2] = w[2].abs()  # all-positive rows: mn clamps to 0
        w[2, ::3] = -0.0  # ... with negative zeros among them
        w[1] = 0  # an all-zero row: scale 0 -> 1
    return w


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape,g", [((5, 64), 64), ((4, 100), 32), ((3, 37), 16), ((6, 130), 128), ((2, 7), 5)])
def test_rtn_matches_reference(bits, symmetric, shape, g):
    w = _weights(*shape, seed=bits * 7 + g)
    scheme = f"int{bits}" + ("-sym" if symmetric else "")
    parts = quantize(w, QuantSpec(scheme, g))
    ref = ref_quantize(w.numpy(), bits, symmetric, g)
    assert set(parts) == set(ref)
    for key, expected in ref.items():
        got = parts[key].numpy()
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8), err_msg=key)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rtn_input_dtypes(dtype):
    w = _weights(4, 96, seed=1).to(dtype)
    for scheme in ("int4", "int3-sym"):
        info = QuantSpec(scheme).info
        ref = ref_quantize(w.float().numpy(), info.bits, info.symmetric, 64)
        parts = quantize(w, QuantSpec(scheme))
        for key in ref:
            np.testing.assert_array_equal(parts[key].numpy(), ref[key])


def test_round_half_to_even():
    # int4-sym: m = -4 -> s = 0.5; w/s hits x.5 exactly for these values
    w = torch.tensor([[-4.0, 0.25, 0.75, 1.25, -0.25, -0.75, 1.75, 2.25]])
    parts = quantize(w, QuantSpec("int4-sym", 8))
    codes = unpack_codes(parts["qweight"], 4, 8)[0].tolist()
    # round(w/s): -8, 0.5->0, 1.5->2, 2.5->2, -0.5->0, -1.5->-2, 3.5->4, 4.5->4 ; +8
    assert codes == [0, 8, 10, 10, 8, 6, 12, 12]


def test_symmetric_tie_takes_first_element():
    # +1 and -1 tie in magnitude: the first decides the sign of the scale
    first_pos = torch.tensor([[1.0, -1.0, 0.5, 0.0]])
    first_neg = torch.tensor([[-1.0, 1.0, 0.5, 0.0]])
    s_pos, _ = group_params(first_pos, 4, True)
    s_neg, _ = group_params(first_neg, 4, True)
    assert s_pos.item() == -0.125 and s_neg.item() == 0.125


def test_padding_codes_are_zero_and_stats_use_real_elements():
    w = torch.full((2, 10), 0.5)
    w[:, 9] = 1.0
    parts = quantize(w, QuantSpec("int4", 8))  # 2 groups, the second has 2 real elements
    codes = unpack_codes(parts["qweight"], 4, 16)
    assert codes[:, 10:].eq(0).all()
    # second group real elements (0.5, 1.0): mn = 0, s = fp16(1/15), z = 0
    assert parts["scales"][0, 1].item() == np.float16(np.float32(1.0) / np.float32(15))
    assert parts["zeros"][0, 1].item() == 0


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 3, 8, 13, 64, 67])
def test_pack_matches_bit_stream_and_unpack_inverts(bits, n):
    gen = torch.Generator().manual_seed(n * 10 + bits)
    codes = torch.randint(0, 2**bits, (3, n), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    np.testing.assert_array_equal(packed.numpy(), ref_pack(codes.numpy(), bits))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_quantize_codes_broadcasts_like_gptq_uses_it():
    w = _weights(6, 64, seed=3)
    scale, zero = group_params(w, 3, False)
    whole = quantize_codes(w, scale[:, None], zero[:, None], 3, False)
    column = quantize_codes(w[:, 5], scale, zero, 3, False)
    assert whole.dtype == torch.uint8 and torch.equal(whole[:, 5], column)
    assert scale.dtype == torch.float32 and torch.equal(scale, scale.half().float())
    assert torch.equal(zero, zero.half().float())


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        pack_codes(torch.zeros(2, 8, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="5"):
        pack_codes(torch.zeros(2, 8, dtype=torch.uint8), 5)


def test_chunked_rows_equal_unchunked(monkeypatch):
    import moeconv.quant.chunks as chunks

    w = _weights(37, 200, seed=4)
    whole = quantize(w, QuantSpec("int3", 64))
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 256 * 3)  # 3 rows per chunk, a short last chunk
    chunked = quantize(w, QuantSpec("int3", 64))
    for key in whole:
        assert torch.equal(whole[key], chunked[key]), key
