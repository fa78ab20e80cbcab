"""Where quantized compute runs: the CUDA kernels package when it can, else the torch path.

The modules call only these functions, so the kernels stay optional: the
package (``moeconv_torch.kernels``, Triton) may be absent, unimportable (no
Triton), or decline a device (``kernels.available``) or a weight
(``kernels.specs.unsupported``, ``PackedExperts.build`` raising), and
everything still runs through the torch dequantize-then-matmul path, on CPU
and on any GPU.  Kernels are used for CUDA tensors only: Triton's CPU
interpreter is for testing the kernels, far too slow to serve.

Interface used: ``kernels.available(device)``,
``kernels.dequantize(parts, scheme, shape, group_size, double_quant, out_dtype)``,
``kernels.specs.unsupported(scheme, shape, group_size, fused=False)``,
``kernels.PackedExperts.build(gate, up, down, hidden=, intermediate=)`` (of
``kernels.PackedWeight(parts, scheme, group_size, double_quant)``; raises
``ValueError`` for weights the kernels cannot read) and
``kernels.fused_moe(hidden, topk_ids, topk_weights, packed_experts)``.  The
fused kernel computes ``silu(gate) * up`` experts without biases
(:attr:`QuantizedExperts.fusable`); the first CUDA forward of such a layer
moves its packed parts into the kernels' layout
(:meth:`QuantizedExperts.adopt_kernel_store`), so they are held once.
"""

from __future__ import annotations

from functools import cache
from types import ModuleType

import torch

from .dequant import dequantize_unchecked

__all__ = ["kernels_for", "fused_moe", "dequantize"]


@cache
def _kernels() -> ModuleType | None:
    try:
        from . import kernels
    except ImportError:
        return None
    return kernels


#: device -> the kernels package or None, decided once per device (a decode step asks once per layer)
_KERNELS_ON: dict[torch.device, ModuleType | None] = {}


def kernels_for(device: torch.device) -> ModuleType | None:
    """The kernels package if it runs on ``device`` (CUDA only), else ``None``."""
    if device.type != "cuda":
        return None
    if device not in _KERNELS_ON:
        kernels = _kernels()
        _KERNELS_ON[device] = kernels if kernels is not None and kernels.available(device) else None
    return _KERNELS_ON[device]


def _kernel_store(kernels: ModuleType, experts):
    """The kernels' packed copy of a layer's experts, built on first use; ``None`` if they cannot read it."""
    if experts.kernel_store is None and not experts.kernel_declined:
        projs = (experts.gate_proj, experts.up_proj, experts.down_proj)
        weights = [
            [kernels.PackedWeight(p.parts(e), *p.spec(e).format) for e in range(experts.num_experts)] for p in projs
        ]
        try:
            store = kernels.PackedExperts.build(
                *weights, hidden=experts.hidden_dim, intermediate=experts.intermediate_dim
            )
        except ValueError:
            experts.kernel_declined = True
            return None
        experts.adopt_kernel_store(store)
    return experts.kernel_store


def fused_moe(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """The fused MoE kernel's output for a :class:`QuantizedExperts`, or ``None`` to use the torch path."""
    kernels = kernels_for(hidden_states.device)
    if kernels is None or hidden_states.dtype not in (torch.bfloat16, torch.float16) or not experts.fusable:
        return None
    store = _kernel_store(kernels, experts)
    if store is None:
        return None
    return kernels.fused_moe(hidden_states, top_k_index, top_k_weights, store)


def dequantize(parts: dict[str, torch.Tensor], spec, dtype: torch.dtype) -> torch.Tensor:
    """One weight as ``[out, in]`` of ``dtype``: a dequant kernel on CUDA when there is one, else torch."""
    device = next(iter(parts.values())).device
    kernels = kernels_for(device)
    if (
        kernels is not None
        and dtype in (torch.bfloat16, torch.float16)
        and kernels.specs.unsupported(spec.scheme, spec.shape, spec.group_size, fused=False) is None
    ):
        return kernels.dequantize(parts, spec.scheme, spec.shape, spec.group_size, spec.double_quant, dtype)
    return dequantize_unchecked(parts, spec.scheme, spec.shape, spec.group_size, spec.double_quant).to(dtype)
