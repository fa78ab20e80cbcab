"""Per-architecture facts: which transformers module holds a layer's experts, and how it is called.

The format describes every routed expert weight by metadata (``layer``,
``expert``, ``proj``) rather than by name, so the loader needs only three
facts per architecture: the class of the experts module that
:class:`QuantizedExperts` replaces, how that module is called and activates
(the ``build`` function), and the renamings that transformers applies between
checkpoint names and module names (copied from transformers'
``conversion_mapping``), used for plain tensors and quantized dense layers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .modules import ClampedSwiGLU, GatedActivation, QuantizedExperts, WeightSpec

__all__ = ["Architecture", "ARCHITECTURES", "architecture_for", "find_experts_modules"]

Specs = Sequence[WeightSpec]


class Llama4QuantizedExperts(QuantizedExperts):
    """Llama 4's calling convention: every expert sees every token, rows pre-scaled by the router.

    ``forward(hidden_states [E*T, H]) -> [E*T, H]``.  Rows of tokens not routed
    to an expert are scaled by ``sigmoid(-inf) = 0``; an expert maps a zero row
    to zero exactly, so only experts with a non-zero row run, on those rows.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        rows = hidden_states.view(self.num_experts, -1, hidden_states.shape[-1])
        active = rows.ne(0).any(dim=-1)
        out = torch.zeros_like(rows)
        for expert, count in enumerate(active.sum(dim=-1).tolist()):
            if count:
                index = active[expert].nonzero().squeeze(1)
                out[expert, index] = self.expert_forward(expert, rows[expert, index]).to(out.dtype)
        return out.view(-1, hidden_states.shape[-1])


class DbrxQuantizedExperts(QuantizedExperts):
    """DBRX's calling convention: ``forward(hidden_states [B, S, H], top_k_index, top_k_weights) -> [B, S, H]``."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        batch = hidden_states.shape[0]
        flat = hidden_states.reshape(-1, self.hidden_dim)
        return super().forward(flat, top_k_index, top_k_weights).view(batch, -1, self.hidden_dim)


def _standard(original: nn.Module, gate: Specs, up: Specs, down: Specs, device) -> QuantizedExperts:
    return QuantizedExperts(gate, up, down, GatedActivation(original.act_fn), device=device)


def _gpt_oss(original: nn.Module, gate: Specs, up: Specs, down: Specs, device) -> QuantizedExperts:
    activation = ClampedSwiGLU(original.alpha, original.limit)
    return QuantizedExperts(gate, up, down, activation, bias="interleaved", device=device, dtype=original.gate_up_proj_bias.dtype)


def _llama4(original: nn.Module, gate: Specs, up: Specs, down: Specs, device) -> QuantizedExperts:
    return Llama4QuantizedExperts(gate, up, down, GatedActivation(original.act_fn), device=device)


def _dbrx(original: nn.Module, gate: Specs, up: Specs, down: Specs, device) -> QuantizedExperts:
    return DbrxQuantizedExperts(gate, up, down, GatedActivation(original.mlp.activation_fn), device=device)


@dataclass(frozen=True)
class Architecture:
    """How one transformers model type holds its routed experts."""

    #: class name of the experts module to replace (one instance per MoE layer)
    experts_class: str
    #: builds the replacement from the original module and per-expert specs
    build: Callable[..., QuantizedExperts] = _standard
    #: (regex, replacement) applied in order: checkpoint tensor name -> module tensor name
    renamings: tuple[tuple[str, str], ...] = ()

    def module_name(self, checkpoint_name: str) -> str:
        """The model's tensor name for a checkpoint tensor name (transformers' own renamings)."""
        for pattern, replacement in self.renamings:
            checkpoint_name = re.sub(pattern, replacement, checkpoint_name)
        return checkpoint_name


_MIXTRAL_NAMES = ((r"\.block_sparse_moe\.", ".mlp."),)
_GRANITE_NAMES = ((r"block_sparse_moe\.router\.layer\.weight$", "block_sparse_moe.router.weight"),)

#: model_type -> Architecture.  Every type here was read from transformers 5's modeling files.
ARCHITECTURES: dict[str, Architecture] = {
    "mixtral": Architecture("MixtralExperts", renamings=_MIXTRAL_NAMES),
    "qwen2_moe": Architecture("Qwen2MoeExperts"),
    "qwen3_moe": Architecture("Qwen3MoeExperts"),
    "deepseek_v2": Architecture("DeepseekV2Experts"),
    "deepseek_v3": Architecture("DeepseekV3Experts"),
    "olmoe": Architecture("OlmoeExperts"),
    "phimoe": Architecture("PhimoeExperts", renamings=_MIXTRAL_NAMES + ((r"\.gate\.weight$", ".router.weight"),)),
    "granitemoe": Architecture("GraniteMoeExperts", renamings=_GRANITE_NAMES),
    "granitemoeshared": Architecture("GraniteMoeSharedExperts", renamings=_GRANITE_NAMES),
    "gpt_oss": Architecture("GptOssExperts", build=_gpt_oss),
    "llama4_text": Architecture("Llama4TextExperts", build=_llama4),
    "dbrx": Architecture("DbrxExperts", build=_dbrx),
}


def architecture_for(model_type: str, source: str = "config.json") -> Architecture:
    """The architecture entry of ``model_type``; unknown types raise ``ValueError`` listing the known ones."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not supported by moeconv_torch; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


_LAYER = re.compile(r"\.(\d+)(?:\.|$)")


def find_experts_modules(model: nn.Module, arch: Architecture) -> dict[int, str]:
    """``{layer index: module path}`` of every experts module; the layer is the first index in the path."""
    found = {}
    for name, module in model.named_modules():
        if type(module).__name__ == arch.experts_class:
            match = _LAYER.search(name)
            if match is None:
                raise ValueError(f"experts module {name!r} has no layer index in its path")
            found[int(match.group(1))] = name
    return found
