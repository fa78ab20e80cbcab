"""NF4 / FP4 (moeconv.quant.blockwise): bit for bit identical to bitsandbytes 0.50's CPU quantize_4bit.

bitsandbytes is a test dependency only; these tests skip (saying why) where it
is missing or older than 0.50, whose CPU ``quantize_blockwise`` (used for the
double-quantized scales) replaced a binary search by the lookup table that
moeconv replicates.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from moeconv.quant import QuantSpec, quantize
from moeconv.quant.blockwise import code_tables, codebook, quantize_dynamic

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (test dependency) is not installed")
import bitsandbytes.functional as bnb_f  # noqa: E402

if tuple(int(p) for p in bnb.__version__.split(".")[:2]) < (0, 50):
    pytest.skip(f"bit-exactness is defined against bitsandbytes 0.50; found {bnb.__version__}", allow_module_level=True)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t


def assert_same_as_bnb(w: torch.Tensor, family: str, blocksize: int, double_quant: bool) -> None:
    packed, state = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type=family, compress_statistics=double_quant)
    parts = quantize(w, QuantSpec(family, blocksize, double_quant))
    assert torch.equal(parts["qweight"], packed.view(-1)), "packed codes differ"
    if double_quant:
        assert torch.equal(parts["absmax_q"], state.absmax), "8-bit absmax codes differ"
        assert torch.equal(_bits(parts["absmax_scale"]), _bits(state.state2.absmax)), "second-level absmax differs"
        assert torch.equal(_bits(parts["absmax_offset"]), _bits(state.offset.reshape(1))), "offset differs"
    else:
        assert torch.equal(_bits(parts["absmax"]), _bits(state.absmax)), "absmax differs"


SHAPES = [(1, 1), (3, 1), (1, 63), (2, 33), (7, 100), (64, 64), (37, 129), (128, 256), (300, 701)]


@pytest.mark.parametrize("family", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_random_weights(family, double_quant, dtype, shape):
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    w = torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen) * 0.05
    if shape[0] > 4:
        w[1] = 0  # whole blocks of zeros
        w[3, ::2] = -0.0
    w = w.to(dtype)
    for blocksize in (32, 64, 256):
        assert_same_as_bnb(w, family, blocksize, double_quant)


@pytest.mark.parametrize("blocksize", [64, 128, 512, 4096])
def test_block_sizes_and_short_last_block(blocksize):
    gen = torch.Generator().manual_seed(blocksize)
    w = torch.randn(33, 250, generator=gen).to(torch.bfloat16)  # 8250: not a multiple of any block size
    for family in ("nf4", "fp4"):
        for dq in (False, True):
            assert_same_as_bnb(w, family, blocksize, dq)


def test_all_zero_weight_and_zero_last_block():
    for w in (torch.zeros(4, 64), torch.cat([torch.randn(1, 64), torch.zeros(1, 3)], dim=1)):
        for family in ("nf4", "fp4"):
            for dq in (False, True):
                assert_same_as_bnb(w, family, 64, dq)


def test_extreme_magnitudes():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(8, 128, generator=gen)
    w[0] *= 1e-30  # absmax far below 1e-38's reciprocal range after clamping
    w[1] *= 1e-39  # subnormal float32
    w[2] *= 1e30
    w[3, 5] = 3e38
    for family in ("nf4", "fp4"):
        for dq in (False, True):
            assert_same_as_bnb(w, family, 64, dq)


def test_many_blocks_uses_the_same_mean_as_bitsandbytes():
    # > 32768 blocks: torch's CPU mean then reduces in parallel, in a thread-count dependent order
    gen = torch.Generator().manual_seed(9)
    w = (torch.randn(512, 4200, generator=gen) * 0.02).to(torch.bfloat16)
    assert_same_as_bnb(w, "nf4", 64, True)


@pytest.mark.parametrize("family", ["nf4", "fp4"])
def test_cell_lookup_equals_bucketize_everywhere(family):
    """The cell lookup against bitsandbytes' bucketize + order, on every bfloat16 cell in
    [-1, 1] (its first, last and a middle float32) and on every bound +-2 ulps."""
    bounds, order = code_tables(family)
    top = torch.arange(0, 1 << 16, dtype=torch.int64)
    cells = torch.cat([top << 16, (top << 16) | 0xFFFF, (top << 16) | 0x8123]).to(torch.int64)
    x = cells.to(torch.int32).view(torch.float32)
    x = x[x.abs() <= 1]
    b = torch.from_numpy(bounds)
    up, down = torch.nextafter(b, b + 1), torch.nextafter(b, b - 1)
    near = torch.cat([b, up, down, torch.nextafter(up, up + 1), torch.nextafter(down, down - 1)])
    x = torch.cat([x, near, torch.tensor([0.0, -0.0, 1.0, -1.0])])
    expected = torch.from_numpy(order)[torch.bucketize(x, b)]
    assert torch.equal(codebook(family)(x.contiguous()), expected)
    # and bitsandbytes' own bounds are ours
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    bnb_bounds, bnb_order = _get_4bit_quantize_bounds(family, torch.device("cpu"))
    assert torch.equal(bnb_bounds, b) and bnb_order.tolist() == order.tolist()


def test_dynamic_lut_matches_bitsandbytes_blockwise():
    """The 8-bit path on values straddling every DYNAMIC_MAP midpoint and every LUT step, in blocks
    whose absmax is exactly 1 (so the normalized value is the probe itself)."""
    from moeconv_numpy.schemes import DYNAMIC_MAP

    mids = torch.from_numpy((DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) * np.float32(0.5))
    steps = torch.arange(0, 65536, 7, dtype=torch.float32) * 2 / 65535 - 1
    half_steps = (torch.arange(0, 65535, 7, dtype=torch.float32) + 0.5) * 2 / 65535 - 1
    around = [p for q in (mids, steps, half_steps) for p in (q, torch.nextafter(q, q + 1), torch.nextafter(q, q - 1))]
    probe = torch.cat(around)
    probe = probe.clamp(-1, 1)
    probe = torch.cat([probe, torch.zeros(-probe.numel() % 255)]).view(-1, 255)
    blocks = torch.cat([torch.ones(probe.shape[0], 1), probe], dim=1).reshape(-1)
    blocks = torch.cat([blocks, torch.zeros(256), torch.full((100,), 0.25)])  # an all-zero block, a short one
    expected_codes, state = bnb_f.quantize_blockwise(blocks, blocksize=256)
    codes, amax = quantize_dynamic(blocks)
    assert torch.equal(codes, expected_codes)
    assert torch.equal(amax, state.absmax)


def test_chunking_does_not_change_bytes(monkeypatch):
    import moeconv.quant.chunks as chunks

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(40, 100, generator=gen)
    whole = quantize(w, QuantSpec("nf4", 64, True))
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 64 * 3)
    chunked = quantize(w, QuantSpec("nf4", 64, True))
    for key in whole:
        assert torch.equal(_bits(whole[key]), _bits(chunked[key])), key
