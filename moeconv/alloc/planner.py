"""``plan_allocation``: one QuantSpec per routed expert under an average-bit budget.

Allocators:

* ``paper``: the combined Λ/MaxVar order of Chowdhury et al. with equally spaced levels.
* ``frequency`` / ``maxvar`` / ``random``: other orders through the same levels and counts.
* ``uniform``: one spec for every expert (the richest one the budget allows, or ``--scheme``).
* ``sensitivity``: measured damage of every candidate on calibration text, exact knapsack.

Level allocators quantize level b as ``int{b}`` (``int{b}-sym`` when ``--scheme``
names a symmetric int scheme) at ``--group-size`` (default 64).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from moeconv_numpy.schemes import SCHEMES, scheme_info

from moeconv.quant import QuantSpec

from . import baselines, paper
from .budget import BUDGET_MODES, budget_bits, cost_matrix, expert_bits, group_size_of
from .signals import max_variance, router_signal
from .source import Expert, ExpertSource, open_source

__all__ = ["ALLOCATORS", "DEFAULT_CANDIDATES", "ExpertChoice", "Plan", "plan_allocation", "spec_label"]

ALLOCATORS = ("paper", "sensitivity", "frequency", "maxvar", "random", "uniform")
LEVEL_ALLOCATORS = ("paper", "frequency", "maxvar", "random")
NEEDS_CALIBRATION = ("sensitivity", "frequency")
DEFAULT_GROUP_SIZE = 64
UNIFORM_GROUP_SIZES = (32, 64, 128)

#: What ``sensitivity`` chooses from when no candidates are given.
DEFAULT_CANDIDATES = tuple(
    [QuantSpec(f"int{bits}", group) for bits in (2, 3, 4, 8) for group in (32, 64, 128)]
    + [QuantSpec("nf4", 64, double_quant=True)]
)


def spec_label(spec) -> str:
    """Short human form of a spec, e.g. ``int3/g64`` or ``nf4/g64+dq``."""
    dq = "+dq" if spec.double_quant and scheme_info(spec.scheme).family in ("nf4", "fp4") else ""
    return f"{spec.scheme}/g{group_size_of(spec)}{dq}"


@dataclass(frozen=True)
class ExpertChoice:
    """The spec chosen for one expert, what it costs, and the signals the choice came from."""

    layer: int
    expert: int
    spec: QuantSpec
    stored_bits: int
    code_bits: int
    numel: int
    signals: dict[str, float] = field(default_factory=dict)


@dataclass
class Plan:
    """The allocation: per-expert choices, per-weight assignment, budget, signals and notes."""

    alloc: str
    budget_mode: str
    avg_bits: float | None
    budget_bits: int | None
    choices: list[ExpertChoice]
    assignment: dict[str, QuantSpec]
    notes: list[str]
    settings: dict

    @property
    def by_expert(self) -> dict[tuple[int, int], QuantSpec]:
        return {(c.layer, c.expert): c.spec for c in self.choices}

    @property
    def stored_bits(self) -> int:
        return sum(c.stored_bits for c in self.choices)

    @property
    def code_bits(self) -> int:
        return sum(c.code_bits for c in self.choices)

    @property
    def numel(self) -> int:
        return sum(c.numel for c in self.choices)

    def to_dict(self) -> dict:
        """JSON-ready form (the output of ``moeconv plan --json``)."""
        return {
            "alloc": self.alloc,
            "settings": self.settings,
            "budget": {
                "mode": self.budget_mode,
                "avg_bits": self.avg_bits,
                "limit_bits": self.budget_bits,
            },
            "predicted": {
                "routed_expert_weights": self.numel,
                "stored_bits": self.stored_bits,
                "stored_bytes": self.stored_bits // 8,
                "code_bits": self.code_bits,
                "avg_bits_per_expert_weight": self.stored_bits / self.numel,
                "avg_code_bits_per_expert_weight": self.code_bits / self.numel,
            },
            "notes": self.notes,
            "experts": [
                {
                    "layer": c.layer,
                    "expert": c.expert,
                    "scheme": c.spec.scheme,
                    "group_size": group_size_of(c.spec),
                    "double_quant": bool(c.spec.double_quant),
                    "stored_bits": c.stored_bits,
                    "code_bits": c.code_bits,
                    "signals": c.signals,
                }
                for c in self.choices
            ],
        }


def _level_specs(levels, scheme: str | None, group_size: int | None) -> list[QuantSpec]:
    suffix = ""
    if scheme is not None:
        info = scheme_info(scheme)
        if info.family != "int":
            raise ValueError(f"level allocators quantize with an int scheme; --scheme {scheme!r} is not one")
        suffix = "-sym" if info.symmetric else ""
    missing = [bits for bits in levels if f"int{bits}" not in SCHEMES]
    if missing:
        raise ValueError(f"--bit-levels: no int scheme has {missing[0]} bits (int schemes have 2, 3, 4 or 8 bits)")
    return [QuantSpec(f"int{bits}{suffix}", group_size or DEFAULT_GROUP_SIZE) for bits in levels]


def _grid(source: ExpertSource, values: dict[tuple[int, int], float]) -> np.ndarray:
    out = np.zeros((source.n_layers, source.n_experts))
    for (layer, expert), value in values.items():
        out[source.position[layer], expert] = value
    return out


def plan_allocation(
    src,
    *,
    avg_bits: float | None = None,
    alloc: str = "paper",
    bit_levels: tuple[int, ...] = (4, 3, 2),
    zeta: float = 3.0,
    router_reference: str | Path | None = None,
    calib=None,
    budget: str = "stored",
    scheme: str | None = None,
    group_size: int | None = None,
    seed: int = 0,
    candidates: list[QuantSpec] | None = None,
    calib_stats=None,
    method: str = "rtn",
    device: str | None = None,
    calib_samples: int = 128,
    calib_seq_len: int = 512,
) -> Plan:
    """Choose a QuantSpec for every routed expert of ``src`` (checkpoint path, ``moeconv.source.Source`` or ``ExpertSource``).

    ``calib`` (a text file: ``calib_samples`` windows of ``calib_seq_len``
    tokens) or ``calib_stats`` (a ``CalibrationStats`` already measured) feed
    ``sensitivity`` and ``frequency``; ``method`` is the quantizer whose damage
    ``sensitivity`` measures (``gptq`` limits the candidates to int schemes).
    Signals are read from the memory-mapped checkpoint; nothing is written.
    """
    if alloc not in ALLOCATORS:
        raise ValueError(f"--alloc must be one of {', '.join(ALLOCATORS)}, got {alloc!r}")
    if budget not in BUDGET_MODES:
        raise ValueError(f"--budget must be one of {', '.join(BUDGET_MODES)}, got {budget!r}")
    if avg_bits is None and alloc != "uniform":
        raise ValueError(f"--alloc {alloc} needs --avg-bits")
    source = open_source(src)
    experts = source.experts
    limit = budget_bits(experts, avg_bits) if avg_bits is not None else None
    settings = {"bit_levels": list(bit_levels), "zeta": zeta, "router_reference": str(router_reference) if router_reference else None,
                "scheme": scheme, "group_size": group_size, "seed": seed, "calib": str(calib) if calib else None,
                "method": method}
    notes: list[str] = []
    signals: dict[str, np.ndarray] = {}

    if alloc in ("paper", "maxvar"):
        signals["maxvar"] = max_variance(source)
    if alloc == "paper":
        router = router_signal(source, router_reference)
        notes.append(router.note)
        signals["lambda"] = router.lam
        signals["router_norm"] = router.final_norm
        if router.reference_norm is not None:
            signals["reference_router_norm"] = router.reference_norm
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if alloc in NEEDS_CALIBRATION:
        if calib_stats is None:
            if calib is None:
                raise ValueError(f"--alloc {alloc} needs --calib FILE (calibration text)")
            calib_stats = _calibrate(source, calib, alloc == "sensitivity", calib_samples, calib_seq_len, device)
        signals["routed_tokens"] = _grid(source, calib_stats.tokens)
        signals["routing_mass"] = _grid(source, calib_stats.mass)
        notes.append(f"calibration: {calib_stats.description}")

    if alloc in LEVEL_ALLOCATORS:
        specs = _level_specs(bit_levels, scheme, group_size)
        orders = {
            "paper": lambda: paper.paper_orders(signals.get("lambda"), signals.get("maxvar"), zeta),
            "frequency": lambda: baselines.frequency_order(signals["routed_tokens"]),
            "maxvar": lambda: baselines.maxvar_order(signals["maxvar"]),
            "random": lambda: baselines.random_order(source.n_layers, source.n_experts, seed),
        }[alloc]()
        chosen = _by_levels(source, orders, specs, bit_levels, budget, avg_bits)
        signals["rank"] = np.argsort(orders, axis=1).astype(float)
    elif alloc == "uniform":
        spec = _uniform_spec(experts, budget, limit, scheme, group_size, candidates)
        chosen = {(e.layer, e.expert): spec for e in experts}
    else:
        from .sensitivity import allocate

        pool = list(candidates or DEFAULT_CANDIDATES)
        if group_size is not None:
            pool = [s for s in pool if group_size_of(s) == group_size]
        if method == "gptq":
            pool = [s for s in pool if scheme_info(s.scheme).family == "int"]
        if budget == "code-bits" and len({group_size_of(s) for s in pool}) > 1:
            notes.append("--budget code-bits does not charge for scales, so smaller groups look free; "
                         "pass --group-size to compare bit-widths at one group size")
        chosen, damages = allocate(source, calib_stats, pool, budget, limit, "gptq" if method == "gptq" else "rtn", device)
        notes.append(f"sensitivity: damage of {'GPTQ' if method == 'gptq' else 'round-to-nearest'} measured for "
                     f"{len(pool)} candidates per expert ({', '.join(spec_label(s) for s in pool)}), exact knapsack")
        for i, spec in enumerate(pool):
            signals[f"damage[{spec_label(spec)}]"] = _grid(source, {k: v[i] for k, v in damages.items()})

    return _plan(source, alloc, budget, avg_bits, limit, chosen, signals, notes, settings)


def _calibrate(source, calib, loss_weighted, n_samples, seq_len, device):
    """Run the source model on the calibration text once (forward, and backward for loss weights)."""
    from .calibration import load_model_and_ids, measure

    model, ids = load_model_and_ids(source.source.path, calib, n_samples, seq_len, 0, device)
    description = (f"{ids.numel()} tokens of {calib} ({ids.shape[0]} x {ids.shape[1]})"
                   + ("; damages weighted by routing weight^2 x loss-gradient norm^2" if loss_weighted else ""))
    stats = measure(model, ids, loss_weighted=loss_weighted, description=description)
    del model
    return stats


def _by_levels(source, orders, specs, levels, budget, avg_bits) -> dict[tuple[int, int], QuantSpec]:
    numel = sum(e.numel for e in source.experts)
    costs = tuple(cost_matrix(source.experts, specs, budget).sum(axis=0) / numel)
    counts = paper.level_counts(source.n_layers, source.n_experts, tuple(levels), costs, avg_bits)
    level = paper.assign_levels(orders, counts)
    return {(e.layer, e.expert): specs[level[source.position[e.layer], e.expert]] for e in source.experts}


def _uniform_spec(experts: list[Expert], budget, limit, scheme, group_size, candidates) -> QuantSpec:
    if limit is None:
        if scheme is None:
            raise ValueError("--alloc uniform needs --avg-bits or --scheme")
        return QuantSpec(scheme, group_size)
    if candidates:
        pool = list(candidates)
    else:
        schemes = [scheme] if scheme else [f"int{b}" for b in (2, 3, 4, 8)]
        groups = [group_size] if group_size else list(UNIFORM_GROUP_SIZES)
        pool = [QuantSpec(s, g) for s in schemes for g in groups]
    fits = [s for s, cost in zip(pool, cost_matrix(experts, pool, budget).sum(axis=0)) if cost <= limit]
    if not fits:
        raise ValueError(f"--alloc uniform: no candidate ({', '.join(spec_label(s) for s in pool)}) fits the budget")
    return max(fits, key=lambda s: (scheme_info(s.scheme).bits, -group_size_of(s)))


def _plan(source, alloc, budget, avg_bits, limit, chosen, signals, notes, settings) -> Plan:
    choices, assignment = [], {}
    rows = {name: np.asarray(grid, dtype=float).tolist() for name, grid in signals.items()}
    for e in source.experts:
        spec = chosen[(e.layer, e.expert)]
        values = {name: grid[source.position[e.layer]][e.expert] for name, grid in rows.items()}
        choices.append(ExpertChoice(e.layer, e.expert, spec, expert_bits(e, spec, "stored"), expert_bits(e, spec, "code-bits"), e.numel, values))
        assignment.update({item.name: spec for item in e.weights.values()})
    plan = Plan(alloc, budget, avg_bits, limit, choices, assignment, notes, settings)
    used = plan.stored_bits if budget == "stored" else plan.code_bits
    if limit is not None and used > limit:
        notes.append(f"over the budget by {used - limit} bits (under one expert's worth): level counts are rounded to whole experts")
    return plan
