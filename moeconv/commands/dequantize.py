"""``moeconv dequantize``: a plain BF16 Hugging Face checkpoint from a converted model.

The result has the source checkpoint's own tensor names (the adapter recorded
in ``quantization_config`` says how to rebuild fused layouts) and a config
without ``quantization_config``, so transformers and any other runtime load it
with no moeconv code.  Quantized weights are dequantized by the reference
reader (``moeconv_numpy``, every checksum verified) and stored as BF16; plain
tensors are copied bit for bit.  The output appears under its final name only
when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import click

#: Files of a converted model that describe the quantized model and must not be copied.
_NOT_COPIED = ("README.md", "bit_allocation.png")


def _plain(model, name: str):
    """A stored tensor as torch, in its stored dtype (the reader widens BF16 to float32 exactly)."""
    import torch

    array = model.tensor(name)
    dtype = model.tensor_info(name).dtype
    tensor = torch.from_numpy(array.copy())
    return tensor.to(torch.bfloat16) if dtype == "BF16" else tensor


def _shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names cut into shards of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def dequantize_model(src: str | os.PathLike, dst: str | os.PathLike, max_shard_bytes: int) -> Path:
    """Write ``dst`` from the converted model ``src``; returns ``dst``."""
    import torch
    from safetensors.torch import save_file

    from moeconv.adapters import get_adapter
    from moeconv_numpy import open_model

    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise click.ClickException(f"{dst} exists and is not an empty directory")
    with open_model(src) as model:
        config = dict(model.config)
        qc = config.pop("quantization_config")
        adapter = get_adapter(qc.get("adapter", ""))
        weights = model.weights
        names = sorted([*weights, *model.plain_tensor_names])
        steps = adapter.restore(names, config)

        def nbytes(step) -> int:
            if any(n in weights for n in step.inputs):
                return 2 * sum(weights[n].shape[0] * weights[n].shape[1] for n in step.inputs if n in weights)
            return sum(model.tensor_info(n).nbytes for n in step.inputs)

        groups = _shards({s.name: nbytes(s) for s in steps}, max_shard_bytes)
        by_name = {s.name: s for s in steps}
        files = (["model.safetensors"] if len(groups) == 1 else
                 [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)])
        tmp = dst.with_name(dst.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weight_map, total = {}, 0
        for file, group in zip(files, groups):
            tensors = {}
            for name in group:
                step = by_name[name]
                inputs = {n: torch.from_numpy(model.dequantize(n)) if n in weights else _plain(model, n)
                          for n in step.inputs}
                value = step.build(inputs)
                if any(n in weights for n in step.inputs):
                    value = value.to(torch.bfloat16)
                tensors[name] = value.contiguous()
                total += value.numel() * value.element_size()
            save_file(tensors, tmp / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(group, file))
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name not in _NOT_COPIED and path.suffix != ".safetensors" \
                and path.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copyfile(path, tmp / path.name)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if dst.exists():
        dst.rmdir()
    os.replace(tmp, dst)
    return dst


@click.command("dequantize")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(file_okay=False, path_type=Path))
@click.option("--max-shard-size", default="2GB", show_default=True, metavar="SIZE", help="Largest output shard.")
def command(out: Path, dst: Path, max_shard_size: str) -> None:
    """Write the converted model OUT as a plain BF16 checkpoint DST with the source's tensor names.

    Transformers (or any runtime) loads DST without moeconv, e.g. to check a
    conversion or to feed tools that cannot read the format.
    """
    from moeconv.adapters import AdapterError
    from moeconv.commands.convert import os_error_line, parse_size
    from moeconv_numpy import FormatError

    try:
        dequantize_model(out, dst, parse_size(max_shard_size))
    except (FormatError, AdapterError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(os_error_line(exc)) from None
    click.echo(f"wrote {dst}")
