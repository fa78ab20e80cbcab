"""Open a converted model directory lazily and read it back, checking as it goes.

``open_model`` reads only ``config.json`` and the index.  A shard's header is
parsed and checked the first time one of its tensors is needed, and its data
is memory-mapped; each tensor's sha256 is checked the first time it is read.
``Model.verify()`` forces every check, cross-shard ones included.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dequant import NUMPY_DTYPES, check_e8m0, dequantize
from .errors import FormatError
from .header import TensorEntry, read_header, read_json_file
from .metadata import ShardMeta, WeightInfo, check_version, parse_shard_meta

__all__ = ["CONFIG_FILE", "INDEX_FILE", "Model", "VerifyReport", "check_shard", "open_model"]

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"[^/\\]+\.safetensors")


@dataclass(frozen=True)
class VerifyReport:
    """What ``Model.verify()`` checked."""

    shards: int
    tensors: int
    weights: int
    tensor_bytes: int


class _Shard:
    """One checked shard file; its data is memory-mapped on first use."""

    def __init__(self, path: Path, meta: ShardMeta):
        self.path = path
        self.meta = meta
        self._data: np.memmap | None = None
        self._verified: set[str] = set()

    def _bytes(self, entry: TensorEntry) -> np.ndarray:
        if self._data is None:
            try:
                self._data = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self.meta.header.file_size,))
            except (OSError, ValueError) as exc:
                raise FormatError(self.path, f"cannot memory-map the file: {exc}") from None
        return self._data[entry.begin : entry.end]

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes (uint8 view of the map) after checking its sha256 once."""
        entry = self.meta.header.tensors[name]
        data = self._bytes(entry)
        if name not in self._verified:
            digest = "sha256:" + hashlib.sha256(memoryview(data)).hexdigest()
            if digest != self.meta.checksums[name]:
                raise FormatError(self.path, "checksum mismatch: the tensor's bytes are damaged", name)
            self._verified.add(name)
        return data

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only array of its stored dtype (BF16 as its raw uint16 bits)."""
        entry = self.meta.header.tensors[name]
        return self.raw(name).view(NUMPY_DTYPES[entry.dtype]).reshape(entry.shape)

    def verify_all(self) -> None:
        """Check every tensor's checksum and that no MXFP4 scale is the forbidden E8M0 NaN."""
        for name in self.meta.header.tensors:
            self.raw(name)
        for weight in self.meta.weights.values():
            if weight.scheme == "mxfp4":
                check_e8m0(self.array(weight.tensors["scales"]), weight.tensors["scales"], str(self.path))

    def close(self) -> None:
        self._data = None


def _widen(array: np.ndarray, dtype: str) -> np.ndarray:
    """BF16 bits -> float32 (exact) and BOOL bytes -> bool; other dtypes are returned as stored."""
    if dtype == "BF16":
        wide = array.astype(np.uint32)
        wide <<= 16  # in place: the float32 result is the only allocation
        return wide.view(np.float32)
    if dtype == "BOOL":
        return array != 0
    return array


