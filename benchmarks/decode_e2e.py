"""End-to-end decode speed of a Mixtral-shaped model loaded through the loader: moeconv NF4 / INT4 vs BF16.

    python benchmarks/decode_e2e.py [--layers 2] [--steps 64] [--schemes nf4,int4]

Writes a random BF16 Mixtral with Mixtral-8x7B's layer shapes (hidden 4096,
intermediate 14336, 8 experts, top-2; ``--layers`` of them, 32k vocabulary) to
a temporary directory, converts it with ``moeconv convert --scheme S
--device cuda`` for each scheme, and times greedy decoding of ``--steps``
tokens after a 32-token prompt with a static KV cache:

* ``bf16``: ``AutoModelForCausalLM.from_pretrained(..., dtype=bfloat16)``;
* each scheme: ``moeconv_torch.load_model(converted, device="cuda")`` (the
  experts stay packed and run through the fused Triton MoE kernel).

Each decode step is one forward of one token, timed two ways: in eager
PyTorch, and as whole steps captured in one CUDA graph and replayed (no
Python or launch overhead: what a serving engine runs).  Eager decoding of
so small a model is bound by the host's Python, so its figures move with the
host from run to run (BF16 187 to 304 tokens/s across runs on H200
machines); the graph figures measure the GPU.  Tokens/s = steps /
seconds, median of ``--repeats``.  Each model is measured in its own process,
so a CUDA error in one leaves the others' figures intact.  The JSON records
device and versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from load_time import make_mixtral

RESULTS = Path(__file__).resolve().parent / "results"


def decode_step_fn(model, prompt_len: int, cache_len: int):
    """A function that decodes one token per forward after a fixed prompt, in a static cache of ``cache_len``."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    prompt = torch.arange(1, prompt_len + 1, device=device).unsqueeze(0)
    with torch.inference_mode():
        logits = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits
    token = logits[:, -1:].argmax(-1)
    position = torch.tensor([[prompt_len]], device=device)

    def step(tok, pos):
        out = model(input_ids=tok, position_ids=pos, cache_position=pos[0], past_key_values=cache, use_cache=True)
        return out.logits[:, -1:].argmax(-1)

    return step, token, position


def time_eager(model, prompt_len: int, steps: int, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        step, token, position = decode_step_fn(model, prompt_len, prompt_len + steps + 1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(steps):
                token = step(token, position + i)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    best = statistics.median(times)
    return {"seconds": times, "tokens_per_s": steps / best, "ms_per_token": 1e3 * best / steps}


def time_graph(model, prompt_len: int, steps: int, repeats: int) -> dict:
    """Whole decode steps captured in one CUDA graph and replayed: ``steps`` tokens per repeat.

    The captured step feeds its own output back (next token and position
    written in place), and transformers' static cache advances its own
    device-side length, so each replay decodes the next token, as eager
    decoding does.  The cache holds every token of every repeat.
    """
    warmup = 3
    step, token, position = decode_step_fn(model, prompt_len, prompt_len + warmup + 1 + steps * repeats + 1)

    def advance():
        token.copy_(step(token, position))
        position.add_(1)

    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                advance()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            advance()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    best = statistics.median(times)
    return {"tokens_per_s": steps / best, "ms_per_token": 1e3 * best / steps}


def measure(kind: str, path: Path, prompt_len: int, steps: int, repeats: int) -> dict:
    """Load ``path`` as ``kind`` (bf16 through transformers, else through the loader) and time its decoding."""
    from transformers import AutoModelForCausalLM

    import moeconv_torch

    start = time.perf_counter()
    if kind == "bf16":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    else:
        model = moeconv_torch.load_model(path, device="cuda").eval()
    torch.cuda.synchronize()
    row = {"load_s": time.perf_counter() - start, "gpu_bytes": torch.cuda.memory_allocated()}
    print(f"{kind}: loaded in {row['load_s']:.1f} s", flush=True)
    row["eager"] = time_eager(model, prompt_len, steps, repeats)
    print(f"{kind}: eager {row['eager']['tokens_per_s']:.1f} tok/s", flush=True)
    try:
        row["cuda_graph"] = time_graph(model, prompt_len, steps, repeats)
        print(f"{kind}: graph {row['cuda_graph']['tokens_per_s']:.1f} tok/s", flush=True)
    except RuntimeError as exc:  # a model that cannot be captured still has its eager figure
        row["cuda_graph"] = {"error": repr(exc)[:300]}
        print(f"{kind}: no CUDA graph: {exc!r}"[:300], flush=True)
    return row


def run_isolated(kind: str, path: Path, args) -> dict:
    """``measure`` in a fresh process, so that a CUDA error in one model cannot poison the others' figures."""
    result = subprocess.run([sys.executable, __file__, "--measure", kind, str(path), "--steps", str(args.steps),
                             "--prompt", str(args.prompt), "--repeats", str(args.repeats)],
                            capture_output=True, text=True)
    print(result.stdout, end="", flush=True)
    if result.returncode != 0:
        print(result.stderr[-3000:], flush=True)
        return {"error": result.stderr[-1500:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--schemes", default="nf4,int4")
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_e2e_h200.json")
    parser.add_argument("--measure", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("decode_e2e.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.measure:
        kind, path = args.measure
        print(json.dumps(measure(kind, Path(path), args.prompt, args.steps, args.repeats)))
        return 0
    import transformers
    import triton

    report = {"device": torch.cuda.get_device_name(0), "command": "python " + " ".join(sys.argv),
              "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
                           "transformers": transformers.__version__, "python": platform.python_version()},
              "model": {"hidden": 4096, "intermediate": 14336, "experts": 8, "top_k": 2, "layers": args.layers,
                        "vocab": 32000},
              "prompt_tokens": args.prompt, "decode_steps": args.steps, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device("cuda"):  # random init on the GPU: minutes faster than on the CPU
            original = make_mixtral(Path(tmp) / "bf16", 4096, 14336, 8, args.layers)
        print("wrote the BF16 model", flush=True)
        report["results"]["bf16"] = run_isolated("bf16", original, args)
        for scheme in args.schemes.split(","):
            converted = Path(tmp) / scheme
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "moeconv", "convert", str(original), str(converted),
                            "--scheme", scheme, "--device", "cuda"], check=True, capture_output=True)
            row = run_isolated(scheme, converted, args)
            row["convert_s"] = time.perf_counter() - start
            base = report["results"]["bf16"]
            for mode in ("eager", "cuda_graph"):
                if "tokens_per_s" in row.get(mode, {}) and "tokens_per_s" in base.get(mode, {}):
                    row[mode]["speedup_vs_bf16"] = row[mode]["tokens_per_s"] / base[mode]["tokens_per_s"]
            report["results"][scheme] = row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
