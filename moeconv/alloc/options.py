"""The allocation options shared by ``moeconv plan`` and ``moeconv convert``.

One decorator so that both commands accept exactly the same spellings and
defaults; ``allocation_kwargs`` turns the parsed values into keyword arguments
of ``plan_allocation``.  ``--calib``, ``--scheme`` and ``--group-size`` are not
here because ``convert`` already owns them (GPTQ/AWQ calibration text, the base
scheme); ``plan`` declares them itself with the same meaning.
"""

from __future__ import annotations

import click

from .budget import BUDGET_MODES
from .planner import ALLOCATORS

__all__ = ["allocation_options", "allocation_kwargs", "parse_bit_levels"]


def parse_bit_levels(text: str) -> tuple[int, ...]:
    """``"4,3,2"`` -> ``(4, 3, 2)``; anything else is a usage error naming the option."""
    try:
        levels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 4,3,2, got {text!r}", param_hint="--bit-levels") from None
    return levels


def allocation_options(command):
    """Add ``--avg-bits --alloc --bit-levels --zeta --router-reference --budget --alloc-seed`` to a click command."""
    options = [
        click.option("--avg-bits", type=float, default=None,
                     help="Average bits per routed-expert weight (every stored bit unless --budget code-bits)."),
        click.option("--alloc", type=click.Choice(ALLOCATORS), default="paper", show_default=True,
                     help="How bits are shared among experts (with --avg-bits)."),
        click.option("--bit-levels", default="4,3,2", show_default=True,
                     help="Equally spaced int bit-widths for paper/frequency/maxvar/random."),
        click.option("--zeta", type=float, default=3.0, show_default=True,
                     help="MaxVar factor of the paper's combined order."),
        click.option("--router-reference", default=None,
                     help="Routers before training: checkpoint dir, safetensors file or Hub id (true Λ)."),
        click.option("--budget", type=click.Choice(BUDGET_MODES), default="stored", show_default=True,
                     help="Count every stored bit (scales, zeros) or only the paper's code bits."),
        click.option("--alloc-seed", type=int, default=0, show_default=True, help="Seed of --alloc random."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def allocation_kwargs(avg_bits, alloc, bit_levels, zeta, router_reference, budget, alloc_seed) -> dict:
    """Keyword arguments of ``plan_allocation`` from the parsed options."""
    return {
        "avg_bits": avg_bits,
        "alloc": alloc,
        "bit_levels": parse_bit_levels(bit_levels),
        "zeta": zeta,
        "router_reference": router_reference,
        "budget": budget,
        "seed": alloc_seed,
    }
