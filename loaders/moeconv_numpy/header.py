"""Parse and check one safetensors file's header before touching its data.

We do not hand untrusted files to the ``safetensors`` library: a header that
claims 2**60 bytes, a shape that disagrees with its byte range or offsets that
overlap must give a :class:`FormatError`, never a crash, a hang or a huge
allocation.  So the 8-byte length and the JSON header are read and checked
here, with every size computed in Python integers against the real file size,
and only then may the data be memory-mapped.  The rules are those of
``spec/FORMAT.md`` section "Limits a reader must enforce".
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

from .errors import FormatError

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_TENSORS_PER_SHARD",
    "MAX_RANK",
    "DTYPE_SIZES",
    "TensorEntry",
    "ShardHeader",
    "loads_json",
    "read_header",
    "read_json_file",
]

#: Largest JSON header a reader accepts (the length field is checked before reading it).
MAX_HEADER_BYTES = 100 * 2**20
#: Most tensors one shard may hold.
MAX_TENSORS_PER_SHARD = 2**20
#: Most dimensions one tensor may have.
MAX_RANK = 8
#: The safetensors dtypes format v1 allows, with their sizes in bytes.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a shard as its header describes it; ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ShardHeader:
    """A checked safetensors header: every entry fits the file and the data has no holes or overlaps."""

    path: str
    header_bytes: int
    file_size: int
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]  # in the order of their data

    @property
    def data_start(self) -> int:
        return 8 + self.header_bytes


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


#: A \uD800-\uDFFF escape: Python's parser turns an unpaired one into a lone surrogate, which is not Unicode.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value) -> bool:
    """Whether any string or key of a parsed JSON value holds a surrogate that no pair completed."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def loads_json(raw: bytes | str, path: str, what: str):
    """Parse JSON text strictly (UTF-8, no duplicate keys, no unpaired surrogate escapes); any problem
    is a FormatError about ``what``.

    Unpaired surrogates are refused because other parsers (serde_json, which
    safetensors and so the PyTorch loader use) refuse them: a file must not
    pass this reader and then fail to load.
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(text, object_pairs_hook=_reject_duplicates)
    except UnicodeDecodeError:
        raise FormatError(path, f"{what} is not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise FormatError(path, f"{what} is not valid JSON ({exc})") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise FormatError(path, f"{what} holds an unpaired UTF-16 surrogate escape (\\uD800-\\uDFFF), not Unicode")
    return value


def read_json_file(path: str | os.PathLike, what: str, limit: int = MAX_HEADER_BYTES) -> dict:
    """A small JSON object file (``config.json``, the index), refusing files over ``limit`` bytes."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size > limit:
            raise FormatError(path, f"{what} is {size} bytes, more than the limit of {limit}")
        with open(path, "rb") as f:
            raw = f.read(size)  # never f.read(limit): that would allocate the limit up front
    except FileNotFoundError:
        raise FormatError(path, f"{what} is missing") from None
    except OSError as exc:
        raise FormatError(path, f"cannot read {what}: {exc.strerror or exc}") from None
    value = loads_json(raw, path, what)
    if not isinstance(value, dict):
        raise FormatError(path, f"{what} must be a JSON object, found {type(value).__name__}")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(path: str, name: str, info, data_size: int, data_start: int) -> TensorEntry:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise FormatError(path, "header entry must be an object with dtype, shape and data_offsets", name)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:  # an unhashable dtype must not raise TypeError
        raise FormatError(path, f"unsupported dtype {dtype!r} (allowed: {', '.join(DTYPE_SIZES)})", name)
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(
            path, f"shape must be a list of at most {MAX_RANK} non-negative integers, got {shape!r}", name
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise FormatError(path, f"data_offsets must be two integers, got {offsets!r}", name)
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise FormatError(
            path, f"data_offsets {offsets} fall outside the {data_size} data bytes of the file (truncated?)", name
        )
    needed = math.prod(shape) * DTYPE_SIZES[dtype]
    if needed != end - begin:
        raise FormatError(
            path, f"shape {shape} of dtype {dtype} needs {needed} bytes but data_offsets span {end - begin}", name
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_tiling(path: str, entries: list[TensorEntry], data_start: int, file_size: int) -> None:
    """Data must be covered exactly once: no overlap, no hole, nothing after the last tensor."""
    position = data_start
    previous = None
    for entry in entries:
        if entry.begin < position:
            raise FormatError(path, f"data overlaps tensor {previous!r}", entry.name)
        if entry.begin > position:
            raise FormatError(path, f"{entry.begin - position} bytes before it belong to no tensor", entry.name)
        position, previous = entry.end, entry.name
    if position != file_size:
        raise FormatError(path, f"{file_size - position} bytes after the last tensor belong to no tensor")


def _read_header_text(path: str) -> tuple[int, int, str]:
    """(file size, header length, header text), the length field checked before the header is read.

    The header's bytes die when this returns, so a huge header is never held
    twice (bytes and text) while it is parsed.
    """
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            if file_size < 8:
                raise FormatError(
                    path, f"file is {file_size} bytes, too short for the 8-byte header length (truncated?)"
                )
            header_bytes = int.from_bytes(f.read(8), "little")
            if header_bytes > MAX_HEADER_BYTES:
                raise FormatError(
                    path, f"header length field says {header_bytes} bytes, over the {MAX_HEADER_BYTES}-byte limit "
                    "(garbage or damaged header)"
                )
            if 8 + header_bytes > file_size:
                raise FormatError(
                    path, f"header length field says {header_bytes} bytes but only {file_size - 8} follow (truncated?)"
                )
            raw = f.read(header_bytes)
    except FileNotFoundError:
        raise FormatError(path, "file is missing") from None
    except OSError as exc:
        raise FormatError(path, f"cannot read file: {exc.strerror or exc}") from None
    try:
        return file_size, header_bytes, raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(path, "safetensors header is not UTF-8 text") from None


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Read and check the header of the safetensors file at ``path`` (reads only the header bytes)."""
    path = os.fspath(path)
    file_size, header_bytes, text = _read_header_text(path)
    header = loads_json(text, path, "safetensors header")
    del text
    if not isinstance(header, dict):
        raise FormatError(path, f"safetensors header must be a JSON object, found {type(header).__name__}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(path, "__metadata__ must be an object of strings")
    if len(header) > MAX_TENSORS_PER_SHARD:
        raise FormatError(path, f"header lists {len(header)} tensors, over the limit of {MAX_TENSORS_PER_SHARD}")

    data_start = 8 + header_bytes
    data_size = file_size - data_start
    entries = [_entry(path, name, info, data_size, data_start) for name, info in header.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    _check_tiling(path, entries, data_start, file_size)
    return ShardHeader(path, header_bytes, file_size, metadata, {e.name: e for e in entries})
