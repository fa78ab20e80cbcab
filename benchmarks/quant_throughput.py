"""Quantization throughput in MB/s of BF16 input, per scheme, with peers side by side.

Quantizes one Mixtral-sized expert matrix (default 4096 x 14336 BF16, 117 MB)
with every moeconv scheme and, in the same run on the same input,
bitsandbytes NF4 + double quant (``quantize_4bit(..., compress_statistics=True)``)
and, when the ``gguf`` package is installed, gguf-py Q4_0 (CPU only).  Each
case runs once to warm up and then ``--repeat`` times; the table reports the
best and median run.  MB/s = bytes of BF16 input / seconds (1 MB = 1e6 bytes).
"MB/CPU-s" divides by the process's CPU time instead (all threads): on a
machine shared with other work it shows what the code costs, where the
wall-clock figure shows what it got.

    python benchmarks/quant_throughput.py                       # CPU, torch's thread count
    python benchmarks/quant_throughput.py --device cuda --out benchmarks/results/quant_throughput_cuda.json

The JSON records the machine (CPU model, GPU name, thread count) and the
torch / bitsandbytes / gguf versions next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moeconv.quant import QuantSpec, chunks, quantize

DEFAULT_OUT = Path(__file__).parent / "results" / "quant_throughput_cpu.json"

#: (label, scheme, group size, double quant)
CASES = [
    *[(f"int{b}{s} g64", f"int{b}{s}", 64, False) for b in (2, 3, 4, 8) for s in ("", "-sym")],
    ("int4 g128", "int4", 128, False),
    ("int4-sym g128", "int4-sym", 128, False),
    ("nf4 g64", "nf4", 64, False),
    ("nf4 g64 +dq", "nf4", 64, True),
    ("fp4 g64", "fp4", 64, False),
    ("fp4 g64 +dq", "fp4", 64, True),
    ("mxfp4", "mxfp4", 32, False),
]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, repeat: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of each timed run (after one warm-up run)."""
    fn()
    _sync(device)
    wall, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def _peers(weight: torch.Tensor) -> dict[str, Callable[[], object] | str]:
    """Peer implementations on the same input; a string says why one is unavailable."""
    peers: dict[str, Callable[[], object] | str] = {}
    try:
        import bitsandbytes.functional as bnb_f

        peers["bitsandbytes nf4 g64 +dq"] = lambda: bnb_f.quantize_4bit(
            weight, blocksize=64, quant_type="nf4", compress_statistics=True
        )
    except Exception as exc:  # an absent or broken install is reported, not fatal
        peers["bitsandbytes nf4 g64 +dq"] = f"unavailable: {type(exc).__name__}: {exc}"
    if weight.device.type == "cpu":
        try:
            from gguf import GGMLQuantizationType, quants

            peers["gguf-py Q4_0 (block 32)"] = lambda: quants.quantize(
                weight.float().numpy(), GGMLQuantizationType.Q4_0
            )
        except Exception as exc:
            peers["gguf-py Q4_0 (block 32)"] = f"unavailable: {type(exc).__name__}: {exc}"
    return peers


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__}
    for module in ("bitsandbytes", "gguf"):
        try:
            from importlib.metadata import version

            out[module] = version(module)
        except Exception:
            out[module] = None
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=14336)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per case after one warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    parser.add_argument("--only", default=None, help="comma-separated substrings; run only matching cases")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default: {DEFAULT_OUT})")
    parser.add_argument("--gpu-chunk-elements", type=int, default=None,
                        help="override moeconv.quant.chunks.GPU_CHUNK_ELEMENTS (how its default was chosen)")
    args = parser.parse_args(argv)
    if args.gpu_chunk_elements:
        chunks.GPU_CHUNK_ELEMENTS = args.gpu_chunk_elements

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(args.rows, args.cols, generator=gen) * 0.02).to(torch.bfloat16).to(device)
    mbytes = weight.numel() * weight.element_size() / 1e6

    cases: dict[str, Callable[[], object] | str] = {
        label: (lambda spec=QuantSpec(scheme, group, dq): quantize(weight, spec))
        for label, scheme, group, dq in CASES
    }
    cases.update(_peers(weight))
    if args.only:
        keys = [k.strip() for k in args.only.split(",")]
        cases = {label: fn for label, fn in cases.items() if any(k in label for k in keys)}

    results = []
    header = f"{'case':28s} {'best MB/s':>10s} {'median MB/s':>12s} {'MB/CPU-s':>9s}"
    print(f"{header}   (input {mbytes:.0f} MB BF16, {device}, {torch.get_num_threads()} torch threads)")
    for label, fn in cases.items():
        if isinstance(fn, str):
            print(f"{label:28s} {fn}")
            results.append({"case": label, "skipped": fn})
            continue
        wall, cpu = _time(fn, device, args.repeat)
        best, median, per_cpu = mbytes / min(wall), mbytes / statistics.median(wall), mbytes / min(cpu)
        print(f"{label:28s} {best:10.0f} {median:12.0f} {per_cpu:9.0f}")
        results.append(
            {"case": label, "seconds": wall, "cpu_seconds": cpu, "best_mb_s": best, "median_mb_s": median,
             "mb_per_cpu_second": per_cpu}
        )

    report = {
        "benchmark": "quant_throughput",
        "input": {"rows": args.rows, "cols": args.cols, "dtype": "bfloat16", "megabytes": mbytes},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "gpu_chunk_elements": chunks.GPU_CHUNK_ELEMENTS,
        "versions": _versions(),
        "platform": platform.platform(),
        "load_average_1min_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "repeat": args.repeat,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
