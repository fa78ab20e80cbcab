"""Fused expert layouts: one tensor per layer holds every expert's projections.

GraniteMoE, Llama 4, DBRX and gpt-oss store a layer's routed experts as one
(or two, or three) stacked tensors instead of one 2-D matrix per expert.  The
format stores one ``[out, in]`` weight per expert and projection, named
``<experts prefix>.<e>.<gate_proj|up_proj|down_proj>.weight`` (FORMAT.md
section 7).  A :class:`Fused` rule says how a stacked tensor holds them, so the
framework can cut it lazily -- each item reads only its own slice from the
memory-mapped shard -- and ``moeconv dequantize`` can stack the weights back
into exactly the source's tensor (shape, orientation, gate/up order).

:class:`FusedMxfp4` is the same for gpt-oss's MXFP4 ``*_blocks``/``*_scales``
pairs, whose bytes already are format v1 ``mxfp4`` parts: they are written
unchanged (``Item.native``) unless a scheme assignment asks for another scheme.

Templates of these rules may use ``{layer}`` only; the experts prefix and the
source tensor name are formatted from the same layer number.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moeconv_numpy.schemes import MX_BLOCK

from ..quant import QuantSpec
from ..quant.mxfp4 import dequantize_mxfp4, from_gpt_oss_blocks
from .base import (
    ROUTED,
    AdapterError,
    Dim,
    Item,
    PlanContext,
    Reader,
    Restore,
    Rule,
    _check_layer,
    compile_template,
)

#: gate/up/down -> the projection's name in logical weight names.
PROJ_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
#: The spec of MXFP4 weights carried through from the source.
MXFP4 = QuantSpec("mxfp4", MX_BLOCK)


def _index_in(block: range, sel: slice) -> slice:
    """``sel`` (relative to ``block``) as an absolute slice: rows ``k::n`` of expert ``e``'s row block."""
    r = block[sel]
    return slice(r.start, r.stop, r.step)


