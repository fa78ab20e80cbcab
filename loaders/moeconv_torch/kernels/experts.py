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

Experts whose three projections have a fragment layout (int2/3/4/8,
nf4 and fp4 in whole 16 x 64 tiles, ``fragments.fragment_unsupported``) keep their codes in
that layout instead, in a fourth buffer (``lanes``, int32), and run in the
fragment kernels (``fragment_moe``); their scales and zeros stay in ``f16``,
from which the scale pairs those kernels read are derived per
activation dtype (``scale_pairs``).  ``weight`` gives such an expert's
stored qweight back, rebuilt bit for bit from the lanes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from moeconv_numpy.schemes import scheme_info, tensor_layout

from . import fragments, specs

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
        fragment: per expert, whether it runs in the fragment kernels.
        lanes: int32 lane words of the fragment experts' codes; ``fragment_offsets``:
            int64 [3, E, 2], start of each of their projections' lanes (in int32
            words) and scale pairs (in pairs times 2), 0 for the other experts.
        up_variants: distinct (gate code, up code) pairs; down_variants: distinct
            down codes (codes from ``specs.spec_code``), of the other experts.
        variant: int32 [2, E]: row 0 indexes ``up_variants``, row 1 ``down_variants``;
            -1 for fragment experts.  ``fragment_up_variants``, ``fragment_down_variants``
            and ``fragment_variant`` are the same for the fragment experts.
    """

    def __init__(self, hidden: int, intermediate: int, quant: dict[str, list[tuple[str, int, bool]]],
                 buffers: dict[str, torch.Tensor], offsets: torch.Tensor,
                 fragment: Sequence[bool], fragment_offsets: torch.Tensor):
        self.hidden, self.intermediate = hidden, intermediate
        self.num_experts = len(quant["gate"])
        self.quant = quant
        self.u8, self.f16, self.f32, self.lanes = buffers["u8"], buffers["f16"], buffers["f32"], buffers["lanes"]
        self.offsets = offsets
        self.fragment = tuple(fragment)
        self.fragment_offsets = fragment_offsets
        self._pairs: dict[torch.dtype, torch.Tensor] = {}
        codes = [[specs.spec_code(*q) for q in quant[p]] for p in PROJECTIONS]
        self.up_variants, self.down_variants, self.variant = self._variants(codes, [not f for f in fragment])
        self.fragment_up_variants, self.fragment_down_variants, self.fragment_variant = self._variants(codes, fragment)

    def _variants(self, codes: list[list[int]], members: Sequence[bool]):
        """(up variants, down variants, int32 [2, E] index table with -1 for non-members) over ``members``."""
        gate, up, down = codes
        pairs = sorted({(gate[e], up[e]) for e in range(self.num_experts) if members[e]})
        downs = sorted({down[e] for e in range(self.num_experts) if members[e]})
        rows = [[pairs.index((gate[e], up[e])) if members[e] else -1 for e in range(self.num_experts)],
                [downs.index(down[e]) if members[e] else -1 for e in range(self.num_experts)]]
        return tuple(pairs), tuple(downs), torch.tensor(rows, dtype=torch.int32, device=self.device)

    @property
    def device(self) -> torch.device:
        return self.u8.device

    @property
    def nbytes(self) -> int:
        """Bytes held on the device (storage, offsets and the scale pairs built so far)."""
        held = (self.u8, self.f16, self.f32, self.lanes, self.offsets, self.fragment_offsets, *self._pairs.values())
        return sum(t.numel() * t.element_size() for t in held)

    def scale_pairs(self, dtype: torch.dtype) -> torch.Tensor:
        """The fragment experts' scale pairs in ``dtype``, built once per dtype.

        Flat; each weight's start at ``fragment_offsets[..., 1]``, as
        ``[groups, rows, 2]`` (``fragments.scale_pairs``, group-major).
        """
        if dtype not in self._pairs:
            total = 0
            pieces = []
            for p, proj in enumerate(PROJECTIONS):
                for e in range(self.num_experts):
                    if self.fragment[e]:
                        w = self.weight(proj, e, codes=False)
                        pair = fragments.scale_pairs(w.parts, w.scheme, self.shape(proj), w.group_size, dtype)
                        pair = pair.transpose(0, 1).reshape(-1)  # group-major, as ``tile_scales`` reads them
                        pieces.append((int(self.fragment_offsets[p, e, 1]), pair))
                        total = max(total, pieces[-1][0] + pair.numel())
            flat = torch.zeros(max(total, 2), dtype=dtype, device=self.device)
            for start, pair in pieces:
                flat[start:start + pair.numel()] = pair
            self._pairs[dtype] = flat
        return self._pairs[dtype]

    def shape(self, proj: str) -> tuple[int, int]:
        """Logical [out, in] shape of a projection's weights."""
        return (self.hidden, self.intermediate) if proj == "down" else (self.intermediate, self.hidden)

    def weight(self, proj: str, expert: int, codes: bool = True) -> PackedWeight:
        """One expert's weight in the stored layout (for a torch fallback or checks).

        Views into the packed storage, except a fragment expert's qweight,
        rebuilt from its lanes (left out when ``codes`` is false).
        """
        scheme, group_size, double_quant = self.quant[proj][expert]
        shape = self.shape(proj)
        layout = tensor_layout(scheme, shape, group_size, double_quant)
        p = PROJECTIONS.index(proj)
        buffers = {"U8": self.u8, "F16": self.f16, "F32": self.f32}
        parts = {}
        for role, suffix in _role_suffixes(scheme, double_quant).items():
            dtype, dims = layout[suffix]
            if suffix == "qweight" and self.fragment[expert]:
                if codes:
                    dtype = fragments.LANE_DTYPE[fragments.lane_bits(scheme)]
                    start, count = int(self.fragment_offsets[p, expert, 0]), fragments.lane_elements(scheme, shape)
                    lanes = self.lanes[start:start + count * dtype.itemsize // 4]
                    lanes = lanes.view(dtype).view(*fragments.lane_shape(scheme, shape))
                    parts[suffix] = fragments.from_fragments(lanes, scheme, shape, dims)
                continue
            start = int(self.offsets[p, expert, ROLES.index(role)])
            parts[suffix] = buffers[dtype][start:start + math.prod(dims)].view(dims)
        return PackedWeight(parts, scheme, group_size, double_quant)

    @classmethod
    def build(cls, gate: Sequence[PackedWeight], up: Sequence[PackedWeight], down: Sequence[PackedWeight],
              *, hidden: int, intermediate: int, fragments_allowed: bool | None = None) -> PackedExperts:
        """Check every weight against the format and the kernels' limits, then copy all parts into flat buffers.

        The inputs can be freed afterwards: the result keeps only its own
        buffers (``weight(proj, e)`` gives the parts back).  Experts whose
        projections all have a fragment layout get one where
        ``fragments_allowed`` says so (default: ``fragments.enabled`` for the
        weights' device; false: every expert runs in the original kernels).
        Raises ``ValueError`` naming the projection and expert of a weight
        that does not fit.
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
        if fragments_allowed is None:
            fragments_allowed = fragments.enabled(device)
        fragment = [fragments_allowed and all(
            fragments.fragment_unsupported(quant[proj][e][0], (hidden, intermediate) if proj == "down"
                                           else (intermediate, hidden), quant[proj][e][1]) is None
            for proj in PROJECTIONS) for e in range(len(gate))]
        q_role = ROLES.index("q")
        lane_parts = [(p, e, flat) for p, e, r, flat in layout if r == q_role and fragment[e]]
        layout = [(p, e, r, flat) for p, e, r, flat in layout if not (r == q_role and fragment[e])]
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
        buffers["lanes"], fragment_offsets = cls._lanes(lane_parts, quant, hidden, intermediate, device)
        return cls(hidden, intermediate, quant, buffers, offsets.to(device), fragment, fragment_offsets.to(device))

    @staticmethod
    def _lanes(lane_parts, quant, hidden: int, intermediate: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The lane words of the fragment experts' qweights in one int32 buffer, and their offsets.

        Lanes start on 128-byte boundaries; scale pairs are numbered in the
        same order (``scale_pairs``), each projection's ``[rows, groups, 2]``.
        """
        fragment_offsets = torch.zeros(3, len(quant["gate"]), 2, dtype=torch.int64)
        words, pairs = 0, 0
        placed = []
        for p, e, flat in lane_parts:
            proj = PROJECTIONS[p]
            scheme, group_size, _ = quant[proj][e]
            shape = (hidden, intermediate) if proj == "down" else (intermediate, hidden)
            start = -(-words // 32) * 32
            lanes = fragments.to_fragments(flat, scheme, shape).reshape(-1).view(torch.int32)
            fragment_offsets[p, e] = torch.tensor([start, pairs])
            placed.append((start, lanes))
            words = start + lanes.numel()
            pairs += shape[0] * math.ceil(shape[1] / group_size) * 2
        buffer = torch.zeros(max(words, 1), dtype=torch.int32, device=device)
        for start, lanes in placed:
            buffer[start:start + lanes.numel()] = lanes
        return buffer, fragment_offsets
