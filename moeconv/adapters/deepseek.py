"""DeepSeek-V2 / V3: routed + shared experts, dense first layers, grouped routing with a score bias.

- The first ``first_k_dense_replace`` layers have a dense MLP of
  ``intermediate_size``; the others route over ``n_routed_experts`` experts of
  ``moe_intermediate_size`` plus ``n_shared_experts`` fused into one shared MLP.
- V3's ``gate.e_score_correction_bias`` is part of the router: kept exactly.
- V3 releases store linear weights as FP8 e4m3 with 128 x 128 ``weight_scale_inv``
  blocks; the framework dequantizes them on the fly (see ``fp8.py``).
- The multi-token-prediction layer (``num_nextn_predict_layers``, index
  ``num_hidden_layers``) is converted like any other layer; its embedding and
  head stay as stored.
"""

from .base import DENSE, SHARED, Adapter, Layers, Linear, Router, register


def _shared(config):
    return config["moe_intermediate_size"] * config["n_shared_experts"]


def _layers(config):
    return config["num_hidden_layers"] + (config.get("num_nextn_predict_layers") or 0)


ADAPTER = register(Adapter(
    name="deepseek",
    model_types=("deepseek_v2", "deepseek_v3"),
    description="DeepSeek-V2(-Lite), DeepSeek-V3, R1 and derivatives (BF16 or FP8 block-scaled)",
    dims={"hidden": "hidden_size", "moe": "moe_intermediate_size", "shared": _shared,
          "dense": "intermediate_size", "experts": "n_routed_experts", "layers": _layers},
    layers=(Layers("model.layers.{layer}."),),
    rules=(
        Router("model.layers.{layer}.mlp.gate.weight", ("experts", "hidden")),
        Router("model.layers.{layer}.mlp.gate.e_score_correction_bias", ("experts",)),
        Linear("model.layers.{layer}.mlp.experts.{expert}.{proj}.weight", inner="moe"),
        Linear("model.layers.{layer}.mlp.shared_experts.{proj}.weight", inner="shared", role=SHARED),
        Linear("model.layers.{layer}.mlp.{proj}.weight", inner="dense", role=DENSE),
    ),
    never_quantize=("model.embed_tokens.weight", "lm_head.weight",
                    "model.layers.{layer}.embed_tokens.weight", "model.layers.{layer}.shared_head.head.weight"),
))
