"""The routed experts and routers of a source checkpoint, as the allocator sees them.

A thin view over ``moeconv.source`` (headers, memory-mapped reads) and the
architecture adapters (which tensor is which): the allocator needs the
(layer, expert) grid, each expert's projections and each MoE layer's router
weight, read one matrix at a time so that a signal never holds a whole layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from moeconv.adapters import ROUTED, Item, adapter_for_config
from moeconv.source import Source, open_source as _open

__all__ = ["Expert", "ExpertSource", "open_source"]


@dataclass(frozen=True)
class Expert:
    """One routed expert: its position and its projection items (``gate``/``up``/``down``; no gate in Switch)."""

    layer: int
    expert: int
    weights: dict[str, Item] = field(hash=False, compare=False)

    @property
    def numel(self) -> int:
        return sum(item.shape[0] * item.shape[1] for item in self.weights.values())

    @property
    def first_proj(self) -> str:
        """The projection MaxVar looks at: ``gate`` (``w1``), or ``up`` where there is no gate (Switch ``wi``)."""
        return "gate" if "gate" in self.weights else "up"


class ExpertSource:
    """Routed experts (sorted by layer, expert) and one router weight per MoE layer."""

    def __init__(self, source: Source):
        self.source = source
        self.adapter = adapter_for_config(source.config)
        items = self.adapter.plan(source.config, source.tensors)
        grid: dict[tuple[int, int], dict[str, Item]] = {}
        for item in items:
            if item.role == ROUTED:
                grid.setdefault((item.layer, item.expert), {})[item.proj] = item
        if not grid:
            raise ValueError(f"{source.path}: the {self.adapter.name} adapter found no routed experts")
        self.experts = [Expert(layer, expert, weights) for (layer, expert), weights in sorted(grid.items())]
        self.routers = self._routers(items)

    def _routers(self, items: list[Item]) -> dict[int, Item]:
        counts: dict[int, int] = {}
        for e in self.experts:
            counts[e.layer] = counts.get(e.layer, 0) + 1
        routers = {
            item.layer: item
            for item in items
            if item.router and len(item.shape) == 2 and item.layer in counts and item.shape[0] == counts[item.layer]
        }
        missing = sorted(set(counts) - set(routers))
        if missing:
            raise ValueError(f"{self.source.path}: MoE layer {missing[0]} has no router weight of shape [{counts[missing[0]]}, hidden]")
        return routers

    @cached_property
    def layers(self) -> list[int]:
        """The MoE layer indices, ascending (dense layers of hybrid models are absent)."""
        return sorted(self.routers)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @cached_property
    def n_experts(self) -> int:
        return max(e.expert for e in self.experts) + 1

    @cached_property
    def position(self) -> dict[int, int]:
        """Row of a layer in ``[n_layers, n_experts]`` signal arrays."""
        return {layer: i for i, layer in enumerate(self.layers)}

    def read(self, item: Item) -> torch.Tensor:
        """One weight as float32 (only its bytes are read from the memory-mapped shard)."""
        return item.load(self.source).to(torch.float32)


def open_source(src) -> ExpertSource:
    """An ``ExpertSource`` for a checkpoint path, a Hub id, or an already opened ``moeconv.source.Source``."""
    if isinstance(src, ExpertSource):
        return src
    return ExpertSource(src if isinstance(src, Source) else _open(src))
