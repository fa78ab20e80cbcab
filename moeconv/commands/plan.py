"""``moeconv plan``: the per-expert allocation convert would use, its signals and predicted size; writes nothing."""

from __future__ import annotations

import json
from collections import Counter

import click

from moeconv.alloc import Plan, plan_allocation, spec_label
from moeconv.alloc.options import allocation_kwargs, allocation_options

#: Signals shown as table columns (all of them are in --json).
_COLUMNS = ("lambda", "router_norm", "reference_router_norm", "maxvar", "rank", "routed_tokens", "routing_mass", "damage")


def _damage_of_choice(choice) -> float | None:
    return choice.signals.get(f"damage[{spec_label(choice.spec)}]")


def render(plan: Plan) -> str:
    """The human-readable plan: header, notes, per-expert table, per-layer summary, predicted size."""
    budget = "no budget (uniform --scheme)" if plan.avg_bits is None else (
        f"{plan.avg_bits:g} {'stored' if plan.budget_mode == 'stored' else 'code'} bits per routed-expert weight "
        f"(at most {plan.budget_bits} bits)"
    )
    lines = [f"allocation: {plan.alloc}; budget: {budget}"]
    lines += [f"note: {note}" for note in plan.notes]
    columns = [c for c in _COLUMNS if c != "damage" and any(c in ch.signals for ch in plan.choices)]
    show_damage = any(_damage_of_choice(ch) is not None for ch in plan.choices)
    header = ["layer", "expert", "choice", "stored_bits", *columns] + (["damage"] if show_damage else [])
    rows = [header]
    for ch in plan.choices:
        row = [str(ch.layer), str(ch.expert), spec_label(ch.spec), str(ch.stored_bits)]
        row += [f"{ch.signals[c]:.6g}" for c in columns]
        if show_damage:
            row.append(f"{_damage_of_choice(ch):.6g}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("per layer:")
    for layer in sorted({ch.layer for ch in plan.choices}):
        counts = Counter(spec_label(ch.spec) for ch in plan.choices if ch.layer == layer)
        lines.append(f"  layer {layer}: " + ", ".join(f"{label} x{n}" for label, n in sorted(counts.items())))
    predicted = plan.to_dict()["predicted"]
    lines.append(
        f"predicted: {predicted['routed_expert_weights']} routed-expert weights in {predicted['stored_bytes']} bytes; "
        f"{predicted['avg_bits_per_expert_weight']:.4f} stored bits/weight, "
        f"{predicted['avg_code_bits_per_expert_weight']:.4f} code bits/weight"
    )
    return "\n".join(lines)


@click.command("plan")
@click.argument("src")
@allocation_options
@click.option("--calib", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Calibration text file (sensitivity, frequency).")
@click.option("--scheme", default=None, help="uniform: the scheme for every expert; level allocators: int or int-sym family.")
@click.option("--group-size", type=int, default=None, help="Group size of the levels (default 64); restricts sensitivity's candidates.")
@click.option("--method", type=click.Choice(["rtn", "gptq", "awq"]), default="rtn", show_default=True,
              help="The quantizer convert will use: sensitivity measures its damage (gptq: int candidates only).")
@click.option("--device", default=None, help="Torch device for calibration (default: cuda if available, else cpu).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def command(src, calib, scheme, group_size, method, device, as_json, **allocation) -> None:
    """Show which scheme every routed expert of SRC would get, why, and the predicted size. Writes nothing."""
    try:
        plan = plan_allocation(src, calib=calib, scheme=scheme, group_size=group_size, method=method, device=device,
                               **allocation_kwargs(**allocation))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(plan.to_dict(), indent=1) if as_json else render(plan))
