"""The model card's bit-allocation heat map: layers x experts, coloured by bits per weight.

With mixed precision the allocator gives each routed expert its own scheme;
a reader of the card wants to see at a glance where the bits went (which layers,
which experts were kept wider).  The numbers come from the converted folder's
own per-expert metadata, so the picture shows what was written, not what was
planned.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["bit_allocation", "plot_bit_allocation", "HEATMAP_NAME"]

#: File name of the heat map inside a converted folder (the card links to it).
HEATMAP_NAME = "bit_allocation.png"


def _routed_experts(model_dir: str | os.PathLike) -> list:
    from moeconv_numpy import open_model

    with open_model(model_dir) as model:
        return [w for w in model.weights.values() if w.role == "routed_expert"]


def bit_allocation(model_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Stored bits per weight of every routed expert: ``(layers, grid)``.

    ``layers`` holds the layer numbers that have routed experts (dense layers are
    skipped) and ``grid[i, e]`` the bits per weight of expert ``e`` of layer
    ``layers[i]``: every stored bit of its quantized projections (codes, scales,
    zeros, double-quant constants) over their number of weights.  NaN marks an
    expert with no quantized projection (kept unquantized).
    """
    experts = _routed_experts(model_dir)
    if not experts:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0))
    layer = np.array([w.layer for w in experts])
    expert = np.array([w.expert for w in experts])
    bits = np.array([w.stored_bits for w in experts], dtype=np.float64)
    numel = np.array([w.numel for w in experts], dtype=np.float64)
    layers, row = np.unique(layer, return_inverse=True)
    total_bits = np.zeros((layers.size, expert.max() + 1))
    total_numel = np.zeros_like(total_bits)
    np.add.at(total_bits, (row, expert), bits)
    np.add.at(total_numel, (row, expert), numel)
    with np.errstate(invalid="ignore", divide="ignore"):
        return layers, np.where(total_numel > 0, total_bits / total_numel, np.nan)


def plot_bit_allocation(model_dir: str | os.PathLike, png_path: str | os.PathLike | None = None) -> Path:
    """Draw the heat map into ``png_path`` (default ``model_dir/bit_allocation.png``); returns its path.

    The model card writer calls it when a bit allocation was used (the card links
    the image), so it always draws, even if the allocation came out uniform.
    Uses matplotlib's Agg canvas directly, so it works headless and leaves
    pyplot's global backend alone.
    """
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("the bit-allocation heat map needs matplotlib: pip install matplotlib") from err

    layers, grid = bit_allocation(model_dir)
    n_layers, n_experts = grid.shape
    fig = Figure(figsize=(min(2.5 + 0.3 * n_experts, 24), min(1.8 + 0.3 * n_layers, 24)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto", interpolation="nearest")
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label("stored bits per weight (grey: not quantized)")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(np.arange(n_layers), [str(layer) for layer in layers])
    ax.set_title("Bit allocation of the routed experts")
    fig.tight_layout()
    out = Path(png_path) if png_path is not None else Path(model_dir) / HEATMAP_NAME
    fig.savefig(out, format="png")
    return out
