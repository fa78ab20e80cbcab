"""Mixtral: ``block_sparse_moe`` with per-expert ``w1`` (gate), ``w3`` (up), ``w2`` (down)."""

from .base import W1_W3_W2, Adapter, Layers, Linear, Router, register

ADAPTER = register(Adapter(
    name="mixtral",
    model_types=("mixtral",),
    description="Mixtral-8x7B / 8x22B and fine-tunes",
    dims={"hidden": "hidden_size", "intermediate": "intermediate_size",
          "experts": "num_local_experts", "layers": "num_hidden_layers"},
    layers=(Layers("model.layers.{layer}."),),
    rules=(
        Router("model.layers.{layer}.block_sparse_moe.gate.weight", ("experts", "hidden")),
        Linear("model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight", W1_W3_W2),
    ),
    never_quantize=("model.embed_tokens.weight", "lm_head.weight"),
))
