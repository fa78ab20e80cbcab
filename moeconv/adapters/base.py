"""Declarative architecture adapters: which source tensor is a routed expert, a router, or the rest.

An :class:`Adapter` is data, not code: a list of :class:`Rule` objects whose
name templates say where the experts, routers, shared experts and dense MLPs of
one architecture live in its Hugging Face checkpoint, plus the config keys that
give their sizes.  From it the framework derives, using only the safetensors
headers, the list of :class:`Item` the pipeline converts, and it checks every
shape against ``config.json`` before a byte of output is written.

Adding an architecture is adding one file to this package that calls
:func:`register`; the package imports every module it holds.  Layouts that are
not one 2-D tensor per weight (fused 3-D expert tensors) subclass :class:`Rule`:
``plan`` turns one source tensor into several items (reading slices lazily) and
``restore`` tells ``moeconv dequantize`` how to put them back together.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .fp8 import SCALE_SUFFIX, dequantize_fp8, fp8_block_size

if TYPE_CHECKING:
    from ..quant import QuantSpec

ROUTED = "routed_expert"
SHARED = "shared_expert"
DENSE = "dense"

#: Canonical projection names of the format (``proj`` in the metadata).
GATE_UP_DOWN = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
W1_W3_W2 = {"w1": "gate", "w3": "up", "w2": "down"}

#: Source dtypes that weights are read from (anything else is refused for quantization).
FLOAT_DTYPES = ("BF16", "F16", "F32")
#: A dimension: a config key, alternative config keys (first present wins; transformers renames
#: some between versions), an integer, or a function of the config dict.
Dim = str | int | tuple[str, ...] | Callable[[Mapping[str, Any]], int]


class AdapterError(ValueError):
    """The source checkpoint does not fit its architecture's adapter (one line, names file and tensor)."""


class TensorInfo(Protocol):
    """What the framework needs to know about a source tensor, from its safetensors header."""

    file: str
    dtype: str
    shape: tuple[int, ...]


class Reader(Protocol):
    """Reads a source tensor lazily (memory-mapped); see :class:`moeconv.source.Source`."""

    def read(self, name: str) -> torch.Tensor: ...

    def read_slice(self, name: str, index: int | slice | tuple) -> torch.Tensor: ...


@dataclass(frozen=True)
class Item:
    """One output of a conversion: a weight that may be quantized, or a tensor stored plainly.

    ``load`` returns the value to convert (float for quantization candidates:
    FP8 sources arrive dequantized).  ``role`` is set only for 2-D linear
    weights that a scheme may be applied to; ``router`` marks tensors that are
    never quantized and are stored exactly.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    load: Callable[[Reader], torch.Tensor] = field(repr=False, compare=False)
    sources: tuple[str, ...]
    role: str | None = None
    layer: int | None = None
    expert: int | None = None
    proj: str | None = None
    router: bool = False
    #: The source already stores this weight in a format scheme (gpt-oss MXFP4): that spec, and
    #: ``load_native`` returning its parts byte for byte.  A task with this very spec writes them
    #: unchanged instead of requantizing ``load``'s float values (see ``adapters/fused.py``).
    native: QuantSpec | None = None
    load_native: Callable[[Reader], dict[str, torch.Tensor]] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Restore:
    """How ``moeconv dequantize`` rebuilds one source tensor from converted tensors.

    ``build`` receives ``{input name: tensor}`` (quantized weights already
    dequantized to float32, plain tensors as stored) and returns the source tensor.
    """

    name: str
    inputs: tuple[str, ...]
    build: Callable[[dict[str, torch.Tensor]], torch.Tensor] = field(repr=False, compare=False)


_PLACEHOLDERS = {"layer": r"(?P<layer>\d+)", "expert": r"(?P<expert>\d+)", "n": r"\d+", "*": r"[^.]+"}


def compile_template(template: str, projs: Iterable[str] = (), prefix: bool = False) -> re.Pattern[str]:
    """Turn ``"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"`` into a regex.

    ``{layer}`` and ``{expert}`` capture integers, ``{proj}`` one of ``projs``,
    ``{n}`` any integer and ``{*}`` any one dotted component; the rest is literal.
    The regex must match the whole name unless ``prefix``.
    """
    alternatives = "|".join(re.escape(p) for p in sorted(projs, key=len, reverse=True))
    out = []
    for literal, name in re.findall(r"([^{]*)(?:\{([^}]*)\})?", template):
        out.append(re.escape(literal))
        if name == "proj":
            out.append(f"(?P<proj>{alternatives})")
        elif name:
            out.append(_PLACEHOLDERS[name])
    return re.compile("".join(out) + ("" if prefix else r"\Z"))


@dataclass(frozen=True)
class Layers:
    """Where layer ``i``'s tensors live (``"model.layers.{layer}."``); ``offset`` numbers a second stack."""

    prefix: str
    offset: Dim = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", compile_template(self.prefix, prefix=True))


