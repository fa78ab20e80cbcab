"""Write a converted model directory: streaming, sharded, checksummed and atomic.

Shard assignment is deterministic.  Items (one plain tensor, or all parts of
one quantized weight, which always share a shard) fill the open shard in the
order they are added; a shard is closed and written as soon as it holds
``max_shard_bytes`` of tensor data or the next item would take it past that
(an item larger than the limit gets a shard of its own).  The same sequence of
adds with the same limit therefore gives the same files, byte for byte: within
a shard, tensors are laid out by decreasing element size (so every tensor is
aligned for memory-mapping) and then by name, and every JSON document is
serialized with a fixed key order.  Only the open shard is held in memory.

Atomicity.  Closed shards go to ``OUT/.moeconv-partial/shard-NNNNN.safetensors``
(written under a ``.tmp`` name, fsynced, then renamed).  ``finalize()`` renames
them to ``model-0000i-of-0000N.safetensors`` (``model.safetensors`` when there
is one), then writes the index and, last of all, ``config.json``, each by
rename.  Readers refuse a directory without ``config.json``, so an interrupted
write never looks like a valid model.

Resuming.  ``ShardedWriter(out, resume=True)`` keeps the closed shards of an
interrupted run that pass a full check (structure and every checksum), drops
damaged ones (and every shard after them) and half-written ``.tmp`` files,
takes back shards that an interrupted ``finalize()`` had already renamed (and
removes its index and config.json), and reports what is already on
disk in ``completed_tensors`` and ``completed_weights``; the converter skips
those names and adds the rest.  Weights that were in the unwritten open shard
are simply added again.  (Shard boundaries of a resumed run may differ from an
uninterrupted one; the model is equally valid.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moeconv_numpy.header import DTYPE_SIZES
from moeconv_numpy.metadata import FORMAT_VERSION, ROUTER_DTYPES, parse_weight_entry
from moeconv_numpy.reader import CONFIG_FILE, INDEX_FILE, check_shard
from moeconv_numpy.errors import FormatError
from moeconv_numpy.schemes import SCHEMES, tensor_layout

__all__ = ["ShardedWriter", "PARTIAL_DIR", "DEFAULT_MAX_SHARD_BYTES", "shard_file_names"]

#: Where closed shards wait until ``finalize()``; its presence marks an unfinished conversion.
PARTIAL_DIR = ".moeconv-partial"
#: Same default as Hugging Face ``save_pretrained``.
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000

_TORCH_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8",
    torch.uint16: "U16", torch.int16: "I16", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.uint32: "U32", torch.int32: "I32", torch.float32: "F32",
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64",
}
_ALLOWED = ", ".join(DTYPE_SIZES)
_NUMPY_KINDS = {
    ("b", 1): "BOOL", ("u", 1): "U8", ("i", 1): "I8",
    ("u", 2): "U16", ("i", 2): "I16", ("f", 2): "F16",
    ("u", 4): "U32", ("i", 4): "I32", ("f", 4): "F32",
    ("u", 8): "U64", ("i", 8): "I64", ("f", 8): "F64",
}


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray  # the little-endian bytes, uint8, 1-D


@dataclass
class _OpenShard:
    tensors: list[_Tensor] = field(default_factory=list)
    weights: dict[str, dict] = field(default_factory=dict)
    routers: list[str] = field(default_factory=list)
    nbytes: int = 0


def _as_tensor(name: str, value) -> _Tensor:
    """A torch tensor (any device) or NumPy array as safetensors dtype, shape and raw little-endian bytes."""
    if isinstance(value, torch.Tensor):
        dtype = _TORCH_DTYPES.get(value.dtype)
        if dtype is None:
            raise ValueError(f"tensor {name!r}: dtype {value.dtype} cannot be stored (allowed: {_ALLOWED})")
        flat = value.detach().to("cpu").contiguous().reshape(-1)
        return _Tensor(name, dtype, tuple(value.shape), flat.view(torch.uint8).numpy())
    if isinstance(value, np.ndarray):
        dtype = _NUMPY_KINDS.get((value.dtype.kind, value.dtype.itemsize))
        if dtype is None:
            raise ValueError(f"tensor {name!r}: dtype {value.dtype} cannot be stored (allowed: {_ALLOWED})")
        array = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
        return _Tensor(name, dtype, value.shape, array.reshape(-1).view(np.uint8))
    raise TypeError(f"tensor {name!r}: expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, chunks: Iterable, tmp_dir: Path) -> None:
    """Write ``chunks`` to a temporary file in ``tmp_dir``, fsync it, then rename it to ``path``."""
    tmp = tmp_dir / (path.name + ".tmp")
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_bytes(value) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _with_quantization_config(config: Mapping) -> dict:
    """The config to write: the source's, with moeconv's quantization_config (method and version first)."""
    qc = dict(config.get("quantization_config") or {})
    method = qc.pop("quant_method", "moeconv")
    if method != "moeconv":
        raise ValueError(
            f"config has a quantization_config for {method!r}: replace it with moeconv's before finalize()"
        )
    qc.pop("format_version", None)
    return {**config, "quantization_config": {"quant_method": "moeconv", "format_version": FORMAT_VERSION, **qc}}


def _extra_files(extra_files: Mapping | Iterable) -> dict[str, bytes | Path]:
    """Normalize ``extra_files`` to ``{plain file name: bytes or existing source path}``."""
    items = extra_files.items() if isinstance(extra_files, Mapping) else ((Path(p).name, p) for p in extra_files)
    out: dict[str, bytes | Path] = {}
    for name, source in items:
        if (
            not isinstance(name, str) or name in ("", ".", "..", CONFIG_FILE, INDEX_FILE, PARTIAL_DIR)
            or "/" in name or "\\" in name or name.endswith(".safetensors")
        ):
            raise ValueError(f"extra file name {name!r} is not allowed (plain names only; not config, index or shards)")
        if not isinstance(source, bytes):
            source = Path(source)
            if not source.is_file():
                raise ValueError(f"extra file {name!r}: source {source} is not a file")
        out[name] = source
    return out


#: Final shard names as ``shard_file_names`` makes them (``number`` is None for the single ``model.safetensors``).
_FINAL_SHARD = re.compile(r"model(?:-(?P<number>\d{5})-of-\d{5})?\.safetensors")


def shard_file_names(count: int) -> list[str]:
    """Final shard names: ``model.safetensors`` alone, else ``model-00001-of-0000N.safetensors``..."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _encode_shard(tensors: list[_Tensor], weights: dict[str, dict], routers: list[str]) -> tuple[bytes, list[_Tensor]]:
    """The header bytes of a shard (length prefix included) and its tensors in data order."""
    ordered = sorted(tensors, key=lambda t: (-DTYPE_SIZES[t.dtype], t.name))
    entries, checksums, offset = {}, {}, 0
    for t in ordered:
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.data.size]}
        checksums[t.name] = "sha256:" + hashlib.sha256(memoryview(t.data)).hexdigest()
        offset += t.data.size
    moeconv = {"version": FORMAT_VERSION, "weights": weights, "routers": sorted(routers), "checksums": checksums}
    header = {
        "__metadata__": {"format": "pt", "moeconv": json.dumps(moeconv, sort_keys=True, separators=(",", ":"))},
        **entries,
    }
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned, as safetensors does
    return len(raw).to_bytes(8, "little") + raw, ordered


