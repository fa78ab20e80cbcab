"""moeconv_numpy.dequantize against tiny examples whose bytes are worked out by hand.

Each test spells out the stored bytes of spec/FORMAT.md section 9 (bit stream
order, nibble order, padding) and the float32 values they must give, so a
packing or formula mistake in the reference reader cannot hide.
"""

from __future__ import annotations

import numpy as np
import pytest

from moeconv_numpy import FormatError, dequantize
from moeconv_numpy.schemes import DYNAMIC_MAP, E2M1_VALUES, FP4_CODE, NF4_CODE


def f16(*rows):
    return np.array(rows, dtype=np.float16)


def test_int3_one_row_of_eight_codes_packs_lsb_first():
    # codes 0..7 as a 24-bit LSB-first stream: 000 100 010 110 001 101 011 111 (bit 0 first)
    # byte 0 = bits 0-7  -> 0b1000_1000 = 0x88; byte 1 -> 0b1100_0110 = 0xC6; byte 2 -> 0b1111_1010 = 0xFA
    parts = {"qweight": np.array([[0x88, 0xC6, 0xFA]], np.uint8), "scales": f16([0.5]), "zeros": f16([3.0])}
    w = dequantize(parts, "int3", (1, 8), 8)
    np.testing.assert_array_equal(w, np.array([[-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]], np.float32))
    assert w.dtype == np.float32


def test_int3_row_not_divisible_by_group_uses_padding_codes():
    # shape 1x5, g=4 -> 2 groups, Kp=8, row_bytes=3; codes 1 2 3 4 | 5 (0 0 0 padding)
    # stream: 1=001 2=010 3=011 4=100 5=101 -> byte0 = 1 | 2<<3 | (3&3)<<6 = 0xD1,
    # byte1 = 3>>2 | 4<<1 | 5<<4 = 0x58, byte2 = 0
    parts = {"qweight": np.array([[0xD1, 0x58, 0x00]], np.uint8), "scales": f16([1.0, 2.0]), "zeros": f16([0.0, 0.5])}
    w = dequantize(parts, "int3", (1, 5), 4)
    np.testing.assert_array_equal(w, np.array([[1, 2, 3, 4, (5 - 0.5) * 2]], np.float32))


def test_int2_four_codes_per_byte_and_symmetric_offset():
    # codes 0 1 2 3 -> 0 | 1<<2 | 2<<4 | 3<<6 = 0xE4; int2-sym: (c - 2) * s
    parts = {"qweight": np.array([[0xE4]], np.uint8), "scales": f16([-0.25])}
    w = dequantize(parts, "int2-sym", (1, 4), 4)
    np.testing.assert_array_equal(w, np.array([[0.5, 0.25, -0.0, -0.25]], np.float32))


def test_int4_low_nibble_first_rows_independent():
    # 2x3, g=2: row0 codes 1 2 | 3 (pad) -> 0x21 0x03; row1 codes 15 0 | 7 (pad) -> 0x0F 0x07
    parts = {"qweight": np.array([[0x21, 0x03], [0x0F, 0x07]], np.uint8), "scales": f16([1.0, 0.5], [2.0, 4.0])}
    w = dequantize(parts, "int4-sym", (2, 3), 2)
    np.testing.assert_array_equal(w, np.array([[-7.0, -6.0, -2.5], [14.0, -16.0, -4.0]], np.float32))


def test_int8_fractional_zero_point_is_float32_exact():
    parts = {"qweight": np.array([[0, 255, 128, 0]], np.uint8), "scales": f16([0.1, 3.0]), "zeros": f16([10.5, -2.0])}
    w = dequantize(parts, "int8", (1, 3), 2)
    s0 = np.float32(np.float16(0.1))
    expected = np.array([(np.float32(0) - np.float32(10.5)) * s0, (np.float32(255) - np.float32(10.5)) * s0, 130 * 3.0])
    assert w.tobytes() == expected.astype(np.float32).tobytes()


def test_nf4_high_nibble_first_odd_length_padding():
    # n = 3: codes 15 0 | 7 (pad) -> bytes 0xF0 0x70; one block (g=32) with absmax 2
    parts = {"qweight": np.array([0xF0, 0x70], np.uint8), "absmax": np.array([2.0], np.float32)}
    w = dequantize(parts, "nf4", (1, 3), 32)
    np.testing.assert_array_equal(w, np.array([[2.0, -2.0, 0.0]], np.float32))


def test_fp4_code_8_is_negative_zero_and_blocks_cross_rows():
    # 2x32 with g=32: row 1 is block 1.  codes: element 0 -> 3 (1.0), element 1 -> 8 (-0.0)
    q = np.zeros(32, np.uint8)
    q[0] = 0x38
    q[16] = 0xB0  # element 32 (row 1, col 0) -> code 11 (-1.0)
    parts = {"qweight": q, "absmax": np.array([4.0, 0.5], np.float32)}
    w = dequantize(parts, "fp4", (2, 32), 32)
    assert w[0, 0] == 4.0 and w[1, 0] == -0.5
    assert w[0, 1] == 0 and np.signbit(w[0, 1])
    assert float(FP4_CODE[0]) == 0.0 and w[0, 2] == 0.0 and not np.signbit(w[0, 2])


