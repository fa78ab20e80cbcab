"""The moeconv entry of a shard's ``__metadata__``: parsed, typed and checked against the header.

A shard's header says what bytes exist; the ``moeconv`` JSON says what they
mean.  This module turns the latter into :class:`WeightInfo` records and
checks that both agree (every part present with the exact dtype and shape of
``tensor_layout``, one checksum per tensor, routers stored plain and wide
enough), so later code can trust a parsed shard without re-checking.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from .errors import FormatError
from .header import ShardHeader, loads_json
from .schemes import scheme_info, stored_bits, code_bits, tensor_layout

__all__ = [
    "SUPPORTED_MAJOR",
    "FORMAT_VERSION",
    "ROLES",
    "PROJS",
    "ROUTER_DTYPES",
    "WeightInfo",
    "ShardMeta",
    "check_version",
    "parse_shard_meta",
    "parse_weight_entry",
]

#: The major format version this reader understands; minor versions only add optional fields.
SUPPORTED_MAJOR = 1
#: The version writers of this package put in files.
FORMAT_VERSION = "1.0"
ROLES = ("routed_expert", "shared_expert", "dense")
PROJS = ("gate", "up", "down", None)
#: Dtypes a router may be stored in: BF16 or wider floats, never anything quantized.
ROUTER_DTYPES = ("BF16", "F16", "F32", "F64")

_VERSION = re.compile(r"([0-9]+)\.([0-9]+)")  # ASCII decimal digits only (\d would accept any script's digits)
_CHECKSUM = re.compile(r"sha256:[0-9a-f]{64}")


def check_version(value, file: str, what: str) -> str:
    """Accept ``"1.x"``; refuse an unknown major version or a malformed one."""
    match = _VERSION.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise FormatError(file, f"{what} must be a \"MAJOR.MINOR\" string, got {value!r}")
    # compared as text: int() of a 5000-digit major would raise ValueError (CPython's int-string limit)
    if match.group(1).lstrip("0") != str(SUPPORTED_MAJOR):
        raise FormatError(
            file, f"{what} {value} is not supported: this reader reads format version {SUPPORTED_MAJOR}.x"
        )
    return value


@dataclass(frozen=True)
class WeightInfo:
    """One quantized weight (per-expert metadata) and the names of its stored tensors."""

    name: str
    scheme: str
    bits: int
    group_size: int
    double_quant: bool
    shape: tuple[int, int]
    dtype: str
    role: str
    layer: int | None
    expert: int | None
    proj: str | None
    shard: str
    #: suffix -> stored tensor name, in tensor_layout order
    tensors: Mapping[str, str]
    #: fields of the entry this reader does not know (kept, never interpreted)
    extra: Mapping[str, object] = field(default_factory=dict)

    @property
    def layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return tensor_layout(self.scheme, self.shape, self.group_size, self.double_quant)

    @property
    def stored_bits(self) -> int:
        """Every bit stored for this weight: codes, scales, zero points, double-quant constants."""
        return stored_bits(self.scheme, self.shape, self.group_size, self.double_quant)

    @property
    def code_bits(self) -> int:
        """The nominal bits of the codes alone."""
        return code_bits(self.scheme, self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes stored for this weight, all parts together (every part has a whole-byte dtype)."""
        return self.stored_bits // 8

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class ShardMeta:
    """A shard whose header and moeconv metadata agree."""

    header: ShardHeader
    version: str
    weights: dict[str, WeightInfo]
    routers: tuple[str, ...]
    checksums: dict[str, str]
    #: tensors that are not parts of a quantized weight, in data order
    plain: tuple[str, ...]


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_weight_entry(path: str, shard: str, name: str, entry) -> WeightInfo:
    """Check one entry of ``weights`` (types, enumerations, a valid layout) and type it."""
    def bad(problem: str) -> FormatError:
        return FormatError(path, f"weight metadata: {problem}", name)

    if not isinstance(entry, dict):
        raise bad("entry must be a JSON object")
    required = ("scheme", "bits", "group_size", "double_quant", "shape", "dtype", "role", "layer", "expert", "proj")
    missing = [key for key in required if key not in entry]
    if missing:
        raise bad(f"missing field(s) {', '.join(missing)}")
    scheme, bits, group_size = entry["scheme"], entry["bits"], entry["group_size"]
    shape, role, layer, expert, proj = entry["shape"], entry["role"], entry["layer"], entry["expert"], entry["proj"]
    if not isinstance(scheme, str):
        raise bad(f"scheme must be a string, got {scheme!r}")
    try:
        info = scheme_info(scheme)
    except ValueError as exc:
        raise bad(str(exc)) from None
    if bits != info.bits or not _int(bits):
        raise bad(f"bits is {bits!r} but scheme {scheme!r} has {info.bits}")
    if not isinstance(entry["double_quant"], bool):
        raise bad(f"double_quant must be true or false, got {entry['double_quant']!r}")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_int(d) and d > 0 for d in shape)):
        raise bad(f"shape must be two positive integers, got {shape!r}")
    if not _int(group_size):
        raise bad(f"group_size must be an integer, got {group_size!r}")
    if not isinstance(entry["dtype"], str):
        raise bad(f"dtype must be a string, got {entry['dtype']!r}")
    if role not in ROLES:
        raise bad(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if proj not in PROJS:
        raise bad(f"proj must be gate, up, down or null, got {proj!r}")
    for key, value in (("layer", layer), ("expert", expert)):
        if value is not None and not (_int(value) and value >= 0):
            raise bad(f"{key} must be a non-negative integer or null, got {value!r}")
    if role == "routed_expert" and (layer is None or expert is None):
        raise bad("a routed_expert needs integer layer and expert")
    if role != "routed_expert" and expert is not None:
        raise bad(f"expert must be null for role {role!r}")
    try:
        layout = tensor_layout(scheme, tuple(shape), group_size, entry["double_quant"])
    except ValueError as exc:
        raise bad(str(exc)) from None
    extra = {k: v for k, v in entry.items() if k not in required}
    return WeightInfo(
        name, scheme, bits, group_size, entry["double_quant"], tuple(shape), entry["dtype"], role, layer, expert,
        proj, shard, MappingProxyType({suffix: f"{name}.{suffix}" for suffix in layout}), MappingProxyType(extra),
    )


def _check_parts(header: ShardHeader, weight: WeightInfo) -> None:
    for suffix, (dtype, shape) in weight.layout.items():
        tensor = header.tensors.get(weight.tensors[suffix])
        if tensor is None:
            raise FormatError(
                header.path, f"part {suffix!r} of weight {weight.name!r} is missing", weight.tensors[suffix]
            )
        if tensor.dtype != dtype or tensor.shape != shape:
            raise FormatError(
                header.path,
                f"stored as {tensor.dtype} {list(tensor.shape)} but scheme {weight.scheme} with group size "
                f"{weight.group_size} and shape {list(weight.shape)} needs {dtype} {list(shape)}",
                tensor.name,
            )


def parse_shard_meta(header: ShardHeader, shard: str) -> ShardMeta:
    """Parse the ``moeconv`` metadata of a checked header and check it against the header's tensors."""
    path = header.path
    raw = header.metadata.get("moeconv")
    if raw is None:
        raise FormatError(path, "not a moeconv shard: __metadata__ has no 'moeconv' entry")
    meta = loads_json(raw, path, "__metadata__['moeconv']")
    if not isinstance(meta, dict):
        raise FormatError(path, "__metadata__['moeconv'] must be a JSON object")
    version = check_version(meta.get("version"), path, "shard format version")
    weights_raw, routers, checksums = meta.get("weights"), meta.get("routers"), meta.get("checksums")
    if not isinstance(weights_raw, dict):
        raise FormatError(path, "__metadata__['moeconv'] needs a 'weights' object")
    if not (isinstance(routers, list) and all(isinstance(r, str) for r in routers)):
        raise FormatError(path, "__metadata__['moeconv'] needs a 'routers' list of tensor names")
    if not isinstance(checksums, dict):
        raise FormatError(path, "__metadata__['moeconv'] needs a 'checksums' object")

    weights = {name: parse_weight_entry(path, shard, name, entry) for name, entry in weights_raw.items()}
    parts = set()
    for weight in weights.values():
        if weight.name in header.tensors:
            raise FormatError(path, "a quantized weight's name is also used by a stored tensor", weight.name)
        _check_parts(header, weight)
        parts.update(weight.tensors.values())

    for name in header.tensors:
        value = checksums.get(name)
        if value is None:
            raise FormatError(path, "has no checksum in the metadata", name)
        if not (isinstance(value, str) and _CHECKSUM.fullmatch(value)):
            raise FormatError(path, f"checksum must be 'sha256:' and 64 lowercase hex digits, got {value!r}", name)
    stray = next((name for name in checksums if name not in header.tensors), None)
    if stray is not None:
        raise FormatError(path, "has a checksum but is not stored in this shard", stray)

    seen: set[str] = set()  # a set, not list.count() per name: that is O(n^2) for a million-name list
    for router in routers:
        if router in seen:
            raise FormatError(path, "a router is listed twice", router)
        seen.add(router)
    for router in routers:
        tensor = header.tensors.get(router)
        if tensor is None:
            raise FormatError(path, "listed as a router but not stored in this shard", router)
        if router in parts:
            raise FormatError(path, "a router must not be quantized", router)
        if tensor.dtype not in ROUTER_DTYPES:
            raise FormatError(
                path, f"router stored as {tensor.dtype}; routers must be {', '.join(ROUTER_DTYPES)}", router
            )

    plain = tuple(name for name in header.tensors if name not in parts)
    return ShardMeta(header, version, weights, tuple(routers), dict(checksums), plain)
