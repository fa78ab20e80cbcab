"""Convert a synthetic checkpoint with Mixtral-8x7B's shapes and record throughput and peak memory.

The checkpoint has Mixtral-8x7B's config (hidden 4096, experts 14336 wide, 8
experts a layer, GQA attention, vocab 32000) with as many layers as it takes
to reach ``--gb`` of BF16, written as ~1 GB safetensors shards of random
values that are generated and written in chunks (never held whole in memory).
``moeconv convert`` then runs in a child process with the defaults (routed
experts NF4 g64 + double quant); the JSON result records wall time, MB/s of
BF16 input (all tensors, and routed experts alone), the child's peak RSS
(``getrusage`` of the child, exact) against the largest source shard, its CPU
time, and the machine's load, since a busy machine slows every figure.

    python benchmarks/convert_mixtral_synthetic.py                 # writes benchmarks/results/*.json
    python benchmarks/convert_mixtral_synthetic.py --device cuda   # quantize on the GPU

The multi-GB files are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

HIDDEN, FFN, EXPERTS, VOCAB, HEADS, KV_HEADS = 4096, 14336, 8, 32000, 32, 8
CHUNK_ROWS = 512  # rows of random data generated at a time


def config(layers: int) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_local_experts": EXPERTS, "num_experts_per_tok": 2,
        "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
        "hidden_act": "silu", "tie_word_embeddings": False, "dtype": "bfloat16",
    }


def tensors(layers: int) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, routed expert?) of every tensor, in Mixtral's layout."""
    kv = HIDDEN // HEADS * KV_HEADS
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN), False)]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (HIDDEN,), False), (p + "post_attention_layernorm.weight", (HIDDEN,), False),
                (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN), False), (p + "self_attn.k_proj.weight", (kv, HIDDEN), False),
                (p + "self_attn.v_proj.weight", (kv, HIDDEN), False), (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN), False),
                (p + "block_sparse_moe.gate.weight", (EXPERTS, HIDDEN), False)]
        for e in range(EXPERTS):
            q = f"{p}block_sparse_moe.experts.{e}."
            out += [(q + "w1.weight", (FFN, HIDDEN), True), (q + "w3.weight", (FFN, HIDDEN), True),
                    (q + "w2.weight", (HIDDEN, FFN), True)]
    out += [("model.norm.weight", (HIDDEN,), False), ("lm_head.weight", (VOCAB, HIDDEN), False)]
    return out


def _write_shard(path: Path, group: list[tuple[str, tuple[int, ...], bool]], gen: torch.Generator) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in group:
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape, _ in group:
            if len(shape) == 1:
                f.write(torch.ones(shape, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
                continue
            for start in range(0, shape[0], CHUNK_ROWS):
                rows = min(CHUNK_ROWS, shape[0] - start)
                block = torch.randn(rows, shape[1], generator=gen).mul_(0.02).to(torch.bfloat16)
                f.write(block.view(torch.uint8).numpy().data)


def write_checkpoint(root: Path, gb: float, shard_bytes: int) -> dict:
    """Write the synthetic checkpoint; returns what was written."""
    per_layer = sum(2 * math.prod(s) for _, s, _ in tensors(1)) - sum(2 * math.prod(s) for _, s, _ in tensors(0))
    layers = max(1, math.ceil((gb * 1e9 - sum(2 * math.prod(s) for _, s, _ in tensors(0))) / per_layer))
    all_tensors = tensors(layers)
    groups, used = [[]], 0
    for t in all_tensors:
        n = 2 * math.prod(t[1])
        if groups[-1] and used + n > shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(t)
        used += n
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, group in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        _write_shard(root / file, group, gen)
        weight_map.update({name: file for name, _, _ in group})
    total = sum(2 * math.prod(s) for _, s, _ in all_tensors)
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (root / "config.json").write_text(json.dumps(config(layers), indent=1))
    return {
        "layers": layers,
        "shards": len(groups),
        "bf16_bytes": total,
        "routed_expert_bf16_bytes": sum(2 * math.prod(s) for _, s, r in all_tensors if r),
        "largest_shard_bytes": max((root / f).stat().st_size for f in set(weight_map.values())),
    }


def _sample_rss(proc: subprocess.Popen) -> dict:
    """Poll the child's /proc status every 20 ms; the split (anonymous vs file-backed pages) at its peak."""
    peak: dict = {"VmRSS_kB": 0}
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                now = {k + "_kB": int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
                       if k in ("VmRSS", "RssAnon", "RssFile")}
        except (OSError, ValueError):
            break
        if now.get("VmRSS_kB", 0) > peak["VmRSS_kB"]:
            peak = now
        time.sleep(0.02)
    return peak


def run_convert(src: Path, out: Path, args) -> dict:
    """``moeconv convert`` in a child process; wall time, and the child's peak RSS and CPU time from getrusage."""
    workers = ["--workers", str(args.workers)] if args.workers else []
    cmd = [sys.executable, "-c", "from moeconv.cli import main; main()", "convert", str(src), str(out),
           *workers, "--device", args.device, *args.extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = _sample_rss(proc)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"convert failed:\n{stderr}")
    return {
        "rss_at_sampled_peak": peak,
        "command": " ".join(["moeconv", *cmd[3:]]),
        "wall_s": wall,
        "peak_rss_bytes": after.ru_maxrss * 1024,  # Linux reports KiB; the max over children, here the one child
        "cpu_user_s": after.ru_utime - before.ru_utime,
        "cpu_sys_s": after.ru_stime - before.ru_stime,
        "out_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
        "stderr_tail": stderr.strip().splitlines()[-6:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "moeconv-bench")
    parser.add_argument("--gb", type=float, default=4.0, help="at least this many GB of BF16")
    parser.add_argument("--shard-size", type=float, default=1.0, help="source shard size in GB")
    parser.add_argument("--workers", type=int, default=None, help="default: convert's own default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default=None, help="result file name (default from device and workers)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the output")
    parser.add_argument("--reuse", action="store_true", help="reuse a checkpoint kept by an earlier --keep run")
    parser.add_argument("extra", nargs="*", help="more convert options, after --")
    args = parser.parse_args()

    src, out = args.dir / "src", args.dir / "out"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    if args.reuse and (args.dir / "written.json").is_file():
        written = json.loads((args.dir / "written.json").read_text())
    else:
        shutil.rmtree(src, ignore_errors=True)
        written = write_checkpoint(src, args.gb, int(args.shard_size * 1e9))
        (args.dir / "written.json").write_text(json.dumps(written))
    write_s = time.perf_counter() - t0
    load = os.getloadavg()
    try:
        run = run_convert(src, out, args)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    result = {
        "benchmark": "convert_mixtral_synthetic",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_average_at_start": load,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "torch": torch.__version__},
        "checkpoint": {**written, "write_s": write_s},
        "settings": {"workers": args.workers, "device": args.device, "extra": args.extra},
        **run,
        "mb_per_s_bf16_input": written["bf16_bytes"] / 1e6 / run["wall_s"],
        "mb_per_s_routed_experts": written["routed_expert_bf16_bytes"] / 1e6 / run["wall_s"],
        "cpu_s_per_gb": (run["cpu_user_s"] + run["cpu_sys_s"]) / (written["bf16_bytes"] / 1e9),
        "peak_rss_over_largest_shard": run["peak_rss_bytes"] / written["largest_shard_bytes"],
    }
    name = args.name or f"convert_mixtral_synthetic_{args.device.split(':')[0]}_w{args.workers or 'auto'}.json"
    path = Path(__file__).resolve().parent / "results" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "stderr_tail"}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
