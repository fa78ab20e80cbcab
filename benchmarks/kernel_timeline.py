"""Where a decode step's time goes: each kernel of one fused MoE layer call, and the gaps between them.

    python benchmarks/kernel_timeline.py [--sets int4,nf4] [--batch 1]

For a Mixtral-8x7B layer (hidden 4096, intermediate 14336, 8 experts,
top-2), replays a CUDA graph of layer calls (every routing of
``moe_kernels.routings``) under the PyTorch profiler and reports, per kernel
name, its launches per call and mean duration, and the graph's time per
call beside their sum (the rest is time between kernels).  That time and
the small kernels (routing, zeroing, the final cast) are what a
faster product kernel cannot win back.  Writes JSON with the device and
versions.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
#: Graph replays profiled per expert set.
REPLAYS = 5


def profile_graph(calls, replays: int = REPLAYS) -> list:
    """The CUDA kernels of ``replays`` replays of a graph of ``calls``, in start order."""
    from torch.profiler import ProfilerActivity, profile

    for call in calls:  # compile outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sorted(kernels, key=lambda e: e.time_range.start)


def timeline(kernels, layer_calls: int) -> dict:
    """Per kernel name: launches a layer call and mean microseconds; gaps between kernels; their totals."""
    by_name = collections.defaultdict(list)
    for k in kernels:
        by_name[k.name].append(k.time_range.end - k.time_range.start)
    gaps = [b.time_range.start - a.time_range.end for a, b in zip(kernels, kernels[1:])]
    rows = {name: {"per_call": len(us) / layer_calls, "mean_us": statistics.mean(us)} for name, us in by_name.items()}
    per_call = sum(r["per_call"] * r["mean_us"] for r in rows.values())
    # The profiler's timestamps can put a kernel's start a little before the previous one's end, so the
    # time outside kernels is the graph's time less theirs (``main``); the median gap is beside it.
    return {"kernels": rows, "kernel_us_per_call": per_call, "gap_median_us": statistics.median(gaps)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="int4,nf4", help="comma-separated expert sets of moe_kernels.py")
    parser.add_argument("--batch", type=int, default=1, choices=(1, 16))
    parser.add_argument("--out", type=Path, default=RESULTS / "kernel_timeline_h200.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("kernel_timeline.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    import moe_kernels as mk
    from moeconv_torch.kernels import fused_moe

    unknown = set(args.sets.split(",")) - set(mk.EXPERT_SETS)
    if unknown:
        parser.error(f"--sets: unknown expert sets {sorted(unknown)}; known: {','.join(mk.EXPERT_SETS)}")
    report = {"device": torch.cuda.get_device_name(0), "command": "python " + " ".join(sys.argv),
              "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
                           "python": platform.python_version()},
              "shapes": {"hidden": mk.H, "intermediate": mk.I, "experts": mk.E, "top_k": mk.TOPK,
                         "tokens": args.batch},
              "results": {}}
    gen = torch.Generator(device=mk.DEV).manual_seed(0)
    with torch.inference_mode():
        xs, ids, wts = mk.routings(args.batch, 4, gen)
        for name in args.sets.split(","):
            experts, _ = mk.build_experts(mk.EXPERT_SETS[name], gen)
            calls = [lambda x=x, i=i, w=w: fused_moe(x, i, w, experts) for x, i, w in zip(xs, ids, wts)]
            row = timeline(profile_graph(calls), REPLAYS * len(calls))
            row["graph_us_per_call"] = mk.graph_ms(calls) * 1e3
            row["outside_kernels_us_per_call"] = row["graph_us_per_call"] - row["kernel_us_per_call"]
            report["results"][name] = row
            print(f"{name}: graph {row['graph_us_per_call']:.1f} us a call = kernels {row['kernel_us_per_call']:.1f}"
                  f" + {row['outside_kernels_us_per_call']:.1f} outside them (median gap "
                  f"{row['gap_median_us']:.2f} us)", flush=True)
            for kernel, k in row["kernels"].items():
                print(f"  {kernel[:60]:60s} x{k['per_call']:.0f} {k['mean_us']:7.2f} us", flush=True)
            del experts
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
