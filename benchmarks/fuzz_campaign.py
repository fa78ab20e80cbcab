"""Fuzz the moeconv readers: mutated copies of valid models must read back correctly or raise FormatError.

Seeds are valid converted models: every conformance vector of ``spec/vectors``
(all 13 schemes, the 5-shard ``mixed`` model and the worked example) and, when
torch is installed, a Mixtral-typed model written by ``tests/format_helpers``
(BF16 routers, F64/I64/BOOL/scalar plain tensors, a shared expert).  A case
copies one seed, applies 1-3 mutations drawn from :data:`MUTATORS` (bit flips
in the length field, header and data; truncations at every region boundary;
header JSON edits: wrong dtypes, negative / overlapping / huge offsets, shapes
that overflow, duplicate names; ``moeconv`` metadata edits: unknown schemes,
group sizes, versions, routers, checksums; index and config edits; deleted
files) and reads the result with ``moeconv_numpy``: ``open_model``,
``verify``, every stored tensor, every ``dequantize``.

A case passes when the read either succeeds and returns, for every tensor and
weight the mutation left described as in the seed, exactly the seed's values,
or raises ``FormatError`` naming a file of the model; in both cases within
1 s of CPU time and with a peak of traced allocations (tracemalloc, which also
sees NumPy's buffers) of at most ``2 x the model's bytes + ALLOWANCE``, where
``ALLOWANCE`` covers the interpreter's fixed cost of parsing a small JSON
header.  ``dequantize`` returns float32 (4-16x the packed bytes by design), so
its budget also admits ``DEQUANT_FACTOR x`` the float32 size of the codes it
unpacks.  Files the NumPy reader accepts are then read by the PyTorch loader's
own paths, when torch is installed: ``safetensors.safe_open`` (how
``moeconv_torch`` reads data; it parses the header itself, so it must accept
what we accept and return the same bytes) and ``moeconv_torch.loading.read_plan``.

    python benchmarks/fuzz_campaign.py                  # 10,000 cases -> benchmarks/results/fuzz_campaign.json
    python benchmarks/fuzz_campaign.py --cases 500 --seed 3
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import tracemalloc
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "spec" / "vectors"
RESULTS = ROOT / "benchmarks" / "results" / "fuzz_campaign.json"

from moeconv_numpy import FormatError, open_model  # noqa: E402
from moeconv_numpy.schemes import SCHEMES, scheme_info, tensor_layout  # noqa: E402

#: A read may take this much CPU time; more is a hang.
TIME_LIMIT_S = 1.0
#: A runaway read is interrupted after this much wall time (and counted as a hang).
ALARM_S = 20.0
#: Fixed allowance for the interpreter's cost of parsing a few-KB header (dicts, strings, error text).
ALLOWANCE = 256 * 1024
#: dequantize's budget per float32 byte of the codes it unpacks (codes, float32 work array, the result).
DEQUANT_FACTOR = 3
MODEL_FILES = re.compile(r"config\.json|model\.safetensors\.index\.json|.*\.safetensors")

# -- seeds --------------------------------------------------------------------------------------------------


@dataclass
class Seed:
    """A valid model (its files' bytes) and what the reader returns for it."""

    name: str
    files: dict[str, bytes]
    #: (tensor name, dtype, shape) -> bytes of Model.tensor()
    tensors: dict[tuple, bytes] = field(default_factory=dict)
    #: (weight name, scheme, group size, double quant, shape) -> bytes of Model.dequantize()
    weights: dict[tuple, bytes] = field(default_factory=dict)


def _tensor_key(model, name):
    info = model.tensor_info(name)
    return (name, info.dtype, info.shape)


def _weight_key(info):
    return (info.name, info.scheme, info.group_size, info.double_quant, info.shape)


def _snapshot(path: Path, name: str) -> Seed:
    files = {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file() and MODEL_FILES.fullmatch(p.name)}
    seed = Seed(name, files)
    with open_model(path) as model:
        model.verify()
        seed.tensors = {_tensor_key(model, t): model.tensor(t).tobytes() for t in model.tensor_names}
        seed.weights = {_weight_key(w): model.dequantize(n).tobytes() for n, w in model.weights.items()}
    return seed


def load_seeds(build_dir: Path | None = None) -> list[Seed]:
    """The conformance vectors, plus the format tests' Mixtral-typed model when torch is available."""
    seeds = [_snapshot(d, d.name) for d in sorted(VECTORS.iterdir()) if (d / "config.json").is_file()]
    if build_dir is not None:
        try:
            sys.path.insert(0, str(ROOT / "tests"))
            from format_helpers import build_model
        except ImportError:  # no torch: the vectors alone still cover every scheme
            return seeds
        out = build_dir / "format_helpers_model"
        shutil.rmtree(out, ignore_errors=True)
        build_model(out, max_shard_bytes=3000)
        seeds.append(_snapshot(out, "format_helpers_mixtral"))
    return seeds


# -- shard surgery --------------------------------------------------------------------------------------------


def split_shard(blob: bytes):
    """(header dict, data bytes) of a still-parsable shard, else None."""
    if len(blob) < 8:
        return None
    n = int.from_bytes(blob[:8], "little")
    if 8 + n > len(blob):
        return None
    try:
        header = json.loads(blob[8 : 8 + n])
    except (ValueError, RecursionError):
        return None
    return (header, blob[8 + n :]) if isinstance(header, dict) else None


def dumps_pairs(pairs) -> str:
    """A JSON object from (key, value) pairs, so that duplicate keys can be written."""
    return "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'))}" for k, v in pairs) + "}"


