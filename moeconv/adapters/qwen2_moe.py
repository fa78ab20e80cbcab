"""Qwen1.5-MoE / Qwen2-MoE: routed experts, one shared expert and its sigmoid ``shared_expert_gate``.

Layers listed in ``mlp_only_layers`` (or skipped by ``decoder_sparse_step``)
carry a dense MLP of ``intermediate_size`` instead.
"""

from .base import DENSE, SHARED, Adapter, Layers, Linear, Router, register

ADAPTER = register(Adapter(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    description="Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B",
    dims={"hidden": "hidden_size", "moe": "moe_intermediate_size", "shared": "shared_expert_intermediate_size",
          "dense": "intermediate_size", "experts": ("num_experts", "num_local_experts"), "layers": "num_hidden_layers"},
    layers=(Layers("model.layers.{layer}."),),
    rules=(
        Router("model.layers.{layer}.mlp.gate.weight", ("experts", "hidden")),
        Router("model.layers.{layer}.mlp.shared_expert_gate.weight", (1, "hidden")),
        Linear("model.layers.{layer}.mlp.experts.{expert}.{proj}.weight", inner="moe"),
        Linear("model.layers.{layer}.mlp.shared_expert.{proj}.weight", inner="shared", role=SHARED),
        Linear("model.layers.{layer}.mlp.{proj}.weight", inner="dense", role=DENSE),
    ),
    never_quantize=("model.embed_tokens.weight", "lm_head.weight"),
))
