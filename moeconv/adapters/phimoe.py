"""PhiMoE (Phi-3.5-MoE): Mixtral's layout, ``block_sparse_moe`` with ``w1``/``w3``/``w2``."""

import dataclasses

from .base import register
from .mixtral import ADAPTER as MIXTRAL

ADAPTER = register(dataclasses.replace(MIXTRAL, name="phimoe", model_types=("phimoe",), description="Phi-3.5-MoE"))