def join_shard(header_text: str | bytes, data: bytes) -> bytes:
    raw = header_text.encode() if isinstance(header_text, str) else header_text
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data


def boundaries(blob: bytes) -> list[int]:
    """Every region boundary of a shard: inside the length field, header end, each tensor's begin and end, +-1."""
    points = set(range(9))
    parsed = split_shard(blob)
    if parsed is not None:
        start = 8 + int.from_bytes(blob[:8], "little")
        points.add(start)
        for name, entry in parsed[0].items():
            offsets = entry.get("data_offsets") if isinstance(entry, dict) and name != "__metadata__" else None
            if isinstance(offsets, list):
                points.update(start + o for o in offsets if isinstance(o, int))
    return sorted({q for p in points for q in (p - 1, p, p + 1) if 0 <= q < len(blob)}) or [0]


# -- interesting values ------------------------------------------------------------------------------------------

BIG = [2**31, 2**32, 2**53 + 1, 2**62, 2**63, 2**64, 10**30, 10**400]
NUMBERS = [0, -1, 1, 3, -(2**63), 1.5, -0.0, float("nan"), float("inf"), True, False] + BIG
ANY = NUMBERS + ["", "x", "F8_E4M3", None, [], {}, [0], [1] * 9, {"a": 1}, [[[[]]]], "\u00e9\ud800"]
DTYPES = ["BOOL", "U8", "I8", "U16", "I16", "F16", "BF16", "U32", "I32", "F32", "U64", "I64", "F64",
          "F8_E4M3", "F8_E5M2", "C64", "bf16", "", 0, None, ["U8"], {"U8": 1}]
SHAPES = [[], [0], [-1], [1.5], [True], ["2"], [2**64], [10**400], [2**32] * 8, [1] * 9, [2**62, 2**62], "U8", None,
          [10**30, 0]]
VERSIONS = ["1.0", "1.99", "2.0", "0.9", "1", "1.0.0", "v1.0", "", None, 1.0, "9" * 5000 + ".0", "\u0661.0",
            "01.00", " 1.0"]
FIELD_VALUES = {
    "scheme": list(SCHEMES) + ["int5", "INT4", "nf4 ", 4, None, ["int4"]],
    "bits": [0, 1, 2, 3, 4, 8, 16, -4, "4", 4.0, True, None],
    "group_size": [0, -1, 1, 3, 16, 32, 64, 4096, 2**31, 2**64, 10**400, 1.5, True, None, "64"],
    "double_quant": [True, False, 0, 1, "true", None],
    "shape": [[0, 1], [-1, 5], [5], [5, 71, 1], [2**62, 2**62], [10**400, 1], [1, 10**400], [71, 5], [5.0, 71],
              [True, 71], [1, 355], [355, 1]],
    "dtype": ["", None, 5, "float8", "bfloat16"],
    "role": ["router", "", None, "dense", "shared_expert", "routed_expert"],
    "layer": [-1, None, 2**70, "0", 1.5, True, 0, 7],
    "expert": [-1, None, 2**70, "0", 1.5, True, 0, 7],
    "proj": ["gate", "up", "down", None, "w1", ""],
}


