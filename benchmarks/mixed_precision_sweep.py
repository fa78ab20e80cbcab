"""Expert-wise mixed precision on moe-tiny-mixtral: every allocator at every budget, RTN and GPTQ.

Perplexity of the fake-quantized transformers model (expert weights replaced by
their dequantized values) with ``moeconv_torch.perplexity.perplexity(model,
ids, 512, 32768)`` on the first 32,768 tokens of ``eval.txt``; calibration
(routing statistics, sensitivity damages, GPTQ Hessians) uses windows from the
rest of ``eval.txt``, so no evaluation token is seen.

Budgets: stored bits per routed-expert weight 2.5, 3.0, 3.5 (= uniform INT3 g64)
and 4.25 (= uniform INT4 g128), and the paper's setting, 4/3/2 at 3.0 code bits
with group 64.  ``paper`` runs with both Λ variants: the true change of the
router-row norm (``router_init.safetensors``) and the final norm (the paper's
code for Mixtral).  Allocations that pick the same spec for every expert as an
earlier one reuse its perplexity.

GPTQ: every (expert, candidate) is quantized once with GPTQ on Hessians of the
float model's routed activations (``moeconv.calib.iterate_moe_layers``) and
cached; an allocation then only swaps weights.  That is GPTQ without the
sequential re-calibration of later layers that ``moeconv convert --method
gptq`` does; ``--sequential-check`` measures the difference on a few settings.

    python benchmarks/mixed_precision_sweep.py            # ~40 min on 2 CPU cores
    python benchmarks/mixed_precision_sweep.py --quantizers rtn --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moeconv.alloc import DEFAULT_CANDIDATES, plan_allocation, spec_label
from moeconv.alloc.calibration import measure
from moeconv.alloc.source import open_source
from moeconv.quant import QuantSpec, dequantize, quantize

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT.parent.parent / "shared" / "models" / "moe-tiny-mixtral"
EVAL_TOKENS = 32768
SEQ_LEN = 512
LEVEL_ALLOCATORS = ("paper", "frequency", "maxvar", "random")


def load(model_dir: Path, dtype, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer((model_dir / "eval.txt").read_text(encoding="utf-8"), return_tensors="pt").input_ids.reshape(-1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, ids


class FakeQuant:
    """Swaps the experts of the transformers model for dequantized candidates, cached per (expert, spec)."""

    def __init__(self, model, source, quantizer: str, hessians=None):
        self.model, self.source, self.quantizer, self.hessians = model, source, quantizer, hessians
        self.cache: dict[tuple, dict[str, torch.Tensor]] = {}
        device = next(model.parameters()).device
        self.original = {(e.layer, e.expert): {p: source.read(it).to(device) for p, it in e.weights.items()} for e in source.experts}

    def weights(self, key, spec: QuantSpec) -> dict[str, torch.Tensor]:
        if (key, spec) not in self.cache:
            if self.quantizer == "gptq":
                self._gptq_layer(key[0], spec)
            else:
                w = self.original[key]
                self.cache[(key, spec)] = {p: dequantize(quantize(m, spec), spec, tuple(m.shape)) for p, m in w.items()}
        return self.cache[(key, spec)]

    def _gptq_layer(self, layer: int, spec: QuantSpec) -> None:
        """GPTQ of every expert of ``layer`` with ``spec``, batched over the experts."""
        from moeconv.calib import gptq_quantize

        keys = [k for k in self.original if k[0] == layer]
        out = {k: {} for k in keys}
        for proj in ("gate", "up", "down"):
            w = torch.stack([self.original[k][proj] for k in keys])
            h = torch.stack([self.hessians[k][1 if proj == "down" else 0] for k in keys]).to(w.device)
            for k, m in zip(keys, gptq_quantize(w, h, spec).dequantize()):
                out[k][proj] = m
        for k in keys:
            self.cache[(k, spec)] = out[k]

    def apply(self, by_expert: dict[tuple[int, int], QuantSpec]) -> None:
        layers = self.model.model.layers
        for (layer, expert), spec in by_expert.items():
            w = self.weights((layer, expert), spec)
            experts = layers[layer].mlp.experts
            inter = w["gate"].shape[0]
            dtype = experts.gate_up_proj.dtype
            experts.gate_up_proj.data[expert, :inter] = w["gate"].to(dtype)
            experts.gate_up_proj.data[expert, inter:] = w["up"].to(dtype)
            experts.down_proj.data[expert] = w["down"].to(dtype)


def float_hessians(model, calib_ids, batch_size):
    """Per expert (H_in, H_mid) of the float model's routed activations, as ``moeconv convert --method gptq`` builds them."""
    from moeconv.calib import iterate_moe_layers

    out = {}
    for layer in iterate_moe_layers(model, calib_ids, batch_size=batch_size):
        s = layer.stats
        for e in range(s.tokens.numel()):
            out[(layer.index, e)] = (s.h_in[e], s.h_mid[e])
    return out


