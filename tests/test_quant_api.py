"""moeconv.quant's public API: QuantSpec, validation, layouts, and the round trip against the NumPy reader.

``dequantize(quantize(W))`` in torch must equal ``moeconv_numpy.dequantize`` of
the same parts bit for bit for every scheme; where CUDA is present, CUDA must
produce the same bytes as the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeconv.quant import QuantSpec, dequantize, quantize
from moeconv_numpy.schemes import SCHEMES

_TORCH = {"U8": torch.uint8, "F16": torch.float16, "F32": torch.float32}


def all_specs() -> list[QuantSpec]:
    specs = []
    for name, info in SCHEMES.items():
        if info.family in ("nf4", "fp4"):
            specs += [QuantSpec(name, 64, False), QuantSpec(name, 64, True), QuantSpec(name, 32, True)]
        elif info.family == "int":
            specs += [QuantSpec(name, 64), QuantSpec(name, 48)]
        else:
            specs.append(QuantSpec(name))
    return specs


def _spec_id(spec: QuantSpec) -> str:
    return f"{spec.scheme}-g{spec.group_size}{'-dq' if spec.double_quant else ''}"


def _weight(shape, seed=0, dtype=torch.bfloat16, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen) * 0.05
    return w.to(dtype).to(device)


def test_spec_normalization():
    assert QuantSpec("int4") == QuantSpec("int4", 64, False)
    assert QuantSpec("int4", double_quant=True).double_quant is False
    assert QuantSpec("nf4").group_size == 64 and QuantSpec("nf4").double_quant is True
    assert QuantSpec("mxfp4").group_size == 32
    with pytest.raises(ValueError, match="unknown scheme"):
        QuantSpec("int5")
    with pytest.raises(ValueError, match="block size"):
        QuantSpec("nf4", 48)
    with pytest.raises(ValueError, match="fixed block size"):
        QuantSpec("mxfp4", 64)
    with pytest.raises(ValueError, match="positive integer"):
        QuantSpec("int4", 0)


@pytest.mark.parametrize("spec", all_specs(), ids=_spec_id)
@pytest.mark.parametrize("shape", [(8, 128), (5, 100), (3, 33)])
def test_layout_and_round_trip_equal_numpy_reference(spec, shape):
    from moeconv_numpy import dequantize as np_dequantize

    w = _weight(shape, seed=shape[1])
    parts = quantize(w, spec, name="experts.0.w1")
    layout = spec.layout(shape)
    assert set(parts) == set(layout)
    for suffix, (dtype, dims) in layout.items():
        assert parts[suffix].dtype == _TORCH[dtype] and tuple(parts[suffix].shape) == dims, suffix
    ours = dequantize(parts, spec, shape)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == shape
    arrays = {k: v.numpy() for k, v in parts.items()}
    reference = np_dequantize(arrays, spec.scheme, shape, spec.group_size, spec.double_quant)
    np.testing.assert_array_equal(ours.numpy().view(np.uint32), reference.view(np.uint32))
    # and the quantization is a quantization of w: the error is bounded by the weight's own scale
    err = (ours - w.float()).abs().max().item()
    assert err <= 0.8 * w.float().abs().max().item()


SOME_SPECS = [QuantSpec("int4"), QuantSpec("int8-sym"), QuantSpec("nf4"), QuantSpec("fp4", 64, False), QuantSpec("mxfp4")]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("spec", SOME_SPECS, ids=_spec_id)
def test_non_finite_weight_is_rejected_by_name(bad, spec):
    w = _weight((4, 96), dtype=torch.float32)
    w[2, 17] = bad
    with pytest.raises(ValueError, match=r"model\.layers\.0\.experts\.3\.w2\.weight.*NaN or Inf.*\[2, 17\]"):
        quantize(w, spec, name="model.layers.0.experts.3.w2.weight")


def test_fp16_scale_overflow_is_rejected():
    w = torch.tensor([[-3e38, 3e38] * 32])
    with pytest.raises(ValueError, match="overflows the float16 scales"):
        quantize(w, QuantSpec("int2"), name="big")


def test_shape_and_type_checks():
    with pytest.raises(ValueError, match="'w3'.*2-D"):
        quantize(torch.zeros(2, 3, 4), QuantSpec("int4"), name="w3")
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.zeros(64), QuantSpec("nf4"))
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.zeros(2, 64, dtype=torch.int32), QuantSpec("int4"))
    with pytest.raises(ValueError, match="positive sizes"):
        quantize(torch.zeros(0, 64), QuantSpec("int4"))


@pytest.mark.parametrize("spec", [QuantSpec("int4"), QuantSpec("nf4"), QuantSpec("mxfp4")], ids=_spec_id)
def test_parameters_are_quantized_without_autograd(spec, monkeypatch):
    import moeconv.quant.chunks as chunks

    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 256)  # several chunks, so worker threads run too
    weight = torch.nn.Parameter(_weight((16, 128), dtype=torch.float32))
    parts = quantize(weight, spec)
    assert not any(p.requires_grad for p in parts.values())
    assert all(torch.equal(a, b) for a, b in zip(parts.values(), quantize(weight.detach(), spec).values()))
    assert not dequantize(parts, spec, weight.shape).requires_grad


def test_dequantize_checks_parts():
    spec = QuantSpec("int4")
    parts = quantize(_weight((4, 64)), spec)
    with pytest.raises(ValueError, match="do not match"):
        dequantize({"qweight": parts["qweight"]}, spec, (4, 64))
    with pytest.raises(ValueError, match="'scales' is"):
        dequantize({**parts, "scales": parts["scales"].float()}, spec, (4, 64))
    with pytest.raises(ValueError, match="expected U8"):
        dequantize(parts, spec, (4, 128))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", all_specs(), ids=_spec_id)
def test_cuda_gives_the_cpu_bytes(spec):
    w = _weight((67, 300), seed=11)
    cpu = quantize(w, spec)
    gpu = quantize(w.cuda(), spec)
    for suffix, part in cpu.items():
        assert gpu[suffix].device.type == "cuda"
        assert torch.equal(gpu[suffix].cpu().view(torch.uint8), part.view(torch.uint8)), suffix
    back = dequantize(gpu, spec, w.shape).cpu()
    assert torch.equal(back.view(torch.int32), dequantize(cpu, spec, w.shape).view(torch.int32))
