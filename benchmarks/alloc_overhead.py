"""Allocation overhead of the data-free allocators (paper, maxvar) on a 48-layer, 64-expert checkpoint.

Writes a synthetic Mixtral-layout checkpoint (config.json, index, one shard per
four layers, BF16) with the real structure (48 layers x 64 experts x w1/w2/w3
plus routers) but small matrices (hidden 64, intermediate 32), then times
``plan_allocation`` end to end (opening the headers, the adapter's tensor
plan, reading every router and every gate projection, the orders and the
levels) and its parts.  Reading cost grows with the gate projections' size;
this measures the fixed overhead per expert, which is what the target is about.

    python benchmarks/alloc_overhead.py [--out benchmarks/results/alloc_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from moeconv.alloc import plan_allocation
from moeconv.alloc.paper import level_counts, paper_orders
from moeconv.alloc.signals import max_variance, router_signal
from moeconv.alloc.source import open_source
from moeconv.source import open_source as open_headers

LAYERS, EXPERTS, HIDDEN, INTER, LAYERS_PER_SHARD = 48, 64, 64, 32, 4


def write_checkpoint(root: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    n_shards = LAYERS // LAYERS_PER_SHARD
    for shard in range(n_shards):
        name = f"model-{shard + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors = {}
        for layer in range(shard * LAYERS_PER_SHARD, (shard + 1) * LAYERS_PER_SHARD):
            prefix = f"model.layers.{layer}.block_sparse_moe."
            tensors[prefix + "gate.weight"] = torch.randn(EXPERTS, HIDDEN, generator=gen).bfloat16()
            for e in range(EXPERTS):
                for proj, shape in (("w1", (INTER, HIDDEN)), ("w3", (INTER, HIDDEN)), ("w2", (HIDDEN, INTER))):
                    tensors[f"{prefix}experts.{e}.{proj}.weight"] = (torch.randn(*shape, generator=gen) * 0.02).bfloat16()
        save_file(tensors, str(root / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_local_experts": EXPERTS, "num_experts_per_tok": 2,
        "num_hidden_layers": LAYERS, "vocab_size": 32}))


def timed(fn, repeats: int) -> tuple[float, object]:
    times, value = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "alloc_overhead.json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared, oversubscribed CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_checkpoint(root)
        result = {"checkpoint": {"layers": LAYERS, "experts": EXPERTS, "hidden": HIDDEN, "intermediate": INTER,
                                 "shards": LAYERS // LAYERS_PER_SHARD, "dtype": "bfloat16"},
                  "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
                  "repeats": args.repeats, "median_s": {}}
        timings = result["median_s"]
        opened = open_headers(root)
        for alloc in ("paper", "maxvar"):
            for what, src in (("checkpoint path", root), ("opened moeconv.source.Source (as convert passes it)", opened)):
                timings[f"plan_allocation({alloc}) from a {what}"], _ = timed(
                    lambda: plan_allocation(src, avg_bits=3.0, alloc=alloc, budget="code-bits"), args.repeats)
        timings["  of which: read headers (moeconv.source.open_source)"], _ = timed(lambda: open_headers(root), args.repeats)
        timings["  of which: adapter tensor plan (ExpertSource)"], source = timed(lambda: open_source(opened), args.repeats)
        timings["plan_allocation(paper) from an ExpertSource (allocation work only)"], _ = timed(
            lambda: plan_allocation(source, avg_bits=3.0, alloc="paper", budget="code-bits"), args.repeats)
        timings["  of which: router signal (final norm)"], router = timed(lambda: router_signal(source), args.repeats)
        timings["  of which: maxvar (read 3072 gate projections)"], maxvar = timed(lambda: max_variance(source), args.repeats)
        timings["  of which: combined order + level counts"], _ = timed(
            lambda: (paper_orders(router.lam, maxvar, 3.0), level_counts(LAYERS, EXPERTS, (4, 3, 2), (4.0, 3.0, 2.0), 3.0)),
            args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name, seconds in timings.items():
        print(f"{name:75} {seconds * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
