"""Triton kernels for moeconv weights on CUDA GPUs: dequantization and a fused MoE layer.

The loader calls three things:

``available(device) -> bool``
    Whether the kernels run on ``device``: a CUDA GPU of compute capability
    8.0 or newer with Triton installed (or any CPU tensor when
    ``TRITON_INTERPRET=1`` is set, which is how CI tests them).

``dequantize(parts, scheme, shape, group_size, double_quant=False, out_dtype=torch.bfloat16)``
    One stored weight (``{suffix: tensor}`` exactly as ``tensor_layout``
    says, on the GPU) to its logical [out, in] matrix, equal bit for bit to the
    spec's float32 formula rounded to ``out_dtype``.

``fused_moe(hidden[T, H], topk_ids[T, k], topk_weights[T, k], experts) -> [T, H]``
    The routed-experts output of a Mixtral-style layer,
    ``sum_j topk_weights[t, j] * down_e(silu(gate_e x_t) * up_e x_t)`` with
    ``e = topk_ids[t, j]``, in ``hidden``'s dtype (bfloat16 or float16).
    Router weights are applied as given (normalise them before, as the model
    does).  ``experts`` is a ``PackedExperts``.

The packed expert set (``PackedExperts``, built once per layer at load time)::

    experts = PackedExperts.build(
        gate=[PackedWeight(parts, scheme, group_size, double_quant) for each expert],  # [I, H]
        up=[...],                                                                       # [I, H]
        down=[...],                                                                     # [H, I]
        hidden=H, intermediate=I)

Each ``PackedWeight`` holds the parts of one stored weight (for Mixtral
``experts.{e}.w1`` is gate, ``w3`` up, ``w2`` down).  Experts may mix schemes
(int2/3/4/8, symmetric or not, nf4/fp4 with or without double quantization,
mxfp4) and group sizes; ``build`` copies all parts into three flat buffers
(u8, f16, f32) with a per-expert offset table, so one kernel launch serves
every expert; the input tensors can be dropped afterwards, and
``experts.weight(proj, e)`` returns views for a torch fallback.  A weight the
kernels cannot read (``unsupported(...)`` says why: group sizes without a
power-of-two divisor >= 16, nf4/fp4 blocks straddling rows) makes ``build``
raise ``ValueError``: the loader should then keep its torch path for that
layer.

On Hopper GPUs (and in the interpreter), ``build`` stores the int2/3/4/8, nf4 and fp4
experts of whole 16 x 64 tiles in the fragment layout (``fragments``), read
by the fragment kernels (``fragment_moe``): tensor-core products at every
batch size with weights dequantized in the registers that feed them.  The
other experts of the layer run in the original kernels (``moe``), in the
same call.  ``MOECONV_FRAGMENTS=0`` keeps every expert in the original ones.

Every launch goes through ``launch.launch``, which relaunches a compiled
kernel without Triton's per-call dispatch (a decode step is short enough on
the GPU for that dispatch to be what eager decoding waits for).  Once a
layer has run in a dtype (the first call builds its scale pairs), ``fused_moe``
does not synchronise with the host, so decode steps can be captured in CUDA
graphs (``benchmarks/decode_e2e.py`` does).
"""

from __future__ import annotations

import os

import torch

from .experts import PROJECTIONS, PackedExperts, PackedWeight
from .specs import unsupported

__all__ = ["available", "dequantize", "fused_moe", "unsupported", "PackedExperts", "PackedWeight", "PROJECTIONS"]


def available(device) -> bool:
    """True when the kernels can run on ``device`` (see the module docstring)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    device = torch.device(device)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return device.type == "cpu"
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def dequantize(parts, scheme: str, shape, group_size: int, double_quant: bool = False,
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """One weight's logical [out, in] matrix in ``out_dtype``; see ``dequant.dequantize``."""
    from .dequant import dequantize as _dequantize

    return _dequantize(parts, scheme, shape, group_size, double_quant, out_dtype)


def fused_moe(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              experts: PackedExperts) -> torch.Tensor:
    """Routed-experts output [T, H] of a MoE layer; see ``moe.fused_moe``."""
    from .moe import fused_moe as _fused_moe

    return _fused_moe(hidden, topk_ids, topk_weights, experts)
