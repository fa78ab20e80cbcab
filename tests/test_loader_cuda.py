"""The loader on a CUDA GPU: the same model as on CPU, kernels or not, and transformers' device_map.

Skipped without a GPU (CI); run on the device machine.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeconv_torch import QuantizedExperts, backend, load_model
from test_loader_model import IDS, build_mixtral, model_bytes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return build_mixtral(tmp_path_factory.mktemp("mixtral_cuda"))


def logits(model, device):
    with torch.no_grad():
        return model(IDS.to(device)).logits.float().cpu()


def close(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=4 * 2**-8 * want.abs().max().item())


def test_cuda_load_matches_cpu_and_keeps_experts_packed_on_the_gpu(mixtral):
    _, conv_dir = mixtral
    model = load_model(conv_dir, device="cuda")
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, QuantizedExperts) and all(b.is_cuda for b in experts.buffers())
    assert model_bytes(model) == model_bytes(load_model(conv_dir))
    close(logits(model, "cuda"), logits(load_model(conv_dir), "cpu"))
    out = model.generate(IDS[:1, :4].cuda(), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)
    # a forward may have moved the parts into the kernels' layout: still held once
    assert model_bytes(model) <= 1.05 * model_bytes(load_model(conv_dir))


def test_kernel_path_and_torch_path_agree_on_cuda(mixtral, monkeypatch):
    _, conv_dir = mixtral
    model = load_model(conv_dir, device="cuda")
    with_kernels = logits(model, "cuda")
    monkeypatch.setattr(backend, "kernels_for", lambda device: None)
    close(with_kernels, logits(model, "cuda"))


def test_from_pretrained_device_map_auto_on_one_gpu(mixtral):
    _, conv_dir = mixtral
    model = AutoModelForCausalLM.from_pretrained(conv_dir, device_map="auto")
    assert {b.device.type for b in model.buffers()} == {"cuda"}
    assert torch.equal(logits(model, "cuda"), logits(load_model(conv_dir, device="cuda"), "cuda"))


def test_device_map_auto_spreads_over_gpu_and_cpu(mixtral):
    _, conv_dir = mixtral
    model = AutoModelForCausalLM.from_pretrained(conv_dir, device_map="auto", max_memory={0: "120KB", "cpu": "2GB"})
    assert {str(d) for d in model.hf_device_map.values()} >= {"0", "cpu"}, model.hf_device_map
    close(logits(model, "cuda"), logits(load_model(conv_dir), "cpu"))
