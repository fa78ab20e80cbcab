"""Tiny random MoE checkpoints, built with transformers and saved sharded, for the converter's tests.

Every builder makes a real model class from transformers (so key names, shapes
and config.json are exactly what ``save_pretrained`` writes for that
architecture), keeps hidden sizes near 64 with 2-3 layers, and saves it with a
small ``max_shard_size`` so the checkpoint has several shards and an index.
``make_fp8`` rewrites one as a DeepSeek-V3-style FP8 checkpoint
(``float8_e4m3fn`` weights + ``weight_scale_inv`` blocks).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

#: A shard size that gives every tiny model a few shards.
SHARD = "60KB"


def _common(**kw):
    return dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, **kw)


def _configs():
    import transformers as T

    return {
        "mixtral": (T.MixtralForCausalLM, T.MixtralConfig(**_common(intermediate_size=96, num_local_experts=4))),
        "qwen2_moe": (T.Qwen2MoeForCausalLM, T.Qwen2MoeConfig(**_common(
            intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
            num_experts_per_tok=2))),
        "qwen3_moe": (T.Qwen3MoeForCausalLM, T.Qwen3MoeConfig(**_common(
            intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=16))),
        "deepseek_v2": (T.DeepseekV2ForCausalLM, T.DeepseekV2Config(**{**_common(
            intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=2,
            num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1, q_lora_rank=None,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16), "num_hidden_layers": 3,
            "num_key_value_heads": 4})),
        "deepseek_v3": (T.DeepseekV3ForCausalLM, T.DeepseekV3Config(**{**_common(
            intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
            num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1, q_lora_rank=32,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16), "num_hidden_layers": 3,
            "num_key_value_heads": 4})),
        "olmoe": (T.OlmoeForCausalLM, T.OlmoeConfig(**_common(
            intermediate_size=32, num_experts=4, num_experts_per_tok=2, eos_token_id=1, pad_token_id=0))),
        "phimoe": (T.PhimoeForCausalLM, T.PhimoeConfig(**_common(intermediate_size=32, num_local_experts=4))),
        "switch_transformers": (T.SwitchTransformersForConditionalGeneration, T.SwitchTransformersConfig(
            d_model=64, d_ff=96, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2,
            num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=4, vocab_size=128)),
    }


ARCHITECTURES = tuple(_configs())


def build(arch: str, path: Path, seed: int = 0, max_shard_size: str = SHARD) -> Path:
    """Save a tiny random ``arch`` model (BF16) in ``path`` as a sharded checkpoint; return ``path``.

    Weights are drawn with std 0.05 so that quantization error is well above
    BF16 rounding and the comparisons in the tests mean something.
    """
    cls, config = _configs()[arch]
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size=max_shard_size)
    return Path(path)


def mixtral_in_memory(seed: int = 0, experts: int = 4, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny Mixtral (hidden 32, intermediate 48, 2 layers, top-2) built in memory, weights ~ N(0, 0.2).

    The large weights make routing and quantization errors visible at this size.
    """
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64, num_local_experts=experts, num_experts_per_tok=2)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.to(dtype)


def shard_files(path: Path) -> dict[str, str]:
    """tensor name -> shard file of a saved checkpoint."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    with safe_open(path / "model.safetensors", "pt") as f:
        return dict.fromkeys(f.keys(), "model.safetensors")


def read_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (tiny) checkpoint, as stored."""
    out = {}
    for name, file in shard_files(path).items():
        with safe_open(path / file, "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def rewrite(path: Path, change) -> None:
    """Apply ``change(shard tensors dict) -> dict`` to every shard of a checkpoint, updating the index."""
    files = shard_files(path)
    weight_map = {}
    for file in sorted(set(files.values())):
        with safe_open(path / file, "pt") as f:
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
        tensors = change(tensors)
        save_file(tensors, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        doc = json.loads(index.read_text())
        doc["weight_map"] = dict(sorted(weight_map.items()))
        index.write_text(json.dumps(doc, indent=2))


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv) with each block's largest magnitude mapped to 448."""
    rows, cols = weight.shape
    bo, bi = block
    nbo, nbi = math.ceil(rows / bo), math.ceil(cols / bi)
    w = F.pad(weight.float(), (0, nbi * bi - cols, 0, nbo * bo - rows)).view(nbo, bo, nbi, bi)
    scale = w.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
    q = (w / scale[:, None, :, None]).view(nbo * bo, nbi * bi)[:rows, :cols].to(torch.float8_e4m3fn)
    return q.contiguous(), scale.contiguous()


def make_fp8(path: Path, block: tuple[int, int] = (32, 32)) -> Path:
    """Turn a saved DeepSeek checkpoint into V3's FP8 release layout, in place.

    Every linear weight of the layers (experts, shared experts, dense MLPs,
    attention projections; not the router, norms, embeddings or head) becomes
    float8_e4m3fn with a ``weight_scale_inv`` of one scale per ``block`` (32 x 32
    here instead of 128 x 128 so tiny weights still have several blocks, some of
    them partial).  ``e_score_correction_bias`` becomes F32 as in the release.
    """

    def change(tensors):
        out = {}
        for name, t in tensors.items():
            linear = name.startswith("model.layers.") and name.endswith("proj.weight") or "proj_with_mqa" in name
            if linear and t.dim() == 2:
                out[name], out[name + "_scale_inv"] = quantize_fp8(t, block)
            elif name.endswith("e_score_correction_bias"):
                out[name] = t.float()
            else:
                out[name] = t
        return out

    rewrite(path, change)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block),
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] not in ARCHITECTURES:
        sys.exit(f"usage: python tests/tiny_models.py {{{'|'.join(ARCHITECTURES)}}} OUT_DIR")
    print(build(sys.argv[1], Path(sys.argv[2])))