def settings(model_dir: Path, budgets):
    """(name, budget mode, avg bits, allocator, plan_allocation kwargs) of every point of the sweep."""
    ref = str(model_dir / "router_init.safetensors")
    points = []
    for b in budgets:
        points.append((f"uniform@{b}", "stored", b, "uniform", {}))
        points.append((f"sensitivity@{b}", "stored", b, "sensitivity", {}))
        points.append((f"paper(final-norm)@{b}", "stored", b, "paper", {}))
        points.append((f"paper(true-Λ)@{b}", "stored", b, "paper", {"router_reference": ref}))
        for alloc in ("frequency", "maxvar", "random"):
            points.append((f"{alloc}@{b}", "stored", b, alloc, {}))
    code = {"budget": "code-bits", "group_size": 64}
    points.append(("uniform int3/g64@3.0code", "code-bits", 3.0, "uniform", {"scheme": "int3", "group_size": 64}))
    points.append(("sensitivity g64@3.0code", "code-bits", 3.0, "sensitivity", code))
    points.append(("paper(final-norm)@3.0code", "code-bits", 3.0, "paper", code))
    points.append(("paper(true-Λ)@3.0code", "code-bits", 3.0, "paper", {**code, "router_reference": ref}))
    points.append(("paper-reversed(final-norm)@3.0code", "code-bits", 3.0, "paper-reversed", code))
    for alloc in ("frequency", "maxvar", "random"):
        points.append((f"{alloc}@3.0code", "code-bits", 3.0, alloc, code))
    return points


def make_plan(source, alloc, avg, mode, kwargs, stats, quantizer):
    if alloc == "paper-reversed":
        plan = plan_allocation(source, avg_bits=avg, alloc="paper", **kwargs)
        order = {}
        for layer in source.layers:
            specs = sorted((c for c in plan.choices if c.layer == layer), key=lambda c: c.signals["rank"])
            for c, r in zip(specs, reversed(specs)):
                order[(layer, c.expert)] = r.spec
        return plan, order
    if alloc == "uniform":
        kwargs = {k: v for k, v in kwargs.items() if k != "budget"}
        if "scheme" in kwargs:
            plan = plan_allocation(source, alloc="uniform", **kwargs)
        else:
            plan = plan_allocation(source, avg_bits=avg, alloc="uniform", budget=mode, **kwargs)
        return plan, plan.by_expert
    extra = {"calib_stats": stats} if alloc in ("sensitivity", "frequency") else {}
    if alloc == "sensitivity":
        extra["method"] = quantizer
        extra["candidates"] = list(DEFAULT_CANDIDATES)
    plan = plan_allocation(source, avg_bits=avg, alloc=alloc, **{"budget": mode, **kwargs}, **extra)
    return plan, plan.by_expert


