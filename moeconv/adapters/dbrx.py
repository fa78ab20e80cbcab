"""DBRX: each layer's experts as three 2-D tensors ``ffn.experts.mlp.{w1,v1,w2}`` of shape ``[E*I, H]``.

Expert ``e`` owns rows ``e*I .. (e+1)*I`` of each.  ``w1`` is gate and ``v1`` up, both
``[out, in]`` (the model computes ``x @ w1[e].T``); ``w2`` is down stored ``[in, out]``
(``h @ w2[e]``), so the logical down weight is ``w2[e].T``.  The router is
``ffn.router.layer.weight [E, H]``.  Sizes live in the nested ``ffn_config``.  Logical
names: ``transformer.blocks.{l}.ffn.experts.{e}.{gate_proj|up_proj|down_proj}.weight``.
"""

from .base import Adapter, Layers, Router, register
from .fused import Fused

_FFN = "transformer.blocks.{layer}.ffn"
_EXPERTS = _FFN + ".experts"

ADAPTER = register(Adapter(
    name="dbrx",
    model_types=("dbrx",),
    description="databricks/dbrx-base, dbrx-instruct",
    dims={"hidden": "d_model", "intermediate": lambda c: c["ffn_config"]["ffn_hidden_size"],
          "experts": lambda c: c["ffn_config"]["moe_num_experts"], "layers": "n_layers"},
    layers=(Layers("transformer.blocks.{layer}."),),
    rules=(
        Router(_FFN + ".router.layer.weight", ("experts", "hidden")),
        Fused(_EXPERTS + ".mlp.w1", _EXPERTS, ("gate",), stacked=False),
        Fused(_EXPERTS + ".mlp.v1", _EXPERTS, ("up",), stacked=False),
        Fused(_EXPERTS + ".mlp.w2", _EXPERTS, ("down",), stacked=False, transposed=True),
    ),
    never_quantize=("transformer.wte.weight", "lm_head.weight"),
))