def interesting(rng: random.Random, old=None):
    """A replacement for a JSON value: near the old integer, or something from the pools."""
    if isinstance(old, int) and not isinstance(old, bool) and rng.random() < 0.4:
        return old + rng.choice([-8, -2, -1, 1, 2, 8, old, -old - 1, 2**32])
    return rng.choice(ANY)


def _paths(doc, prefix=()):
    """Every (container, key) in a JSON document, for tree mutations."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield doc, key
        if len(prefix) < 6:
            yield from _paths(value, prefix + (key,))


def mutate_tree(rng: random.Random, doc):
    """Replace, delete, duplicate or retype one random node of a JSON document (in place when possible)."""
    paths = list(_paths(doc))
    if not paths:
        return interesting(rng, doc)
    parent, key = rng.choice(paths)
    op = rng.random()
    if op < 0.5:
        parent[key] = interesting(rng, parent[key])
    elif op < 0.65:
        del parent[key]
    elif op < 0.8 and isinstance(parent, dict):
        parent[str(key) + rng.choice(["", "x", ".qweight", " "])] = parent[key]
    elif op < 0.9:
        parent[key] = [parent[key]] if rng.random() < 0.5 else json.dumps(parent[key])
    else:
        parent[key] = {"nested": parent[key]}
    return doc


# -- mutators: each edits ``files`` (name -> bytes) in place and returns a short description ---------------------------


def _shards(files):
    return sorted(n for n in files if n.endswith(".safetensors"))


def _pick_shard(rng, files):
    shards = _shards(files)
    return rng.choice(shards) if shards else None


def _flip(rng, blob: bytes, lo: int, hi: int, count: int) -> bytes:
    if hi <= lo:
        return blob
    out = bytearray(blob)
    for _ in range(count):
        i = rng.randrange(lo, hi)
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def _header_end(blob: bytes) -> int:
    return min(len(blob), 8 + int.from_bytes(blob[:8], "little")) if len(blob) >= 8 else len(blob)


def m_bitflip_length(rng, files):
    name = _pick_shard(rng, files)
    files[name] = _flip(rng, files[name], 0, min(8, len(files[name])), rng.randint(1, 3))
    return f"bitflip length field of {name}"


def m_bitflip_header(rng, files):
    name = _pick_shard(rng, files)
    files[name] = _flip(rng, files[name], 8, _header_end(files[name]), rng.randint(1, 4))
    return f"bitflip header of {name}"


def m_bitflip_data(rng, files):
    name = _pick_shard(rng, files)
    files[name] = _flip(rng, files[name], _header_end(files[name]), len(files[name]), rng.randint(1, 4))
    return f"bitflip data of {name}"


def m_byte_poke(rng, files):
    name = _pick_shard(rng, files)
    blob = bytearray(files[name])
    if len(blob) > 8:
        i = rng.randrange(8, len(blob))
        blob[i] = rng.choice(b'\x00\xff"{}[],:\\0-9 \n\t')
    files[name] = bytes(blob)
    return f"poke a byte of {name}"


def m_truncate_boundary(rng, files):
    name = _pick_shard(rng, files)
    at = rng.choice(boundaries(files[name]))
    files[name] = files[name][:at]
    return f"truncate {name} at boundary {at}"


def m_extend(rng, files):
    name = _pick_shard(rng, files)
    files[name] += rng.choice([b"\0", b" " * 8, os.urandom(rng.randint(1, 64))])
    return f"extend {name}"


def m_length_field(rng, files):
    name = _pick_shard(rng, files)
    blob = files[name]
    n = _header_end(blob) - 8
    value = rng.choice([0, 1, 2, n - 1, n + 1, n - 8, n + 8, len(blob) - 8, len(blob) - 7, 100 * 2**20,
                        100 * 2**20 + 1, 2**63, 2**64 - 1])
    files[name] = max(0, value).to_bytes(8, "little") + blob[8:]
    return f"length field of {name} = {value}"


def m_header_whitespace(rng, files):
    name = _pick_shard(rng, files)
    parsed = split_shard(files[name])
    if parsed is None:
        return "header whitespace: unparsable, skipped"
    text = json.dumps(parsed[0], separators=(",", ":"))
    text = rng.choice([" " + text, "\n" + text, text + "\n", text + "\t", "\ufeff" + text, text + " x"])
    files[name] = join_shard(text, parsed[1])
    return f"whitespace around the header of {name}"


def _edit_header(rng, files, edit, what):
    name = _pick_shard(rng, files)
    parsed = split_shard(files[name])
    if parsed is None:
        return f"{what}: unparsable, skipped"
    header, data = parsed
    tensors = [k for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if not tensors:
        return f"{what}: no tensor, skipped"
    result = edit(header, tensors)
    text = result if isinstance(result, str) else json.dumps(header, separators=(",", ":"))
    files[name] = join_shard(text, data)
    return f"{what} in {name}"


def m_tensor_field(rng, files):
    def edit(header, tensors):
        entry = header[rng.choice(tensors)]
        key = rng.choice(["dtype", "shape", "data_offsets"])
        if key == "dtype":
            entry[key] = rng.choice(DTYPES)
        elif key == "shape":
            old = entry.get("shape")
            entry[key] = rng.choice(SHAPES + ([old[::-1], old + [1], [math.prod(old)]] if isinstance(old, list) and
                                              all(isinstance(d, int) for d in old) else []))
        else:
            offsets = entry.get("data_offsets")
            ok = isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            begin, end = offsets if ok else (0, 0)
            other = header[rng.choice(tensors)].get("data_offsets")
            entry[key] = rng.choice([[-1, end], [end, begin], [0, 2**64], [begin, end + 1], [begin + 1, end + 1],
                                     other, [begin], [begin, end, end], [float(begin), end], [str(begin), end],
                                     [begin, 2**63], [0, 0], None])
        return None

    return _edit_header(rng, files, edit, "tensor entry field")


def m_tensor_entries(rng, files):
    def edit(header, tensors):
        victim = rng.choice(tensors)
        op = rng.randrange(4)
        if op == 0:
            del header[victim]
        elif op == 1:
            header[victim + rng.choice(["x", ".qweight", ""]) + "_"] = header.pop(victim)
        elif op == 2:
            header["extra.tensor"] = {"dtype": "U8", "shape": [rng.choice([1, 4, 2**40])],
                                      "data_offsets": [0, rng.choice([1, 4, 2**40])]}
        else:  # the same name twice, written as raw JSON
            pairs = list(header.items())
            at = next(i for i, (k, _) in enumerate(pairs) if k == victim)
            copy = dict(header[victim])
            if rng.random() < 0.5:
                copy["shape"] = [0]
                copy["data_offsets"] = [0, 0]
            pairs.insert(at + rng.randint(0, 1), (victim, copy))
            return dumps_pairs(pairs)
        return None

    return _edit_header(rng, files, edit, "tensor entries")


def m_header_tree(rng, files):
    return _edit_header(rng, files, lambda header, tensors: mutate_tree(rng, header) and None, "header tree")


def m_metadata_object(rng, files):
    def edit(header, tensors):
        meta = header.get("__metadata__")
        if not isinstance(meta, dict):
            header["__metadata__"] = interesting(rng)
            return None
        op = rng.randrange(4)
        if op == 0:
            meta.pop("moeconv", None)
        elif op == 1:
            meta[rng.choice(["moeconv", "format", "new"])] = interesting(rng)
        elif op == 2:
            meta["moeconv"] = "[" * 100000 + "]" * 100000
        else:
            header["__metadata__"] = interesting(rng)
        return None

    return _edit_header(rng, files, edit, "__metadata__ object")


def _edit_moeconv(rng, files, edit, what):
    def outer(header, tensors):
        meta_obj = header.get("__metadata__")
        raw = meta_obj.get("moeconv") if isinstance(meta_obj, dict) else None
        try:
            meta = json.loads(raw) if isinstance(raw, str) else None
        except (ValueError, RecursionError):
            meta = None
        if not isinstance(meta, dict):
            return None
        result = edit(meta)
        meta_obj["moeconv"] = result if isinstance(result, str) else json.dumps(meta, sort_keys=True)
        return None

    return _edit_header(rng, files, outer, what)


def m_weight_entry(rng, files):
    def edit(meta):
        weights = meta.get("weights")
        if not isinstance(weights, dict) or not weights:
            return None
        entry = weights[rng.choice(sorted(weights))]
        if not isinstance(entry, dict):
            return None
        key = rng.choice(sorted(FIELD_VALUES))
        if rng.random() < 0.1:
            entry.pop(key, None)
        else:
            entry[key] = rng.choice(FIELD_VALUES[key])
        if rng.random() < 0.2:
            entry["future_field"] = interesting(rng)  # unknown keys must be ignored
        return None

    return _edit_moeconv(rng, files, edit, "weight entry field")


def m_moeconv_meta(rng, files):
    def edit(meta):
        op = rng.randrange(9)
        weights, routers, checksums = meta.get("weights"), meta.get("routers"), meta.get("checksums")
        if op == 0:
            meta["version"] = rng.choice(VERSIONS)
        elif op == 1 and isinstance(routers, list):
            candidates = list(checksums) if isinstance(checksums, dict) else ["x"]
            routers.append(rng.choice(routers + candidates if routers else candidates + [1, None, "missing"]))
        elif op == 2 and isinstance(checksums, dict) and checksums:
            name = rng.choice(sorted(checksums))
            value = str(checksums[name])
            wrong_digit = value[:-1] + ("1" if value.endswith("0") else "0")
            checksums[name] = rng.choice([None, 1, value.upper(), "sha256:" + "0" * 64, wrong_digit])
            if rng.random() < 0.3:
                del checksums[name]
        elif op == 3 and isinstance(checksums, dict):
            checksums["stray.tensor"] = "sha256:" + "a" * 64
        elif op == 4 and isinstance(weights, dict) and weights:
            name = rng.choice(sorted(weights))
            action = rng.randrange(3)
            if action == 0:
                del weights[name]
            elif action == 1:
                weights[name + ".copy"] = weights[name]
            else:
                weights[name.rsplit(".", 1)[0]] = weights.pop(name)
        elif op == 5:  # duplicate key, raw
            pairs = list(meta.items())
            key, value = rng.choice(pairs)
            return dumps_pairs(pairs + [(key, value)])
        elif op == 6:
            meta[rng.choice(["weights", "routers", "checksums"])] = interesting(rng)
        elif op == 7:
            meta["future_top_level"] = {"any": [1, 2]}  # must be ignored
        else:
            mutate_tree(rng, meta)
        return None

    return _edit_moeconv(rng, files, edit, "moeconv metadata")


def _edit_json_file(rng, files, name, edit, what):
    if name not in files:
        return f"{what}: {name} absent, skipped"
    try:
        doc = json.loads(files[name])
    except (ValueError, RecursionError):
        return f"{what}: unparsable, skipped"
    if not isinstance(doc, dict):
        return f"{what}: not an object, skipped"
    result = edit(doc)
    files[name] = (result if isinstance(result, str) else json.dumps(doc, indent=2)).encode()
    return what


def m_index(rng, files):
    shards = _shards(files) or ["model.safetensors"]

    def edit(doc):
        weight_map = doc.get("weight_map")
        op = rng.randrange(6)
        if op == 0 and isinstance(doc.get("metadata"), dict):
            total = doc["metadata"].get("total_size")
            total = total if isinstance(total, int) else 0
            doc["metadata"]["total_size"] = rng.choice([total + 1, total - 1, -1, 2**64, str(total), 1.5, None])
        elif op == 1 and isinstance(doc.get("metadata"), dict):
            doc["metadata"]["moeconv_version"] = rng.choice(VERSIONS)
        elif op == 2 and isinstance(weight_map, dict) and weight_map:
            tensor = rng.choice(sorted(weight_map))
            weight_map[tensor] = rng.choice(shards + [
                "missing.safetensors", "../model.safetensors", "/etc/passwd.safetensors", ".hidden.safetensors",
                "a\\b.safetensors", "config.json", "", 5, None, "nul\0.safetensors"])
        elif op == 3 and isinstance(weight_map, dict) and weight_map:
            if rng.random() < 0.5:
                del weight_map[rng.choice(sorted(weight_map))]
            else:
                weight_map["extra.tensor"] = rng.choice(shards)
        elif op == 4:
            doc["weight_map"] = rng.choice([{}, [], None, "x"])
        else:
            mutate_tree(rng, doc)
        return None

    return _edit_json_file(rng, files, "model.safetensors.index.json", edit, "index")


def m_config(rng, files):
    def edit(doc):
        qc = doc.get("quantization_config")
        op = rng.randrange(5)
        if op == 0 and isinstance(qc, dict):
            qc["quant_method"] = rng.choice(["fp8", "", None, "MOECONV", 1])
        elif op == 1 and isinstance(qc, dict):
            qc["format_version"] = rng.choice(VERSIONS)
        elif op == 2:
            doc.pop("quantization_config", None)
        elif op == 3:
            return rng.choice(["[]", "{", '{"a":1,"a":2}', "null", "\xff"])
        else:
            mutate_tree(rng, doc)
        return None

    return _edit_json_file(rng, files, "config.json", edit, "config")


def m_files(rng, files):
    names = sorted(files)
    name = rng.choice(names)
    op = rng.randrange(3)
    if op == 0:
        del files[name]
        return f"delete {name}"
    if op == 1:
        files[name] = b""
        return f"empty {name}"
    shards = _shards(files)
    if len(shards) >= 2:
        a, b = rng.sample(shards, 2)
        files[a], files[b] = files[b], files[a]
        return f"swap {a} and {b}"
    return f"swap: one shard, skipped"


#: (name, weight) of every mutator; header and metadata edits are the richest, so they run most.
MUTATORS = [
    (m_bitflip_length, 1), (m_bitflip_header, 3), (m_bitflip_data, 2), (m_byte_poke, 2),
    (m_truncate_boundary, 3), (m_extend, 1), (m_length_field, 2), (m_header_whitespace, 1),
    (m_tensor_field, 4), (m_tensor_entries, 3), (m_header_tree, 3), (m_metadata_object, 1),
    (m_weight_entry, 5), (m_moeconv_meta, 5), (m_index, 3), (m_config, 2), (m_files, 1),
]


def mutate(rng: random.Random, files: dict[str, bytes]) -> list[str]:
    """Apply 1-3 random mutators to a copy's files, in place; return what was done."""
    funcs, weights = zip(*MUTATORS)
    done = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if not _shards(files):
            break
        done.append(rng.choices(funcs, weights)[0](rng, files))
    return done


