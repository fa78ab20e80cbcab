"""The routed experts of one MoE layer, packed once for the fused Triton kernels.

Experts of one layer may each have their own scheme, bit width and group size.
The fused kernels run all of them in one launch per stage, so their packed
tensors must be reachable from one set of base pointers: every part is copied
into one of three flat buffers by element type (``u8`` for codes, absmax_q and
E8M0 scales; ``f16`` for int scales and zeros; ``f32`` for absmax,
absmax_scale and absmax_offset), each part starting on a 128-byte boundary so
that code rows keep 16-byte loads.  ``offsets`` says where each part of each
projection of each expert starts, and ``variant`` which compiled
specialisation of the kernel reads it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from moeconv_numpy.schemes import scheme_info, tensor_layout

from . import specs

#: Projection order of ``offsets``' first axis: Mixtral's w1 (gate), w3 (up), w2 (down).
PROJECTIONS = ("gate", "up", "down")
#: Roles in ``offsets``' last axis, as ``tiles.dequant_tile`` names its pointers.
ROLES = ("q", "s", "z", "fa", "fb", "b")
_BUFFER = {torch.uint8: "u8", torch.float16: "f16", torch.float32: "f32"}
_ALIGN_BYTES = 128


@dataclass(frozen=True)
class PackedWeight:
    """One stored weight as the loader has it: its parts (suffix -> tensor) and how it was quantized."""

    parts: Mapping[str, torch.Tensor]
    scheme: str
    group_size: int
    double_quant: bool = False


def _role_suffixes(scheme: str, double_quant: bool) -> dict[str, str]:
    """role -> stored suffix for one scheme (the inverse of the pointer table in ``tiles.dequant_tile``)."""
    info = scheme_info(scheme)
    family = info.family
    if family == "int":
        return {"q": "qweight", "s": "scales"} if info.symmetric else {"q": "qweight", "s": "scales", "z": "zeros"}
    if family == "mxfp4":
        return {"q": "qweight", "b": "scales"}
    if double_quant:
        return {"q": "qweight", "b": "absmax_q", "fa": "absmax_scale", "fb": "absmax_offset"}
    return {"q": "qweight", "fa": "absmax"}


class PackedExperts:
    """All routed experts of one MoE layer in the layout the fused kernels read.

    Build it with ``PackedExperts.build(gate, up, down, hidden=H, intermediate=I)``
    where ``gate[e]``/``up[e]`` are [I, H] and ``down[e]`` is [H, I] weights.

    Attributes:
        num_experts, hidden, intermediate: the layer's sizes.
        quant: projection -> per expert (scheme, group_size, double_quant).
        u8, f16, f32: flat storage of every part (see the module docstring).
        offsets: int64 [3, E, 6], element offset of role ``ROLES[j]`` of
            projection ``PROJECTIONS[p]`` of expert ``e`` in its buffer
            (0 for roles the scheme lacks; never read).
        up_variants: distinct (gate code, up code) pairs; down_variants: distinct
            down codes (codes from ``specs.spec_code``).
        variant: int32 [2, E]: row 0 indexes ``up_variants``, row 1 ``down_variants``.
    """

    def __init__(self, hidden: int, intermediate: int, quant: dict[str, list[tuple[str, int, bool]]],
                 buffers: dict[str, torch.Tensor], offsets: torch.Tensor):
        self.hidden, self.intermediate = hidden, intermediate
        self.num_experts = len(quant["gate"])
        self.quant = quant
        self.u8, self.f16, self.f32 = buffers["u8"], buffers["f16"], buffers["f32"]
        self.offsets = offsets
        gate, up, down = ([specs.spec_code(*q) for q in quant[p]] for p in PROJECTIONS)
        self.up_variants = tuple(sorted(set(zip(gate, up))))
        self.down_variants = tuple(sorted(set(down)))
        rows = [[self.up_variants.index(pair) for pair in zip(gate, up)],
                [self.down_variants.index(code) for code in down]]
        self.variant = torch.tensor(rows, dtype=torch.int32, device=self.device)

    @property
    def device(self) -> torch.device:
        return self.u8.device

    @property
    def nbytes(self) -> int:
        """Bytes held on the device (storage, offsets and variant tables)."""
        return sum(t.numel() * t.element_size() for t in (self.u8, self.f16, self.f32, self.offsets))

    def shape(self, proj: str) -> tuple[int, int]:
        """Logical [out, in] shape of a projection's weights."""
        return (self.hidden, self.intermediate) if proj == "down" else (self.intermediate, self.hidden)

    def weight(self, proj: str, expert: int) -> PackedWeight:
        """One expert's weight as views into the packed storage (for a torch fallback or checks)."""
        scheme, group_size, double_quant = self.quant[proj][expert]
        layout = tensor_layout(scheme, self.shape(proj), group_size, double_quant)
        p = PROJECTIONS.index(proj)
        buffers = {"U8": self.u8, "F16": self.f16, "F32": self.f32}
        parts = {}
        for role, suffix in _role_suffixes(scheme, double_quant).items():
            dtype, shape = layout[suffix]
            start = int(self.offsets[p, expert, ROLES.index(role)])
            parts[suffix] = buffers[dtype][start:start + math.prod(shape)].view(shape)
        return PackedWeight(parts, scheme, group_size, double_quant)

    @classmethod
    def build(cls, gate: Sequence[PackedWeight], up: Sequence[PackedWeight], down: Sequence[PackedWeight],
              *, hidden: int, intermediate: int) -> PackedExperts:
        """Check every weight against the format and the kernels' limits, then copy all parts into flat buffers.

        The inputs can be freed afterwards: the result keeps only its own
        buffers (``weight(proj, e)`` gives views back).  Raises ``ValueError``
        naming the projection and expert of a weight that does not fit.
        """
        if not (len(gate) == len(up) == len(down) >= 1):
            raise ValueError(f"gate, up and down need one weight per expert, got {len(gate)}, {len(up)}, {len(down)}")
        device = gate[0].parts["qweight"].device
        layout: list[tuple[int, int, int, torch.Tensor]] = []  # (projection, expert, role, flat part)
        quant: dict[str, list[tuple[str, int, bool]]] = {}
        for p, (proj, weights) in enumerate(zip(PROJECTIONS, (gate, up, down))):
            shape = (hidden, intermediate) if proj == "down" else (intermediate, hidden)
            quant[proj] = []
            for e, w in enumerate(weights):
                name = f"expert {e} {proj}"
                reason = specs.unsupported(w.scheme, shape, w.group_size)
                if reason:
                    raise ValueError(f"{name}: the fused MoE kernels cannot read it: {reason}")
                parts = specs.check_parts(w.parts, w.scheme, shape, w.group_size, w.double_quant, name)
                if parts["qweight"].device != device:
                    raise ValueError(f"{name}: on {parts['qweight'].device}, expert 0 gate is on {device}")
                quant[proj].append((w.scheme, w.group_size, bool(w.double_quant)))
                for role, suffix in _role_suffixes(w.scheme, w.double_quant).items():
                    layout.append((p, e, ROLES.index(role), parts[suffix].reshape(-1)))
        offsets = torch.zeros(3, len(gate), len(ROLES), dtype=torch.int64)
        sizes = {"u8": 0, "f16": 0, "f32": 0}
        for p, e, r, flat in layout:
            buf = _BUFFER[flat.dtype]
            align = _ALIGN_BYTES // flat.element_size()
            offsets[p, e, r] = -(-sizes[buf] // align) * align
            sizes[buf] = int(offsets[p, e, r]) + flat.numel()
        dtypes = {"u8": torch.uint8, "f16": torch.float16, "f32": torch.float32}
        buffers = {b: torch.zeros(max(n, 1), dtype=dtypes[b], device=device) for b, n in sizes.items()}
        for p, e, r, flat in layout:
            start = int(offsets[p, e, r])
            buffers[_BUFFER[flat.dtype]][start:start + flat.numel()] = flat
        return cls(hidden, intermediate, quant, buffers, offsets.to(device))
