"""Dry run at DeepSeek-V3 scale: convert a synthetic FP8 checkpoint layer by layer and project all 61 layers.

The synthetic checkpoint has DeepSeek-V3's shapes: hidden 7168, routed experts
of intermediate 2048 (256 a layer; ``--experts`` can use fewer to fit a time
budget, every matrix keeping its real shape), one shared expert, MLA
attention (q_lora 1536, kv_lora 512, 128 heads), vocabulary 129280, and V3's
FP8 release layout: every linear weight ``float8_e4m3fn`` with a F32
``weight_scale_inv`` of shape ``[ceil(out/128), ceil(in/128)]``.  Shards are
~4.3 GB like the release's.  Weights are random bytes streamed to disk from a
256 MB pool (never held whole in memory) with the FP8 NaN patterns masked out.
As many layers as requested are written, fewer if the disk cannot hold them
next to the converted output.

The conversion (the deepseek adapter, default options: routed experts NF4 g64
with double quant, FP8 dequantized on the fly, everything else BF16) runs in a
child process through the pipeline API; its progress hook timestamps every
tensor and a thread samples its RSS every 0.1 s, so the JSON holds time and
peak RSS per layer (peak RSS must not grow with the layer count) and the time
per routed-expert matrix.  From those it projects the full model — 58 MoE
layers of 256 experts, 3 dense layers (MLP 18432), embeddings and head — on
this machine, and on one H100: measured when run with ``--device cuda`` there,
otherwise from the stated ``GPU_ASSUMPTION`` (a measured end-to-end GPU
conversion rate plus this machine's measured FP8 widening cost).  The big
files are deleted at the end unless ``--keep``.

    nohup python benchmarks/deepseek_v3_dry_run.py --layers 2 --experts 128 > dry_run.log 2>&1 &
    python benchmarks/deepseek_v3_dry_run.py --layers 2 --device cuda --out /tmp/dry_run_cuda.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: where the package is not installed (a GPU machine with a copy of the repository), import it from the tree
PYTHONPATH = os.pathsep.join([str(ROOT), str(ROOT / "loaders"), *filter(None, [os.environ.get("PYTHONPATH")])])
sys.path[:0] = [str(ROOT), str(ROOT / "loaders")]
RESULTS = ROOT / "benchmarks" / "results" / "deepseek_v3_dry_run.json"

HIDDEN, MOE_INTER, DENSE_INTER, VOCAB, BLOCK = 7168, 2048, 18432, 129280, 128
vocab = VOCAB  # the synthetic checkpoint's vocabulary (--vocab makes smoke tests small; projections use VOCAB)
Q_LORA, KV_LORA, HEADS, QK_NOPE, QK_ROPE, V_HEAD = 1536, 512, 128, 128, 64, 128
FULL_EXPERTS, FULL_LAYERS, DENSE_LAYERS = 256, 61, 3
SHARD_BYTES = 4_300_000_000  # the V3 release's shard size
POOL_BYTES = 256 * 2**20
CHUNK = 64 * 2**20

# -- the synthetic checkpoint ------------------------------------------------------------------------------------


def config(layers: int, experts: int) -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": HIDDEN,
        "intermediate_size": DENSE_INTER, "moe_intermediate_size": MOE_INTER, "n_routed_experts": experts,
        "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 0, "num_hidden_layers": layers, "num_nextn_predict_layers": 0,
        "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "q_lora_rank": Q_LORA, "kv_lora_rank": KV_LORA,
        "qk_nope_head_dim": QK_NOPE, "qk_rope_head_dim": QK_ROPE, "v_head_dim": V_HEAD, "vocab_size": vocab,
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [BLOCK, BLOCK]},
    }


def _linear(name: str, out: int, inp: int) -> list[tuple[str, str, tuple[int, ...]]]:
    scales = (math.ceil(out / BLOCK), math.ceil(inp / BLOCK))
    return [(name, "F8_E4M3", (out, inp)), (name + "_scale_inv", "F32", scales)]


def layer_tensors(layer: int, experts: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of one MoE layer in V3's layout: attention, norms, router, experts, shared expert."""
    p = f"model.layers.{layer}."
    out = [(p + "input_layernorm.weight", "BF16", (HIDDEN,)),
           (p + "post_attention_layernorm.weight", "BF16", (HIDDEN,)),
           (p + "self_attn.q_a_layernorm.weight", "BF16", (Q_LORA,)),
           (p + "self_attn.kv_a_layernorm.weight", "BF16", (KV_LORA,))]
    out += _linear(p + "self_attn.q_a_proj.weight", Q_LORA, HIDDEN)
    out += _linear(p + "self_attn.q_b_proj.weight", HEADS * (QK_NOPE + QK_ROPE), Q_LORA)
    out += _linear(p + "self_attn.kv_a_proj_with_mqa.weight", KV_LORA + QK_ROPE, HIDDEN)
    out += _linear(p + "self_attn.kv_b_proj.weight", HEADS * (QK_NOPE + V_HEAD), KV_LORA)
    out += _linear(p + "self_attn.o_proj.weight", HIDDEN, HEADS * V_HEAD)
    out += [(p + "mlp.gate.weight", "BF16", (experts, HIDDEN)),
            (p + "mlp.gate.e_score_correction_bias", "F32", (experts,))]
    for e in range(experts):
        for proj in ("gate_proj", "up_proj"):
            out += _linear(f"{p}mlp.experts.{e}.{proj}.weight", MOE_INTER, HIDDEN)
        out += _linear(f"{p}mlp.experts.{e}.down_proj.weight", HIDDEN, MOE_INTER)
    for proj in ("gate_proj", "up_proj"):
        out += _linear(f"{p}mlp.shared_experts.{proj}.weight", MOE_INTER, HIDDEN)
    out += _linear(f"{p}mlp.shared_experts.down_proj.weight", HIDDEN, MOE_INTER)
    return out