# -- running one case --------------------------------------------------------------------------------------------


class Hang(Exception):
    """Raised by the alarm when a read runs past ALARM_S."""


def _alarm(signum, frame):
    raise Hang


@dataclass
class Outcome:
    kind: str  # "ok", "FormatError", "crash", "wrong_result", "hang"
    detail: str
    cpu_s: float
    wall_s: float
    peak_bytes: int
    budget_bytes: int
    file_bytes: int
    checked_values: int = 0
    message: str = ""  # the FormatError's full text


def _problem_class(exc: FormatError) -> str:
    """The error's problem text with names and numbers blanked, for counting errors by kind."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", exc.problem)
    text = re.sub(r"\[[^\]]*\]", "[…]", text)
    text = re.sub(r"(?<![\w.-])-?\d+(\.\d+)?(?!\w)", "N", text)  # numbers, not the digits of U8 or UTF-8
    return text[:90]


def _unpacked_codes(info) -> int:
    """How many codes dequantize unpacks for a weight (padding included): its float32 work size / 4."""
    layout = tensor_layout(info.scheme, info.shape, info.group_size, info.double_quant)
    family = scheme_info(info.scheme).family
    if family == "int":
        return info.shape[0] * layout["scales"][1][1] * info.group_size
    return 2 * math.prod(layout["qweight"][1])


def read_everything(path: Path, seed: Seed | None, torch_paths: bool) -> tuple[int, int]:
    """Open, verify, read every tensor and dequantize every weight; compare with the seed where described alike.

    Returns (values compared with the seed, extra dequantize budget in bytes).
    Raises FormatError for a bad model and AssertionError for a wrong value.
    """
    checked, extra = 0, 0
    with open_model(path) as model:
        model.verify()
        for name in model.tensor_names:
            value = model.tensor(name)
            expected = seed.tensors.get(_tensor_key(model, name)) if seed else None
            if expected is not None:
                assert value.tobytes() == expected, f"tensor {name!r} differs from the seed"
                checked += 1
            del value
        for name, info in model.weights.items():
            extra = max(extra, DEQUANT_FACTOR * 4 * _unpacked_codes(info))
            value = model.dequantize(name)
            expected = seed.weights.get(_weight_key(info)) if seed else None
            if expected is not None:
                assert value.tobytes() == expected, f"weight {name!r} dequantizes differently from the seed"
                checked += 1
            del value
        if torch_paths:
            checked += _torch_paths(path, model)
    return checked, extra


def _torch_paths(path: Path, model) -> int:
    """The PyTorch loader's own reading: safetensors must accept what we accept, with the same bytes."""
    import torch
    from safetensors import safe_open

    from moeconv_torch.loading import read_plan

    checked = 0
    for shard in model.shard_files:
        with safe_open(path / shard, framework="pt") as f:
            for name in f.keys():
                raw = f.get_tensor(name).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                entry = model.tensor_info(name)
                with open(path / shard, "rb") as blob:
                    blob.seek(entry.begin)
                    assert raw == blob.read(entry.nbytes), f"safetensors returns other bytes for {name!r}"
                checked += 1
    if model.config.get("model_type") == "mixtral":
        plan = read_plan(path)
        assert sum(len(e) for by_proj in plan.experts.values() for e in by_proj.values()) + len(plan.linears) == len(
            model.weights)
        checked += 1
    return checked


