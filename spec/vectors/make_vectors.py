"""Regenerate the conformance vectors of spec/FORMAT.md ("Conformance vectors").

    python spec/vectors/make_vectors.py [OUT_DIR]      # default: this directory

Every vector is written by the real quantizers (``moeconv.quant.quantize``) and
the real writer (``moeconv.format.ShardedWriter``), so the tests can check that
both still reproduce the committed files byte for byte.  The expected float32
outputs come from the converter's torch dequantizer and are checked here,
bit for bit, against the independent NumPy reference reader before anything
is written: a vector is only produced when two implementations agree.

The worked example of the spec is built from hand-computed parts (no
quantizer needed) and cross-checked against the quantizer.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import moeconv_numpy
from moeconv.format import ShardedWriter
from moeconv_numpy.schemes import DYNAMIC_MAP

# moeconv.quant is imported inside the functions that quantize, so that the
# tests can rebuild the worked example and read the tables without it.

HERE = Path(__file__).resolve().parent
SHAPE = (5, 71)
WEIGHT = "model.layers.0.block_sparse_moe.experts.0.w1.weight"

#: case directory -> (scheme, group size, double quant)
CASES = {
    **{f"int{b}{sym}": (f"int{b}{sym}", 32, False) for b in (2, 3, 4, 8) for sym in ("", "-sym")},
    "nf4": ("nf4", 32, False),
    "nf4-dq": ("nf4", 32, True),
    "fp4": ("fp4", 32, False),
    "fp4-dq": ("fp4", 32, True),
    "mxfp4": ("mxfp4", 32, False),
}

#: the mixed-precision, multi-shard model: tensor -> (case, role, layer, expert, proj)
MIXED = {
    "model.layers.0.mlp.experts.0.gate_proj.weight": ("int4", "routed_expert", 0, 0, "gate"),
    "model.layers.0.mlp.experts.0.up_proj.weight": ("nf4-dq", "routed_expert", 0, 0, "up"),
    "model.layers.0.mlp.experts.1.gate_proj.weight": ("int2-sym", "routed_expert", 0, 1, "gate"),
    "model.layers.0.mlp.experts.1.up_proj.weight": ("mxfp4", "routed_expert", 0, 1, "up"),
    "model.layers.0.mlp.shared_expert.gate_proj.weight": ("int8", "shared_expert", 0, None, "gate"),
}
MIXED_MAX_SHARD_BYTES = 512

#: the worked example of spec/FORMAT.md: an int4 weight, group size 4, 2 x 6
EXAMPLE_NAME = "model.layers.0.mlp.experts.1.down_proj.weight"
EXAMPLE_WEIGHT = np.array([[0.5, -0.25, 1.0, 0.0, 2.0, -1.0], [0.0, 0.0, 0.0, 0.0, -3.0, 0.125]], np.float32)
EXAMPLE_PARTS = {
    # codes row 0: 9 0 15 3 | 15 0 (0 0 padding); row 1: 0 0 0 0 | 0 15 (0 0): two codes per byte, low nibble first
    "qweight": np.array([[0x09, 0x3F, 0x0F, 0x00], [0x00, 0x00, 0xF0, 0x00]], np.uint8),
    # fp16 bits: 0.08331298828125, 0.199951171875 / 1.0, 0.2083740234375
    "scales": np.array([[0x2D55, 0x3266], [0x3C00, 0x32AB]], np.uint16).view(np.float16),
    # fp16 bits: 3.0, 5.0 / -0.0, 14.3984375
    "zeros": np.array([[0x4200, 0x4500], [0x8000, 0x4B33]], np.uint16).view(np.float16),
}
EXAMPLE_META = {
    "scheme": "int4", "group_size": 4, "double_quant": False, "shape": [2, 6], "dtype": "float32",
    "role": "routed_expert", "layer": 0, "expert": 1, "proj": "down",
}


def vector_weight() -> np.ndarray:
    """The [5, 71] float32 input of every case: typical rows plus the edge cases the spec lists."""
    rng = np.random.default_rng(20240601)
    w = (rng.standard_normal(SHAPE) * 0.02).astype(np.float32)
    w[1] = 0.0  # an all-zero row: all-zero int/mx groups and a whole all-zero nf4/fp4 block (96..127)
    w[2, 40] = 8.0  # one huge outlier (about 400 sigma)
    w[3] = -np.abs(w[3])  # negative only: the zero point must still cover 0
    w[4] = rng.uniform(-1, 1, SHAPE[1]).astype(np.float32)
    return w


def _config(scheme_info: dict) -> dict:
    return {"model_type": "moeconv-vector", "quantization_config": scheme_info}


def _entry(scheme: str, group_size: int, dq: bool, shape, role="routed_expert", layer=0, expert=0, proj="gate"):
    return {
        "scheme": scheme, "group_size": group_size, "double_quant": dq, "shape": list(shape), "dtype": "float32",
        "role": role, "layer": layer, "expert": expert, "proj": proj,
    }


def _expected(parts: dict, scheme: str, group_size: int, dq: bool, shape) -> np.ndarray:
    """The torch dequantizer's output, required to equal the NumPy reference bit for bit."""
    from moeconv.quant import QuantSpec, dequantize

    spec = QuantSpec(scheme, group_size, dq)
    reference = moeconv_numpy.dequantize(
        {k: v.numpy() for k, v in parts.items()}, scheme, shape, group_size, dq
    )
    torch_out = dequantize(parts, spec, shape).numpy()
    if torch_out.dtype != np.float32 or torch_out.tobytes() != reference.tobytes():
        raise SystemExit(f"{scheme} g{group_size} dq={dq}: torch and NumPy dequantization differ; not writing vectors")
    return reference


