"""gpt-oss: fused experts with interleaved gate/up, per-expert biases, and a router with a bias.

Two on-disk layouts, one set of logical weights
(``model.layers.{l}.mlp.experts.{e}.{gate_proj|up_proj|down_proj}.weight``):

- the release (``openai/gpt-oss-20b``, ``-120b``): MXFP4 ``experts.gate_up_proj_blocks``
  ``U8 [E, 2I, H/32, 16]`` + ``_scales`` ``U8 [E, 2I, H/32]`` and ``experts.down_proj_blocks``
  ``[E, H, I/32, 16]`` + ``_scales``, rows ``[out, in]``.  These bytes already are format v1
  ``mxfp4``: they are carried through unchanged (each expert's rows, no requantization)
  unless a scheme assignment names another scheme for a weight;
- BF16 (``save_pretrained`` of ``GptOssForCausalLM``, e.g. the "-BF16" re-uploads):
  ``experts.gate_up_proj [E, H, 2I]`` and ``experts.down_proj [E, I, H]``, stored ``[in, out]``.

In both, gate and up are interleaved along the output axis: row ``2i`` of an expert's
``[2I, H]`` gate_up is gate ``i`` and row ``2i + 1`` is up ``i`` (transformers'
``GptOssExperts._apply_gate`` takes ``gate_up[..., ::2]`` and ``[..., 1::2]``).

The biases ``experts.gate_up_proj_bias [E, 2I]`` (interleaved too) and
``experts.down_proj_bias [E, H]`` are not weights: they stay fused and plain under
their source names, in their source dtype, which is where the loader reads them.
``router.weight`` and ``router.bias`` are the router, stored exactly.

``moeconv dequantize`` always writes the BF16 layout (``gate_up_proj``/``down_proj``):
a plain checkpoint has no MXFP4, and transformers loads it with no quantization config.
"""

from .base import Adapter, Layers, Router, register
from .fused import Fused, FusedMxfp4

_EXPERTS = "model.layers.{layer}.mlp.experts"

ADAPTER = register(Adapter(
    name="gpt_oss",
    model_types=("gpt_oss",),
    description="gpt-oss-20b / 120b (MXFP4 release, carried through) and BF16 copies",
    dims={"hidden": "hidden_size", "intermediate": "intermediate_size",
          "experts": "num_local_experts", "layers": "num_hidden_layers"},
    layers=(Layers("model.layers.{layer}."),),
    rules=(
        Router("model.layers.{layer}.mlp.router.weight", ("experts", "hidden")),
        Router("model.layers.{layer}.mlp.router.bias", ("experts",)),
        FusedMxfp4(_EXPERTS + ".gate_up_proj", _EXPERTS, ("gate", "up"), split="interleave"),
        FusedMxfp4(_EXPERTS + ".down_proj", _EXPERTS, ("down",)),
        Fused(_EXPERTS + ".gate_up_proj", _EXPERTS, ("gate", "up"), split="interleave", transposed=True),
        Fused(_EXPERTS + ".down_proj", _EXPERTS, ("down",), transposed=True),
    ),
    never_quantize=("model.embed_tokens.weight", "lm_head.weight"),
))