@dataclass(frozen=True)
class Fused(Rule):
    """Routed experts stacked in one source tensor: which projections, in which order and orientation.

    - ``tensor``: the source tensor, e.g. ``"model.layers.{layer}.mlp.experts.gate_up_proj"``.
    - ``experts``: the experts prefix of the logical names, e.g. ``"model.layers.{layer}.mlp.experts"``.
    - ``projs``: the projections one expert's slice holds along its output axis, in order
      (``("gate", "up")`` or ``("down",)``).
    - ``split``: ``"concat"`` (first all gate rows, then all up rows) or ``"interleave"``
      (gate rows even, up rows odd, as gpt-oss).
    - ``transposed``: an expert's slice is ``[in, out]`` (used as ``x @ W``) rather than ``[out, in]``.
    - ``stacked``: True for ``[E, ...]``; False when the experts' slices are concatenated
      along axis 0 of a 2-D tensor (DBRX's ``[E * rows, cols]``).
    - ``inner``: the dimension of the intermediate size (gate/up: ``[inner, hidden]``, down: ``[hidden, inner]``).
    """

    tensor: str
    experts: str
    projs: tuple[str, ...]
    split: str = "concat"
    transposed: bool = False
    stacked: bool = True
    inner: Dim = "intermediate"

    def __post_init__(self) -> None:
        if self.split not in ("concat", "interleave"):
            raise ValueError(f"Fused({self.tensor!r}): split must be 'concat' or 'interleave', got {self.split!r}")
        if "down" in self.projs and self.projs != ("down",):
            raise ValueError(f"Fused({self.tensor!r}): down cannot share a tensor with gate/up")
        object.__setattr__(self, "_regex", compile_template(self.claimed))
        names = [PROJ_NAMES[p] for p in self.projs]
        object.__setattr__(self, "_logical", compile_template(self.experts + ".{expert}.{proj}.weight", names))

    @property
    def claimed(self) -> str:
        """The template of the source tensor this rule reads."""
        return self.tensor

    # -- geometry ---------------------------------------------------------------------------
    def weight_shape(self, ctx: PlanContext) -> tuple[int, int]:
        """One projection of one expert, ``[out, in]``."""
        hidden, inner = ctx.dim("hidden"), ctx.dim(self.inner)
        return (hidden, inner) if self.projs == ("down",) else (inner, hidden)

    def source_shape(self, ctx: PlanContext) -> tuple[int, ...]:
        """The fused tensor's shape implied by config.json."""
        out, cols = self.weight_shape(ctx)
        per_expert = (cols, len(self.projs) * out) if self.transposed else (len(self.projs) * out, cols)
        experts = ctx.dim("experts")
        if self.stacked:
            return (experts, *per_expert)
        return (experts * per_expert[0], per_expert[1])

    def _select(self, k: int, out: int) -> slice:
        """Projection ``k``'s rows within one expert's output axis."""
        if self.split == "interleave":
            return slice(k, None, len(self.projs))
        return slice(k * out, (k + 1) * out)

    def index(self, expert: int, k: int, ctx: PlanContext) -> tuple:
        """The safetensors slice of projection ``k`` of ``expert`` (only those bytes are read)."""
        out, cols = self.weight_shape(ctx)
        sel = self._select(k, out)
        if self.stacked:
            return (expert, slice(None), sel) if self.transposed else (expert, sel)
        rows = cols if self.transposed else len(self.projs) * out
        block = range(expert * rows, (expert + 1) * rows)
        return (slice(block.start, block.stop), sel) if self.transposed else (_index_in(block, sel),)

    def _check(self, name: str, want: tuple[int, ...], ctx: PlanContext, what: str) -> None:
        got = tuple(ctx.tensors[name].shape)
        if got != want:
            keys = ", ".join(f"{ctx.key_of(d)}={ctx.dim(d)}" for d in ("experts", "hidden", self.inner))
            raise AdapterError(
                f"{ctx.tensors[name].file}: tensor {name!r} ({what}) has shape {list(got)}, "
                f"but config.json ({keys}) implies {list(want)}"
            )

    # -- planning ---------------------------------------------------------------------------
    def plan(self, name: str, ctx: PlanContext) -> list[Item] | None:
        match = self._regex.match(name)
        if match is None:
            return None
        layer = ctx.layer_of(name)
        _check_layer(ctx, name, layer)
        self._check(name, self.source_shape(ctx), ctx, f"fused {'/'.join(self.projs)} of all experts")
        prefix = self.experts.format(layer=match["layer"])
        dtype = ctx.tensors[name].dtype
        shape = self.weight_shape(ctx)
        return [
            Item(f"{prefix}.{e}.{PROJ_NAMES[proj]}.weight", shape, dtype, self._loader(name, e, k, ctx), (name,),
                 ROUTED, layer, e, proj)
            for e in range(ctx.dim("experts"))
            for k, proj in enumerate(self.projs)
        ]

    def _loader(self, name: str, expert: int, k: int, ctx: PlanContext):
        index, transposed = self.index(expert, k, ctx), self.transposed

        def load(reader: Reader) -> torch.Tensor:
            part = reader.read_slice(name, index)
            return (part.T if transposed else part).contiguous()

        return load

    def check_complete(self, items: Sequence[Item], ctx: PlanContext) -> None:
        """Every layer holding this rule's tensor has gate, up and down of every expert (from any rule)."""
        mine = {it.layer for it in items if it.role == ROUTED and self._regex.match(it.sources[0])}
        have = defaultdict(set)
        for it in items:
            if it.role == ROUTED and it.layer in mine:
                have[it.layer].add((it.expert, it.proj))
        want = {(e, p) for e in range(ctx.dim("experts")) for p in PROJ_NAMES}
        for layer in sorted(mine):
            missing = sorted(want - have[layer])
            if missing:
                expert, proj = missing[0]
                raise AdapterError(
                    f"layer {layer} has {self.claimed!r} but no {proj} projection of expert {expert} "
                    f"({len(missing)} expert weights of that layer missing)"
                )

    # -- dequantize -------------------------------------------------------------------------
    def restore(self, names: Sequence[str], ctx: PlanContext) -> list[Restore]:
        """Stack each layer's per-expert weights back into the source tensor ``tensor``."""
        found: dict[str, dict[tuple[int, str], str]] = defaultdict(dict)
        for n in names:
            m = self._logical.match(n)
            if m:
                found[m["layer"]][int(m["expert"]), m["proj"]] = n
        steps = []
        for layer, by_key in found.items():
            experts = ctx.dim("experts")
            order = [(e, PROJ_NAMES[p]) for e in range(experts) for p in self.projs]
            missing = [k for k in order if k not in by_key]
            if missing:
                e, p = missing[0]
                raise AdapterError(
                    f"cannot rebuild {self.tensor.format(layer=layer)!r}: the model has no expert {e} {p} weight "
                    f"(config.json has {experts} experts)"
                )
            inputs = tuple(by_key[k] for k in order)
            steps.append(Restore(self.tensor.format(layer=layer), inputs, functools.partial(self._stack, inputs)))
        return steps

    def _stack(self, inputs: tuple[str, ...], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of the slicing: ``[E * n, out, in]`` -> the source layout, in one reshape/transpose."""
        weights = [tensors[n] for n in inputs]
        dtype = functools.reduce(torch.promote_types, (w.dtype for w in weights))
        n = len(self.projs)
        out, cols = weights[0].shape
        per = torch.stack([w.to(dtype) for w in weights]).view(-1, n, out, cols)
        if self.split == "interleave":
            per = per.transpose(1, 2)  # [E, out, n, in]: row 2i gate i, row 2i+1 up i
        per = per.reshape(-1, n * out, cols)
        if self.transposed:
            per = per.transpose(1, 2)
        if not self.stacked:
            per = per.reshape(-1, per.shape[-1])
        return per.contiguous()


@dataclass(frozen=True)
class FusedMxfp4(Fused):
    """gpt-oss MXFP4 experts: ``<tensor>_blocks`` ``U8 [E, out, in/32, 16]`` and ``<tensor>_scales`` ``U8 [E, out, in/32]``.

    Rows are ``[out, in]`` (never transposed), blocks of 32 along ``in``, the
    low nibble of a byte holding the even element: exactly format v1 ``mxfp4``
    (see ``moeconv.quant.mxfp4``).  Each item carries its rows' bytes through
    unchanged as ``native`` parts and dequantizes them (float32, exact) when a
    different scheme is assigned or the weight is kept plain.  Rebuilding is
    left to the BF16 :class:`Fused` rule of the same ``tensor``: a plain
    checkpoint has no MXFP4.
    """

    def __post_init__(self) -> None:
        if self.transposed or not self.stacked:
            raise ValueError(f"FusedMxfp4({self.tensor!r}): MXFP4 blocks are stacked [E, out, ...] and never transposed")
        super().__post_init__()
        object.__setattr__(self, "_scales", compile_template(self.tensor + "_scales"))

    @property
    def claimed(self) -> str:
        return self.tensor + "_blocks"

    def source_shape(self, ctx: PlanContext) -> tuple[int, ...]:
        """``[E, out, ceil(in/32), 16]``; an ``in`` that is not a multiple of 32 then fails the shape check."""
        out, cols = self.weight_shape(ctx)
        return (ctx.dim("experts"), len(self.projs) * out, -(-cols // MX_BLOCK), MX_BLOCK // 2)

    def plan(self, name: str, ctx: PlanContext) -> list[Item] | None:
        if self._scales.match(name):
            blocks = name.removesuffix("_scales") + "_blocks"
            if blocks not in ctx.tensors:
                raise AdapterError(f"{ctx.tensors[name].file}: tensor {name!r} has no companion {blocks!r}")
            return []  # read together with its blocks
        match = self._regex.match(name)
        if match is None:
            return None
        scales = name.removesuffix("_blocks") + "_scales"
        if scales not in ctx.tensors:
            raise AdapterError(f"{ctx.tensors[name].file}: tensor {name!r} has no companion {scales!r}")
        for tensor, dtype in ((name, ctx.tensors[name].dtype), (scales, ctx.tensors[scales].dtype)):
            if dtype != "U8":
                raise AdapterError(f"{ctx.tensors[tensor].file}: tensor {tensor!r} is {dtype}; MXFP4 blocks and scales are U8")
        want = self.source_shape(ctx)
        self._check(name, want, ctx, "MXFP4 blocks of all experts")
        self._check(scales, want[:-1], ctx, "MXFP4 scales of all experts")
        out, cols = self.weight_shape(ctx)
        if cols % MX_BLOCK:
            raise AdapterError(
                f"{ctx.tensors[name].file}: tensor {name!r} holds MXFP4 blocks of {cols} columns, "
                f"which is not a multiple of {MX_BLOCK} (config.json)"
            )
        layer = ctx.layer_of(name)
        _check_layer(ctx, name, layer)
        prefix = self.experts.format(layer=match["layer"])
        shape = self.weight_shape(ctx)
        items = []
        for e in range(ctx.dim("experts")):
            for k, proj in enumerate(self.projs):
                logical = f"{prefix}.{e}.{PROJ_NAMES[proj]}.weight"
                native = self._native(name, scales, self.index(e, k, ctx), logical)
                load = functools.partial(_dequantized, native, shape, logical)
                items.append(Item(logical, shape, "F32", load, (name, scales), ROUTED, layer, e, proj,
                                  native=MXFP4, load_native=native))
        return items

    @staticmethod
    def _native(blocks: str, scales: str, index: tuple, logical: str):
        def load(reader: Reader) -> dict[str, torch.Tensor]:
            return from_gpt_oss_blocks(reader.read_slice(blocks, index), reader.read_slice(scales, index), logical)

        return load

    def restore(self, names: Sequence[str], ctx: PlanContext) -> list[Restore]:
        return []


def _dequantized(native, shape: tuple[int, int], name: str, reader: Reader) -> torch.Tensor:
    return dequantize_mxfp4(native(reader), shape, name)
