"""Llama 4 (Scout, Maverick): fused experts stored ``[in, out]``, a shared expert, interleaved MoE layers.

MoE layers (every ``interleave_moe_layer_step``-th, or those in ``moe_layers``) hold
``feed_forward.experts.gate_up_proj [E, H, 2I]`` -- columns ``[:I]`` gate, ``[I:]`` up,
as ``chunk(2, dim=-1)`` in the model -- ``feed_forward.experts.down_proj [E, I, H]``,
the router ``feed_forward.router.weight [E, H]`` and a shared expert
``feed_forward.shared_expert.{gate,up,down}_proj.weight`` of size ``intermediate_size``;
the other layers a dense ``feed_forward.{gate,up,down}_proj.weight`` of
``intermediate_size_mlp``.  The Hub releases are ``Llama4ForConditionalGeneration``
(model_type ``llama4``, text weights under ``language_model.model.layers``, sizes in
``text_config``; vision tower and projector kept as stored); ``Llama4ForCausalLM``
checkpoints (model_type ``llama4_text``) use ``model.layers``.  Logical names:
``<layers>.{l}.feed_forward.experts.{e}.{gate_proj|up_proj|down_proj}.weight``.
"""

from .base import DENSE, SHARED, Adapter, Layers, Linear, Router, register
from .fused import Fused


def _text(key):
    """A text-model size: from ``text_config`` in a multimodal config.json, else top level."""
    return lambda c: (c.get("text_config") or c)[key]


def _rules(layers: str) -> tuple:
    ff = layers + ".{layer}.feed_forward"
    return (
        Router(ff + ".router.weight", ("experts", "hidden")),
        Fused(ff + ".experts.gate_up_proj", ff + ".experts", ("gate", "up"), transposed=True),
        Fused(ff + ".experts.down_proj", ff + ".experts", ("down",), transposed=True),
        Linear(ff + ".shared_expert.{proj}.weight", role=SHARED),
        Linear(ff + ".{proj}.weight", inner="dense", role=DENSE),
    )


ADAPTER = register(Adapter(
    name="llama4",
    model_types=("llama4", "llama4_text"),
    description="Llama-4-Scout-17B-16E, Llama-4-Maverick-17B-128E (BF16)",
    dims={"hidden": _text("hidden_size"), "intermediate": _text("intermediate_size"),
          "dense": _text("intermediate_size_mlp"), "experts": _text("num_local_experts"),
          "layers": _text("num_hidden_layers")},
    layers=(Layers("model.layers.{layer}."), Layers("language_model.model.layers.{layer}.")),
    rules=_rules("model.layers") + _rules("language_model.model.layers"),
    never_quantize=("model.embed_tokens.weight", "lm_head.weight",
                    "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"),
))
