"""GraniteMoE (Granite 3.0/3.1 MoE): fused ``input_linear`` (gate then up) and ``output_linear``.

On disk (the Hub releases, and what transformers 5 ``save_pretrained`` writes back):
``block_sparse_moe.input_linear.weight [E, 2I, H]`` -- rows ``[:I]`` gate, ``[I:]`` up, as
``chunk(2, dim=-1)`` in the model -- ``block_sparse_moe.output_linear.weight [E, H, I]``
(down) and the router ``block_sparse_moe.router.layer.weight [E, H]``.  Logical names
use the experts module transformers builds:
``model.layers.{l}.block_sparse_moe.experts.{e}.{gate_proj|up_proj|down_proj}.weight``.
"""

from .base import Adapter, Layers, Router, register
from .fused import Fused

_MOE = "model.layers.{layer}.block_sparse_moe"

ADAPTER = register(Adapter(
    name="granitemoe",
    model_types=("granitemoe",),
    description="ibm-granite granite-3.0/3.1 -1b-a400m, -3b-a800m",
    dims={"hidden": "hidden_size", "intermediate": "intermediate_size",
          "experts": "num_local_experts", "layers": "num_hidden_layers"},
    layers=(Layers("model.layers.{layer}."),),
    rules=(
        Router(_MOE + ".router.layer.weight", ("experts", "hidden")),
        Fused(_MOE + ".input_linear.weight", _MOE + ".experts", ("gate", "up")),
        Fused(_MOE + ".output_linear.weight", _MOE + ".experts", ("down",)),
    ),
    never_quantize=("model.embed_tokens.weight", "lm_head.weight"),
))
