"""Triton dequantization kernels against the float32 formulas of format v1, bit for bit.

On a machine without CUDA the kernels run in Triton's interpreter on CPU
tensors (tests/conftest.py sets TRITON_INTERPRET); on a GPU the same tests run
the compiled kernels.  The reference below is written from spec/FORMAT.md in
NumPy, independently of the kernels and of the converter.
"""

import math
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from moeconv_numpy import schemes  # noqa: E402
from moeconv_numpy.schemes import DYNAMIC_MAP, E2M1_VALUES, FP4_CODE, NF4_CODE, scheme_info  # noqa: E402
from moeconv_torch import kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def ref_dequantize(parts, scheme, shape, group_size, double_quant):
    """float32 [rows, cols] from NumPy parts, following the numerics section of the spec."""
    info = scheme_info(scheme)
    rows, cols = shape
    if info.family == "int":
        n_groups = math.ceil(cols / group_size)
        kp = n_groups * group_size
        bits = np.unpackbits(parts["qweight"], axis=1, bitorder="little")[:, : kp * info.bits]
        codes = (bits.reshape(rows, kp, info.bits).astype(np.int64) << np.arange(info.bits)).sum(-1)
        scales = np.repeat(parts["scales"].astype(np.float32), group_size, axis=1)
        if info.symmetric:
            zeros = np.float32(2 ** (info.bits - 1))
        else:
            zeros = np.repeat(parts["zeros"].astype(np.float32), group_size, axis=1)
        return ((codes.astype(np.float32) - zeros) * scales)[:, :cols]
    if info.family == "mxfp4":
        q = parts["qweight"]
        codes = np.stack([q & 15, q >> 4], axis=-1).reshape(rows, -1)
        exps = np.repeat(parts["scales"].astype(np.int32), 32, axis=1) - 127
        return np.ldexp(E2M1_VALUES[codes], exps).astype(np.float32)[:, :cols]
    n = rows * cols
    q = parts["qweight"]
    codes = np.stack([q >> 4, q & 15], axis=-1).reshape(-1)[:n]
    if double_quant:
        n_blocks = parts["absmax_q"].size
        scale = np.repeat(parts["absmax_scale"], schemes.DOUBLE_QUANT_BLOCK)[:n_blocks]
        absmax = DYNAMIC_MAP[parts["absmax_q"]] * scale + parts["absmax_offset"][0]
    else:
        absmax = parts["absmax"]
    table = NF4_CODE if info.family == "nf4" else FP4_CODE
    return (table[codes] * np.repeat(absmax, group_size)[:n]).reshape(rows, cols)


def random_parts(scheme, shape, group_size, double_quant, rng, scale=1.0):
    """Random stored parts in the exact layout of the spec: any byte is a valid code.

    Scales span several decades (and signs) so that rounding to the output
    dtype is exercised; ``scale`` shrinks them to weight-like magnitudes.
    """
    info = scheme_info(scheme)
    parts = {}
    for suffix, (dtype, dims) in schemes.tensor_layout(scheme, shape, group_size, double_quant).items():
        if suffix == "scales" and info.family == "mxfp4":
            parts[suffix] = rng.integers(0, 255, dims, dtype=np.uint8)  # 255 is NaN, never written
        elif dtype == "U8":
            parts[suffix] = rng.integers(0, 256, dims, dtype=np.uint8)
        elif suffix == "zeros":
            parts[suffix] = rng.uniform(0, 2**info.bits - 1, dims).astype(np.float16)
        else:
            magnitude = scale * 10.0 ** rng.uniform(-3, 0, dims) * rng.choice([-1.0, 1.0], dims)
            parts[suffix] = magnitude.astype(np.float16 if dtype == "F16" else np.float32)
    return parts


def to_torch(parts, device=DEVICE):
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in parts.items()}


INT_SCHEMES = ("int2", "int3", "int4", "int8", "int2-sym", "int3-sym", "int4-sym", "int8-sym")
CASES = [(scheme, (6, 200), 64, False) for scheme in INT_SCHEMES] + [
    ("int4", (5, 96), 32, False),
    ("int3", (4, 300), 128, False),
    ("nf4", (7, 37), 64, False),
    ("nf4", (7, 37), 32, True),
    ("fp4", (9, 64), 64, False),
    ("fp4", (3, 1100), 128, True),
    ("nf4", (40, 40), 32, True),
    ("mxfp4", (5, 70), 32, False),
    ("mxfp4", (3, 64), 32, False),
]


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme,shape,group_size,double_quant", CASES)
def test_dequantize_matches_reference_bitwise(scheme, shape, group_size, double_quant, out_dtype):
    rng = np.random.default_rng(abs(hash((scheme, shape, group_size, double_quant))) % 2**32)
    parts = random_parts(scheme, shape, group_size, double_quant, rng)
    expected = torch.from_numpy(ref_dequantize(parts, scheme, shape, group_size, double_quant)).to(out_dtype)
    got = kernels.dequantize(to_torch(parts), scheme, shape, group_size, double_quant, out_dtype).cpu()
    assert got.dtype == out_dtype and tuple(got.shape) == shape
    mismatch = (got.view(torch.int16) != expected.view(torch.int16)).sum().item()
    assert mismatch == 0, f"{mismatch} of {got.numel()} elements differ from the reference"