def all_tensors(layers: int, experts: int) -> list[tuple[str, str, tuple[int, ...]]]:
    out = [("model.embed_tokens.weight", "BF16", (vocab, HIDDEN))]
    for layer in range(layers):
        out += layer_tensors(layer, experts)
    return out + [("model.norm.weight", "BF16", (HIDDEN,)), ("lm_head.weight", "BF16", (vocab, HIDDEN))]


_SIZES = {"F8_E4M3": 1, "BF16": 2, "F32": 4}


def nbytes(dtype: str, shape) -> int:
    return _SIZES[dtype] * math.prod(shape)


def shard_plan(tensors) -> list[list]:
    """Tensors cut into ~SHARD_BYTES shards in order; a layer's tensors never share a shard with another layer's."""
    shards, current, size, layer = [], [], 0, None
    for t in tensors:
        t_layer = t[0].split(".")[2] if t[0].startswith("model.layers.") else None
        if current and (size + nbytes(t[1], t[2]) > SHARD_BYTES or t_layer != layer):
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes(t[1], t[2])
        layer = t_layer
    return shards + [current] if current else shards


class RandomBytes:
    """Chunks of random bytes cut from one random pool at random offsets: fast enough to write tens of GB."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.integers(0, 256, POOL_BYTES + CHUNK, dtype=np.uint8)

    def _bytes(self, n: int) -> np.ndarray:
        start = int(self.rng.integers(0, POOL_BYTES))
        return self.pool[start : start + n].copy()

    def fp8(self, n: int) -> np.ndarray:
        chunk = self._bytes(n)
        chunk &= 0xBF  # clear the exponent's top bit: no e4m3fn NaN (0x7F, 0xFF); |values| <= 1.875
        return chunk

    def bf16(self, n: int) -> np.ndarray:
        bits = self._bytes(2 * n).view("<u2")
        bits &= 0x807F  # keep sign and mantissa
        bits |= 0x3C00  # exponent 120: |values| in [2^-7, 2^-6), finite
        return bits

    def f32(self, n: int, scale: float) -> np.ndarray:
        return (self.rng.random(n, dtype=np.float32) + 0.5) * np.float32(scale)  # positive, like scales


def write_shard(path: Path, tensors, source: RandomBytes) -> int:
    header, offset = {}, 0
    for name, dtype, shape in tensors:
        size = nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, dtype, shape in tensors:
            left = nbytes(dtype, shape)
            while left:
                n = min(left, CHUNK)
                if dtype == "F8_E4M3":
                    f.write(memoryview(source.fp8(n)))
                elif dtype == "BF16":
                    f.write(memoryview(source.bf16(n // 2)))
                else:
                    f.write(memoryview(source.f32(n // 4, 1e-3)))
                left -= n
    return 8 + len(raw) + offset


def write_checkpoint(path: Path, layers: int, experts: int) -> dict:
    path.mkdir(parents=True, exist_ok=True)
    tensors = all_tensors(layers, experts)
    shards = shard_plan(tensors)
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    source, total, started = RandomBytes(), 0, time.perf_counter()
    weight_map = {}
    for name, shard in zip(names, shards):
        total += write_shard(path / name, shard, source)
        weight_map.update(dict.fromkeys((t[0] for t in shard), name))
        print(f"  wrote {name} ({total / 1e9:.1f} GB so far)", flush=True)
    index = {"metadata": {"total_size": sum(nbytes(t[1], t[2]) for t in tensors)}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(config(layers, experts), indent=2))
    return {"bytes": total, "shards": len(shards), "seconds": round(time.perf_counter() - started, 1)}


def needed_bytes(layers: int, experts: int) -> tuple[int, int]:
    """(source bytes, converted bytes) of a synthetic checkpoint: NF4+dq experts ~4.13 bits, the rest BF16."""
    source = converted = 0
    for name, dtype, shape in all_tensors(layers, experts):
        size = nbytes(dtype, shape)
        source += size
        if name.endswith("_scale_inv"):
            continue
        if ".mlp.experts." in name:
            converted += math.prod(shape) * 4.13 / 8
        else:
            converted += 2 * math.prod(shape) if dtype == "F8_E4M3" else size
    return source, int(converted)


# -- the conversion (child process) --------------------------------------------------------------------------------


def _rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def category(name: str) -> str:
    if ".mlp.experts." in name:
        return "routed_expert"
    if ".mlp.shared_experts." in name:
        return "shared_expert"
    if ".self_attn." in name and name.endswith("proj.weight") or "proj_with_mqa" in name:
        return "attention"
    if ".mlp.gate." in name:
        return "router"
    return "embedding" if name.endswith(("embed_tokens.weight", "lm_head.weight")) else "norm"


def child(src: Path, out: Path, device: str, events: Path) -> None:
    """Convert with the pipeline API, logging (t, layer, category, numel) per tensor and (t, rss) samples."""
    from moeconv.pipeline import Options, convert, plan_conversion
    from moeconv.source import open_source

    log = open(events, "w", buffering=1)
    t0 = time.perf_counter()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            log.write(json.dumps({"t": time.perf_counter() - t0, "rss": _rss()}) + "\n")

    def progress(task) -> None:
        item = task.item
        log.write(json.dumps({"t": time.perf_counter() - t0, "layer": item.layer, "cat": category(item.name),
                              "numel": task.numel, "rss": _rss()}) + "\n")

    threading.Thread(target=sample, daemon=True).start()
    conv = plan_conversion(open_source(src), Options())
    log.write(json.dumps({"t": time.perf_counter() - t0, "planned": len(conv.tasks),
                          "max_shard_bytes": conv.max_shard_bytes(), "rss": _rss()}) + "\n")
    convert(conv, out, device=device, progress=progress)
    stop.set()
    log.write(json.dumps({"t": time.perf_counter() - t0, "done": True, "rss": _rss()}) + "\n")


# -- analysis -------------------------------------------------------------------------------------------------------


def analyse(events: list[dict], experts: int) -> dict:
    """Per layer: wall time (first to last of its tensors) and peak RSS; seconds per tensor category."""
    tasks = [e for e in events if "cat" in e]
    samples = [e for e in events if "rss" in e]
    per_layer, per_cat = {}, {}
    previous = next(e["t"] for e in events if "planned" in e)
    for e in tasks:
        seconds = e["t"] - previous
        previous = e["t"]
        c = per_cat.setdefault(e["cat"], {"tensors": 0, "numel": 0, "seconds": 0.0})
        c["tensors"] += 1
        c["numel"] += e["numel"]
        c["seconds"] += seconds
        if e["layer"] is not None:
            layer = per_layer.setdefault(e["layer"], {"start": e["t"] - seconds, "end": e["t"], "seconds": 0.0})
            layer["end"] = e["t"]
            layer["seconds"] += seconds
    for layer in per_layer.values():
        inside = [s["rss"] for s in samples if layer["start"] <= s["t"] <= layer["end"]]
        layer["peak_rss_bytes"] = max(inside)
        layer["seconds"] = round(layer["seconds"], 1)
        del layer["start"], layer["end"]
    for c in per_cat.values():
        c["seconds"] = round(c["seconds"], 2)
        c["numel_per_second"] = round(c["numel"] / c["seconds"]) if c["seconds"] else None
    return {"layers": {str(k): v for k, v in sorted(per_layer.items())}, "categories": per_cat,
            "peak_rss_bytes": max(s["rss"] for s in samples), "seconds": round(events[-1]["t"], 1)}


#: Categories of many small tensors: their time is per tensor (latency), not per weight.
PER_TENSOR = ("router", "norm")


def full_model() -> dict:
    """Weights and tensors of the full DeepSeek-V3 by category: 3 dense + 58 MoE layers (256 experts), embeddings.

    The dense layers' MLPs (FP8, stored as BF16 like attention) are counted with attention.
    """
    moe, dense = {}, {}
    for name, dtype, shape in layer_tensors(0, FULL_EXPERTS):
        if name.endswith("_scale_inv"):
            continue
        cat = category(name)
        for counts in (moe, dense) if cat in ("attention", "norm") else (moe,):
            entry = counts.setdefault(cat, {"numel": 0, "tensors": 0})
            entry["numel"] += math.prod(shape)
            entry["tensors"] += 1
    dense["attention"]["numel"] += 3 * DENSE_INTER * HIDDEN
    dense["attention"]["tensors"] += 3
    moe_layers = FULL_LAYERS - DENSE_LAYERS
    total = {cat: {k: moe_layers * v for k, v in counts.items()} for cat, counts in moe.items()}
    for cat, counts in dense.items():
        for k, v in counts.items():
            total[cat][k] += DENSE_LAYERS * v
    total["embedding"] = {"numel": 2 * VOCAB * HIDDEN, "tensors": 2}  # the full model's, whatever --vocab was
    total["norm"]["tensors"] += 1
    return total


def project(measured: dict, note: str | None) -> dict:
    """Seconds for the full model at each category's measured rate; memory: the largest measured peak."""
    counts = full_model()
    seconds = {}
    for cat, n in counts.items():
        m = measured["categories"].get(cat) or measured["categories"]["routed_expert"]  # shared: as routed
        if cat in PER_TENSOR:
            seconds[cat] = round(n["tensors"] * m["seconds"] / m["tensors"])
        else:
            seconds[cat] = round(n["numel"] / m["numel_per_second"])
    expert = measured["categories"]["routed_expert"]
    total = sum(seconds.values())
    return {
        "counts": counts, "seconds_by_category": seconds, "total_seconds": total,
        "total_hours": round(total / 3600, 2),
        "seconds_per_moe_layer_experts_only": round(3 * FULL_EXPERTS * MOE_INTER * HIDDEN / expert["numel_per_second"]),
        "peak_rss_bytes": measured["peak_rss_bytes"],
        "peak_rss_note": "the per-layer peak does not grow with the layer count (see measured.layers), so the full "
                         "model needs the largest peak measured here (embeddings included)",
        **({"note": note} if note else {}),
    }