def test_double_quant_uses_one_scale_per_256_blocks():
    n_blocks = 300  # > 256: blocks 256..299 use absmax_scale[1]
    shape = (1, n_blocks * 32)
    qweight = np.full(shape[1] // 2, 0xFF, np.uint8)  # every code 15 -> NF4 value 1.0
    absmax_q = (np.arange(n_blocks) % 256).astype(np.uint8)
    absmax_scale = np.array([0.5, 3.0], np.float32)
    offset = np.array([0.25], np.float32)
    parts = {"qweight": qweight, "absmax_q": absmax_q, "absmax_scale": absmax_scale, "absmax_offset": offset}
    w = dequantize(parts, "nf4", shape, 32, double_quant=True)
    block_absmax = np.array(
        [DYNAMIC_MAP[q] * absmax_scale[k // 256] + offset[0] for k, q in enumerate(absmax_q)], np.float32
    )
    assert NF4_CODE[15] == 1.0
    assert w.tobytes() == np.repeat(block_absmax, 32)[None, :].tobytes()
    assert w[0, 256 * 32] == np.float32(DYNAMIC_MAP[0] * np.float32(3.0) + np.float32(0.25))


def test_mxfp4_low_nibble_first_with_e8m0_scales_and_padding():
    # 1x33 -> 2 blocks of 32 (31 padding columns), qweight [1, 32], scales [1, 2]
    q = np.zeros((1, 32), np.uint8)
    q[0, 0] = 0xF1  # element 0 -> code 1 (0.5), element 1 -> code 15 (-6)
    q[0, 16] = 0x03  # element 32 -> code 3 (1.5)
    parts = {"qweight": q, "scales": np.array([[129, 0]], np.uint8)}
    w = dequantize(parts, "mxfp4", (1, 33), 32)
    assert w.shape == (1, 33)
    assert w[0, 0] == 2.0 and w[0, 1] == -24.0
    assert w[0, 32] == np.float32(1.5 * 2.0**-127)  # exact subnormal-range result
    assert E2M1_VALUES[15] == -6.0


def test_mxfp4_rejects_the_e8m0_nan_scale():
    parts = {"qweight": np.zeros((1, 16), np.uint8), "scales": np.array([[255]], np.uint8)}
    with pytest.raises(FormatError, match=r"w\.scales.*255"):
        dequantize(parts, "mxfp4", (1, 32), 32, name="w")


@pytest.mark.parametrize(
    "parts, problem",
    [
        ({"qweight": np.zeros((1, 4), np.uint8), "scales": f16([1.0])}, "do not match"),
        ({"qweight": np.zeros((1, 3), np.uint8), "scales": f16([1.0]), "zeros": f16([0.0])}, r"expected U8 \[1, 4\]"),
        ({"qweight": np.zeros((1, 4), np.uint8), "scales": np.ones((1, 1), np.float32), "zeros": f16([0.0])}, "F16"),
    ],
)
def test_parts_must_match_the_layout_exactly(parts, problem):
    with pytest.raises(FormatError, match=problem) as err:
        dequantize(parts, "int4", (1, 8), 8, name="experts.0.w1.weight", source="model.safetensors")
    assert "model.safetensors" in str(err.value) and "experts.0.w1.weight" in str(err.value)


def test_unknown_scheme_and_bad_group_size_are_format_errors():
    with pytest.raises(FormatError, match="unknown scheme"):
        dequantize({}, "int5", (1, 8), 8)
    with pytest.raises(FormatError, match="block size"):
        dequantize({}, "nf4", (1, 8), 48)


def test_large_weight_dequantizes_quickly_and_exactly():
    """Vectorized: a 1024x4096 int3 weight in well under a second, equal to a per-element decode."""
    import time

    rng = np.random.default_rng(0)
    rows, cols, g = 1024, 4096, 64
    qweight = rng.integers(0, 256, (rows, cols * 3 // 8), dtype=np.uint8)
    scales = rng.standard_normal((rows, cols // g)).astype(np.float16)
    zeros = rng.uniform(0, 7, (rows, cols // g)).astype(np.float16)
    start = time.perf_counter()
    w = dequantize({"qweight": qweight, "scales": scales, "zeros": zeros}, "int3", (rows, cols), g)
    elapsed = time.perf_counter() - start
    bits = np.unpackbits(qweight[7], bitorder="little")[: cols * 3].reshape(cols, 3)
    codes = bits @ np.array([1, 2, 4])
    z, s = np.repeat(zeros[7].astype(np.float32), g), np.repeat(scales[7].astype(np.float32), g)
    row = (codes.astype(np.float32) - z) * s
    assert w[7].tobytes() == row.astype(np.float32).tobytes()
    assert elapsed < 2.0
