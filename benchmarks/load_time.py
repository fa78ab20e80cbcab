"""Load time and resident memory: a converted checkpoint vs its BF16 original, loaded by transformers.

    python benchmarks/load_time.py ../shared/models/moe-tiny-mixtral [--converted DIR] [--devices cpu,cuda] [--repeats 5]
    python benchmarks/load_time.py --make-mixtral 1024,3584,8,4 [--devices cpu,cuda]

``--make-mixtral H,I,E,L`` first writes a random BF16 Mixtral (hidden H,
intermediate I, E experts, L layers) to a temporary directory and uses it as
the original, to see how load time scales past the tiny shared model.
Without ``--converted`` the original is first converted with the defaults
(``moeconv convert``: NF4, blocks of 64, double quantization) into a temporary
directory.  Each way of loading runs once to warm imports and the page cache,
then ``--repeats`` timed times; the median and the minimum are reported, with
the bytes of the loaded model's parameters and buffers (each storage once) next
to the bytes of its safetensors files.  The JSON goes to
``benchmarks/results/load_time-<model>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

import moeconv_torch

RESULTS = Path(__file__).resolve().parent / "results"


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers, each storage once (tied weights share one)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def files_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def make_mixtral(out: Path, hidden: int, intermediate: int, experts: int, layers: int) -> Path:
    """A random-init BF16 Mixtral checkpoint (its weights do not matter for load time)."""
    from transformers import MixtralConfig

    config = MixtralConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_local_experts=experts, num_hidden_layers=layers,
        num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512), vocab_size=32000,
    )
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    return out


def time_loads(load, device: str, repeats: int) -> dict:
    """Warm once, then time ``repeats`` loads (synchronizing CUDA); report seconds and the model's bytes."""
    model = load()
    resident = model_bytes(model)
    del model
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        model = load()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del model
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times, "resident_bytes": resident}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def measure(original: Path, converted: Path, device: str, repeats: int) -> dict:
    """Time the three ways of loading onto ``device``."""
    ways = {
        "transformers_bf16_original": lambda: AutoModelForCausalLM.from_pretrained(
            original, dtype=torch.bfloat16, device_map=device),
        "moeconv_load_model": lambda: moeconv_torch.load_model(converted, device=device),
        "transformers_from_pretrained_converted": lambda: AutoModelForCausalLM.from_pretrained(
            converted, dtype=torch.bfloat16, device_map=device),
    }
    return {way: time_loads(load, device, repeats) for way, load in ways.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original", type=Path, nargs="?", help="BF16 Hugging Face checkpoint directory")
    parser.add_argument("--make-mixtral", metavar="H,I,E,L", help="use a random BF16 Mixtral of these sizes instead")
    parser.add_argument("--converted", type=Path, help="its moeconv conversion (default: convert with defaults now)")
    parser.add_argument("--devices", default="cpu", help="comma-separated torch devices to load onto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if (args.original is None) == (args.make_mixtral is None):
        parser.error("give an original checkpoint or --make-mixtral, not both")

    with tempfile.TemporaryDirectory() as tmp:
        if args.make_mixtral:
            args.original = make_mixtral(Path(tmp) / "original", *map(int, args.make_mixtral.split(",")))
        converted = args.converted
        if converted is None:
            converted = Path(tmp) / "converted"
            from moeconv.cli import main as moeconv_cli

            moeconv_cli(["convert", str(args.original), str(converted)], standalone_mode=False)
        results = {device: measure(args.original, converted, device, args.repeats) for device in args.devices.split(",")}
        sizes = {"original_file_bytes": files_bytes(args.original), "converted_file_bytes": files_bytes(converted)}
        name = f"mixtral-{args.make_mixtral.replace(',', '-')}" if args.make_mixtral else args.original.name

    for by_way in results.values():
        base = by_way["transformers_bf16_original"]["median_s"]
        for way, r in by_way.items():
            r["speedup_vs_bf16_original"] = base / r["median_s"]
            file_size = sizes["original_file_bytes" if way.endswith("original") else "converted_file_bytes"]
            r["resident_over_file"] = r["resident_bytes"] / file_size
    report = {
        "what": "load time and resident bytes (parameters + buffers) of a converted checkpoint vs its BF16 original",
        "original": f"random BF16 Mixtral H,I,E,L={args.make_mixtral}" if args.make_mixtral else str(args.original),
        "converted": str(args.converted or "converted with `moeconv convert` defaults (nf4, g64, double quant)"),
        "device_names": {d: device_name(d) for d in results},
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **sizes,
        "results": results,
    }
    out = args.out or RESULTS / f"load_time-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for device, by_way in results.items():
        for way, r in by_way.items():
            print(f"{device:6s} {way:40s} median {r['median_s']:.3f} s  min {r['min_s']:.3f} s  "
                  f"x{r['speedup_vs_bf16_original']:.2f} vs BF16  resident/file {r['resident_over_file']:.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
