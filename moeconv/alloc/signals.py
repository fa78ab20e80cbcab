"""Data-free expert signals of the paper: router-norm change Λ and MaxVar.

Both are computed from the memory-mapped checkpoint one matrix at a time (a
router, or one expert's gate projection), so they cost one read of the gate
projections and nothing else.  Values are float32 computations returned as
float64 arrays of shape ``[n_moe_layers, n_experts]`` (layer order of
``ExpertSource.layers``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .source import ExpertSource

__all__ = ["RouterSignal", "router_signal", "max_variance", "load_reference_routers"]

FINAL_NORM_NOTE = (
    "no --router-reference: Λ is the final router-row norm ||w_e||, as the paper's code does for Mixtral "
    "(the true Λ = | ||w_e(final)|| - ||w_e(reference)|| | needs the routers from before training)"
)


@dataclass(frozen=True)
class RouterSignal:
    """Λ per expert, with the norms it came from and a note saying which variant it is."""

    lam: np.ndarray
    final_norm: np.ndarray
    reference_norm: np.ndarray | None
    note: str


def _row_norms(weight: torch.Tensor) -> np.ndarray:
    return torch.linalg.vector_norm(weight.to(torch.float32), dim=1).double().numpy()


def router_signal(source: ExpertSource, reference: str | Path | None = None) -> RouterSignal:
    """Λ_e = | ||w_e(final)|| - ||w_e(reference)|| | per router row, or ||w_e(final)|| without a reference."""
    items = [source.routers[layer] for layer in source.layers]
    final = np.stack([_row_norms(source.read(item)) for item in items])
    if reference is None:
        return RouterSignal(final, final, None, FINAL_NORM_NOTE)
    before = load_reference_routers(reference, {item.name: item.shape for item in items})
    initial = np.stack([_row_norms(before[item.name]) for item in items])
    note = f"Λ = | ||w_e(final)|| - ||w_e(reference)|| | with the routers of {reference}"
    return RouterSignal(np.abs(final - initial), final, initial, note)


def max_variance(source: ExpertSource) -> np.ndarray:
    """MaxVar_e: variance (unbiased, across the input dimension) of the gate-projection row with the largest L2 norm.

    Ties between equally large rows pick the first one.  Experts without a gate
    projection (Switch Transformers) use their first FFN matrix ``wi``.
    """
    out = np.zeros((source.n_layers, source.n_experts))
    for layer in source.layers:
        experts = [e for e in source.experts if e.layer == layer]
        weights = torch.stack([source.read(e.weights[e.first_proj]) for e in experts])
        rows = torch.argmax(weights.square().sum(dim=2), dim=1)
        variance = weights[torch.arange(len(experts)), rows].var(dim=1)
        out[source.position[layer], [e.expert for e in experts]] = variance.double().numpy()
    return out


def load_reference_routers(reference: str | Path, shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """The reference (pre-training) router weights named in ``shapes``.

    ``reference`` is a checkpoint directory, a safetensors file holding router
    weights under the checkpoint's own key names, or a Hugging Face Hub id
    (only the shards that hold the routers are downloaded).
    """
    path = Path(reference)
    if path.is_file():
        files = {name: path for name in shapes}
    elif path.is_dir():
        files = _local_files(path, shapes)
    elif _looks_like_hub_id(str(reference)):
        files = _hub_files(str(reference), shapes)
    else:
        raise ValueError(f"--router-reference {reference!r} is neither a file, a directory nor a Hub id")
    out = {}
    for name, shape in shapes.items():
        with safe_open(str(files[name]), framework="pt") as handle:
            if name not in handle.keys():
                raise ValueError(f"router reference {files[name]} has no tensor {name!r}")
            tensor = handle.get_tensor(name)
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"router reference {files[name]}: {name} has shape {list(tensor.shape)}, the checkpoint's has {list(shape)}"
            )
        out[name] = tensor
    return out


def _local_files(root: Path, shapes: dict[str, tuple[int, int]]) -> dict[str, Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = [name for name in shapes if name not in weight_map]
        if missing:
            raise ValueError(f"router reference {index} has no entry for {missing[0]!r}")
        return {name: root / weight_map[name] for name in shapes}
    shards = sorted(root.glob("*.safetensors"))
    where = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            where.update({name: shard for name in handle.keys() if name in shapes})
    missing = [name for name in shapes if name not in where]
    if missing:
        raise ValueError(f"router reference directory {root} has no tensor {missing[0]!r} in any *.safetensors file")
    return where


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/"))


def _hub_files(repo_id: str, shapes: dict[str, tuple[int, int]]) -> dict[str, Path]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        index = Path(hf_hub_download(repo_id, "model.safetensors.index.json"))
    except EntryNotFoundError:
        single = Path(hf_hub_download(repo_id, "model.safetensors"))
        return {name: single for name in shapes}
    weight_map = json.loads(index.read_text())["weight_map"]
    missing = [name for name in shapes if name not in weight_map]
    if missing:
        raise ValueError(f"router reference {repo_id} (Hub) has no tensor {missing[0]!r}")
    shards = {shard: Path(hf_hub_download(repo_id, shard)) for shard in {weight_map[name] for name in shapes}}
    return {name: shards[weight_map[name]] for name in shapes}