def model_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def run_case(path: Path, seed: Seed | None = None, torch_paths: bool = False) -> Outcome:
    """Read the model at ``path`` under a CPU clock, an alarm and tracemalloc; classify what happened."""
    file_bytes = model_bytes(path)
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, ALARM_S)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    kind, detail, message, checked, extra = "ok", "", "", 0, 0
    try:
        checked, extra = read_everything(path, seed, torch_paths)
    except FormatError as exc:
        kind, detail, message = "FormatError", _problem_class(exc), str(exc)[:1000]
        if str(path) not in str(exc):
            kind, detail = "crash", f"FormatError naming no file of the model: {exc}"
    except Hang:
        kind, detail = "hang", f"interrupted after {ALARM_S} s"
    except AssertionError as exc:
        kind, detail = "wrong_result", str(exc)
    except Exception as exc:  # noqa: BLE001 - any other exception is the crash we hunt for
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        kind = "crash"
        detail = f"{type(exc).__name__}: {str(exc)[:200]} at {Path(frame.filename).name}:{frame.lineno}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    peak = tracemalloc.get_traced_memory()[1] - base
    if started:
        tracemalloc.stop()
    if kind in ("ok", "FormatError") and cpu > TIME_LIMIT_S:
        kind, detail = "hang", f"{cpu:.2f} s of CPU"
    return Outcome(kind, detail, cpu, wall, peak, 2 * file_bytes + ALLOWANCE + extra, file_bytes, checked, message)


