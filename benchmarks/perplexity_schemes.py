"""Perplexity of moe-tiny-mixtral with every scheme, quantized by RTN, GPTQ and AWQ (fake quantization).

For each (scheme, method) a fresh float32 copy of the model is loaded, every
routed expert weight is replaced by ``dequantize(quantize(W))`` — directly for
RTN, through :func:`moeconv.calib.quantize_moe` for GPTQ and AWQ, which also
fold AWQ's layer scales into the norms/routers — and perplexity is measured
with :func:`moeconv_torch.perplexity.perplexity` on the first 32,768 tokens of
eval.txt in 512-token windows (the project's metric).  Calibration uses the
tokens of eval.txt AFTER the first 32,768 (never the evaluated ones), cut into
``--calib-samples`` windows of ``--seq-len``.

Variants measured beside the defaults (``gptq``: no act-order, clipping
search on; ``awq``: one power-of-two gate/up scale per layer folded into the
norm, routers compensated — what format v1 can store — and clipping search):
``gptq-act-order``; ``gptq-no-clip`` / ``awq-no-clip`` (plain min/max group
ranges); ``awq-free``
(layer scale not rounded to powers of two: router logits change by rounding);
``awq-expert`` (one gate/up input scale per expert: needs a spec addition,
fake-quant only); ``awq-none`` (no gate/up input scale, only the down scale
folded into up, plus clipping: routers untouched).  GPTQ exists for the int family only.

    python benchmarks/perplexity_schemes.py                     # CPU or CUDA, whichever is there
    python benchmarks/perplexity_schemes.py --schemes int4,int3 --methods gptq --calib-samples 32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
import warnings
from pathlib import Path

import torch

from moeconv.calib import CalibConfig, quantize_moe
from moeconv.calib.awq import fake_quantize
from moeconv.calib.capture import arch_for, fused_expert_weights
from moeconv.quant import QuantSpec
from moeconv_numpy.schemes import scheme_info
from moeconv_torch.perplexity import perplexity

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT.parent / "shared" / "models" / "moe-tiny-mixtral"
DEFAULT_OUT = Path(__file__).parent / "results" / "perplexity_schemes.json"
EVAL_TOKENS, SEQ_LEN = 32768, 512
SCHEMES = ["int2", "int3", "int4", "int8", "int3-sym", "int4-sym", "nf4", "fp4", "mxfp4"]
#: method label -> CalibConfig overrides (None: plain RTN, no calibration)
METHODS = {
    "rtn": None,
    "gptq": {"method": "gptq"},
    "gptq-act-order": {"method": "gptq", "act_order": True},
    "gptq-no-clip": {"method": "gptq", "clip": False},
    "awq": {"method": "awq", "awq_input": "norm", "awq_pow2": True},
    "awq-free": {"method": "awq", "awq_input": "norm", "awq_pow2": False},
    "awq-expert": {"method": "awq", "awq_input": "expert"},
    "awq-none": {"method": "awq", "awq_input": "none"},
    "awq-no-clip": {"method": "awq", "awq_input": "norm", "awq_pow2": True, "clip": False},
}


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "cpu": _cpu_model(), "torch_threads": torch.get_num_threads(),
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def versions() -> dict:
    import transformers

    import moeconv

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "moeconv": moeconv.__version__}


@torch.no_grad()
def rtn_in_place(model, spec: QuantSpec) -> None:
    """Replace every routed expert weight by its round-to-nearest fake quantization."""
    arch = arch_for(model)
    for layer in model.get_submodule(arch.layers):
        for weight in fused_expert_weights(layer.get_submodule(f"{arch.block}.{arch.experts}")):
            weight.copy_(fake_quantize(weight, spec))


def load(model_dir: Path, device: torch.device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--variants-for", default="int2,int3,int4",
                        help="schemes that also get the non-default variants (gptq-act-order, awq-free, ...)")
    parser.add_argument("--group-size", type=int, default=64, help="group size of the int schemes and nf4/fp4")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--percdamp", type=float, default=CalibConfig.percdamp, help="GPTQ damping")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help="calibration window length")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    device = torch.device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer((args.model / "eval.txt").read_text(encoding="utf-8"), return_tensors="pt").input_ids.reshape(-1)
    eval_ids = ids[:EVAL_TOKENS]
    n_calib = min(args.calib_samples, (ids.numel() - EVAL_TOKENS) // args.seq_len)
    calib_ids = ids[EVAL_TOKENS: EVAL_TOKENS + n_calib * args.seq_len].view(n_calib, args.seq_len)

    start = time.perf_counter()
    baseline = perplexity(load(args.model, device), eval_ids, SEQ_LEN, EVAL_TOKENS)
    report = {
        "benchmark": "perplexity_schemes",
        "model": args.model.name,
        "machine": machine(device),
        "versions": versions(),
        "tokens": {"eval": f"eval.txt tokens [0, {EVAL_TOKENS}), windows of {SEQ_LEN}",
                   "calibration": f"eval.txt tokens [{EVAL_TOKENS}, {EVAL_TOKENS + calib_ids.numel()}), "
                                  f"{n_calib} windows of {args.seq_len}",
                   "eval_file_tokens": ids.numel()},
        "calib_defaults": {**dataclasses.asdict(CalibConfig()), "percdamp": args.percdamp},
        "baseline_float32": {"ppl": baseline, "seconds": time.perf_counter() - start},
        "results": [],
    }
    print(f"float32 baseline ppl {baseline:.4f}", flush=True)
    variants = set(args.variants_for.split(","))
    for scheme in args.schemes.split(","):
        info = scheme_info(scheme)
        group = info.default_group_size if info.family == "mxfp4" else args.group_size
        spec = QuantSpec(scheme, group)
        for method in args.methods.split(","):
            overrides = METHODS[method]
            if method in ("gptq", "gptq-act-order") and info.family != "int":
                continue
            if method not in ("rtn", "gptq", "awq") and scheme not in variants:
                continue
            model = load(args.model, device)
            start = time.perf_counter()
            fallbacks = []
            if overrides is None:
                rtn_in_place(model, spec)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    config = CalibConfig(**{"percdamp": args.percdamp, **overrides})
                    result = quantize_moe(model, calib_ids, spec, config)
                fallbacks = result.fallbacks
            quant_s = time.perf_counter() - start
            ppl = perplexity(model, eval_ids, SEQ_LEN, EVAL_TOKENS)
            row = {"scheme": scheme, "group_size": spec.group_size, "double_quant": spec.double_quant,
                   "method": method, "config": overrides, "ppl": ppl, "quantize_seconds": quant_s,
                   "rtn_fallbacks": fallbacks}
            report["results"].append(row)
            print(f"{scheme:9s} g{spec.group_size:<3d} {method:15s} ppl {ppl:8.4f}  ({quant_s:6.1f} s, "
                  f"{len(fallbacks)} RTN fallbacks)", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
