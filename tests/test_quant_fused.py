"""Fused Triton quantizers (moeconv.quant.triton_quant): the same bytes as the torch path, every tensor.

The torch path (``fused=False``, on the CPU) is the definition; the kernels run
through ``fused=True`` -- in Triton's interpreter on CPU tensors where there is
no GPU (tests/conftest.py sets TRITON_INTERPRET), compiled on a GPU.  Weights
are built to hit the edges of the arithmetic: values exactly on a code
boundary after scaling, +-0.0, subnormal inputs, subnormal products and
scales, all-zero blocks, the largest finite values of each dtype.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from moeconv.quant import QuantSpec, quantize  # noqa: E402
from moeconv.quant import triton_quant  # noqa: E402
from moeconv.quant.blockwise import codebook, quantize_blockwise4  # noqa: E402
from moeconv.quant.mxfp4 import e2m1_codebook, quantize_mxfp4  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def assert_same_bytes(fused: dict, reference: dict) -> None:
    """Every tensor of ``fused`` equals ``reference``'s, byte for byte (float32 NaN payloads included)."""
    assert fused.keys() == reference.keys()
    for key, ref in reference.items():
        got, ref = fused[key].cpu(), ref.cpu()
        assert got.dtype == ref.dtype and got.shape == ref.shape, key
        assert torch.equal(got.contiguous().view(torch.uint8), ref.contiguous().view(torch.uint8)), key


