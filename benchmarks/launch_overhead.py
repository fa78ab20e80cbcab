"""Host time of one fused MoE layer call at one token: Triton's own dispatch against ``kernels.launch``.

    python benchmarks/launch_overhead.py [--calls 500]

Eager decoding runs one layer call per layer per token, and at one token the
GPU work is short (about 75-120 us on Mixtral shapes), so the host time of
a call decides whether eager decoding keeps the GPU busy.  For a Mixtral-8x7B
layer (hidden 4096, intermediate 14336, 8 experts, top-2) in nf4 and int4,
this times ``calls`` back-to-back calls without synchronising (host time) and
the same calls until the GPU is done (total), each way:

* ``triton``: every launch through Triton's dispatch (what the interpreter
  path of ``kernels.launch`` does, forced here);
* ``cached``: ``kernels.launch`` as shipped, which calls the compiled
  kernels' launchers directly after the first launch.

Writes JSON with the device and versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def per_call_us(fn, calls: int) -> dict:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    queued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return {"host_us": 1e6 * (queued - start) / calls, "total_us": 1e6 * (done - start) / calls}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--out", type=Path, default=RESULTS / "launch_overhead_h200.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("launch_overhead.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from moe_kernels import build_experts
    from moeconv_torch.kernels import fused_moe
    from moeconv_torch.kernels import launch as launch_module

    report = {"device": torch.cuda.get_device_name(0), "command": "python " + " ".join(sys.argv),
              "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
                           "python": platform.python_version()},
              "shapes": {"hidden": 4096, "intermediate": 14336, "experts": 8, "top_k": 2, "tokens": 1},
              "results": {}}
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    ids = torch.tensor([[1, 5]], device="cuda")
    weights = torch.full((1, 2), 0.5, device="cuda")
    with torch.inference_mode():
        for scheme, dq in (("nf4", True), ("int4", False)):
            experts, _ = build_experts([(scheme, 64, dq)] * 8, gen)
            row = {}
            for way, through_triton in (("triton", True), ("cached", False)):
                launch_module._INTERPRET = through_triton
                row[way] = per_call_us(lambda: fused_moe(x, ids, weights, experts), args.calls)
                print(f"{scheme:5s} {way:7s} host {row[way]['host_us']:6.1f} us a call, "
                      f"total {row[way]['total_us']:6.1f} us", flush=True)
            launch_module._INTERPRET = False
            report["results"][scheme] = row
            del experts
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