class Model:
    """A converted model directory (see ``open_model``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FormatError(self.path, "does not exist")
        if not self.path.is_dir():
            raise FormatError(self.path, "not a directory: give the converted model's directory")
        config_file = self.path / CONFIG_FILE
        if not config_file.exists():
            raise FormatError(config_file, "file is missing: not a finished model (an interrupted conversion has none)")
        self.config = read_json_file(config_file, "config.json")
        qc = self.config.get("quantization_config")
        if not isinstance(qc, dict) or qc.get("quant_method") != "moeconv":
            raise FormatError(config_file, "quantization_config.quant_method is not \"moeconv\": not a moeconv model")
        self.format_version = check_version(qc.get("format_version"), config_file, "quantization_config.format_version")
        self.quantization_config = qc
        self._weight_map = self._read_index()
        self._shards: dict[str, _Shard] = {}

    # -- index and shards -------------------------------------------------
    def _read_index(self) -> dict[str, str]:
        path = self.path / INDEX_FILE
        index = read_json_file(path, "index")
        metadata, weight_map = index.get("metadata"), index.get("weight_map")
        if not isinstance(metadata, dict):
            raise FormatError(path, "index needs a 'metadata' object")
        check_version(metadata.get("moeconv_version"), path, "metadata.moeconv_version")
        total = metadata.get("total_size")
        if not isinstance(total, int) or isinstance(total, bool) or total < 0:
            raise FormatError(path, f"metadata.total_size must be a non-negative integer, got {total!r}")
        self._total_size = total
        if not isinstance(weight_map, dict) or not weight_map:
            raise FormatError(path, "index needs a non-empty 'weight_map' object")
        self._shard_tensors: dict[str, set[str]] = {}
        for tensor, shard in weight_map.items():
            if not (isinstance(shard, str) and _SHARD_NAME.fullmatch(shard)) or shard.startswith("."):
                raise FormatError(path, f"shard name {shard!r} is not a plain *.safetensors file name", tensor)
            self._shard_tensors.setdefault(shard, set()).add(tensor)
        return weight_map

    def _shard(self, name: str) -> _Shard:
        shard = self._shards.get(name)
        if shard is None:
            path = self.path / name
            if not path.is_file():
                raise FormatError(path, f"shard listed in {INDEX_FILE} is missing")
            meta = parse_shard_meta(read_header(path), name)
            listed = self._shard_tensors[name]
            stored = set(meta.header.tensors)
            if listed != stored:
                missing = sorted(listed - stored)
                if missing:
                    raise FormatError(path, f"listed in {INDEX_FILE} but not stored in this shard", missing[0])
                extra = sorted(stored - listed)[0]
                raise FormatError(path, f"stored but {INDEX_FILE} maps it elsewhere or not at all", extra)
            shard = self._shards[name] = _Shard(path, meta)
        return shard

    def _shard_of(self, tensor: str) -> _Shard:
        shard = self._weight_map.get(tensor)
        if shard is None:
            raise KeyError(f"{self.path}: no tensor named {tensor!r}")
        return self._shard(shard)

    @property
    def shard_files(self) -> list[str]:
        """Shard file names, in first-appearance order of the index."""
        return list(self._shard_tensors)

    def _all_shards(self) -> list[_Shard]:
        shards = [self._shard(name) for name in self.shard_files]
        seen: dict[str, str] = {}
        for shard in shards:
            for weight in shard.meta.weights:
                if weight in seen:
                    raise FormatError(shard.path, f"quantized weight also described in {seen[weight]}", weight)
                if weight in self._weight_map:
                    raise FormatError(shard.path, "a quantized weight's name is also used by a stored tensor", weight)
                seen[weight] = shard.path.name
        return shards

    # -- what the model holds ---------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        """Every stored tensor (quantized parts and plain tensors)."""
        return list(self._weight_map)

    @property
    def weights(self) -> dict[str, WeightInfo]:
        """Quantized weights by logical name (reads every shard header)."""
        return {name: w for shard in self._all_shards() for name, w in shard.meta.weights.items()}

    @property
    def plain_tensor_names(self) -> list[str]:
        """Tensors stored as they are (routers, norms, attention, embeddings...)."""
        return [name for shard in self._all_shards() for name in shard.meta.plain]

    @property
    def routers(self) -> list[str]:
        """Router tensors (gates, router biases): plain, BF16 or wider."""
        return [name for shard in self._all_shards() for name in shard.meta.routers]

    def tensor_info(self, name: str) -> TensorEntry:
        """Dtype, shape and byte range of a stored tensor (reads its shard's header only)."""
        return self._shard_of(name).meta.header.tensors[name]

    def tensor(self, name: str) -> np.ndarray:
        """A stored tensor, checksum-verified, memory-mapped where possible.

        Quantized parts and U8/I*/F16/F32/F64 tensors come back read-only in
        their stored dtype; BF16 is widened to float32 (exactly) and BOOL to
        ``bool``, since NumPy has no bfloat16.
        """
        shard = self._shard_of(name)
        return _widen(shard.array(name), shard.meta.header.tensors[name].dtype)

    def dequantize(self, name: str) -> np.ndarray:
        """A quantized weight as float32 ``[out, in]``, exactly as spec/FORMAT.md defines it."""
        shard_file = self._weight_map.get(f"{name}.qweight")
        shard = self._shard(shard_file) if shard_file is not None else None
        weight = shard.meta.weights.get(name) if shard is not None else None
        if weight is None:
            raise KeyError(f"{self.path}: no quantized weight named {name!r}")
        parts = {suffix: shard.array(tensor) for suffix, tensor in weight.tensors.items()}
        return dequantize(
            parts, weight.scheme, weight.shape, weight.group_size, weight.double_quant,
            name=name, source=str(shard.path),
        )

    # -- integrity ----------------------------------------------------------
    def verify(self) -> VerifyReport:
        """Check every shard's structure and every tensor's checksum; raise FormatError at the first damage."""
        shards = self._all_shards()
        total = sum(entry.nbytes for shard in shards for entry in shard.meta.header.tensors.values())
        if total != self._total_size:
            raise FormatError(
                self.path / INDEX_FILE, f"metadata.total_size is {self._total_size} but the shards hold {total} bytes"
            )
        for shard in shards:
            shard.verify_all()
        return VerifyReport(
            shards=len(shards),
            tensors=len(self._weight_map),
            weights=sum(len(s.meta.weights) for s in shards),
            tensor_bytes=total,
        )

    def close(self) -> None:
        """Drop the memory maps (arrays already returned keep theirs alive)."""
        for shard in self._shards.values():
            shard.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_shard(path: str | os.PathLike) -> ShardMeta:
    """Fully check one shard file on its own (structure and every checksum) and return its metadata.

    Used to trust the shards of an interrupted conversion before resuming it.
    """
    path = Path(path)
    shard = _Shard(path, parse_shard_meta(read_header(path), path.name))
    try:
        shard.verify_all()
    finally:
        shard.close()
    return shard.meta


def open_model(path: str | os.PathLike) -> Model:
    """Open a converted model directory: reads config.json and the index now, shards when needed.

    Raises :class:`FormatError` if the directory is not a finished moeconv
    model of a supported major version.
    """
    return Model(path)