def summary(plan, by_expert) -> dict:
    counts: dict[str, int] = {}
    for spec in by_expert.values():
        counts[spec_label(spec)] = counts.get(spec_label(spec), 0) + 1
    stored = sum(c.stored_bits for c in plan.choices)
    code = sum(c.code_bits for c in plan.choices)
    if by_expert is not plan.by_expert:  # reversed order: same multiset of specs, same totals
        assert sorted(map(str, by_expert.values())) == sorted(map(str, plan.by_expert.values()))
    return {"stored_bits_per_weight": stored / plan.numel, "code_bits_per_weight": code / plan.numel,
            "schemes": dict(sorted(counts.items()))}


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    quantizers = [q for q in ("rtn", "gptq") if any(r["quantizer"] == q for r in results)]
    fig, axes = plt.subplots(1, len(quantizers), figsize=(6.5 * len(quantizers), 4.8), squeeze=False)
    for ax, q in zip(axes[0], quantizers):
        rows = [r for r in results if r["quantizer"] == q]
        for alloc in sorted({r["allocator"] for r in rows}):
            pts = sorted((r["stored_bits_per_weight"], r["ppl"]) for r in rows if r["allocator"] == alloc and r["budget_mode"] == "stored")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=alloc)
        code = [r for r in rows if r["budget_mode"] == "code-bits"]
        for r in code:
            ax.scatter(r["stored_bits_per_weight"], r["ppl"], marker="x", color="black", s=20)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel("stored bits per routed-expert weight")
        ax.set_ylabel("perplexity (32,768 eval tokens)")
        ax.set_title(f"moe-tiny-mixtral, {q.upper()} (x: 4/3/2 @ 3.0 code bits)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "mixed_precision_sweep.json")
    ap.add_argument("--quantizers", default="rtn,gptq")
    ap.add_argument("--budgets", default="2.5,3.0,3.5,4.25")
    ap.add_argument("--calib-samples", type=int, default=64, help="calibration windows of 512 tokens after the eval tokens")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gptq-budgets", default=None, help="stored-bit budgets for GPTQ (default: --budgets)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is much faster on a shared, oversubscribed CPU)")
    ap.add_argument("--sequential-check", action="store_true", help="also run sequential GPTQ (as convert does) on a few settings")
    ap.add_argument("--merge", action="store_true", help="keep the rows of other quantizers already in --out")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from --out and exit")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(args.out.read_text())["results"], args.out.with_suffix(".png"))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from moeconv.calib import calibration_ids
    from moeconv_torch.perplexity import perplexity

    t0 = time.time()
    model, ids = load(args.model, getattr(torch, args.dtype), args.device)
    from transformers import AutoTokenizer

    calib_ids = calibration_ids(args.model / "eval.txt", AutoTokenizer.from_pretrained(args.model), args.calib_samples, SEQ_LEN, EVAL_TOKENS)
    source = open_source(args.model)
    eval_ids = ids[:EVAL_TOKENS].view(1, -1)

    def ppl() -> float:
        return perplexity(model, eval_ids, SEQ_LEN, EVAL_TOKENS)

    t = time.time()
    base = ppl()
    timing = {"eval_s": time.time() - t}
    print(f"float model ({args.dtype}): ppl {base:.4f} in {timing['eval_s']:.1f} s", flush=True)
    t = time.time()
    stats = measure(model, calib_ids, loss_weighted=True, description=f"{calib_ids.numel()} tokens of eval.txt after the first {EVAL_TOKENS}")
    timing["calibration_pass_s"] = time.time() - t
    quantizers = args.quantizers.split(",")
    kept, commands = [], []
    if args.merge and args.out.is_file():
        previous = json.loads(args.out.read_text())
        kept = [r for r in previous["results"] if r["quantizer"] not in quantizers]
        commands = previous.get("commands", [previous["command"]] if "command" in previous else [])
    results, seen = kept, {}
    out = {"model": str(args.model), "machine": {"platform": platform.platform(), "processor": platform.processor(),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device},
           "dtype": args.dtype, "commands": [*commands, " ".join(sys.argv)], "eval_tokens": EVAL_TOKENS, "seq_len": SEQ_LEN,
           "calibration_tokens": calib_ids.numel(), "calibration": "eval.txt tokens after the first 32,768",
           "float_ppl": base, "timing": timing, "results": results}
    for quantizer in quantizers:
        hessians = None
        if quantizer == "gptq":
            t = time.time()
            hessians = float_hessians(model, calib_ids, 8)
            timing["gptq_hessian_pass_s"] = time.time() - t
        fq = FakeQuant(model, source, quantizer, hessians)
        budgets = args.gptq_budgets if quantizer == "gptq" and args.gptq_budgets else args.budgets
        for name, mode, avg, alloc, kwargs in settings(args.model, [float(b) for b in budgets.split(",")]):
            t = time.time()
            plan, by_expert = make_plan(source, alloc, avg, mode, kwargs, stats, quantizer)
            plan_s = time.time() - t
            key = (quantizer, tuple(sorted((k, str(v)) for k, v in by_expert.items())))
            if key in seen:
                value, reused = seen[key], True
            else:
                fq.apply(by_expert)
                value, reused = ppl(), False
                seen[key] = value
            row = {"quantizer": quantizer, "setting": name, "allocator": name.split("@")[0].replace(" int3/g64", "").replace(" g64", ""),
                   "budget_mode": mode, "avg_bits": avg, "ppl": value, "reused": reused, "plan_s": plan_s,
                   **summary(plan, by_expert), "notes": plan.notes}
            results.append(row)
            print(f"{quantizer:4} {name:38} ppl {value:8.4f}  stored {row['stored_bits_per_weight']:.3f}  "
                  f"code {row['code_bits_per_weight']:.3f}  {row['schemes']}  ({time.time() - t:.0f} s)", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False))
        _restore(model, fq.original)  # float experts again for the next quantizer
    if args.sequential_check:
        out["sequential_gptq"] = sequential_check(model, source, calib_ids, stats, ppl, args.model)
    timing["total_s"] = time.time() - t0
    args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {timing['total_s']:.0f} s")