class PlanContext:
    """What rules see while planning: the config, resolved dimensions and the source tensors."""

    def __init__(self, adapter: Adapter, config: Mapping[str, Any], tensors: Mapping[str, TensorInfo]):
        self.adapter = adapter
        self.config = config
        self.tensors = tensors
        self._dims: dict[str, int] = {}

    def dim(self, dim: Dim) -> int:
        """A dimension's value from the config; a missing key is an error naming it."""
        if isinstance(dim, int):
            return dim
        key = dim if isinstance(dim, str) else None
        if key is not None and key in self._dims:
            return self._dims[key]
        spec = self.adapter.dims.get(dim, dim) if isinstance(dim, str) else dim
        if isinstance(spec, tuple):
            spec = next((k for k in spec if k in self.config), " or ".join(spec))
        try:
            value = spec(self.config) if callable(spec) else self.config[spec]
        except (KeyError, TypeError) as exc:
            raise AdapterError(
                f"config.json lacks {exc} needed by the {self.adapter.name} adapter (for {dim!r})"
            ) from None
        if key is not None:
            self._dims[key] = int(value)
        return int(value)

    def key_of(self, dim: Dim) -> str:
        """The config key a dimension comes from, for messages (its name when computed)."""
        spec = self.adapter.dims.get(dim, dim) if isinstance(dim, str) else dim
        if isinstance(spec, tuple):
            return next((k for k in spec if k in self.config), spec[0])
        return spec if isinstance(spec, str) else str(dim)

    def layer_of(self, name: str) -> int | None:
        """The layer index of any tensor (stacks numbered one after another), or None."""
        for layers in self.adapter.layers:
            match = layers._regex.match(name)
            if match:
                return int(match["layer"]) + self.dim(layers.offset)
        return None

    def loader(self, name: str) -> tuple[str, tuple[str, ...], Callable[[Reader], torch.Tensor]]:
        """(dtype of the loaded value, source tensors read, load function) for one source tensor.

        FP8 tensors with a ``weight_scale_inv`` sibling are dequantized on the fly
        to float32; other dtypes load as stored.
        """
        info = self.tensors[name]
        scale = name + SCALE_SUFFIX
        if info.dtype == "F8_E4M3" and scale in self.tensors:
            block = fp8_block_size(self.config)
            expected = tuple(math.ceil(d / b) for d, b in zip(info.shape, block))
            if tuple(self.tensors[scale].shape) != expected:
                raise AdapterError(
                    f"{self.tensors[scale].file}: tensor {scale!r} has shape {list(self.tensors[scale].shape)}, "
                    f"but {name!r} {list(info.shape)} in blocks of {list(block)} needs {list(expected)}"
                )
            return "F32", (name, scale), lambda r: dequantize_fp8(r.read(name), r.read(scale), block)
        return info.dtype, (name,), lambda r: r.read(name)

    def check_shape(self, name: str, expected: Sequence[Dim], what: str) -> None:
        """Raise a one-line error when ``name``'s shape disagrees with config.json."""
        want = tuple(self.dim(d) for d in expected)
        got = tuple(self.tensors[name].shape)
        if got != want:
            keys = ", ".join(f"{self.key_of(d)}={self.dim(d)}" for d in dict.fromkeys(expected) if not isinstance(d, int))
            raise AdapterError(
                f"{self.tensors[name].file}: tensor {name!r} ({what}) has shape {list(got)}, "
                f"but config.json ({keys}) implies {list(want)}"
            )