def write_case(out: Path, name: str, weight: np.ndarray) -> None:
    from moeconv.quant import QuantSpec, quantize

    scheme, group_size, dq = CASES[name]
    parts = quantize(torch.from_numpy(weight), QuantSpec(scheme, group_size, dq), WEIGHT)
    writer = ShardedWriter(out / name)
    writer.add_quantized(WEIGHT, parts, _entry(scheme, group_size, dq, weight.shape))
    writer.finalize(_config({"scheme": scheme, "group_size": group_size, "double_quant": dq}))
    _expected(parts, scheme, group_size, dq, weight.shape).tofile(out / name / "expected.f32")


def write_mixed(out: Path, weight: np.ndarray) -> None:
    from moeconv.quant import QuantSpec, quantize

    writer = ShardedWriter(out / "mixed", MIXED_MAX_SHARD_BYTES)
    for name, (case, role, layer, expert, proj) in MIXED.items():
        scheme, group_size, dq = CASES[case]
        parts = quantize(torch.from_numpy(weight), QuantSpec(scheme, group_size, dq), name)
        writer.add_quantized(name, parts, _entry(scheme, group_size, dq, weight.shape, role, layer, expert, proj))
    writer.add_tensor("model.layers.0.mlp.gate.weight", torch.from_numpy(weight[:2]).to(torch.bfloat16), router=True)
    writer.add_tensor("model.layers.0.mlp.shared_expert_gate.weight", torch.from_numpy(weight[4:5]), router=True)
    writer.add_tensor("model.layers.0.post_attention_layernorm.weight", torch.ones(SHAPE[1], dtype=torch.bfloat16))
    card = b"moeconv conformance vector: mixed schemes and roles in several shards\n"
    writer.finalize(_config({"scheme": "mixed"}), {"README.md": card})


def check_worked_example() -> None:
    """The spec's hand-computed parts must be what the quantizer produces."""
    from moeconv.quant import QuantSpec, quantize

    made = quantize(torch.from_numpy(EXAMPLE_WEIGHT), QuantSpec("int4", 4, False), EXAMPLE_NAME)
    for suffix, part in EXAMPLE_PARTS.items():
        if made[suffix].numpy().tobytes() != part.tobytes():
            raise SystemExit(f"worked example: the quantizer's {suffix} differs from the hand computation in the spec")


def write_worked_example(out: Path) -> None:
    writer = ShardedWriter(out / "worked_example")
    writer.add_quantized(EXAMPLE_NAME, EXAMPLE_PARTS, EXAMPLE_META)
    writer.finalize(_config({"scheme": "int4", "group_size": 4}))


def hex_float(value) -> str:
    """C99 ``%a`` spelling of a float32 value (``0x1.fc6666p-1``), exact and readable by ``float.fromhex``."""
    mantissa, exponent = float(value).hex().split("p")
    return f"{mantissa.rstrip('0').rstrip('.')}p{exponent}"


def write_dynamic_map(out: Path) -> None:
    lines = ["# index  hex (exact float32)  decimal    DYNAMIC_MAP of spec/FORMAT.md Appendix A"]
    lines += [f"{i:3d}  {hex_float(v):>16}  {float(v)!r}" for i, v in enumerate(DYNAMIC_MAP)]
    (out / "dynamic_map.txt").write_text("\n".join(lines) + "\n")


def write_manifest(out: Path, weight: np.ndarray) -> None:
    weight.tofile(out / "input.f32")
    manifest = {
        "input": {"file": "input.f32", "dtype": "float32", "byte_order": "little", "shape": list(weight.shape)},
        "cases": [
            {"dir": name, "weight": WEIGHT, "scheme": s, "group_size": g, "double_quant": dq,
             "expected": "expected.f32"}
            for name, (s, g, dq) in CASES.items()
        ],
        "mixed": {"dir": "mixed", "weights": {name: case for name, (case, *_rest) in MIXED.items()}},
        "rejected_inputs": [
            {"description": "NaN anywhere in the weight", "value": "nan"},
            {"description": "+Inf or -Inf anywhere in the weight", "value": "inf"},
        ],
    }
    (out / "cases.json").write_text(json.dumps(manifest, indent=2) + "\n")


def hexdump(data: bytes) -> str:
    """``xxd``-style dump (offset, 16 bytes in pairs, ASCII) as printed in spec/FORMAT.md."""
    lines = []
    for offset in range(0, len(data), 16):
        chunk = data[offset : offset + 16]
        pairs = " ".join(chunk[i : i + 2].hex() for i in range(0, len(chunk), 2))
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{offset:08x}: {pairs:<39}  {text}")
    return "\n".join(lines)


#: every directory this script writes (removed first, so it can regenerate in place)
OUTPUT_DIRS = (*CASES, "mixed", "worked_example")


def main(out: Path = HERE) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    check_worked_example()
    weight = vector_weight()
    for name in CASES:
        write_case(out, name, weight)
    write_mixed(out, weight)
    write_worked_example(out)
    write_dynamic_map(out)
    write_manifest(out, weight)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