class ShardedWriter:
    """Stream tensors and quantized weights into ``out_dir`` (see the module docstring for the guarantees).

    Usage::

        writer = ShardedWriter(out_dir, max_shard_bytes)
        writer.add_quantized(name, quantize(w, spec, name), {"scheme": "int4", "group_size": 64, ...})
        writer.add_tensor("model.layers.0.block_sparse_moe.gate.weight", gate, router=True)
        writer.finalize(config, {"tokenizer.json": src / "tokenizer.json", "README.md": card_bytes})

    Tensors are referenced, not copied, until their shard is written: do not
    modify them in place after adding them.
    """

    def __init__(
        self, out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, *, resume: bool = False
    ):
        if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._partial = self.out_dir / PARTIAL_DIR
        self._open = _OpenShard()
        self._shards: list[Path] = []
        self._shard_tensors: list[list[str]] = []  # tensor names of each written shard
        self._names: set[str] = set()  # every tensor and logical weight name taken so far
        self._total_bytes = 0
        self._finalized = False
        self.completed_tensors: frozenset[str] = frozenset()
        self.completed_weights: dict[str, dict] = {}
        self._prepare_directory(resume)

    # -- setup ----------------------------------------------------------------
    def _prepare_directory(self, resume: bool) -> None:
        entries = set(os.listdir(self.out_dir)) if self.out_dir.is_dir() else set()
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"output {self.out_dir} exists and is not a directory")
        if resume and (not entries or PARTIAL_DIR in entries):  # other entries: left by an interrupted finalize()
            self._partial.mkdir(parents=True, exist_ok=True)
            self._undo_interrupted_finalize(entries)
            self._adopt_completed_shards()
            return
        if entries == {PARTIAL_DIR}:
            raise ValueError(f"output {self.out_dir} holds an unfinished conversion: resume it or delete the directory")
        if entries:
            raise ValueError(f"output {self.out_dir} is not empty: choose a new directory or delete it")
        self._partial.mkdir(parents=True)
        _fsync_dir(self.out_dir)

    def _undo_interrupted_finalize(self, entries: set[str]) -> None:
        """Put back what a ``finalize()`` killed midway had moved: config.json and the index go
        (config.json first, so the directory never looks complete), and shards already under their
        final names return to their numbered partial names, to be adopted and renamed again."""
        for name in (CONFIG_FILE, INDEX_FILE):
            if name in entries:
                (self.out_dir / name).unlink()
        for name in entries:
            match = _FINAL_SHARD.fullmatch(name)
            if match:
                number = int(match["number"] or 1)
                os.replace(self.out_dir / name, self._partial / f"shard-{number:05d}.safetensors")
        _fsync_dir(self.out_dir)

    def _adopt_completed_shards(self) -> None:
        """Keep the longest intact run shard-00001, shard-00002, ... and delete the rest.

        Only a prefix is kept: the converter re-adds everything after it in the
        original order, so the shards it writes get the same numbers and
        contents as in an uninterrupted run (adopting past a gap would also
        make a new shard overwrite an adopted one of the same number).
        """
        for tmp in self._partial.glob("*.tmp"):
            tmp.unlink()
        tensors, weights = set(), {}
        shards = sorted(self._partial.glob("shard-*.safetensors"))
        for i, path in enumerate(shards):
            try:
                if path.name != f"shard-{i + 1:05d}.safetensors":
                    raise FormatError(path, "a shard before it is missing")
                meta = check_shard(path)
            except FormatError:
                for later in shards[i:]:  # damaged by the interruption, or after a gap: added again
                    later.unlink()
                break
            self._shards.append(path)
            self._shard_tensors.append(list(meta.header.tensors))
            tensors.update(meta.header.tensors)
            self._total_bytes += sum(e.nbytes for e in meta.header.tensors.values())
            weights.update(json.loads(meta.header.metadata["moeconv"])["weights"])
        self.completed_tensors = frozenset(tensors)
        self.completed_weights = weights
        self._names = tensors | set(weights)

    # -- adding -----------------------------------------------------------------
    def _claim(self, names: list[str], what: str) -> None:
        taken = next((n for n in names if n in self._names), None)
        if taken is not None:
            raise ValueError(f"{what}: name {taken!r} is already used by another tensor or weight")
        if self._finalized:
            raise RuntimeError(f"{what}: the writer is already finalized")

    def _append(self, tensors: list[_Tensor], weight: tuple[str, dict] | None = None, router: bool = False) -> None:
        """Put one item into the open shard: a plain tensor, or all parts of a weight with its entry.

        The entry and the router listing are recorded after the possible flush,
        so they always land in the shard that holds their tensors.
        """
        size = sum(t.data.size for t in tensors)
        if self._open.tensors and self._open.nbytes + size > self.max_shard_bytes:
            self._flush()
        self._open.tensors.extend(tensors)
        if weight is not None:
            self._open.weights[weight[0]] = weight[1]
        if router:
            self._open.routers.append(tensors[0].name)
        self._open.nbytes += size
        self._names.update(t.name for t in tensors)
        if self._open.nbytes >= self.max_shard_bytes:
            self._flush()

    def add_quantized(self, logical_name: str, parts: Mapping, entry_meta: Mapping) -> None:
        """Add one quantized weight: ``parts`` exactly as ``tensor_layout`` says, ``entry_meta`` its metadata.

        ``entry_meta`` needs ``scheme``, ``group_size``, ``shape`` (logical
        ``[out, in]``), ``dtype`` (the source dtype, e.g. ``"bfloat16"``) and
        ``role``; ``double_quant`` defaults to false and ``layer``, ``expert``,
        ``proj`` to null; ``bits`` is filled in from the scheme.  Further
        JSON-serializable keys are stored as they are (readers ignore them).
        """
        what = f"weight {logical_name!r}"
        entry = {"double_quant": False, "layer": None, "expert": None, "proj": None, **entry_meta}
        missing = [k for k in ("scheme", "group_size", "shape", "dtype", "role") if k not in entry]
        if missing:
            raise ValueError(f"{what}: entry_meta lacks {', '.join(missing)}")
        entry["shape"] = [int(d) for d in entry["shape"]]
        scheme = entry["scheme"]
        entry.setdefault("bits", SCHEMES[scheme].bits if isinstance(scheme, str) and scheme in SCHEMES else None)
        try:
            info = parse_weight_entry("<writer>", "", logical_name, entry)
            json.dumps(entry)
        except FormatError as exc:
            raise ValueError(f"{what}: {exc.problem}") from None
        except TypeError as exc:
            raise ValueError(f"{what}: entry_meta is not JSON-serializable ({exc})") from None
        layout = tensor_layout(info.scheme, info.shape, info.group_size, info.double_quant)
        if set(parts) != set(layout):
            raise ValueError(f"{what}: parts {sorted(parts)} do not match the {info.scheme} layout {sorted(layout)}")
        tensors = [_as_tensor(f"{logical_name}.{suffix}", parts[suffix]) for suffix in layout]
        for t, (suffix, (dtype, shape)) in zip(tensors, layout.items()):
            if (t.dtype, t.shape) != (dtype, shape):
                raise ValueError(
                    f"{what}: part {suffix!r} is {t.dtype} {list(t.shape)} but {info.scheme} with group size "
                    f"{info.group_size} and shape {list(info.shape)} needs {dtype} {list(shape)}"
                )
        if info.scheme == "mxfp4" and np.any(tensors[1].data == 255):
            raise ValueError(f"{what}: an E8M0 scale is 255 (NaN), which format v1 forbids")
        self._claim([logical_name] + [t.name for t in tensors], what)
        self._names.add(logical_name)
        self._append(tensors, (logical_name, entry))

    def add_tensor(self, name: str, tensor, router: bool = False) -> None:
        """Add a plain tensor (stored as it is); ``router=True`` lists it as a router, which must be BF16 or wider."""
        t = _as_tensor(name, tensor)
        if router and t.dtype not in ROUTER_DTYPES:
            raise ValueError(
                f"router {name!r} is {t.dtype}; routers are never quantized: store them as BF16 or wider "
                f"({', '.join(ROUTER_DTYPES)})"
            )
        self._claim([name], f"tensor {name!r}")
        self._append([t], router=router)

    # -- writing ------------------------------------------------------------------
    def _flush(self) -> None:
        shard = self._open
        if not shard.tensors:
            return
        path = self._partial / f"shard-{len(self._shards) + 1:05d}.safetensors"
        header, ordered = _encode_shard(shard.tensors, shard.weights, shard.routers)
        _write_atomic(path, [header, *(memoryview(t.data) for t in ordered)], self._partial)
        _fsync_dir(self._partial)
        self._shards.append(path)
        self._shard_tensors.append([t.name for t in ordered])
        self._total_bytes += shard.nbytes
        self._open = _OpenShard()

    def finalize(self, config: Mapping, extra_files: Mapping | Iterable = ()) -> Path:
        """Write the last shard, then the extra files, the index and ``config.json`` (last); return ``out_dir``.

        ``config`` is the source model's config; its ``quantization_config``
        (if any) must be moeconv's and gets ``quant_method`` and
        ``format_version`` set.  ``extra_files`` maps a file name in the output
        to its contents (``bytes``) or to a file to copy (a path), or is an
        iterable of paths copied under their own names.
        """
        if self._finalized:
            raise RuntimeError("the writer is already finalized")
        config_bytes = _json_bytes(_with_quantization_config(config))
        files = _extra_files(extra_files)
        self._flush()
        if not self._shards:
            raise ValueError("nothing to write: no tensor was added")
        names = shard_file_names(len(self._shards))
        for name, source in files.items():  # tokenizer files and model cards: small enough to read whole
            _write_atomic(self.out_dir / name, [source if isinstance(source, bytes) else source.read_bytes()],
                          self._partial)
        weight_map = {}
        for path, tensors, name in zip(self._shards, self._shard_tensors, names):
            weight_map.update(dict.fromkeys(tensors, name))
            os.replace(path, self.out_dir / name)
        _fsync_dir(self.out_dir)
        index = {
            "metadata": {"total_size": self._total_bytes, "moeconv_version": FORMAT_VERSION},
            "weight_map": dict(sorted(weight_map.items())),
        }
        _write_atomic(self.out_dir / INDEX_FILE, [_json_bytes(index)], self._partial)
        _fsync_dir(self.out_dir)
        _write_atomic(self.out_dir / CONFIG_FILE, [config_bytes], self._partial)
        shutil.rmtree(self._partial)
        _fsync_dir(self.out_dir)
        self._finalized = True
        return self.out_dir
