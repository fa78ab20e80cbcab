"""Switch Transformers (encoder-decoder): sparse FFN blocks with ``expert_{e}.wi`` / ``wo``.

Encoder block ``i`` is layer ``i`` and decoder block ``j`` is layer
``num_layers + j``, so every MoE layer of both stacks has its own index.
Sparse blocks hold ``mlp.router.classifier`` and ``mlp.experts.expert_{e}``;
the others hold a dense ``mlp.wi`` / ``mlp.wo``.  There is no gate projection:
``wi`` is the up projection and ``wo`` the down projection.
"""

from .base import DENSE, Adapter, Layers, Linear, Router, register

_PROJS = {"wi": "up", "wo": "down"}
_EXPERTS = "block.{layer}.layer.{n}.mlp.experts.expert_{expert}.{proj}.weight"

ADAPTER = register(Adapter(
    name="switch_transformers",
    model_types=("switch_transformers",),
    description="google/switch-base-8 ... switch-c-2048",
    dims={"hidden": "d_model", "ff": "d_ff", "experts": "num_experts",
          "layers": lambda c: c["num_layers"] + c["num_decoder_layers"], "decoder": "num_layers"},
    layers=(Layers("encoder.block.{layer}."), Layers("decoder.block.{layer}.", offset="decoder")),
    rules=(
        Router("{*}.block.{layer}.layer.{n}.mlp.router.classifier.weight", ("experts", "hidden")),
        Router("{*}.block.{layer}.layer.{n}.mlp.router.classifier.bias", ("experts",)),
        Linear("encoder." + _EXPERTS, _PROJS, inner="ff"),
        Linear("decoder." + _EXPERTS, _PROJS, inner="ff"),
        Linear("{*}.block.{layer}.layer.{n}.mlp.{proj}.weight", _PROJS, inner="ff", role=DENSE),
    ),
    never_quantize=("shared.weight", "lm_head.weight", "{*}.embed_tokens.weight",
                    "{*}.block.{layer}.layer.{n}.{*}.relative_attention_bias.weight"),
))
