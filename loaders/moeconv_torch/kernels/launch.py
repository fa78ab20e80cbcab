"""Launching Triton kernels again without Triton's per-call dispatch.

A decode step of one MoE layer is four or five launches of a few tens of
microseconds of GPU time each.  Triton's launch path binds and specialises
every argument, builds a cache key from them and the constexprs, and checks
the kernel's globals on each call.  On the H200 machine's host,
``benchmarks/launch_overhead.py`` timed one nf4 layer call at one token at
168 us of host time through it, for about 120 us of GPU work, so eager
decoding is bound by the host; through this module, 145 us (int4: 174
against 142; the host's figures move by tens of percent between runs).

``launch(kernel, grid, *args, **kwargs)`` keys a launch on what Triton
specialises a compiled kernel on, taken conservatively: each tensor
argument's dtype and whether its address is 16-byte aligned, the exact value
of every other positional argument, the keyword arguments (constexprs and
launch options), the grid and the current device.  The first launch with a
key goes through Triton (which compiles or finds the kernel) and keeps the
compiled kernel's launcher; later ones call that launcher directly with the
arguments in signature order.  Under ``TRITON_INTERPRET=1``, or where Triton
hands back no compiled kernel, every launch goes through Triton.
"""

from __future__ import annotations

import os

import torch

__all__ = ["launch", "cdiv", "next_power_of_2"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: launch key -> (compiled kernel, its launcher for the key's grid, names of the parameters after the positionals)
_LAUNCHERS: dict[tuple, tuple] = {}
#: keys kept before the table starts over (prefill keys on its token count: one key per prompt length)
_MAX_LAUNCHERS = 4096
#: the device Triton launches on (what its driver asks too)
_current_device = torch.cuda.current_device


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host code (``triton.cdiv`` is a constexpr function, several microseconds a call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``), for host code, as ``cdiv``."""
    return 1 << max(0, n - 1).bit_length()


def launch(kernel, grid: tuple[int, ...], *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, with the dispatch done once per key; returns the compiled kernel.

    Tensors go in ``args``; ``kwargs`` holds the constexprs and launch options
    and must name every parameter after the positional ones (the kernels here
    have no defaults).
    """
    if _INTERPRET:
        return kernel[grid](*args, **kwargs)
    key = (kernel, grid, _current_device(),
           tuple([(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in args]),
           tuple(kwargs.items()))
    known = _LAUNCHERS.get(key)
    if known is None:
        compiled = kernel[grid](*args, **kwargs)
        if compiled is None or not hasattr(compiled, "__getitem__"):
            return compiled
        if len(_LAUNCHERS) >= _MAX_LAUNCHERS:
            _LAUNCHERS.clear()
        whole_grid = tuple(grid) + (1,) * (3 - len(grid))  # a compiled kernel's launcher takes all three
        _LAUNCHERS[key] = (compiled, compiled[whole_grid], kernel.arg_names[len(args):])
        return compiled
    compiled, launcher, names = known
    launcher(*args, *[kwargs[name] for name in names])
    return compiled
