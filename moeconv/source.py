"""Opening a source checkpoint: a local directory or file, or a Hugging Face Hub repo id.

Only headers are read up front.  Tensors are read one at a time through
``safetensors.safe_open``, which memory-maps the shard: the returned tensor
shares the mapping, and dropping it unmaps the pages, so resident memory stays
at the tensors in flight whatever the checkpoint's size.

PyTorch ``.bin`` checkpoints are pickles, and unpickling a file can run code
from it, so they are refused unless the caller opts in (``allow_pickle``), and
even then are read with ``torch.load(weights_only=True)``.  Nothing here ever
imports or executes a repository's own code (``auto_map``/``trust_remote_code``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import pickle
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

#: Files copied into the converted model next to the weights (tokenizer, generation, processor).
COPY_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "*.tiktoken",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
    "preprocessor_config.json", "processor_config.json",
)
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
_MAX_HEADER = 100 * 1024 * 1024
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HF_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[^/]+)$")
_TORCH_DTYPES = {
    torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8",
    torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
}


class SourceError(ValueError):
    """The source cannot be opened or is inconsistent (one line naming the file and tensor)."""


@dataclass(frozen=True)
class TensorInfo:
    """One source tensor as its file header describes it."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int


@dataclass
class Source:
    """An opened checkpoint: its config, the header of every tensor, and lazy reads.

    ``tensors`` is ordered by file and then by position in the file, so
    reading in that order walks each shard once, front to back.
    """

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    copy_files: list[Path]
    repo_id: str | None = None
    revision: str | None = None
    readme_metadata: dict[str, Any] = field(default_factory=dict)
    pickle: bool = False
    _pickle_cache: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def file_path(self, name: str) -> Path:
        return self.path / self.tensors[name].file

    def read(self, name: str) -> torch.Tensor:
        """The tensor as stored, memory-mapped (its pages are released when it is dropped)."""
        if self.pickle:
            return self._pickled(self.tensors[name].file)[name]
        with safe_open(self.file_path(name), framework="pt") as f:
            return f.get_tensor(name)

    def read_slice(self, name: str, index: int | slice | tuple) -> torch.Tensor:
        """``tensor[index]`` (ints, slices with steps, or a tuple of them), reading only those bytes (fused experts)."""
        if self.pickle:
            return self.read(name)[index]
        with safe_open(self.file_path(name), framework="pt") as f:
            return f.get_slice(name)[index]

    def _pickled(self, file: str) -> dict[str, torch.Tensor]:
        if file not in self._pickle_cache:
            self._pickle_cache.clear()  # one file mapped at a time
            self._pickle_cache[file] = _load_pickle(self.path / file)
        return self._pickle_cache[file]

    def fingerprint(self) -> str:
        """A hash of the config and every tensor header: identifies "the same source" for resuming."""
        h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for name, info in self.tensors.items():
            h.update(f"{name}\0{info.file}\0{info.dtype}\0{info.shape}\0{info.offset}\n".encode())
        return h.hexdigest()

    def largest_file_bytes(self) -> int:
        return max((self.path / f).stat().st_size for f in {i.file for i in self.tensors.values()})


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, from its header only (no data is read)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SourceError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER:
                raise SourceError(f"{path}: safetensors header claims {length} bytes; not a valid file")
            header = json.loads(f.read(length))
            data_size = os.fstat(f.fileno()).st_size - 8 - length
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: cannot read the safetensors header ({exc})") from None
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            out[name] = TensorInfo(path.name, entry["dtype"], tuple(entry["shape"]), entry["data_offsets"][0])
            _check_extent(path, name, out[name], entry["data_offsets"][1], data_size)
        except (KeyError, TypeError, IndexError):
            raise SourceError(f"{path}: malformed header entry for tensor {name!r}") from None
    return out


#: Bytes per element of the safetensors dtypes whose size is known here (others are refused later, by name).
_ELEMENT_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
                  "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def _check_extent(path: Path, name: str, info: TensorInfo, end: int, data_size: int) -> None:
    """Refuse, before anything is written, a tensor whose bytes the file lacks or whose shape lies about them
    (otherwise the read in the middle of the conversion fails with safetensors' own error)."""
    if not 0 <= info.offset <= end <= data_size:
        raise SourceError(
            f"{path}: tensor {name!r} occupies bytes {info.offset}..{end} of the data, but the file holds "
            f"{max(data_size, 0)} (truncated?)"
        )
    size = _ELEMENT_BYTES.get(info.dtype)
    if size is not None and size * math.prod(info.shape) != end - info.offset:
        raise SourceError(
            f"{path}: tensor {name!r} has shape {list(info.shape)} of {info.dtype} "
            f"({size * math.prod(info.shape)} bytes), but its data_offsets span {end - info.offset} bytes"
        )


def _tensors_from_safetensors(root: Path, files: dict[str, list[str]] | None) -> dict[str, TensorInfo]:
    """Headers of every shard, checked against the index (``files``: shard -> tensors it should hold)."""
    if files is None:
        found = read_safetensors_header(root / SINGLE)
        return dict(sorted(found.items(), key=lambda kv: kv[1].offset))
    tensors: dict[str, TensorInfo] = {}
    for shard, names in files.items():
        if not (root / shard).is_file():
            raise SourceError(
                f"{root / INDEX} lists {shard} (holding {names[0]!r} and {len(names) - 1} more tensors), "
                f"but {root / shard} does not exist"
            )
        found = read_safetensors_header(root / shard)
        missing = [n for n in names if n not in found]
        if missing:
            raise SourceError(f"{root / shard}: tensor {missing[0]!r} is listed in {INDEX} but not in the file")
        for name in sorted(names, key=lambda n: found[n].offset):
            tensors[name] = found[name]
    return tensors


