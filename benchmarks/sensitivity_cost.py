"""What ``--alloc sensitivity`` costs, next to one GPTQ pass, on moe-tiny-mixtral.

    python benchmarks/sensitivity_cost.py [--threads 1] [--out benchmarks/results/sensitivity_cost.json]

Times, on the same calibration windows as ``mixed_precision_sweep.py`` (64
windows of 512 eval.txt tokens after the first 32,768):

* the allocator's one calibration pass (forward and backward over the text,
  ``moeconv.alloc.calibration.measure``);
* its plan at 3.5 stored bits (``plan_allocation``: damage measurement and
  knapsack) for the default candidates with round-to-nearest, for the
  paper's four g64 int candidates with GPTQ, and for the twelve default int
  candidates with GPTQ;
* one sequential GPTQ pass over the model, INT3 g64 (``moeconv.calib.quantize_moe``,
  what ``moeconv convert --method gptq`` runs).

Prints the figures and writes JSON with the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from mixed_precision_sweep import DEFAULT_MODEL, EVAL_TOKENS, SEQ_LEN, load

ROOT = Path(__file__).resolve().parent


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "sensitivity_cost.json")
    args = parser.parse_args()
    if not args.model.is_dir():
        print(f"{args.model} not found", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from moeconv.alloc import DEFAULT_CANDIDATES, plan_allocation
    from moeconv.alloc.calibration import measure
    from moeconv.alloc.source import open_source
    from moeconv.calib import CalibConfig, calibration_ids, quantize_moe
    from moeconv.quant import QuantSpec

    model, _ = load(args.model, torch.float32, "cpu")
    ids = calibration_ids(args.model / "eval.txt", AutoTokenizer.from_pretrained(args.model), 64, SEQ_LEN, EVAL_TOKENS)
    source = open_source(args.model)
    stats, calib_s = timed(lambda: measure(model, ids, loss_weighted=True))
    int_candidates = [c for c in DEFAULT_CANDIDATES if c.scheme.startswith("int")]
    paper_candidates = [QuantSpec(s, 64) for s in ("int2", "int3", "int4", "int8")]
    damages = {}
    for name, candidates, method in [("rtn, default candidates", list(DEFAULT_CANDIDATES), "rtn"),
                                     ("gptq, int2/3/4/8 g64", paper_candidates, "gptq"),
                                     ("gptq, default int candidates", int_candidates, "gptq")]:
        stats.damages.clear()  # measured afresh for each set (a plan at another budget would reuse them)
        _, seconds = timed(lambda: plan_allocation(source, avg_bits=3.5, alloc="sensitivity", calib_stats=stats,
                                                   candidates=candidates, method=method, device="cpu"))
        damages[name] = {"candidates": len(candidates), "plan_s": seconds, "total_s": calib_s + seconds}
        print(f"sensitivity ({name}, {len(candidates)}): calibration {calib_s:.1f} s + plan {seconds:.1f} s "
              f"= {calib_s + seconds:.1f} s", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starved experts fall back to RTN with a warning
        _, gptq_s = timed(lambda: quantize_moe(model, ids, QuantSpec("int3", 64), CalibConfig(method="gptq")))
    print(f"one sequential GPTQ pass (int3 g64): {gptq_s:.1f} s")
    for row in damages.values():
        row["vs_one_gptq_pass"] = row["total_s"] / gptq_s
    report = {"model": args.model.name, "calibration_tokens": ids.numel(), "threads": args.threads,
              "machine": {"platform": platform.platform(), "processor": platform.processor()},
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "command": "python " + " ".join(sys.argv), "calibration_pass_s": calib_s,
              "sensitivity": damages, "one_gptq_pass_s": gptq_s}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
