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
from moeconv.quant.intq import quantize_int  # noqa: E402
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
    for name in ("quantize_blocks4", "quantize_mxfp4_rows", "quantize_int_rows"):
        real = getattr(triton_quant, name)
        monkeypatch.setattr(triton_quant, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    specs = [QuantSpec("nf4", 64, True), QuantSpec("fp4", 64, False), QuantSpec("mxfp4"),
             QuantSpec("int4", 64), QuantSpec("int3-sym", 128), QuantSpec("int4", 48)]  # 48: no kernel
    for spec in specs:
        quantize(w, spec)
    fused = ["quantize_blocks4", "quantize_blocks4", "quantize_mxfp4_rows", "quantize_int_rows", "quantize_int_rows"]
    expected = fused if DEVICE == "cuda" else []
    assert calls == expected


def int_edge_groups(dtype: torch.dtype, bits: int, size: int) -> list[torch.Tensor]:
    """Groups of ``size`` values that hit the edges of the int arithmetic.

    Scales of 1 (and powers of two) make the scaled values the values
    themselves, so halves are exact ties of the rounding; a zero point of 3
    moves the ties; the symmetric ones have ``+-a`` ties in both orders.
    """
    info = torch.finfo(dtype)
    smallest = info.tiny * info.eps
    top = float(2**bits - 1)
    half = float(2 ** (bits - 1))
    halves = torch.arange(min(2**bits - 1, 7)) + 0.5  # x.5 ties, down (0.5, 2.5) and up (1.5)
    up, down = (8 if dtype == torch.float16 else 12), 20  # scales 2^up, 2^-down: in float16's range

    def group(*values, palette=torch.zeros(1)) -> torch.Tensor:
        lead = torch.tensor(values, dtype=torch.float32)
        return torch.cat([lead, fill(palette, size - lead.numel())]).to(dtype)

    ties = torch.cat([halves, on_and_around(halves, torch.float32)])
    groups = [
        group(0.0, top, palette=ties),  # asym: scale 1, zero -0.0
        group(0.0, top * 2.0**up, palette=ties * 2.0**up),  # scale a power of two
        group(0.0, top * 2.0**-down, palette=ties * 2.0**-down),  # a float16-subnormal one
        group(-3.0, top - 3.0, palette=ties.clamp(max=top - 3.0) - 3.0),  # zero 3
        group(-half, palette=ties.clamp(max=half) - half),  # sym: scale 1
        group(half, palette=half - ties.clamp(max=half)),  # sym: scale -1
        group(0.25, -5.0, 5.0, palette=torch.tensor([1.0, -2.0])),  # +-a tie, -a first
        group(0.25, 5.0, -5.0, palette=torch.tensor([1.0, -2.0])),  # +a first
        torch.zeros(size, dtype=dtype),
        torch.full((size,), -0.0, dtype=dtype),
        fill(torch.tensor([0.0, -0.0, smallest, -smallest], dtype=dtype), size),
        (torch.arange(size) % 7 - 3).to(dtype) * smallest,  # subnormal inputs, scale 0 -> 1
        group(-2e-6, 3e-6, palette=torch.linspace(-2e-6, 3e-6, 11)),  # float16-subnormal scales
        group(-(2.0**-14), 2.0**-14, palette=torch.tensor([2.0**-15, -(2.0**-16)])),
        # float16 rounding ties (to even: down here, up in the next), normal and subnormal, of the scale
        # (and of the zero point: -mn / 1), where the input dtype holds them
        group(0.0, top * (1 + 2.0**-11)),
        group(0.0, top * (1 + 3 * 2.0**-11)),
        group(0.0, top * 3 * 2.0**-25),
        group(-(1 + 2.0**-11), top - (1 + 2.0**-11)),
        group(-half * (1 + 2.0**-11)),
        group(-half * 3 * 2.0**-25, palette=torch.tensor([2.0**-24])),
        group(half * 2.0**-25),  # scale 2^-25 rounds to 0, so 1
    ]
    if dtype == torch.float16:
        groups.append(group(info.max, -info.max, palette=torch.tensor([1.0, -1000.0])))  # the widest range
    return groups


def int_weight(dtype: torch.dtype, bits: int, group_size: int, shape: tuple[int, int]) -> torch.Tensor:
    """Random groups of magnitudes 1e-8 .. 1e3 (float16-subnormal scales among them) with the edge
    groups in place of the first whole groups, row by row."""
    rows, cols = shape
    gen = torch.Generator().manual_seed(group_size + cols)
    scale = 10.0 ** torch.empty(rows, -(-cols // group_size)).uniform_(-8, 3, generator=gen)
    w = (torch.randn(rows, cols, generator=gen) * scale.repeat_interleave(group_size, dim=1)[:, :cols]).to(dtype)
    per_row = cols // group_size
    edge = int_edge_groups(dtype, bits, group_size)
    assert len(edge) <= rows * per_row
    for i, values in enumerate(edge):
        r, j = divmod(i, per_row)
        w[r, j * group_size : (j + 1) * group_size] = values
    return w


INT_VARIANTS = [(bits, symmetric) for bits in (2, 3, 4, 8) for symmetric in (False, True)]


def assert_int_same(w: torch.Tensor, bits: int, symmetric: bool, group_size: int, finite: bool = True) -> dict:
    """The fused call and the torch path give the same bytes and the same ``finite`` (which is expected).

    The reference is the CPU's, the definition, except for rejected weights: their fused call redoes
    them with the torch path on the same device, whose NaN bytes may be the device's own."""
    reference, ref_finite = quantize_int(w.to("cpu" if finite else DEVICE), bits, symmetric, group_size, fused=False)
    fused, got_finite = quantize_int(w.to(DEVICE), bits, symmetric, group_size, fused=True)
    assert bool(got_finite) == bool(ref_finite) == finite
    assert_same_bytes(fused, reference)
    return fused


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [8, 32, 64, 128])
@pytest.mark.parametrize("shape", [(24, 256), (47, 131)])  # whole groups; a short last group of 3 columns
def test_int_same_bytes(dtype, group_size, shape):
    for bits, symmetric in INT_VARIANTS:
        assert_int_same(int_weight(dtype, bits, group_size, shape), bits, symmetric, group_size)


def test_int_strided_weight():
    base = int_weight(torch.bfloat16, 4, 32, (41, 131)).t().contiguous()
    for view in (lambda t: t.t(), lambda t: t.t()[1:, 3:]):  # column stride 41; and an offset start
        for bits, symmetric in INT_VARIANTS:
            assert_int_same(view(base), bits, symmetric, 32)


def test_int_edge_groups_round_as_the_format_says():
    """The fused codes themselves, on a few groups: ties to even, zero point, padding, first of a +-a tie."""
    w = torch.zeros(3, 12)
    w[0, :8] = torch.tensor([0.0, 15.0, 0.5, 1.5, 2.5, -0.0, 14.5, 7.49])  # scale 1, zero -0.0
    w[1, :8] = torch.tensor([0.25, -5.0, 5.0, 1.0, 2.5, 0.0, 0.0, 0.0])  # sym: m = -5, scale 0.625
    w[2, :8] = torch.tensor([0.25, 5.0, -5.0, 1.0, 2.5, 0.0, 0.0, 0.0])  # sym: m = 5, scale -0.625
    w[:, 8:] = -1.0  # a short last group of 4 real columns (and 4 padding ones)
    asym, _ = quantize_int(w.to(DEVICE), 4, False, 8, fused=True)
    low, high = asym["qweight"].cpu() & 15, asym["qweight"].cpu() >> 4
    codes = torch.stack([low, high], dim=-1).view(3, 16)
    assert codes[0, :8].tolist() == [0, 15, 0, 2, 2, 0, 14, 7]
    assert asym["zeros"].cpu()[0, 0].view(torch.int16).item() == -0x8000  # -0.0
    assert codes[:, 12:].eq(0).all()  # padding codes
    sym, _ = quantize_int(w.to(DEVICE), 4, True, 8, fused=True)
    assert sym["scales"].cpu()[1:, 0].tolist() == [0.625, -0.625]


def test_int_unsupported_group_size_takes_the_torch_path(monkeypatch):
    calls = []
    monkeypatch.setattr(triton_quant, "quantize_int_rows", lambda *a: calls.append(a))
    w = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    for group_size in (4, 48, 8192):
        assert_int_same(w, 3, False, group_size)
    assert calls == []


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # float16 scales in the interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int_range_beyond_float16_takes_the_torch_path(dtype):
    """A finite weight whose scale overflows float16: finite False and the torch path's bytes."""
    w = int_weight(dtype, 4, 32, (11, 70))
    w[3, 66] = 1e8  # over 65504 * 255: in a short last group
    for bits, symmetric in INT_VARIANTS:
        assert_int_same(w, bits, symmetric, 32, finite=False)
    w = int_weight(torch.float32, 4, 32, (11, 70))
    w[10, 64:66] = torch.tensor([3e38, -3e38])  # the range itself overflows float32
    assert_int_same(w, 4, False, 32, finite=False)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("at", [(2, 5), (46, 130)])  # in a whole group; in the short last group
def test_int_non_finite_takes_the_torch_path(bad, at):
    w = int_weight(torch.bfloat16, 4, 64, (47, 131))
    w[at] = bad
    for bits, symmetric in ((4, False), (3, True)):
        assert_int_same(w, bits, symmetric, 64, finite=False)
