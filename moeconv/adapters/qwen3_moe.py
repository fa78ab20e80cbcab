"""Qwen3-MoE: routed experts only (no shared expert), dense MLPs in ``mlp_only_layers``."""

from .base import DENSE, Adapter, Layers, Linear, Router, register

ADAPTER = register(Adapter(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    description="Qwen3-30B-A3B, Qwen3-235B-A22B",
    dims={"hidden": "hidden_size", "moe": "moe_intermediate_size", "dense": "intermediate_size",
          "experts": ("num_experts", "num_local_experts"), "layers": "num_hidden_layers"},
    layers=(Layers("model.layers.{layer}."),),
    rules=(
        Router("model.layers.{layer}.mlp.gate.weight", ("experts", "hidden")),
        Linear("model.layers.{layer}.mlp.experts.{expert}.{proj}.weight", inner="moe"),
        Linear("model.layers.{layer}.mlp.{proj}.weight", inner="dense", role=DENSE),
    ),
    never_quantize=("model.embed_tokens.weight", "lm_head.weight"),
))