def on_and_around(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` rounded to ``dtype`` and their neighbours there, both signs (zeros kept as they are)."""
    v = values.to(dtype)
    v = torch.cat([v, -v])
    nonzero = v[v != 0]
    return torch.cat([v, torch.nextafter(nonzero, nonzero * 2), torch.nextafter(nonzero, nonzero / 2)])


def fill(palette: torch.Tensor, n: int) -> torch.Tensor:
    """``palette`` repeated to ``n`` values."""
    return palette.repeat(n // palette.numel() + 1)[:n]


def led_blocks(palette: torch.Tensor, size: int, lead: float) -> torch.Tensor:
    """Blocks of ``size`` values: ``lead`` (the block's largest magnitude), then the next ``size - 1``
    values of ``palette``, until every palette value has appeared once."""
    pieces = fill(palette, -(-palette.numel() // (size - 1)) * (size - 1)).view(-1, size - 1)
    return torch.cat([torch.full((pieces.shape[0], 1), lead, dtype=palette.dtype), pieces], dim=1).view(-1)


def blockwise_weight(family: str, dtype: torch.dtype, blocksize: int, shape: tuple[int, int]) -> torch.Tensor:
    """Whole blocks of edge cases, then random values of all magnitudes."""
    info = torch.finfo(dtype)
    smallest = info.tiny * info.eps  # the smallest subnormal
    gen = torch.Generator().manual_seed(blocksize)
    bounds = torch.from_numpy(codebook(family).bounds)
    ties = torch.cat([on_and_around(bounds, dtype), torch.tensor([0.0, -0.0], dtype=dtype)])
    power = 8 if dtype == torch.float16 else 100
    tiny_products = torch.tensor([smallest, -smallest, info.tiny], dtype=dtype)
    wide = (torch.randn(blocksize - 1, generator=gen) * 10.0 ** torch.randint(-40, 1, (blocksize - 1,), generator=gen))
    edge = torch.cat([
        led_blocks(ties, blocksize, 1.0),  # absmax 1: the values are the scaled ones, exact bounds among them
        led_blocks(ties * 2.0**power, blocksize, 2.0**power),  # absmax a power of two: the same, exactly
        led_blocks(ties * 2.0**-power, blocksize, 2.0**-power),
        torch.zeros(blocksize, dtype=dtype),
        torch.full((blocksize,), -0.0, dtype=dtype),
        fill(torch.tensor([0.0, -0.0, smallest, -smallest], dtype=dtype), blocksize),  # absmax clamped to 1e-38
        (torch.randint(-40, 41, (blocksize,), generator=gen) * smallest).to(dtype),
        torch.cat([torch.tensor([info.max]), wide]).to(dtype),  # 1/absmax subnormal for float32 and bfloat16
        led_blocks(tiny_products, blocksize, -1.0),  # subnormal products
    ])
    n = shape[0] * shape[1]
    scale = 10.0 ** torch.empty(n // 64 + 1).uniform_(-6, 4, generator=gen).repeat_interleave(64)[:n]
    w = (torch.randn(n, generator=gen) * scale).clamp(-info.max, info.max).to(dtype)
    assert edge.numel() <= n
    w[: edge.numel()] = edge
    return w.view(shape)


@pytest.mark.parametrize("family", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("shape", [(48, 128), (47, 131)])  # 6144 elements: whole blocks; 6157: a short last block
def test_blockwise_same_bytes(family, dtype, blocksize, shape):
    w = blockwise_weight(family, dtype, blocksize, shape)
    assert torch.isfinite(w).all()
    for double_quant in (False, True):
        reference, ref_finite = quantize_blockwise4(w, family, blocksize, double_quant, fused=False)
        fused, finite = quantize_blockwise4(w.to(DEVICE), family, blocksize, double_quant, fused=True)
        assert bool(finite) and bool(ref_finite)
        assert_same_bytes(fused, reference)


def test_blockwise_shorter_than_a_block():
    """No whole block: nothing for the kernel, the torch code does the short block alone."""
    w = torch.randn(3, 7, generator=torch.Generator().manual_seed(2))
    for family in ("nf4", "fp4"):
        reference, _ = quantize_blockwise4(w, family, 32, True, fused=False)
        fused, _ = quantize_blockwise4(w.to(DEVICE), family, 32, True, fused=True)
        assert_same_bytes(fused, reference)


def test_blockwise_edge_weights_hit_every_code():
    """The edge blocks are not vacuous: every code appears, FP4's tiny-positive code 8 among them."""
    w = blockwise_weight("fp4", torch.float32, 64, (48, 128))
    parts, _ = quantize_blockwise4(w.to(DEVICE), "fp4", 64, False, fused=True)
    packed = parts["qweight"].cpu()
    codes = torch.cat([packed >> 4, packed & 15])
    assert torch.bincount(codes.long(), minlength=16).min() > 0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 in the interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("at", [0, 6150])  # in a whole block; in the short last block (6144 to 6157)
def test_blockwise_non_finite_takes_the_torch_path(bad, at):
    """NaN/Inf weights get the torch path's bytes on the same device (and finite=False, so quantize refuses them)."""
    w = blockwise_weight("nf4", torch.bfloat16, 64, (47, 131))
    w.view(-1)[at] = bad
    for double_quant in (False, True):
        reference, ref_finite = quantize_blockwise4(w.to(DEVICE), "nf4", 64, double_quant, fused=False)
        fused, finite = quantize_blockwise4(w.to(DEVICE), "nf4", 64, double_quant, fused=True)
        assert not bool(finite) and not bool(ref_finite)
        assert_same_bytes(fused, reference)


def mxfp4_weight(dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    """Rows of edge cases (ties of E2M1 at several scales, subnormals, the largest values), then random rows."""
    info = torch.finfo(dtype)
    smallest = info.tiny * info.eps
    gen = torch.Generator().manual_seed(shape[1])
    rows, cols = shape
    ties = on_and_around(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0]), dtype)
    ties = torch.cat([ties, torch.tensor([0.0, -0.0], dtype=dtype)])
    power = 8 if dtype == torch.float16 else 100
    kinds = [
        led_blocks(ties, 32, 6.0),  # block max 6: scale 1, the values are the scaled ones
        led_blocks(ties * 2.0**power, 32, 6.0 * 2.0**power),
        led_blocks(ties * 2.0**-power, 32, 6.0 * 2.0**-power),
        torch.tensor([0.0, -0.0, smallest, -smallest], dtype=dtype),  # e = 0
        led_blocks(torch.tensor([smallest, -smallest, -3 * smallest], dtype=dtype), 32, -1.0),  # subnormal products
        led_blocks(-on_and_around(torch.tensor([1e-3, 0.5]), dtype), 32, info.max),  # e = 252 and subnormal products
        torch.zeros(1, dtype=dtype),
    ]
    scale = 10.0 ** torch.empty(rows, 1).uniform_(-8, 4, generator=gen)
    w = (torch.randn(rows, cols, generator=gen) * scale).to(dtype)
    for r in range(min(rows, len(kinds))):
        w[r] = fill(kinds[r], cols)
    return w


MX_SHAPES = [(1, 1), (3, 33), (7, 100), (40, 64), (5, 1100), (130, 45)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MX_SHAPES)
def test_mxfp4_same_bytes(dtype, shape):
    w = mxfp4_weight(dtype, shape)
    reference, ref_finite = quantize_mxfp4(w, fused=False)
    fused, finite = quantize_mxfp4(w.to(DEVICE), fused=True)
    assert bool(finite) and bool(ref_finite)
    assert_same_bytes(fused, reference)


def test_mxfp4_strided_weight():
    base = mxfp4_weight(torch.bfloat16, (70, 9))
    for view in (lambda t: t.t(), lambda t: t.t()[:, 1:]):  # column stride 9; and an offset start
        reference, _ = quantize_mxfp4(view(base), fused=False)
        fused, _ = quantize_mxfp4(view(base.to(DEVICE)), fused=True)
        assert_same_bytes(fused, reference)


def test_mxfp4_edge_weights_hit_every_code():
    w = mxfp4_weight(torch.float32, (8, 100))
    parts, _ = quantize_mxfp4(w.to(DEVICE), fused=True)
    packed = parts["qweight"].cpu()
    codes = torch.cat([packed >> 4, packed & 15]).view(-1)
    assert torch.bincount(codes.long(), minlength=16).min() > 0
    assert {0, 252}.issubset(set(parts["scales"].cpu().view(-1).tolist()))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_mxfp4_non_finite_takes_the_torch_path(bad):
    w = mxfp4_weight(torch.float32, (5, 100))
    w[2, 70] = bad
    reference, ref_finite = quantize_mxfp4(w.to(DEVICE), fused=False)  # the same device: see the blockwise test
    fused, finite = quantize_mxfp4(w.to(DEVICE), fused=True)
    assert not bool(finite) and not bool(ref_finite)
    assert_same_bytes(fused, reference)


def test_kernels_run_exactly_when_the_weight_is_on_cuda(monkeypatch):
    """``quantize`` picks the kernels by itself on CUDA and never on the CPU."""
    calls = []
    for name in ("quantize_blocks4", "quantize_mxfp4_rows"):
        real = getattr(triton_quant, name)
        monkeypatch.setattr(triton_quant, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for spec in (QuantSpec("nf4", 64, True), QuantSpec("fp4", 64, False), QuantSpec("mxfp4")):
        quantize(w, spec)
    expected = ["quantize_blocks4", "quantize_blocks4", "quantize_mxfp4_rows"] if DEVICE == "cuda" else []
    assert calls == expected
