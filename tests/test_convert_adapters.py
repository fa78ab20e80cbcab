"""Every per-expert-2-D adapter, end to end on a tiny random model made with transformers.

For each architecture: build and save a sharded checkpoint, ``moeconv convert``
it with the defaults, verify it with the reference reader, compare every routed
expert with the source within NF4's error bound, check that every router (and
every other tensor) is bit-identical, then ``moeconv dequantize`` it and load
the result with plain transformers.  Which tensor is an expert or a router is
decided here by patterns written independently of the adapters.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors import safe_open

import tiny_models as tm
from moeconv.cli import main
from moeconv_numpy import open_model
from moeconv_numpy.schemes import DOUBLE_QUANT_BLOCK, DYNAMIC_MAP, NF4_CODE

#: arch -> (routed expert pattern, router pattern, number of routed-expert weights)
EXPECTED = {
    "mixtral": (r"model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.w[123]\.weight", r".*block_sparse_moe\.gate\.weight", 24),
    "phimoe": (r"model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.w[123]\.weight", r".*block_sparse_moe\.gate\.weight", 24),
    "qwen2_moe": (r"model\.layers\.\d+\.mlp\.experts\.\d+\.\w+_proj\.weight", r".*mlp\.(gate|shared_expert_gate)\.weight", 24),
    "qwen3_moe": (r"model\.layers\.\d+\.mlp\.experts\.\d+\.\w+_proj\.weight", r".*mlp\.gate\.weight", 24),
    "olmoe": (r"model\.layers\.\d+\.mlp\.experts\.\d+\.\w+_proj\.weight", r".*mlp\.gate\.weight", 24),
    "deepseek_v2": (r"model\.layers\.\d+\.mlp\.experts\.\d+\.\w+_proj\.weight", r".*mlp\.gate\.(weight|e_score_correction_bias)", 24),
    "deepseek_v3": (r"model\.layers\.\d+\.mlp\.experts\.\d+\.\w+_proj\.weight", r".*mlp\.gate\.(weight|e_score_correction_bias)", 24),
    "deepseek_v3_fp8": (r"model\.layers\.\d+\.mlp\.experts\.\d+\.\w+_proj\.weight", r".*mlp\.gate\.(weight|e_score_correction_bias)", 24),
    "switch_transformers": (r"(en|de)coder\.block\.\d+\.layer\.\d+\.mlp\.experts\.expert_\d+\.w[io]\.weight", r".*mlp\.router\.classifier\.weight", 16),
}
_HALF_GAP_NF4 = float(np.diff(NF4_CODE).max()) / 2
_HALF_GAP_DQ = float(np.diff(DYNAMIC_MAP).max()) / 2


def nf4_dq_bound(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Per-element bound of |w - dequant(nf4 g64 + double quant)|: half a code gap times the block's
    absmax, plus the worst error of the 8-bit absmax (half a dynamic-map gap of its 256-block scale)."""
    flat = w.float().reshape(-1)
    n = flat.numel()
    nb = math.ceil(n / block)
    absmax = torch.nn.functional.pad(flat.abs(), (0, nb * block - n)).view(nb, block).amax(1)
    centred = absmax - absmax.mean()
    ng = math.ceil(nb / DOUBLE_QUANT_BLOCK)
    scale = torch.nn.functional.pad(centred.abs(), (0, ng * DOUBLE_QUANT_BLOCK - nb)).view(ng, -1).amax(1)
    per_block = _HALF_GAP_NF4 * absmax + _HALF_GAP_DQ * scale.repeat_interleave(DOUBLE_QUANT_BLOCK)[:nb]
    return (per_block.repeat_interleave(block)[:n] * (1 + 1e-5) + 1e-7).view(w.shape)


def fp8_reference(w8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """FP8 weight times its block scale, written out element by element (no reshapes shared with the code)."""
    rows, cols = w8.shape
    s = scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return w8.float() * s


def source_values(path) -> tuple[dict[str, torch.Tensor], dict]:
    """The source's tensors with FP8 weights replaced by their float32 values; and config.json."""
    config = json.loads((path / "config.json").read_text())
    tensors = tm.read_all(path)
    block = (config.get("quantization_config") or {}).get("weight_block_size")
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        out[name] = fp8_reference(t, tensors[name + "_scale_inv"], block) if t.dtype == torch.float8_e4m3fn else t
    return out, config


def stored(out, name: str) -> torch.Tensor:
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(out / index[name], "pt") as f:
        return f.get_tensor(name)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")


def _source(arch: str, root):
    if arch == "deepseek_v3_fp8":
        return tm.make_fp8(tm.build("deepseek_v3", root / arch))
    return tm.build(arch, root / arch)


def _cli(*args: str) -> None:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_convert_verify_dequantize(arch, workdir):
    src = _source(arch, workdir)
    out, dst = workdir / f"{arch}-nf4", workdir / f"{arch}-bf16"
    expert_pattern, router_pattern, n_experts = EXPECTED[arch]
    expert_re, router_re = re.compile(expert_pattern), re.compile(router_pattern)
    assert len(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]) > 0  # sharded

    _cli("convert", src, out)
    ref, config = source_values(src)
    model = open_model(out)
    model.verify()

    experts = {n for n in ref if expert_re.fullmatch(n)}
    routers = {n for n in ref if router_re.fullmatch(n)}
    assert len(experts) == n_experts and routers
    assert set(model.weights) == experts
    for name, info in model.weights.items():
        assert (info.scheme, info.group_size, info.double_quant, info.role) == ("nf4", 64, True, "routed_expert")
        assert info.dtype == "bfloat16"  # FP8 sources too: the model computes in BF16
        assert info.expert == int(re.search(r"experts\.(?:expert_)?(\d+)\.", name)[1])
        w = ref[name].float()
        err = (torch.from_numpy(model.dequantize(name)) - w).abs()
        assert (err <= nf4_dq_bound(w)).all(), f"{name}: error {err.max()} above the NF4 bound"
        assert err.max() > 0  # really quantized
    assert set(model.routers) == routers
    for name in routers:
        assert same_bits(stored(out, name), tm.read_all(src)[name]), f"router {name} changed"
    for name in set(ref) - experts:
        kept = stored(out, name)
        expect = ref[name] if ref[name].dtype != torch.float32 or arch != "deepseek_v3_fp8" or name in routers \
            else ref[name].to(torch.bfloat16)
        assert same_bits(kept, expect), f"{name} is not kept as stored"
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: moeconv" in card
    assert json.loads((out / "config.json").read_text())["quantization_config"]["adapter"]

    _cli("dequantize", out, dst)
    restored = tm.read_all(dst)
    assert set(restored) == set(ref)
    assert "quantization_config" not in json.loads((dst / "config.json").read_text())
    for name in experts:
        assert restored[name].dtype == torch.bfloat16
        assert torch.allclose(restored[name].float(), torch.from_numpy(model.dequantize(name)).bfloat16().float())
    for name in set(ref) - experts:
        assert same_bits(restored[name], stored(out, name))
    cls = getattr(transformers, config["architectures"][0])
    loaded, info = cls.from_pretrained(dst, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    shutil.rmtree(dst)
