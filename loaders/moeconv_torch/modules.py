"""Quantized experts and linear layers that keep the format's packed tensors and dequantize on the fly.

These modules hold exactly the bytes a converted file stores for them, so a
model's memory stays close to its file size.  A weight is dequantized only
when a forward pass needs it (for experts: only the experts that tokens were
routed to), used for one matmul, and dropped.

Packed parts are stored as raw ``uint8`` buffers and viewed back as their
format dtype (float16 scales, float32 absmax...) on use: ``model.to(dtype)``
or ``model.half()`` casts floating-point tensors, which would silently corrupt
scales kept in their own dtype, but leaves ``uint8`` alone.

Experts of one layer may each have their own scheme, bits and group size
(mixed precision inside a layer is the point of the format); the experts of a
projection are grouped by format and each group is stacked, so a kernel can
run every expert of a group from one set of tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeconv_numpy.schemes import scheme_info, tensor_layout

from . import backend
from .dequant import check_parts

__all__ = [
    "WeightSpec",
    "PackedWeight",
    "PackedGroup",
    "PackedExperts",
    "QuantizedLinear",
    "QuantizedExperts",
    "GatedActivation",
    "ClampedSwiGLU",
    "PACKED_SUFFIXES",
]

_DTYPES = {"U8": torch.uint8, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
#: Names of the packed buffers (the format's tensor suffixes): how loaders tell them from model weights.
PACKED_SUFFIXES = ("qweight", "scales", "zeros", "absmax", "absmax_q", "absmax_scale", "absmax_offset")


@dataclass(frozen=True)
class WeightSpec:
    """How one ``[out, in]`` weight is quantized: the format's per-weight metadata.

    ``group_size=None`` takes the scheme's default.  Construction validates the
    combination with ``tensor_layout``, so a bad spec fails before any tensor exists.
    """

    scheme: str
    shape: tuple[int, int]
    group_size: int | None = None
    double_quant: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.group_size is None:
            object.__setattr__(self, "group_size", scheme_info(self.scheme).default_group_size)
        tensor_layout(self.scheme, self.shape, self.group_size, self.double_quant)

    @property
    def layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """``{suffix: (format dtype, shape)}`` of the stored parts."""
        return tensor_layout(self.scheme, self.shape, self.group_size, self.double_quant)

    @property
    def format(self) -> tuple[str, int, bool]:
        """What weights must share to be stacked in one :class:`PackedGroup`."""
        return (self.scheme, self.group_size, self.double_quant)

    @property
    def bits(self) -> int:
        return scheme_info(self.scheme).bits


@dataclass(frozen=True)
class PackedWeight:
    """A weight's spec together with its stored parts (``{suffix: tensor}`` as the format stores them)."""

    spec: WeightSpec
    parts: Mapping[str, torch.Tensor]


def _nbytes(dtype: str, dims: tuple[int, ...]) -> int:
    return math.prod(dims) * _DTYPES[dtype].itemsize


