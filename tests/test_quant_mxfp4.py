"""MXFP4 (moeconv.quant.mxfp4): OCP numerics, and gpt-oss blocks carried through byte for byte."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moeconv.quant import QuantSpec, dequantize, quantize
from moeconv.quant.mxfp4 import e2m1_codebook, from_gpt_oss_blocks
from moeconv_numpy.schemes import E2M1_VALUES

MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def ref_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes [rows, padded cols] and E8M0 scales, element by element in float64 from the OCP rules."""
    rows, cols = w.shape
    n_blocks = math.ceil(cols / 32)
    w = np.pad(w.astype(np.float64), ((0, 0), (0, n_blocks * 32 - cols)))
    codes = np.zeros(w.shape, np.uint8)
    scales = np.zeros((rows, n_blocks), np.uint8)
    for r in range(rows):
        for j in range(n_blocks):
            block = w[r, j * 32 : (j + 1) * 32]
            amax = np.abs(block).max()
            e = 0 if amax == 0 else int(np.clip(np.frexp(amax)[1] - 1 - 2 + 127, 0, 254))
            scales[r, j] = e
            for k, x in enumerate(block / 2.0 ** (e - 127)):
                dist = np.abs(MAGNITUDES - min(abs(x), 6.0))
                best = np.flatnonzero(dist == dist.min())
                mag = best[0] if len(best) == 1 else best[best % 2 == 0][0]  # ties to the even code
                codes[r, j * 32 + k] = mag | (8 if x < 0 else 0)
    return codes, scales


def _nibbles_low_first(codes: np.ndarray) -> np.ndarray:
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


@pytest.mark.parametrize("shape", [(3, 32), (4, 100), (2, 7), (5, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(shape[1])
    w = (torch.randn(shape, generator=gen) * torch.logspace(-3, 2, shape[0])[:, None]).to(dtype)
    w[0, :3] = 0
    parts = quantize(w, QuantSpec("mxfp4"))
    codes, scales = ref_mxfp4(w.float().numpy())
    np.testing.assert_array_equal(parts["scales"].numpy(), scales)
    np.testing.assert_array_equal(parts["qweight"].numpy(), _nibbles_low_first(codes))


def test_ties_go_to_even_and_saturate():
    # block amax 6 -> e = 127 (scale 1); then each value is rounded on its own
    values = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, 5.9, -0.1]
    w = torch.tensor([values + [0.0] * (32 - len(values))])
    parts = quantize(w, QuantSpec("mxfp4"))
    assert parts["scales"].item() == 127
    back = dequantize(parts, QuantSpec("mxfp4"), w.shape)[0, : len(values)].tolist()
    assert back == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -4.0, 6.0, -0.0]


def ref_e2m1(v: np.ndarray) -> np.ndarray:
    """Nearest magnitude by distance (float64), ties to the even code, sign bit for v < 0."""
    dist = np.abs(MAGNITUDES - np.minimum(np.abs(v), 6.0)[:, None])
    nearest = dist == dist.min(axis=1, keepdims=True)
    even_tie = nearest & (np.arange(8) % 2 == 0)
    mag = np.where(nearest.sum(axis=1) > 1, even_tie.argmax(axis=1), nearest.argmax(axis=1))
    return mag | np.where(v < 0, 8, 0)


def test_e2m1_lookup_on_every_cell_and_threshold():
    top = torch.arange(0, 1 << 16, dtype=torch.int64) << 16
    x = torch.cat([top, top | 0xFFFF, top | 0x4321]).to(torch.int32).view(torch.float32)
    x = x[x.abs() <= 8]
    t = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    t = torch.cat([t, -t])
    zeros = torch.tensor([0.0, -0.0, 1e-45, -1e-45])
    x = torch.cat([x, t, torch.nextafter(t, t + 1), torch.nextafter(t, t - 1), zeros])
    got = e2m1_codebook()(x.contiguous()).numpy()
    np.testing.assert_array_equal(got, ref_e2m1(x.double().numpy()))


def test_zero_and_tiny_blocks():
    w = torch.zeros(2, 64)
    w[1, 32:] = 1e-40  # subnormal block: e clamps to 0
    parts = quantize(w, QuantSpec("mxfp4"))
    assert parts["scales"].tolist() == [[0, 0], [0, 0]]
    assert torch.equal(dequantize(parts, QuantSpec("mxfp4"), w.shape), torch.zeros(2, 64))


def test_values_on_the_grid_round_trip_exactly():
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (6, 64), generator=gen)
    codes[:, ::32] = 7  # each block holds a 6.0, so its scale is exactly 2**k
    exponents = torch.randint(-20, 20, (6, 2), generator=gen).repeat_interleave(32, dim=1)
    w = torch.tensor(E2M1_VALUES)[codes] * torch.pow(2.0, exponents.float())
    back = dequantize(quantize(w, QuantSpec("mxfp4")), QuantSpec("mxfp4"), w.shape)
    assert torch.equal(back, w)


def _gpt_oss_blocks(experts=2, rows=3, n_blocks=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, n_blocks, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(100, 140, (experts, rows, n_blocks), generator=gen, dtype=torch.uint8)
    scales[0, 0, 0], scales[1, 2, 3] = 0, 254  # 2**-127 (subnormal) and 2**127 (6 * 2**127 overflows)
    return blocks, scales


def test_gpt_oss_blocks_carry_through_unchanged_and_dequantize_straightforwardly():
    blocks, scales = _gpt_oss_blocks()
    experts, rows, n_blocks, _ = blocks.shape
    for e in range(experts):
        parts = from_gpt_oss_blocks(blocks[e], scales[e])
        assert parts["qweight"].numpy().tobytes() == blocks[e].numpy().tobytes()
        assert parts["scales"].numpy().tobytes() == scales[e].numpy().tobytes()
        got = dequantize(parts, QuantSpec("mxfp4"), (rows, n_blocks * 32)).numpy()
        # reference: element 2j in the low nibble, value * 2**(scale - 127), in float64 then float32
        b = blocks[e].numpy().reshape(rows, -1)
        codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(rows, -1)
        exponent = np.repeat(scales[e].numpy().astype(np.float64) - 127, 32, axis=1)
        with np.errstate(over="ignore"):
            expected = (E2M1_VALUES[codes].astype(np.float64) * 2.0**exponent).astype(np.float32)
        np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_gpt_oss_dequantization_equals_transformers():
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    blocks, scales = _gpt_oss_blocks(seed=3)
    scales[1, 2, 3] = 130  # transformers' ldexp of 6 * 2**127 is inf as well; keep the comparison finite
    theirs = mxfp4._convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [experts, in, out]
    for e in range(blocks.shape[0]):
        parts = from_gpt_oss_blocks(blocks[e], scales[e])
        ours = dequantize(parts, QuantSpec("mxfp4"), (blocks.shape[1], blocks.shape[2] * 32))
        assert torch.equal(ours, theirs[e].T)


def test_gpt_oss_input_checks():
    blocks, scales = _gpt_oss_blocks()
    with pytest.raises(ValueError, match="uint8"):
        from_gpt_oss_blocks(blocks.int(), scales)
    with pytest.raises(ValueError, match="n_blocks"):
        from_gpt_oss_blocks(blocks, scales[..., :-1])
    bad = scales.clone()
    bad[0, 1, 2] = 255
    with pytest.raises(ValueError, match="255"):
        from_gpt_oss_blocks(blocks, bad, name="experts.gate_up_proj")