def _restore(model, original) -> None:
    for (layer, expert), w in original.items():
        experts = model.model.layers[layer].mlp.experts
        inter = w["gate"].shape[0]
        experts.gate_up_proj.data[expert, :inter] = w["gate"]
        experts.gate_up_proj.data[expert, inter:] = w["up"]
        experts.down_proj.data[expert] = w["down"]


#: Settings re-run with sequential GPTQ (``moeconv.calib.quantize_moe``, what ``convert --method gptq`` does).
SEQUENTIAL = ("uniform@3.5", "sensitivity@3.5", "uniform@4.25", "sensitivity@4.25", "sensitivity g64@3.0code",
              "paper(final-norm)@3.0code", "paper(true-Λ)@3.0code", "frequency@3.0code")


def sequential_check(model, source, calib_ids, stats, ppl, model_dir):
    """Sequential GPTQ of a few allocations: later layers calibrate on the quantized earlier ones."""
    from moeconv.calib import CalibConfig, quantize_moe

    device = next(model.parameters()).device
    original = {(e.layer, e.expert): {p: source.read(it).to(device) for p, it in e.weights.items()} for e in source.experts}
    rows = []
    for name, mode, avg, alloc, kwargs in settings(model_dir, [3.5, 4.25]):
        if name not in SEQUENTIAL:
            continue
        plan, specs = make_plan(source, alloc, avg, mode, kwargs, stats, "gptq")
        t = time.time()
        quantize_moe(model, calib_ids, lambda layer, expert, proj: specs[(layer, expert)], CalibConfig(method="gptq"))
        rows.append({"setting": name, "ppl": ppl(), "quantize_s": time.time() - t, **summary(plan, specs)})
        print(f"sequential gptq {name}: ppl {rows[-1]['ppl']:.4f}", flush=True)
        _restore(model, original)
    return rows


if __name__ == "__main__":
    main()