class PackedGroup(nn.Module):
    """The parts of ``count`` weights sharing one spec, stacked: one ``uint8 [count, nbytes]`` buffer per suffix."""

    def __init__(self, spec: WeightSpec, count: int, device: torch.device | str | None = None):
        super().__init__()
        self.spec = spec
        self.count = count
        for suffix, (dtype, dims) in spec.layout.items():
            self.register_buffer(suffix, torch.empty(count, _nbytes(dtype, dims), dtype=torch.uint8, device=device))

    def stacked(self, suffix: str) -> torch.Tensor:
        """Part ``suffix`` of every weight of the group in its format dtype: ``[count, *part shape]``."""
        dtype, dims = self.spec.layout[suffix]
        return getattr(self, suffix).view(_DTYPES[dtype]).view(self.count, *dims)

    def parts(self, slot: int) -> dict[str, torch.Tensor]:
        """The parts of the weight in ``slot``, as views in their format dtypes."""
        return {
            suffix: getattr(self, suffix)[slot].view(_DTYPES[dtype]).view(dims)
            for suffix, (dtype, dims) in self.spec.layout.items()
        }

    def set_parts(self, slot: int, parts: Mapping[str, torch.Tensor]) -> None:
        """Copy a weight's parts (any device) into ``slot`` after checking them against the spec."""
        spec = self.spec
        check_parts(parts, spec.scheme, spec.shape, spec.group_size, spec.double_quant)
        for suffix in spec.layout:
            getattr(self, suffix)[slot].copy_(parts[suffix].contiguous().view(torch.uint8).view(-1))

    def dequantize(self, slot: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in ``slot`` as ``[out, in]`` of ``dtype`` (exact reference values, then one cast)."""
        return backend.dequantize(self.parts(slot), self.spec, dtype)

    def extra_repr(self) -> str:
        spec = self.spec
        dq = ", double_quant" if spec.double_quant else ""
        return f"{spec.scheme}, group_size={spec.group_size}{dq}, shape={list(spec.shape)}, count={self.count}"


class PackedExperts(nn.Module):
    """One projection (gate, up or down) of every expert of a layer, grouped by format.

    ``locations[e] == (group, slot)`` says where expert ``e`` lives;
    ``members[g]`` lists the experts of group ``g`` in slot order.
    """

    def __init__(self, specs: Sequence[WeightSpec], device: torch.device | str | None = None):
        super().__init__()
        if not specs:
            raise ValueError("PackedExperts needs at least one expert")
        shapes = {spec.shape for spec in specs}
        if len(shapes) != 1:
            raise ValueError(f"the experts of one projection must share a shape, got {sorted(shapes)}")
        members: dict[tuple, list[int]] = {}
        for expert, spec in enumerate(specs):
            members.setdefault(spec.format, []).append(expert)
        self.members = list(members.values())
        self.groups = nn.ModuleList(PackedGroup(specs[experts[0]], len(experts), device) for experts in self.members)
        self.locations = [(0, 0)] * len(specs)
        for index, experts in enumerate(self.members):
            for slot, expert in enumerate(experts):
                self.locations[expert] = (index, slot)
        self.shape = specs[0].shape

    @property
    def num_experts(self) -> int:
        return len(self.locations)

    def spec(self, expert: int) -> WeightSpec:
        return self.groups[self.locations[expert][0]].spec

    def parts(self, expert: int) -> dict[str, torch.Tensor]:
        group, slot = self.locations[expert]
        return self.groups[group].parts(slot)

    def set_parts(self, expert: int, parts: Mapping[str, torch.Tensor]) -> None:
        group, slot = self.locations[expert]
        self.groups[group].set_parts(slot, parts)

    def dequantize(self, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        group, slot = self.locations[expert]
        return self.groups[group].dequantize(slot, dtype)


class GatedActivation(nn.Module):
    """``act(gate) * up``: the GLU of Mixtral, Qwen, DeepSeek, OLMoE, Llama 4, DBRX..."""

    def __init__(self, act: nn.Module | None = None):
        super().__init__()
        self.act = act if act is not None else nn.SiLU()

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act(gate) * up


class ClampedSwiGLU(nn.Module):
    """gpt-oss's GLU: clamped gate and up, ``(up + 1) * gate * sigmoid(alpha * gate)``."""

    def __init__(self, alpha: float, limit: float):
        super().__init__()
        self.alpha = alpha
        self.limit = limit

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


class QuantizedLinear(nn.Module):
    """A bias-optional linear layer whose weight stays packed; for shared experts and dense layers."""

    def __init__(
        self,
        spec: WeightSpec,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        self.spec = spec
        self.out_features, self.in_features = spec.shape
        self.packed = PackedGroup(spec, 1, device)
        self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_packed(cls, weight: PackedWeight, bias: torch.Tensor | None = None) -> "QuantizedLinear":
        """Build from a weight's stored parts (and an optional dense bias), on the parts' device."""
        device = next(iter(weight.parts.values())).device
        dtype = bias.dtype if bias is not None else torch.bfloat16
        module = cls(weight.spec, bias=bias is not None, device=device, dtype=dtype)
        module.packed.set_parts(0, weight.parts)
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.packed.dequantize(0, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantizedExperts(nn.Module):
    """The routed experts of one MoE layer, packed, each expert with its own scheme.

    A drop-in for transformers' fused experts modules (``MixtralExperts``,
    ``Qwen3MoeExperts``, ...): ``forward(hidden_states [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]``.  Expert ``e`` computes
    ``down_e(activation(gate_e(x), up_e(x)))``; its output is scaled by the
    token's routing weight and summed.

    ``bias`` adds per-expert biases named as gpt-oss names them:
    ``gate_up_proj_bias [E, 2I]`` (gate and up ``"interleaved"`` or
    ``"concatenated"``) and ``down_proj_bias [E, H]``.
    """

    def __init__(
        self,
        gate: Sequence[WeightSpec],
        up: Sequence[WeightSpec],
        down: Sequence[WeightSpec],
        activation: nn.Module | None = None,
        bias: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        if not len(gate) == len(up) == len(down):
            raise ValueError(f"gate, up and down need one spec per expert, got {len(gate)}, {len(up)}, {len(down)}")
        self.gate_proj = PackedExperts(gate, device)
        self.up_proj = PackedExperts(up, device)
        self.down_proj = PackedExperts(down, device)
        intermediate, hidden = self.gate_proj.shape
        if self.up_proj.shape != (intermediate, hidden) or self.down_proj.shape != (hidden, intermediate):
            raise ValueError(
                f"expert shapes do not chain: gate {list(self.gate_proj.shape)}, up {list(self.up_proj.shape)}, "
                f"down {list(self.down_proj.shape)} (need [I, H], [I, H], [H, I])"
            )
        self.num_experts = len(gate)
        self.hidden_dim = hidden
        self.intermediate_dim = intermediate
        self.activation = activation if activation is not None else GatedActivation()
        if bias not in (None, "interleaved", "concatenated"):
            raise ValueError(f"bias must be None, 'interleaved' or 'concatenated', got {bias!r}")
        self.bias_layout = bias
        #: the CUDA kernels' flat copy of the packed parts, once adopted (see :meth:`adopt_kernel_store`)
        self.kernel_store = None
        #: True once the kernels declined this layer (a scheme or group size they cannot read)
        self.kernel_declined = False
        if bias is None:
            self.gate_up_proj_bias = self.down_proj_bias = None
        else:
            shape_gu, shape_d = (self.num_experts, 2 * intermediate), (self.num_experts, hidden)
            self.gate_up_proj_bias = nn.Parameter(torch.empty(shape_gu, device=device, dtype=dtype), requires_grad=False)
            self.down_proj_bias = nn.Parameter(torch.empty(shape_d, device=device, dtype=dtype), requires_grad=False)

    @classmethod
    def from_packed(
        cls,
        gate: Sequence[PackedWeight],
        up: Sequence[PackedWeight],
        down: Sequence[PackedWeight],
        activation: nn.Module | None = None,
        gate_up_bias: torch.Tensor | None = None,
        down_bias: torch.Tensor | None = None,
        bias_layout: str = "concatenated",
    ) -> "QuantizedExperts":
        """Build from each expert's stored parts, on the parts' device; biases are optional."""
        device = next(iter(gate[0].parts.values())).device
        has_bias = gate_up_bias is not None or down_bias is not None
        if has_bias and (gate_up_bias is None or down_bias is None):
            raise ValueError("give both gate_up_bias and down_bias, or neither")
        module = cls(
            [w.spec for w in gate], [w.spec for w in up], [w.spec for w in down], activation,
            bias=bias_layout if has_bias else None, device=device,
            dtype=gate_up_bias.dtype if has_bias else torch.bfloat16,
        )
        for packed, weights in ((module.gate_proj, gate), (module.up_proj, up), (module.down_proj, down)):
            for expert, weight in enumerate(weights):
                packed.set_parts(expert, weight.parts)
        if has_bias:
            module.gate_up_proj_bias.data.copy_(gate_up_bias)
            module.down_proj_bias.data.copy_(down_bias)
        return module

    def _gate_up_bias(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        bias = self.gate_up_proj_bias[expert].to(dtype)
        if self.bias_layout == "interleaved":
            return bias[0::2], bias[1::2]
        return bias[: self.intermediate_dim], bias[self.intermediate_dim :]

    @property
    def fusable(self) -> bool:
        """Whether a fused SiLU-GLU MoE kernel computes this layer: no biases, ``silu(gate) * up``."""
        act = getattr(self.activation, "act", None)
        return self.bias_layout is None and type(self.activation) is GatedActivation and type(act).__name__ in (
            "SiLU", "SiLUActivation"
        )

    def weight(self, proj: str, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Expert ``expert``'s ``proj`` ("gate", "up", "down") weight, dequantized to ``[out, in]`` of ``dtype``."""
        packed = getattr(self, f"{proj}_proj")
        if self.kernel_store is None:
            return packed.dequantize(expert, dtype)
        stored = self.kernel_store.weight(proj, expert)
        return backend.dequantize(dict(stored.parts), packed.spec(expert), dtype)

    def adopt_kernel_store(self, store) -> None:
        """Keep the packed parts only in the CUDA kernels' flat layout (``kernels.PackedExperts``).

        The kernels copy every part into their own buffers; holding both would
        double the experts' memory, so the grouped buffers are emptied and the
        torch path reads views of the kernels' copy from then on.  The flat
        buffers are registered here, so they count among the module's buffers.
        """
        self.kernel_store = store
        for name in ("u8", "f16", "f32", "lanes", "offsets", "fragment_offsets"):
            self.register_buffer(f"kernel_{name}", getattr(store, name), persistent=False)
        for packed in (self.gate_proj, self.up_proj, self.down_proj):
            for group in packed.groups:
                for suffix in group.spec.layout:
                    setattr(group, suffix, getattr(group, suffix).new_empty(group.count, 0))

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``expert`` on rows ``x [n, H]`` (unweighted), dequantizing its three weights for this call."""
        gate = F.linear(x, self.weight("gate", expert, x.dtype))
        up = F.linear(x, self.weight("up", expert, x.dtype))
        if self.gate_up_proj_bias is not None:
            gate_bias, up_bias = self._gate_up_bias(expert, x.dtype)
            gate, up = gate + gate_bias, up + up_bias
        out = F.linear(self.activation(gate, up), self.weight("down", expert, x.dtype))
        if self.down_proj_bias is not None:
            out = out + self.down_proj_bias[expert].to(x.dtype)
        return out

    def routed_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """The torch path: token/expert pairs sorted by expert, each active expert run once on its rows."""
        top_k = top_k_index.shape[-1]
        flat_index = top_k_index.reshape(-1)
        flat_weights = top_k_weights.reshape(-1)
        order = torch.argsort(flat_index, stable=True)
        counts = torch.bincount(flat_index, minlength=self.num_experts)[: self.num_experts].tolist()
        out = torch.zeros_like(hidden_states)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            pairs = order[start : start + count]
            start += count
            tokens = pairs // top_k
            rows = self.expert_forward(expert, hidden_states[tokens]) * flat_weights[pairs, None]
            out.index_add_(0, tokens, rows.to(out.dtype))
        return out

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        fused = backend.fused_moe(self, hidden_states, top_k_index, top_k_weights)
        if fused is not None:
            return fused
        return self.routed_forward(hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
            f"intermediate_dim={self.intermediate_dim}, bias={self.bias_layout}"
        )