def _read_index(path: Path) -> dict[str, list[str]]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"{path}: not a valid checkpoint index ({exc})") from None
    files: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard or "\\" in shard:
            raise SourceError(
                f"{path}: tensor {name!r} is mapped to {shard!r}, which is not a file name inside the checkpoint"
            )
        files.setdefault(shard, []).append(name)
    return dict(sorted(files.items()))


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A ``.bin`` state dict with ``weights_only`` (no arbitrary objects), memory-mapped when its format allows."""
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # legacy (pre-zip) torch.save files cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"{path}: not loadable as a plain weights-only state dict ({first})") from None


def _tensors_from_pickle(root: Path) -> dict[str, TensorInfo]:
    """Tensor metadata of ``.bin`` checkpoints (only with allow_pickle; weights_only loads, memory-mapped)."""
    index = root / PICKLE_INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [PICKLE_SINGLE]
    tensors = {}
    for file in files:
        if not (root / file).is_file():
            raise SourceError(f"{index} lists {file}, but {root / file} does not exist")
        state = _load_pickle(root / file)
        for i, (name, t) in enumerate(state.items()):
            tensors[name] = TensorInfo(file, _TORCH_DTYPES.get(t.dtype, str(t.dtype)), tuple(t.shape), i)
    return tensors


def _load_config(root: Path) -> dict[str, Any]:
    path = root / "config.json"
    if not path.is_file():
        raise SourceError(f"{root}: no config.json; moeconv needs a Hugging Face checkpoint directory")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: cannot parse ({exc})") from None


def _readme_metadata(root: Path) -> dict[str, Any]:
    readme = root / "README.md"
    if not readme.is_file():
        return {}
    from huggingface_hub.repocard import metadata_load

    try:
        return metadata_load(readme) or {}
    except Exception:  # a malformed model card must not stop a conversion; it only feeds ours
        return {}


def _copy_files(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, g) for g in COPY_PATTERNS))


def open_local(root: Path, allow_pickle: bool = False) -> Source:
    """Open a local checkpoint directory (sharded with an index, or one ``model.safetensors``)."""
    root = root.resolve()
    if root.is_file():
        if root.suffix != ".safetensors":
            raise SourceError(f"{root}: expected a directory or a .safetensors file")
        config = _load_config(root.parent)
        tensors = dict(sorted(read_safetensors_header(root).items(), key=lambda kv: kv[1].offset))
        return Source(root.parent, config, tensors, _copy_files(root.parent), readme_metadata=_readme_metadata(root.parent))
    if not root.is_dir():
        raise SourceError(f"{root}: no such file or directory")
    config = _load_config(root)
    pickled = False
    if (root / INDEX).is_file():
        tensors = _tensors_from_safetensors(root, _read_index(root / INDEX))
    elif (root / SINGLE).is_file():
        tensors = _tensors_from_safetensors(root, None)
    elif (root / PICKLE_INDEX).is_file() or (root / PICKLE_SINGLE).is_file():
        if not allow_pickle:
            raise SourceError(
                f"{root}: holds only PyTorch .bin (pickle) weights; unpickling can execute code from the file, "
                "so moeconv refuses it. Convert it to safetensors first, or pass --allow-pickle if you trust it."
            )
        tensors, pickled = _tensors_from_pickle(root), True
    else:
        raise SourceError(f"{root}: no {INDEX} or {SINGLE} found")
    source = Source(root, config, tensors, _copy_files(root), readme_metadata=_readme_metadata(root), pickle=pickled)
    cached = _HF_CACHE_SNAPSHOT.search(root.as_posix())
    if cached:  # a snapshot inside the Hugging Face cache: we know which repo it is
        source.repo_id, source.revision = f"{cached['org']}/{cached['name']}", cached["commit"]
    return source


def is_repo_id(src: str) -> bool:
    """True for ``org/name`` strings that are not existing local paths."""
    return bool(_REPO_ID.fullmatch(src)) and not os.path.exists(src)


def open_hub(repo_id: str, revision: str | None = None, allow_pickle: bool = False) -> Source:
    """Download only what a conversion needs from the Hub (cache and HF_HUB_OFFLINE honoured), then open it.

    First the small files (config, index, tokenizer, generation config, model
    card), then exactly the weight shards the index names.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    small = ["config.json", INDEX, SINGLE, PICKLE_INDEX, "README.md", *COPY_PATTERNS]
    try:
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=small))
        if (root / INDEX).is_file():
            shards = list(_read_index(root / INDEX))
        elif (root / PICKLE_INDEX).is_file() and allow_pickle:
            shards = sorted(set(json.loads((root / PICKLE_INDEX).read_text())["weight_map"].values()))
        else:
            shards = []
        if shards:
            root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=shards))
    except RepositoryNotFoundError:
        raise SourceError(f"{repo_id}: no such repository on the Hub (or it is private and no token was given)") from None
    except LocalEntryNotFoundError:
        raise SourceError(
            f"{repo_id}: not in the local Hugging Face cache and the Hub cannot be reached (HF_HUB_OFFLINE?)"
        ) from None
    except HfHubHTTPError as exc:
        raise SourceError(f"{repo_id}: download failed: {str(exc).splitlines()[0]}") from None
    source = open_local(root, allow_pickle=allow_pickle)
    source.repo_id = repo_id
    return source


def open_source(src: str | os.PathLike, revision: str | None = None, allow_pickle: bool = False) -> Source:
    """A local directory / ``.safetensors`` file, or a Hub repo id (``org/name``)."""
    text = os.fspath(src)
    if is_repo_id(text):
        return open_hub(text, revision, allow_pickle)
    if revision is not None:
        raise SourceError(f"--revision applies to Hub repo ids, but {text!r} is a local path")
    return open_local(Path(text), allow_pickle)