def probe() -> dict:
    """CPU seconds to widen one FP8 expert matrix to float32 and to quantize it (NF4 g64 + dq), best of 3."""
    import torch

    from moeconv.adapters.fp8 import dequantize_fp8
    from moeconv.quant import QuantSpec, quantize

    w8 = torch.from_numpy(RandomBytes(1).fp8(MOE_INTER * HIDDEN).reshape(MOE_INTER, HIDDEN)).view(torch.float8_e4m3fn)
    scale = torch.rand(MOE_INTER // BLOCK, HIDDEN // BLOCK) * 1e-3
    widen, quant = [], []
    for _ in range(3):
        t0 = time.process_time()
        w = dequantize_fp8(w8, scale, (BLOCK, BLOCK))
        t1 = time.process_time()
        quantize(w, QuantSpec("nf4", 64, True), "probe")
        widen.append(t1 - t0)
        quant.append(time.process_time() - t1)
    return {"widen_cpu_s": round(min(widen), 4), "quantize_cpu_s": round(min(quant), 4),
            "torch_threads": torch.get_num_threads()}


#: The one-GPU projection's inputs (no CUDA entry exists in benchmarks/results/quant_throughput_*.json).
GPU_ASSUMPTION = {
    "end_to_end_routed_weights_per_s": 214.5e6,
    "measured_in": "benchmarks/results/convert_mixtral_synthetic_h100-cuda_w1.json: `moeconv convert --device cuda` of a Mixtral-shaped BF16 "
                   "checkpoint on one H100 with a 16-core host, 429 MB/s of BF16 routed experts = 214.5 M weights/s "
                   "(reading, host-to-device copy, NF4 quantization on the GPU, copy back, writing)",
    "host_threads": 16,
    "model": "seconds per routed expert matrix = weights / end_to_end rate + the FP8 -> float32 widening that the "
             "source reader does on the host (this machine's measured CPU seconds x torch threads here / 16 host "
             "threads: it is one elementwise pass); every other category at this machine's measured rate "
             "(conservative: they are plain copies, ~2% of the time); host memory as measured here",
}


def gpu_projection(measured: dict) -> dict:
    """One H100 from GPU_ASSUMPTION and this machine's measured FP8 widening cost (see GPU_ASSUMPTION['model'])."""
    cats = measured["categories"]
    expert, probed = cats["routed_expert"], measured["probe"]
    widen = probed["widen_cpu_s"] * probed["torch_threads"] / GPU_ASSUMPTION["host_threads"]
    per_weight = 1 / GPU_ASSUMPTION["end_to_end_routed_weights_per_s"] + widen / (MOE_INTER * HIDDEN)
    rate = {"numel_per_second": round(1 / per_weight)}
    assumed = {**measured, "categories": {**cats, "routed_expert": {**expert, **rate},
                                          "shared_expert": {**cats.get("shared_expert", expert), **rate}}}
    return {**project(assumed, "assumption-based (no CUDA measurement of this dry run): see assumption"),
            "assumption": GPU_ASSUMPTION}


# -- main -----------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=FULL_EXPERTS, help="routed experts per layer (V3: 256)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moeconv-deepseek-v3-dry-run"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and the converted model")
    parser.add_argument("--vocab", type=int, default=VOCAB, help="synthetic vocabulary (small for smoke tests)")
    parser.add_argument("--child", nargs=3, metavar=("SRC", "OUT", "EVENTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global vocab
    vocab = args.vocab
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), args.device, Path(args.child[2]))
        return 0

    args.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    layers = args.layers
    while layers > 1 and sum(needed_bytes(layers, args.experts)) > 0.8 * free:
        layers -= 1
    src, out, events = args.workdir / "src", args.workdir / "out", args.workdir / "events.jsonl"
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    source_bytes, converted_bytes = needed_bytes(layers, args.experts)
    print(f"{layers} layer(s) x {args.experts} experts: {source_bytes / 1e9:.1f} GB source, "
          f"~{converted_bytes / 1e9:.1f} GB converted, {free / 1e9:.0f} GB free", flush=True)
    try:
        written = write_checkpoint(src, layers, args.experts)
        started = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, __file__, "--device", args.device, "--child", str(src), str(out), str(events)],
                       check=True, env={**os.environ, "PYTHONPATH": PYTHONPATH})
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.perf_counter() - started
        output_bytes = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    finally:
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    measured = analyse([json.loads(line) for line in events.read_text().splitlines()], args.experts)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    measured["probe"] = probe()
    import torch

    result = {
        "what": "convert a synthetic DeepSeek-V3-shaped FP8 checkpoint (deepseek adapter, default NF4 g64 + dq) "
                "and project the full 61-layer model",
        "command": "python benchmarks/deepseek_v3_dry_run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "shapes": {"hidden": HIDDEN, "moe_intermediate": MOE_INTER, "routed_experts_per_layer": args.experts,
                   "shared_experts": 1, "fp8_block": [BLOCK, BLOCK], "vocab": VOCAB,
                   "attention": "MLA q_lora 1536, kv_lora 512, 128 heads"},
        "layers_converted": layers,
        "layers_requested": args.layers,
        "device": args.device,
        "source": written,
        "output_bytes": output_bytes,
        "conversion_wall_s": round(wall, 1),
        "child_cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
        "child_max_rss_bytes": after.ru_maxrss * 1024,
        "measured": measured,
        "projection_this_machine": project(measured, None) if args.device == "cpu" else None,
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
                    "platform": platform.platform(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
    }
    if args.device == "cpu":
        result["projection_one_h100"] = gpu_projection(measured)
    else:
        result["projection_this_gpu"] = project(measured, "measured with --device " + args.device)
    if args.experts != FULL_EXPERTS:
        result["note"] = (f"{args.experts} experts a layer instead of {FULL_EXPERTS} to fit the time budget; every "
                          "matrix has V3's shape, so per-matrix rates carry over, and the projection uses 256")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("layers_converted", "conversion_wall_s", "child_max_rss_bytes")}))
    print(json.dumps(measured["layers"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
