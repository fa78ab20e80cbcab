"""PhiMoE (Phi-3.5-MoE): Mixtral's layout, ``block_sparse_moe`` with ``w1``/``w3``/``w2``."""

from .base import W1_W3_W2, Adapter, Layers, Linear, Router, register

ADAPTER = register(Adapter(
    name="phimoe",
    model_types=("phimoe",),
    description="Phi-3.5-MoE",
    dims={"hidden": "hidden_size", "intermediate": "intermediate_size",
          "experts": "num_local_experts", "layers": "num_hidden_layers"},
    layers=(Layers("model.layers.{layer}."),),
    rules=(
        Router("model.layers.{layer}.block_sparse_moe.gate.weight", ("experts", "hidden")),
        Linear("model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight", W1_W3_W2),
    ),
    never_quantize=("model.embed_tokens.weight", "lm_head.weight"),
))
