"""OLMoE: per-expert gate/up/down under ``mlp.experts``; ``intermediate_size`` is the expert's."""

from .base import Adapter, Layers, Linear, Router, register

ADAPTER = register(Adapter(
    name="olmoe",
    model_types=("olmoe",),
    description="OLMoE-1B-7B",
    dims={"hidden": "hidden_size", "intermediate": "intermediate_size",
          "experts": ("num_experts", "num_local_experts"), "layers": "num_hidden_layers"},
    layers=(Layers("model.layers.{layer}."),),
    rules=(
        Router("model.layers.{layer}.mlp.gate.weight", ("experts", "hidden")),
        Linear("model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"),
    ),
    never_quantize=("model.embed_tokens.weight", "lm_head.weight"),
))
