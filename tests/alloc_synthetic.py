"""Tiny Mixtral-layout checkpoints with chosen router and gate-projection statistics, for the alloc tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_checkpoint(root: Path, n_layers: int = 2, n_experts: int = 4, hidden: int = 64, inter: int = 96,
                     router_norms=None, gate_scales=None, seed: int = 0) -> Path:
    """A Mixtral checkpoint (config + two shards + index) whose router row e of layer l has norm
    ``router_norms[l][e]`` and whose gate projection of expert (l, e) is scaled by ``gate_scales[l][e]``."""
    gen = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(n_layers):
        prefix = f"model.layers.{layer}.block_sparse_moe."
        router = torch.randn(n_experts, hidden, generator=gen)
        if router_norms is not None:
            router = router / router.norm(dim=1, keepdim=True) * torch.tensor(router_norms[layer], dtype=torch.float32)[:, None]
        tensors[prefix + "gate.weight"] = router.to(torch.bfloat16)
        for expert in range(n_experts):
            scale = 1.0 if gate_scales is None else gate_scales[layer][expert]
            base = f"{prefix}experts.{expert}."
            tensors[base + "w1.weight"] = (torch.randn(inter, hidden, generator=gen) * 0.02 * scale).to(torch.bfloat16)
            tensors[base + "w3.weight"] = (torch.randn(inter, hidden, generator=gen) * 0.02).to(torch.bfloat16)
            tensors[base + "w2.weight"] = (torch.randn(hidden, inter, generator=gen) * 0.02).to(torch.bfloat16)
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, str(root / shard), metadata={"format": "pt"})
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": hidden,
              "intermediate_size": inter, "num_local_experts": n_experts, "num_experts_per_tok": 2,
              "num_hidden_layers": n_layers, "vocab_size": 32}
    (root / "config.json").write_text(json.dumps(config))
    return root


def write_routers(path: Path, routers: dict[str, torch.Tensor]) -> Path:
    """A safetensors file of router weights under the checkpoint's own key names."""
    save_file({k: v.clone().contiguous() for k, v in routers.items()}, str(path))
    return path


def save_char_tokenizer(path: Path, vocab_size: int = 128) -> None:
    """A character-level tokenizer (ids below ``vocab_size``) so that tiny models can read calibration text."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 32 + vocab_size - 1)]
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(path)