def write_model(files: dict[str, bytes], path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    for name, blob in files.items():
        (path / name).write_bytes(blob)


def fuzz_case(seed: Seed, rng: random.Random, path: Path, torch_paths: bool = False) -> tuple[list[str], Outcome]:
    files = dict(seed.files)
    done = mutate(rng, files)
    write_model(files, path)
    return done, run_case(path, seed, torch_paths)


# -- the campaign ---------------------------------------------------------------------------------------------------


def campaign(cases: int, seed: int, workdir: Path, torch_paths: bool) -> dict:
    seeds = load_seeds(workdir if torch_paths else None)
    rng = random.Random(seed)
    outcomes = collections.Counter()
    problems = collections.Counter()
    defects = []
    worst = {"cpu_s": 0.0, "wall_s": 0.0, "peak_bytes": 0, "ratio_to_file": 0.0, "ratio_to_budget": 0.0}
    over_budget = wall_over = checked = 0
    case_dir = workdir / "case"
    for s in seeds:  # warm up: imports and first-use caches must not count as a case's time or memory
        write_model(s.files, case_dir)
        read_everything(case_dir, s, torch_paths)
    started = time.perf_counter()
    tracemalloc.start()
    for i in range(cases):
        s = seeds[i % len(seeds)]
        done, out = fuzz_case(s, rng, case_dir, torch_paths)
        outcomes[out.kind] += 1
        checked += out.checked_values
        if out.kind == "FormatError":
            problems[out.detail] += 1
        if out.kind not in ("ok", "FormatError"):
            defects.append({"case": i, "seed": s.name, "mutations": done, "kind": out.kind, "detail": out.detail})
        over = out.peak_bytes > out.budget_bytes
        over_budget += over
        if over:
            defects.append({"case": i, "seed": s.name, "mutations": done, "kind": "over_allocation",
                            "detail": f"peak {out.peak_bytes} B > budget {out.budget_bytes} B"})
        wall_over += out.wall_s > TIME_LIMIT_S
        worst["cpu_s"] = max(worst["cpu_s"], out.cpu_s)
        worst["wall_s"] = max(worst["wall_s"], out.wall_s)
        worst["peak_bytes"] = max(worst["peak_bytes"], out.peak_bytes)
        worst["ratio_to_file"] = max(worst["ratio_to_file"], out.peak_bytes / out.file_bytes if out.file_bytes else 0)
        if out.peak_bytes / out.budget_bytes > worst["ratio_to_budget"]:
            worst["ratio_to_budget"] = out.peak_bytes / out.budget_bytes
            worst["case"] = {"case": i, "seed": s.name, "mutations": done, "outcome": out.kind, "detail": out.detail,
                             "peak_bytes": out.peak_bytes, "file_bytes": out.file_bytes}
        if (i + 1) % 1000 == 0:
            print(f"{i + 1}/{cases} cases, {dict(outcomes)}", file=sys.stderr, flush=True)
    tracemalloc.stop()
    crashes = sum(n for k, n in outcomes.items() if k in ("crash", "wrong_result"))
    return {
        "what": "fuzz campaign of the moeconv readers (moeconv_numpy; safetensors + moeconv_torch.read_plan on "
                "accepted files): mutated valid models must read back exactly or raise FormatError",
        "command": f"python benchmarks/fuzz_campaign.py --cases {cases} --seed {seed}"
                   + ("" if torch_paths else " --no-torch"),
        "cases": cases,
        "seeds": [s.name for s in seeds],
        "mutators": [f.__name__.removeprefix("m_") for f, _ in MUTATORS],
        "outcomes": dict(outcomes),
        "format_errors_by_problem": dict(problems.most_common(40)),
        "distinct_format_error_problems": len(problems),
        "values_compared_with_seed": checked,
        "crashes": crashes,
        "hangs": outcomes.get("hang", 0),
        "over_allocations": over_budget,
        "time_limit_cpu_s": TIME_LIMIT_S,
        "cases_over_1s_wall": wall_over,
        "max_cpu_s": round(worst["cpu_s"], 4),
        "max_wall_s": round(worst["wall_s"], 4),
        "max_peak_alloc_bytes": worst["peak_bytes"],
        "max_alloc_ratio_to_file_bytes": round(worst["ratio_to_file"], 3),
        "max_alloc_ratio_to_budget": round(worst["ratio_to_budget"], 4),
        "max_alloc_case": worst.get("case"),
        "alloc_budget": f"2 x model bytes + {ALLOWANCE} B (+ {DEQUANT_FACTOR} x the float32 size of the codes a "
                        "dequantize unpacks)",
        "defects": defects[:50],
        "elapsed_s": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
                    "python": sys.version.split()[0], "numpy": np.__version__},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch loader's paths")
    args = parser.parse_args(argv)
    scratch = "/dev/shm" if os.path.isdir("/dev/shm") else None  # many small files: a RAM disk where there is one
    with tempfile.TemporaryDirectory(prefix="moeconv-fuzz-", dir=scratch) as tmp:
        result = campaign(args.cases, args.seed, Path(tmp), torch_paths=not args.no_torch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: result[k] for k in ("cases", "outcomes", "crashes", "hangs", "over_allocations", "max_cpu_s",
                                      "max_alloc_ratio_to_file_bytes", "max_alloc_ratio_to_budget")}
    print(json.dumps(summary, indent=2))
    return 1 if result["crashes"] or result["hangs"] or result["over_allocations"] else 0


if __name__ == "__main__":
    sys.exit(main())