class Rule:
    """Claims source tensors by name and turns them into items.

    Subclasses implement ``plan``; ``restore`` is only needed when the items'
    names differ from the source tensors' (fused layouts).
    """

    def plan(self, name: str, ctx: PlanContext) -> list[Item] | None:
        """The items for source tensor ``name``, ``[]`` to consume it silently, None if not ours."""
        raise NotImplementedError

    def restore(self, names: Sequence[str], ctx: PlanContext) -> list[Restore]:
        """Source tensors rebuilt from converted ``names``; the default (identity) needs none."""
        return []

    def check_complete(self, items: Sequence[Item], ctx: PlanContext) -> None:
        """Raise if the checkpoint lacks tensors this rule expects (called once after planning)."""


def _check_layer(ctx: PlanContext, name: str, layer: int | None) -> None:
    if layer is not None and layer >= ctx.dim("layers"):
        raise AdapterError(
            f"{ctx.tensors[name].file}: tensor {name!r} is in layer {layer}, "
            f"but config.json has {ctx.dim('layers')} layers"
        )


@dataclass(frozen=True)
class Linear(Rule):
    """2-D linear weights, one source tensor per (layer, [expert], projection).

    ``template`` names the tensor with ``{layer}``, ``{proj}`` and, for routed
    experts, ``{expert}``; ``projs`` maps the source's projection names to
    gate/up/down; ``inner`` is the dimension of the intermediate size, so gate
    and up are ``[inner, hidden]`` and down is ``[hidden, inner]``.
    """

    template: str
    projs: Mapping[str, str] = field(default_factory=lambda: dict(GATE_UP_DOWN))
    inner: Dim = "intermediate"
    role: str = ROUTED

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", compile_template(self.template, self.projs))

    def shape(self, proj: str) -> tuple[Dim, Dim]:
        return ("hidden", self.inner) if proj == "down" else (self.inner, "hidden")

    def plan(self, name: str, ctx: PlanContext) -> list[Item] | None:
        match = self._regex.match(name)
        if match is None:
            return None
        proj = self.projs[match["proj"]]
        expert = int(match["expert"]) if "expert" in match.groupdict() else None
        layer = ctx.layer_of(name)
        _check_layer(ctx, name, layer)
        ctx.check_shape(name, self.shape(proj), f"{self.role} {proj} projection")
        if expert is not None and expert >= ctx.dim("experts"):
            raise AdapterError(
                f"{ctx.tensors[name].file}: tensor {name!r} is expert {expert}, "
                f"but config.json has {ctx.dim('experts')} experts per layer"
            )
        dtype, sources, load = ctx.loader(name)
        shape = tuple(ctx.tensors[name].shape)
        return [Item(name, shape, dtype, load, sources, self.role, layer, expert, proj)]

    def check_complete(self, items: Sequence[Item], ctx: PlanContext) -> None:
        """Every layer with one of this rule's tensors has them all (all experts x all projections)."""
        if self.role != ROUTED:
            return
        mine = [it for it in items if self._regex.match(it.name)]
        found = defaultdict(set)
        for it in mine:
            found[it.layer].add((it.expert, it.proj))
        want = {(e, p) for e in range(ctx.dim("experts")) for p in set(self.projs.values())}
        for layer, have in sorted(found.items()):
            missing = sorted(want - have)
            if missing:
                expert, proj = missing[0]
                raise AdapterError(
                    f"the checkpoint has no {proj} projection of expert {expert} in layer {layer} "
                    f"({len(missing)} expert weights of that layer missing; template {self.template!r})"
                )


