"""The routed experts and routers of a source checkpoint, as the allocator sees them.

A thin view over ``moeconv.source`` (headers, memory-mapped reads) and the
architecture adapters (which tensor is which): the allocator needs the
(layer, expert) grid, each expert's projections and each MoE layer's router
weight, read one matrix at a time so that a signal never holds a whole layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from safetensors import safe_open

from moeconv.adapters import ROUTED, Item, adapter_for_config
from moeconv.source import Source, open_source as _open

__all__ = ["Expert", "ExpertSource", "open_source"]


@dataclass(frozen=True)
class Expert:
    """One routed expert: its position and its projection items (``gate``/``up``/``down``; no gate in Switch)."""

    layer: int
    expert: int
    weights: dict[str, Item] = field(hash=False, compare=False)

    @cached_property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """The projections' shapes, in ``weights`` order (the key of the bit accounting)."""
        return tuple(tuple(item.shape) for item in self.weights.values())

    @cached_property
    def numel(self) -> int:
        return sum(shape[0] * shape[1] for shape in self.shapes)

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
        return item.load(self._reader).to(torch.float32)

    @cached_property
    def _reader(self):
        return self.source if self.source.pickle else _OpenShards(self.source)


class _OpenShards:
    """Reads tensors straight from one copy-on-write memory map per shard.

    A tensor becomes a view of its bytes (float dtypes) at a few microseconds
    each, instead of a ``safe_open`` call with a header parse per tensor; only
    the pages of the tensors read are ever touched.  Slices of fused tensors
    and other dtypes go through ``safe_open``.
    """

    _VIEWS = {"BF16": (np.uint16, torch.bfloat16), "F16": (np.float16, torch.float16), "F32": (np.float32, torch.float32)}

    def __init__(self, source: Source):
        self.source = source
        self.maps: dict[str, tuple[np.ndarray, int]] = {}

    def _map(self, file: str) -> tuple[np.ndarray, int]:
        if file not in self.maps:
            path = self.source.path / file
            mapped = np.memmap(path, dtype=np.uint8, mode="c").view(np.ndarray)  # plain views: no memmap bookkeeping per slice
            header = int(np.frombuffer(mapped[:8].tobytes(), dtype="<u8")[0])
            self.maps[file] = (mapped, 8 + header)
        return self.maps[file]

    def read(self, name: str) -> torch.Tensor:
        info = self.source.tensors[name]
        if info.dtype not in self._VIEWS:
            with safe_open(self.source.path / info.file, framework="pt") as handle:
                return handle.get_tensor(name)
        np_dtype, torch_dtype = self._VIEWS[info.dtype]
        mapped, start = self._map(info.file)
        count = math.prod(info.shape)
        begin = start + info.offset
        raw = mapped[begin: begin + count * np.dtype(np_dtype).itemsize].view(np_dtype)
        return torch.from_numpy(raw).view(torch_dtype).reshape(info.shape)

    def read_slice(self, name: str, index: int) -> torch.Tensor:
        return self.read(name)[index]


def open_source(src) -> ExpertSource:
    """An ``ExpertSource`` for a checkpoint path, a Hub id, or an already opened ``moeconv.source.Source``."""
    if isinstance(src, ExpertSource):
        return src
    return ExpertSource(src if isinstance(src, Source) else _open(src))