@pytest.mark.parametrize("scheme,shape,group_size", [("int4", (40, 192), 64), ("int3", (9, 100), 32),
                                                     ("nf4", (13, 27), 64), ("mxfp4", (11, 70), 32)])
def test_many_programs_and_a_ragged_last_one(scheme, shape, group_size):
    """Small tiles: the stream spans many programs, the last one only partly; padded rows and partial units."""
    from moeconv_torch.kernels import dequant

    parts = random_parts(scheme, shape, group_size, False, np.random.default_rng(4))
    expected = torch.from_numpy(ref_dequantize(parts, scheme, shape, group_size, False)).to(torch.bfloat16)
    tiling = dequant.DequantTiling(tile_elems=256)
    got = dequant.dequantize(to_torch(parts), scheme, shape, group_size, tiling=tiling).cpu()
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


def test_codes_that_do_not_start_on_a_word_boundary():
    """A qweight view one byte into a larger buffer (as a part sliced from a file may be) is read correctly."""
    scheme, shape, group_size = "int4", (6, 128), 64
    parts = random_parts(scheme, shape, group_size, False, np.random.default_rng(5))
    expected = torch.from_numpy(ref_dequantize(parts, scheme, shape, group_size, False)).to(torch.bfloat16)
    torch_parts = to_torch(parts)
    buffer = torch.zeros(torch_parts["qweight"].numel() + 1, dtype=torch.uint8, device=DEVICE)
    buffer[1:] = torch_parts["qweight"].reshape(-1)
    torch_parts["qweight"] = buffer[1:].view(torch_parts["qweight"].shape)
    got = kernels.dequantize(torch_parts, scheme, shape, group_size, False, torch.bfloat16).cpu()
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


def test_double_quant_spans_several_second_level_blocks():
    # 600 blocks of 32: absmax_scale has 3 entries, so block // 256 indexing is exercised.
    scheme, shape = "nf4", (150, 128)
    rng = np.random.default_rng(7)
    parts = random_parts(scheme, shape, 32, True, rng)
    assert parts["absmax_scale"].size == 3
    expected = torch.from_numpy(ref_dequantize(parts, scheme, shape, 32, True)).to(torch.bfloat16)
    got = kernels.dequantize(to_torch(parts), scheme, shape, 32, True, torch.bfloat16).cpu()
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


def test_dequantize_rejects_wrong_parts():
    rng = np.random.default_rng(0)
    parts = to_torch(random_parts("int4", (4, 64), 64, False, rng))
    parts["scales"] = parts["scales"].float()
    with pytest.raises(ValueError, match="scales"):
        kernels.dequantize(parts, "int4", (4, 64), 64)
    del parts["zeros"]
    with pytest.raises(ValueError, match="zeros"):
        kernels.dequantize(parts, "int4", (4, 64), 64)


def test_available_matches_the_device():
    assert kernels.available(DEVICE)
    if DEVICE == "cpu":
        assert kernels.available("cpu") == (os.environ.get("TRITON_INTERPRET") == "1")


def test_agrees_with_moeconv_numpy_reader():
    """Cross-check with the format package's own dequantizer, where it exists."""
    import moeconv_numpy

    reader = getattr(moeconv_numpy, "dequantize", None)
    if reader is None:
        pytest.skip("moeconv_numpy.dequantize is not available yet")
    rng = np.random.default_rng(3)
    cases = [("int3", (4, 100), 64, False), ("nf4", (6, 64), 64, True), ("mxfp4", (2, 64), 32, False)]
    for scheme, shape, gs, dq in cases:
        parts = random_parts(scheme, shape, gs, dq, rng)
        expected = torch.from_numpy(np.asarray(reader(parts, scheme, shape, gs, dq), dtype=np.float32))
        got = kernels.dequantize(to_torch(parts), scheme, shape, gs, dq, torch.bfloat16).cpu()
        assert torch.equal(got.view(torch.int16), expected.to(torch.bfloat16).view(torch.int16)), scheme