@dataclass(frozen=True)
class Router(Rule):
    """A router tensor (gate weight, router bias, e_score_correction_bias, shared_expert_gate).

    Routers are never quantized and are stored bit-identical to the source.
    ``shape`` (dimensions) is checked against config.json when given.
    """

    template: str
    shape: tuple[Dim, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", compile_template(self.template))

    def plan(self, name: str, ctx: PlanContext) -> list[Item] | None:
        if self._regex.match(name) is None:
            return None
        layer = ctx.layer_of(name)
        _check_layer(ctx, name, layer)
        if self.shape is not None:
            ctx.check_shape(name, self.shape, "router")
        dtype, sources, load = ctx.loader(name)
        return [Item(name, tuple(ctx.tensors[name].shape), dtype, load, sources, layer=layer, router=True)]


@dataclass(frozen=True)
class Adapter:
    """Everything moeconv needs to know about one architecture's checkpoint layout.

    ``dims`` maps dimension names used by the rules (always ``hidden``,
    ``experts`` and ``layers``; others as the rules name them) to config keys
    or functions of the config.  ``never_quantize`` lists templates of 2-D
    tensors that ``--quantize-dense`` leaves alone (embeddings, output heads).
    Tensors no rule claims are stored as they are; those that are 2-D
    ``.weight`` tensors inside a layer become ``dense`` candidates.
    """

    name: str
    model_types: tuple[str, ...]
    dims: Mapping[str, Dim]
    layers: tuple[Layers, ...]
    rules: tuple[Rule, ...]
    never_quantize: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_never", tuple(compile_template(t) for t in self.never_quantize))

    def plan(self, config: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> list[Item]:
        """Every item of the conversion, checked against config.json, in the order of ``tensors``."""
        ctx = PlanContext(self, config, tensors)
        items: list[Item] = []
        for name in tensors:
            if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in tensors:
                continue  # read together with its FP8 weight
            for rule in self.rules:
                planned = rule.plan(name, ctx)
                if planned is not None:
                    items.extend(planned)
                    break
            else:
                items.append(self._other(name, ctx))
        for rule in self.rules:
            rule.check_complete(items, ctx)
        if not any(it.role == ROUTED for it in items):
            raise AdapterError(
                f"found no routed-expert tensors for the {self.name} adapter; "
                f"is this really a {'/'.join(self.model_types)} checkpoint?"
            )
        return items

    def _other(self, name: str, ctx: PlanContext) -> Item:
        info = ctx.tensors[name]
        layer = ctx.layer_of(name)
        dtype, sources, load = ctx.loader(name)
        dense = (
            len(info.shape) == 2
            and name.endswith(".weight")
            and layer is not None
            and not any(r.match(name) for r in self._never)
        )
        return Item(name, tuple(info.shape), dtype, load, sources, DENSE if dense else None, layer)

    def restore(self, names: Sequence[str], config: Mapping[str, Any]) -> list[Restore]:
        """How to rebuild the source's tensors from converted ``names`` (identity unless a rule says)."""
        ctx = PlanContext(self, config, {})
        steps: list[Restore] = []
        for rule in self.rules:
            steps.extend(rule.restore(names, ctx))
        claimed = {n for step in steps for n in step.inputs}
        steps.extend(Restore(n, (n,), _identity(n)) for n in names if n not in claimed)
        return steps


def _identity(name: str) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    return lambda tensors: tensors[name]


REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    """Add an adapter to the registry (each adapter module calls this once at import)."""
    for other in REGISTRY.values():
        shared = set(other.model_types) & set(adapter.model_types)
        if shared and other.name != adapter.name:
            raise ValueError(f"adapters {other.name!r} and {adapter.name!r} both claim model_type {shared}")
    REGISTRY[adapter.name] = adapter
    return adapter


def supported_model_types() -> list[str]:
    return sorted(t for a in REGISTRY.values() for t in a.model_types)


def adapter_for_config(config: Mapping[str, Any]) -> Adapter:
    """The adapter for a config.json; an unknown architecture lists the supported ones."""
    model_type = config.get("model_type")
    for adapter in REGISTRY.values():
        if model_type in adapter.model_types:
            return adapter
    arch = ", ".join(config.get("architectures") or []) or "no architectures field"
    raise AdapterError(
        f"unsupported architecture: model_type {model_type!r} ({arch}); "
        f"moeconv supports: {', '.join(supported_model_types())}"
    )


def get_adapter(name: str) -> Adapter:
    """An adapter by its name (as recorded in a converted model's quantization_config)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise AdapterError(f"unknown adapter {name!r}; known adapters: {', '.join(sorted(REGISTRY))}") from None
