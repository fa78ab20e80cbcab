"""Small models in format v1 for the format tests, and tools to damage them.

Parts are random bytes of exactly the right layout (no quantizer needed), so
these helpers exercise the writer and the reader on their own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from moeconv.format import ShardedWriter
from moeconv_numpy.dequant import NUMPY_DTYPES
from moeconv_numpy.schemes import tensor_layout

#: (projection name, proj) of a Mixtral expert
PROJS = (("w1", "gate"), ("w3", "up"), ("w2", "down"))
#: scheme, group size, double quant of routed experts, cycled over (layer, expert, proj)
EXPERT_SCHEMES = [
    ("int4", 32, False), ("int3", 16, False), ("nf4", 32, True), ("mxfp4", 32, False),
    ("int2-sym", 8, False), ("fp4", 64, False), ("int8", 32, False), ("int4-sym", 32, False),
]
HIDDEN, INTER = 40, 24
CONFIG = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": HIDDEN}


def random_parts(scheme: str, shape, group_size: int, double_quant: bool, rng: np.random.Generator) -> dict:
    """Random stored tensors of exactly ``tensor_layout``'s dtypes and shapes (finite scales, no E8M0 NaN)."""
    parts = {}
    for suffix, (dtype, dims) in tensor_layout(scheme, tuple(shape), group_size, double_quant).items():
        if dtype == "U8":
            high = 200 if (scheme == "mxfp4" and suffix == "scales") else 256
            low = 100 if high == 200 else 0
            parts[suffix] = rng.integers(low, high, dims, dtype=np.uint8)
        else:
            parts[suffix] = rng.uniform(-2, 2, dims).astype(NUMPY_DTYPES[dtype])
    return parts


def expert_name(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight"


def build_model(out: Path, max_shard_bytes: int = 2000, seed: int = 0, layers: int = 2, experts: int = 2) -> dict:
    """Write a small mixed-precision MoE model; return what was written, for comparison.

    Returns ``{"weights": {name: (parts, entry)}, "plain": {name: torch or numpy tensor}, "routers": [...]}``.
    """
    rng = np.random.default_rng(seed)
    writer = ShardedWriter(out, max_shard_bytes)
    written: dict = {"weights": {}, "plain": {}, "routers": []}
    i = 0
    for layer in range(layers):
        for expert in range(experts):
            for proj_name, proj in PROJS:
                scheme, g, dq = EXPERT_SCHEMES[i % len(EXPERT_SCHEMES)]
                i += 1
                shape = [HIDDEN, INTER] if proj == "down" else [INTER, HIDDEN]
                parts = random_parts(scheme, shape, g, dq, rng)
                entry = {
                    "scheme": scheme, "group_size": g, "double_quant": dq, "shape": shape, "dtype": "bfloat16",
                    "role": "routed_expert", "layer": layer, "expert": expert, "proj": proj,
                }
                name = expert_name(layer, expert, proj_name)
                writer.add_quantized(name, parts, entry)
                written["weights"][name] = (parts, entry)
        router = f"model.layers.{layer}.block_sparse_moe.gate.weight"
        gate = torch.from_numpy(rng.standard_normal((experts, HIDDEN)).astype(np.float32)).to(torch.bfloat16)
        writer.add_tensor(router, gate, router=True)
        written["plain"][router] = gate
        written["routers"].append(router)
        norm = f"model.layers.{layer}.post_attention_layernorm.weight"
        written["plain"][norm] = np.ones(HIDDEN, np.float32)
        writer.add_tensor(norm, written["plain"][norm])
    shared = "model.layers.0.mlp.shared_expert.gate_proj.weight"
    parts = random_parts("int8-sym", [INTER, HIDDEN], 64, False, rng)
    entry = {"scheme": "int8-sym", "group_size": 64, "shape": [INTER, HIDDEN], "dtype": "bfloat16",
             "role": "shared_expert", "layer": 0, "proj": "gate", "method": "rtn"}
    writer.add_quantized(shared, parts, entry)
    written["weights"][shared] = (parts, entry)
    for name, value in {
        "model.embed_tokens.weight": torch.from_numpy(rng.standard_normal((16, HIDDEN))).to(torch.bfloat16),
        "model.rotary.inv_freq": np.arange(4, dtype=np.float64),
        "model.position_ids": torch.arange(6, dtype=torch.int64),
        "model.mask": np.array([True, False, True]),
        "model.scalar": torch.tensor(3.5, dtype=torch.float16),
    }.items():
        writer.add_tensor(name, value)
        written["plain"][name] = value
    writer.finalize({**CONFIG, "quantization_config": {"scheme": "mixed"}},
                    {"tokenizer.json": b'{"version": "1.0"}', "README.md": b"# test model\n"})
    return written


def shard_paths(model: Path) -> list[Path]:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    return [model / name for name in dict.fromkeys(index["weight_map"].values())]


def read_raw(path: Path) -> tuple[dict, bytes]:
    """A shard's header (as a dict) and its data bytes."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_raw(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def edit_moeconv_meta(path: Path, edit) -> None:
    """Apply ``edit(meta_dict)`` to the parsed ``__metadata__['moeconv']`` of a shard and write it back."""
    header, data = read_raw(path)
    meta = json.loads(header["__metadata__"]["moeconv"])
    edit(meta)
    header["__metadata__"]["moeconv"] = json.dumps(meta)
    write_raw(path, header, data)
