"""``moeconv inspect PATH [--json]``: schemes, bits and sizes of a converted model.

Reads only headers (no tensor data), through the NumPy reader.  The two
averages over routed-expert weights are the numbers people compare schemes by:
``avg_code_bits_per_expert_weight`` counts only the codes (what papers call
"4-bit"); ``avg_bits_per_expert_weight`` counts every stored bit (codes,
scales, zero points, double-quant constants).
"""

from __future__ import annotations

import json
import os
import re

import click

from moeconv_numpy import open_model
from moeconv_numpy.header import DTYPE_SIZES

from .verify import one_line_errors

_ROLE_ORDER = {"routed_expert": 0, "shared_expert": 1, "dense": 2}
_PROJ_ORDER = {"gate": 0, "up": 1, "down": 2, None: 3}
_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    """The decoder layer a plain tensor belongs to, read from its name (None for embeddings, final norm...)."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def summarize(path: str) -> dict:
    """Everything ``inspect`` shows, as a JSON-ready dict."""
    model = open_model(path)
    weights = sorted(
        model.weights.values(),
        key=lambda w: (w.layer is None, w.layer or 0, _ROLE_ORDER[w.role], w.expert or 0, _PROJ_ORDER[w.proj], w.name),
    )
    routers = set(model.routers)
    rows = [
        {
            "tensor": w.name, "role": w.role, "layer": w.layer, "expert": w.expert, "proj": w.proj,
            "scheme": w.scheme, "bits": w.bits, "group_size": w.group_size, "double_quant": w.double_quant,
            "shape": list(w.shape), "source_dtype": w.dtype, "bytes": w.nbytes,
            "bits_per_weight": w.stored_bits / w.numel,
        }
        for w in weights
    ]
    plain = []
    for name in model.plain_tensor_names:
        info = model.tensor_info(name)
        plain.append({
            "tensor": name, "layer": _layer_of(name), "dtype": info.dtype, "shape": list(info.shape),
            "bytes": info.nbytes, "router": name in routers,
        })
    experts = [w for w in weights if w.role == "routed_expert"]
    expert_params = sum(w.numel for w in experts)
    tensor_bytes = sum(r["bytes"] for r in rows) + sum(p["bytes"] for p in plain)
    bf16_bytes = 2 * (sum(w.numel for w in weights) + sum(p["bytes"] // DTYPE_SIZES[p["dtype"]] for p in plain))
    return {
        "path": str(path),
        "format_version": model.format_version,
        "shards": model.shard_files,
        "weights": rows,
        "plain_tensors": plain,
        "totals": {
            "quantized_weights": len(rows),
            "plain_tensors": len(plain),
            "routers": len(routers),
            "routed_expert_weights": len(experts),
            "routed_expert_params": expert_params,
            "tensor_bytes": tensor_bytes,
            "file_bytes": sum(os.path.getsize(os.path.join(path, s)) for s in model.shard_files),
            "bf16_bytes": bf16_bytes,
            "ratio_vs_bf16": tensor_bytes / bf16_bytes if bf16_bytes else None,
        },
        "avg_code_bits_per_expert_weight": sum(w.code_bits for w in experts) / expert_params if experts else None,
        "avg_bits_per_expert_weight": sum(w.stored_bits for w in experts) / expert_params if experts else None,
    }


def _dash(value) -> str:
    return "-" if value is None else str(value)


def _table(summary: dict) -> list[str]:
    head = ("layer", "expert", "proj", "role", "scheme", "bits", "group", "dq", "shape", "bytes", "bits/w", "tensor")
    quantized = [
        (
            _dash(r["layer"]), _dash(r["expert"]), _dash(r["proj"]), r["role"], r["scheme"], str(r["bits"]),
            str(r["group_size"]), "yes" if r["double_quant"] else "-", "x".join(map(str, r["shape"])),
            str(r["bytes"]), f"{r['bits_per_weight']:.3f}", r["tensor"],
        )
        for r in summary["weights"]
    ]
    plain = [
        (
            _dash(p["layer"]), "-", "-", "router" if p["router"] else "plain", p["dtype"],
            str(8 * DTYPE_SIZES[p["dtype"]]), "-",
            "-", "x".join(map(str, p["shape"])) or "scalar", str(p["bytes"]), "-", p["tensor"],
        )
        for p in summary["plain_tensors"]
    ]
    # one block per layer: its plain tensors (router, norms, attention) after its quantized weights
    layers = [r["layer"] for r in summary["weights"]] + [p["layer"] for p in summary["plain_tensors"]]
    order = sorted(range(len(layers)), key=lambda i: (layers[i] is None, layers[i] or 0, i))
    rows = quantized + plain
    body = [rows[i] for i in order]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in [head, *body]]


def _fmt_bits(value) -> str:
    return "n/a (no routed experts)" if value is None else f"{value:.4f}"


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def command(path: str, as_json: bool) -> None:
    """Show, per layer and expert, each tensor's scheme, bits, group size and bytes, with totals.

    Also the average bits per routed-expert weight, counting the codes only
    and counting every stored bit, and the total size against BF16.
    """
    with one_line_errors():
        summary = summarize(path)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for line in _table(summary):
        click.echo(line)
    t = summary["totals"]
    click.echo("")
    click.echo(
        f"{t['quantized_weights']} quantized weights, {t['plain_tensors']} plain tensors ({t['routers']} routers) "
        f"in {len(summary['shards'])} shard(s)"
    )
    click.echo(
        f"tensor bytes {t['tensor_bytes']:,} (files {t['file_bytes']:,}); BF16 would be {t['bf16_bytes']:,}"
        + (f" -> {t['ratio_vs_bf16']:.3f}x" if t["ratio_vs_bf16"] is not None else "")
    )
    click.echo(
        f"routed experts ({t['routed_expert_weights']} weights, {t['routed_expert_params']:,} params): "
        f"avg code bits/weight {_fmt_bits(summary['avg_code_bits_per_expert_weight'])}, "
        f"avg stored bits/weight {_fmt_bits(summary['avg_bits_per_expert_weight'])}"
    )
