"""Triton kernels on one GPU, side by side in one run: dequant bandwidth, MoE decode and prefill vs BF16.

    python benchmarks/moe_kernels.py --out benchmarks/results/moe_kernels_h200.json [--sweep] [--fragment-sweep]

Shapes are Mixtral-8x7B's MoE layer (hidden 4096, intermediate 14336, 8
experts, top-2).  Packed weights are random bytes and random scales in the
exact stored layout (the kernels' speed does not depend on the values; their
numerics are checked by tests/test_kernels_*.py and, at these sizes, by the
``check`` entries below against BF16 matmuls on the dequantized weights).

Timing: CUDA events around CUDA-graph replays (each graph holds several calls
on different inputs and routings, so launch gaps and cache reuse do not
flatter anyone), median of repeats; eager timings are reported beside them.
``--sweep`` also times alternative tilings, which is how the defaults in
``moeconv_torch.kernels`` were chosen.  ``--parts``, ``--sets`` and
``--batches`` narrow a run to some sections, expert sets and decode batch
sizes (a full run with ``--sweep`` takes longer than one device command may);
the ``targets`` summary needs a full run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from moeconv_numpy.schemes import tensor_layout
from moeconv_torch import kernels
from moeconv_torch.kernels import PackedExperts, PackedWeight
from moeconv_torch.kernels import dequant as kdequant
from moeconv_torch.kernels import fragment_moe as kfrag
from moeconv_torch.kernels import moe as kmoe

H, I, E, TOPK = 4096, 14336, 8, 2
DEV = "cuda"
DEQUANT_CASES = [("int2", 64, False), ("int3", 64, False), ("int4", 64, False), ("int8", 64, False),
                 ("int4-sym", 64, False), ("nf4", 64, False), ("nf4", 64, True), ("fp4", 64, False),
                 ("fp4", 64, True), ("mxfp4", 32, False)]
EXPERT_SETS = {
    "nf4": [("nf4", 64, True)] * E,
    "int4": [("int4", 64, False)] * E,
    "mixed_4.25": [("int2", 64, False)] * 2 + [("int3", 64, False)] * 2 + [("int4", 64, False)] * 2
    + [("int8", 64, False)] * 2,
    "mixed_4.0": [("int3", 64, False)] * 4 + [("int4", 64, False)] * 3 + [("int8", 64, False)],
    "mixed_int_4.0": [("int2", 64, False)] * 2 + [("int4", 64, False)] * 4 + [("int8", 64, False)] * 2,
    # The same int4 experts outside the fragment layout: the kernels of sessions 1-5, for A/B runs.
    "int4_legacy": [("int4", 64, False)] * E,
    "int8": [("int8", 64, False)] * E,
    "int2": [("int2", 64, False)] * E,
    "int3": [("int3", 64, False)] * E,
}


def log(*args):
    print(*args, flush=True)


def events_ms(fn, reps=20, warmup=3) -> float:
    """Median milliseconds of ``fn`` between CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(calls, reps=20) -> float:
    """Median milliseconds per call of a CUDA graph that replays ``calls`` in order."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    return events_ms(graph.replay, reps=reps) / len(calls)


def kernel_ms(fn, calls=5) -> float:
    """Milliseconds of one ``fn()`` on the GPU alone: replayed from a CUDA graph, so that Python's launch
    overhead (tens of microseconds, as long as a whole dequantization) is not counted."""
    return graph_ms([fn] * calls)


def eager_ms(calls, reps=10) -> float:
    def run():
        for c in calls:
            c()
    return events_ms(run, reps=reps) / len(calls)


def random_parts(scheme, shape, group_size, double_quant, gen):
    """Random parts in the stored layout with weight-like magnitudes (no inf/NaN)."""
    parts = {}
    for suffix, (dtype, dims) in tensor_layout(scheme, shape, group_size, double_quant).items():
        if dtype == "U8":
            low, high = (118, 124) if (scheme == "mxfp4" and suffix == "scales") else (0, 256)
            parts[suffix] = torch.randint(low, high, dims, dtype=torch.uint8, device=DEV, generator=gen)
        elif suffix == "zeros":
            bits = int(scheme[3])
            parts[suffix] = (torch.rand(dims, device=DEV, generator=gen) * (2**bits - 1)).half()
        elif suffix == "absmax_offset":
            parts[suffix] = torch.full(dims, 0.05, device=DEV)
        else:
            x = torch.rand(dims, device=DEV, generator=gen) * 0.01 + 0.001
            parts[suffix] = x.half() if dtype == "F16" else x.float() * 10
    return parts


def nbytes(parts) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def copy_bandwidth() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = events_ms(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() / ms / 1e9  # TB/s: bytes read + written


def fill_bandwidth() -> float:
    """TB/s of a write-only pass (``fill_``): dequantization writes 4x more bytes than it reads."""
    dst = torch.empty(2**30, dtype=torch.uint8, device=DEV)
    ms = events_ms(lambda: dst.fill_(1), reps=20)
    return dst.numel() / ms / 1e9


def bench_dequant(copy_bw, sweep, gen, bnb):
    shape = (I, H)
    out = {"shape": list(shape), "rows": [], "sweep": []}
    tilings = [kdequant.DequantTiling(elems, warps)
               for elems, warps in [(2048, 4), (4096, 4), (8192, 4), (8192, 8), (16384, 8)]]
    if sweep:
        for scheme, gs, dq in [("int4", 64, False), ("int3", 64, False), ("nf4", 64, True), ("int8", 64, False)]:
            parts = random_parts(scheme, shape, gs, dq, gen)
            moved = nbytes(parts) + 2 * I * H
            for tiling in tilings:
                ms = kernel_ms(lambda: kdequant.dequantize(parts, scheme, shape, gs, dq, tiling=tiling))
                out["sweep"].append({"scheme": scheme, "double_quant": dq, "tiling": tiling.__dict__,
                                     "ms": ms, "TBps": moved / ms / 1e9})
                log(f"  sweep dequant {scheme:8s} dq={dq:d} {tiling} {moved / ms / 1e9:.2f} TB/s")
    for scheme, gs, dq in DEQUANT_CASES:
        parts = random_parts(scheme, shape, gs, dq, gen)
        moved = nbytes(parts) + 2 * I * H
        ms = kernel_ms(lambda: kernels.dequantize(parts, scheme, shape, gs, dq, torch.bfloat16))
        row = {"scheme": scheme, "group_size": gs, "double_quant": dq, "ms": ms, "packed_bytes": nbytes(parts),
               "TBps": moved / ms / 1e9, "fraction_of_copy": moved / ms / 1e9 / copy_bw}
        out["rows"].append(row)
        log(f"dequant {scheme:8s} dq={dq:d} {ms * 1e3:7.1f} us {row['TBps']:.2f} TB/s ({row['fraction_of_copy']:.0%})")
    if bnb is not None:
        w = torch.randn(shape, device=DEV, dtype=torch.bfloat16) * 0.02
        for dq in (False, True):
            q, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
            packed = q.numel() + state.absmax.numel() * state.absmax.element_size()
            if dq:
                packed += state.state2.absmax.numel() * 4 + state.state2.code.numel() * 4
            try:
                ms = kernel_ms(lambda: bnb.functional.dequantize_4bit(q, state))
            except RuntimeError:  # not capturable in a graph: time it eagerly (launch overhead included)
                ms = events_ms(lambda: bnb.functional.dequantize_4bit(q, state))
            moved = packed + 2 * I * H
            out["rows"].append({"scheme": "bitsandbytes-nf4", "group_size": 64, "double_quant": dq, "ms": ms,
                                "TBps": moved / ms / 1e9, "fraction_of_copy": moved / ms / 1e9 / copy_bw})
            log(f"dequant bnb-nf4  dq={dq:d} {ms * 1e3:7.1f} us {moved / ms / 1e9:.2f} TB/s")
    return out


def build_experts(quants, gen, fragments_allowed=None) -> tuple[PackedExperts, int]:
    """A packed expert set from per-expert (scheme, group, dq); also its stored bytes."""
    lists = {"gate": [], "up": [], "down": []}
    for scheme, gs, dq in quants:
        for proj in lists:
            shape = (H, I) if proj == "down" else (I, H)
            lists[proj].append(PackedWeight(random_parts(scheme, shape, gs, dq, gen), scheme, gs, dq))
    packed = PackedExperts.build(lists["gate"], lists["up"], lists["down"], hidden=H, intermediate=I,
                                 fragments_allowed=fragments_allowed)
    stored = sum(nbytes(w.parts) for ws in lists.values() for w in ws)
    return packed, stored


def expert_bytes(experts: PackedExperts) -> list[int]:
    """Stored bytes of each expert (all three projections)."""
    return [sum(nbytes(experts.weight(p, e).parts) for p in ("gate", "up", "down")) for e in range(E)]


class Bf16Layer:
    """The BF16 baseline: transformers' per-expert loop (gather tokens, three matmuls, index_add)."""

    def __init__(self, gen):
        self.w1 = torch.randn(E, I, H, device=DEV, dtype=torch.bfloat16, generator=gen) * 0.02
        self.w3 = torch.randn(E, I, H, device=DEV, dtype=torch.bfloat16, generator=gen) * 0.02
        self.w2 = torch.randn(E, H, I, device=DEV, dtype=torch.bfloat16, generator=gen) * 0.02

    @staticmethod
    def plan(ids, wts):
        """Per expert: (expert, token indices, router weights), computed once on the host like a fixed routing."""
        ids_c, out = ids.cpu(), []
        for e in range(E):
            tok, slot = torch.nonzero(ids_c == e, as_tuple=True)
            if tok.numel():
                tok, slot = tok.to(DEV), slot.to(DEV)
                out.append((e, tok, wts[tok, slot].unsqueeze(1).to(torch.bfloat16)))
        return out

    def loop(self, x, plan, weights=None):
        w1, w3, w2 = weights if weights is not None else (self.w1, self.w3, self.w2)
        out = torch.zeros_like(x)
        for e, tok, w in plan:
            xe = x[tok]
            h = F.silu(xe @ w1[e].T) * (xe @ w3[e].T)
            out.index_add_(0, tok, (h @ w2[e].T) * w)
        return out

    @staticmethod
    def grouped_plan(ids, wts):
        """Pairs sorted by expert for ``grouped``: (token of each row, router weight, expert end offsets)."""
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
        return order // TOPK, wts.reshape(-1)[order].unsqueeze(1).to(torch.bfloat16), offs

    def grouped(self, x, plan):
        """torch._grouped_mm over tokens sorted by expert (the fastest BF16 path PyTorch offers)."""
        tok, w, offs = plan
        xs = x[tok]
        g = torch._grouped_mm(xs, self.w1.transpose(1, 2), offs=offs)
        u = torch._grouped_mm(xs, self.w3.transpose(1, 2), offs=offs)
        y = torch._grouped_mm(F.silu(g) * u, self.w2.transpose(1, 2), offs=offs)
        out = torch.zeros_like(x)
        out.index_add_(0, tok, y * w)
        return out


def routings(batch, count, gen):
    """``count`` random top-2 routings of ``batch`` tokens; for batch 1 every one of the 28 expert pairs."""
    if batch == 1:
        ids = [torch.tensor([p], device=DEV) for p in itertools.combinations(range(E), 2)]
    else:
        ids = [random_topk(batch, gen) for _ in range(count)]
    wts = [torch.softmax(torch.randn(i.shape, device=DEV, generator=gen), -1) for i in ids]
    xs = [torch.randn(i.shape[0], H, device=DEV, dtype=torch.bfloat16, generator=gen) for i in ids]
    return xs, ids, wts


def random_topk(tokens, gen):
    """Each token's top-2 of 8 distinct experts, uniformly at random."""
    return torch.rand(tokens, E, device=DEV, generator=gen).argsort(-1)[:, :TOPK].contiguous()


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def check_against_bf16(experts, x, ids, wts, bf16: Bf16Layer, config=None) -> float:
    """Relative error of fused_moe vs the BF16 loop on the same weights dequantized by our kernel."""
    def dense(proj):
        mats = []
        for e in range(E):
            w = experts.weight(proj, e)
            mats.append(kernels.dequantize(w.parts, w.scheme, experts.shape(proj), w.group_size, w.double_quant))
        return torch.stack(mats)

    weights = (dense("gate"), dense("up"), dense("down"))
    want = bf16.loop(x, Bf16Layer.plan(ids, wts), weights)
    got = kmoe.fused_moe(x, ids, wts, experts, config)
    return rel_err(got, want)


def bnb_layer(gen):
    """bitsandbytes NF4 (double quant, block 64) experts and a per-expert loop using bnb.matmul_4bit."""
    import bitsandbytes as bnb

    ws = []
    for shape in [(I, H), (I, H), (H, I)]:
        row = []
        for _ in range(E):
            w = torch.randn(shape, device=DEV, dtype=torch.bfloat16, generator=gen) * 0.02
            row.append(bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True))
        ws.append(row)

    def loop(x, plan):
        out = torch.zeros_like(x)
        for e, tok, w in plan:
            xe = x[tok]
            (q1, s1), (q3, s3), (q2, s2) = ws[0][e], ws[1][e], ws[2][e]
            h = F.silu(bnb.matmul_4bit(xe, q1.t(), quant_state=s1)) * bnb.matmul_4bit(xe, q3.t(), quant_state=s3)
            out.index_add_(0, tok, bnb.matmul_4bit(h, q2.t(), quant_state=s2) * w)
        return out
    return loop


def timed(calls):
    """Graph and eager timings of a list of calls, in microseconds."""
    return {"graph_us": graph_ms(calls) * 1e3, "eager_us": eager_ms(calls) * 1e3}


DECODE_SWEEP = {
    1: [kmoe.MoeConfig("gemv", 1, bn_up, bn_dn, 64, 0, w, s, unroll=u)
        for bn_up, bn_dn, w, s, u in [(32, 64, 4, 3, 2), (64, 64, 4, 3, 4), (64, 128, 4, 3, 4), (32, 64, 4, 3, 8),
                                      (64, 64, 8, 3, 4), (128, 128, 8, 3, 4), (64, 64, 4, 3, 2)]],
    16: [kmoe.MoeConfig("dot", 16, 32, 32, 64, 0, 4, 3), kmoe.MoeConfig("dot", 16, 64, 64, 64, 0, 4, 4)],
}
PREFILL_SWEEP = [kmoe.MoeConfig("dot", bm, bn, bn, 64, 1, w, s)
                 for bm, bn, w, s in [(128, 64, 4, 4), (128, 128, 8, 3), (128, 128, 4, 4), (64, 128, 4, 4),
                                      (256, 128, 8, 3), (128, 256, 8, 3)]]
DECODE_B1 = kfrag.FragmentConfig(8, 64, 128, 13, 4, 3, up_split_k=2, warp_mma=True, scale_after_product=True,
                                 scales_ahead=True)
FRAGMENT_SWEEP = {
    # Around today's default (64-row gate/up programs in two K pieces, 128-row down programs split 13 ways,
    # scales a tile ahead, three stages): each of these changes alone.
    1: [dataclasses.replace(DECODE_B1, **change)
        for change in [{}, dict(num_stages=2), dict(num_stages=4), dict(split_k=8),
                       dict(split_k=20), dict(up_split_k=1), dict(up_split_k=3), dict(down_block_n=64)]],
    16: [kfrag.FragmentConfig(8, up, down, split, 4, 3, k_step=2, warp_mma=True, scale_after_product=True,
                              scales_ahead=ahead)
         for up, down, split, ahead in [(64, 64, 3, False), (64, 64, 3, True), (64, 128, 6, False),
                                        (64, 128, 6, True), (64, 128, 3, True)]],
    "prefill": [kfrag.FragmentConfig(128, 64, 64, 1, 4, st, k_step=k) for st, k in [(3, 1), (4, 1), (3, 2)]]
               + [kfrag.FragmentConfig(128, 64, 64, 1, 4, 3, split_gate_up=True)],
}
#: Sections a run can be limited to with ``--parts``.
PARTS = ("dequant", "decode", "prefill")


def with_split(cfg: kmoe.MoeConfig, pairs: int, n_sms: int) -> kmoe.MoeConfig:
    """A sweep config with split-K chosen the way ``choose_config`` does."""
    blocks = pairs if cfg.mode == "gemv" else min(pairs, math.ceil(pairs / cfg.block_m) + E)
    split = kmoe._split_for(blocks * math.ceil(H / cfg.down_block_n), I, kmoe.k_step(cfg), n_sms)
    return dataclasses.replace(cfg, split_k=split)


def sweep_fragments(res, sets, names, configs, run, output, figure, baseline_us, label) -> None:
    """Time ``run(experts, fragment_config)`` for each config on each named set (fragment experts only).

    Each config's output (``output(experts, config)``) is also compared with
    the default tiling's: a tiling that is fast but wrong is recorded with its
    error and never counted as the best.
    """
    res["fragment_sweep"] = []
    for name in names:
        experts, _ = sets[name]
        want = output(experts, None)
        for cfg in configs:
            try:
                us = run(experts, cfg)
                err = rel_err(output(experts, cfg), want)
            except Exception as exc:  # e.g. out of shared memory for a large tile
                res["fragment_sweep"].append({"set": name, "config": cfg.__dict__, "error": repr(exc)[:200]})
                continue
            res["fragment_sweep"].append({"set": name, "config": cfg.__dict__, "graph_us": us,
                                          "rel_err_vs_default": err})
            log(f"  fragment sweep {label} {name:5s} {cfg} {us:9.1f} us (rel err vs default {err:.1e})")
            best = res.setdefault(f"{name}_fragment_best", {})
            if err < 1e-2 and ("graph_us" not in best or us < best["graph_us"]):
                best.update(graph_us=us, config=cfg.__dict__, **{figure: baseline_us / us})


def sweep_configs(res, sets, names, configs, pairs, n_sms, run, figure, baseline_us, label) -> None:
    """Time ``run(experts, config)`` for each swept config on each named expert set.

    Every timing goes to ``res["sweep"]``; the fastest per set, with ``figure``
    = ``baseline_us`` / its time, to ``res[f"{name}_best"]``.
    """
    res["sweep"] = []
    for name in names:
        experts, _ = sets[name]
        for cfg in configs:
            cfg = with_split(cfg, pairs, n_sms)
            try:
                us = run(experts, cfg)
            except Exception as exc:  # e.g. out of shared memory for a large tile
                res["sweep"].append({"set": name, "config": cfg.__dict__, "error": repr(exc)[:200]})
                continue
            res["sweep"].append({"set": name, "config": cfg.__dict__, "graph_us": us})
            log(f"  sweep {label} {name:5s} {cfg} {us:9.1f} us")
            best = res.setdefault(f"{name}_best", dict(res[name]) if "graph_us" in res.get(name, {}) else {})
            if "graph_us" not in best or us < best["graph_us"]:
                best.update(graph_us=us, config=cfg.__dict__, **{figure: baseline_us / us})


def bench_decode(bf16, sets, sweep, gen, bnb_loop, n_sms, batches=(1, 16), fragment_sweep=False):
    out = {}
    for batch in batches:
        xs, ids, wts = routings(batch, 4, gen)
        plans = [Bf16Layer.plan(i, w) for i, w in zip(ids, wts)]
        res = {"routings": len(ids), "bf16": timed([lambda x=x, p=p: bf16.loop(x, p) for x, p in zip(xs, plans)])}
        log(f"decode b={batch:2d} bf16         {res['bf16']['graph_us']:8.1f} us (eager {res['bf16']['eager_us']:.1f})")
        if bnb_loop is not None:
            try:
                res["bitsandbytes_nf4"] = timed([lambda x=x, p=p: bnb_loop(x, p) for x, p in zip(xs, plans)])
            except Exception as exc:  # bnb kernels may refuse graph capture; fall back to eager
                res["bitsandbytes_nf4"] = {"eager_us": eager_ms([lambda x=x, p=p: bnb_loop(x, p)
                                                                 for x, p in zip(xs, plans)]) * 1e3,
                                           "graph_error": repr(exc)[:200]}
            log(f"decode b={batch:2d} bnb nf4      {res['bitsandbytes_nf4']}")
        for name, (experts, per_expert) in sets.items():
            touched = statistics.mean(sum(per_expert[e] for e in set(i.reshape(-1).tolist())) for i in ids)
            try:
                t = timed([lambda x=x, i=i, w=w: kernels.fused_moe(x, i, w, experts) for x, i, w in zip(xs, ids, wts)])
            except Exception as exc:  # one failing set must not hide the others
                res[name] = {"error": repr(exc)[:500]}
                log(f"decode b={batch:2d} {name}: {exc!r}")
                continue
            t["config"] = kmoe.choose_config(batch * TOPK, experts, n_sms).__dict__
            if any(experts.fragment):
                t["fragment_config"] = kfrag.choose_fragment_config(batch * TOPK, experts, n_sms).__dict__
            t["speedup_vs_bf16"] = res["bf16"]["graph_us"] / t["graph_us"]
            t["weight_TBps"] = touched / t["graph_us"] / 1e6
            res[name] = t
            log(f"decode b={batch:2d} {name:12s} {t['graph_us']:8.1f} us (eager {t['eager_us']:.1f}) "
                f"x{t['speedup_vs_bf16']:.2f} vs bf16, weights {t['weight_TBps']:.2f} TB/s")
            if name.startswith("mixed"):  # the alternative to one launch for all schemes: one per scheme group
                cfg = dataclasses.replace(kmoe.choose_config(batch * TOPK, experts, n_sms), variants_per_launch=1)
                try:
                    us = graph_ms([lambda x=x, i=i, w=w: kmoe.fused_moe(x, i, w, experts, cfg)
                                   for x, i, w in zip(xs, ids, wts)]) * 1e3
                    res[f"{name}_per_scheme_launches"] = {"graph_us": us, "config": cfg.__dict__}
                    log(f"decode b={batch:2d} {name + '_per_scheme_launches':12s} {us:8.1f} us")
                except Exception as exc:
                    res[f"{name}_per_scheme_launches"] = {"error": repr(exc)[:300]}
        if fragment_sweep:
            def run_fragment(experts, cfg, xs=xs, ids=ids, wts=wts):
                return graph_ms([lambda x=x, i=i, w=w: kmoe.fused_moe(x, i, w, experts, fragment_config=cfg)
                                 for x, i, w in zip(xs, ids, wts)]) * 1e3
            def output(experts, cfg, x=xs[0], i=ids[0], w=wts[0]):
                return kmoe.fused_moe(x, i, w, experts, fragment_config=cfg)
            sweep_fragments(res, sets, [n for n in ("int4", "nf4") if n in sets], FRAGMENT_SWEEP[batch],
                            run_fragment, output, "speedup_vs_bf16", res["bf16"]["graph_us"], f"b={batch:2d}")
        if sweep:
            def run(experts, cfg, xs=xs, ids=ids, wts=wts):
                return graph_ms([lambda x=x, i=i, w=w: kmoe.fused_moe(x, i, w, experts, cfg)
                                 for x, i, w in zip(xs, ids, wts)]) * 1e3
            swept = [n for n in ("int4_legacy", "nf4") if n in sets]
            sweep_configs(res, sets, swept, DECODE_SWEEP[batch], batch * TOPK, n_sms, run,
                          "speedup_vs_bf16", res["bf16"]["graph_us"], f"b={batch:2d}")
        out[f"batch_{batch}"] = res
    return out


def dequant_then_loop(experts: PackedExperts, bf16: Bf16Layer, x, plan, base_us: float) -> dict:
    """Prefill the other way the dequant kernels allow: every expert to BF16, then the BF16 loop (cuBLAS).

    The stored parts are rebuilt from the fragment lanes once, outside the
    timing (a runtime taking this path would hold them beside the lanes).
    Timed: the dequantizations alone, and followed by the loop.
    """
    stored = {p: [experts.weight(p, e) for e in range(E)] for p in ("gate", "up", "down")}

    def weights():
        return tuple([kernels.dequantize(w.parts, w.scheme, (H, I) if p == "down" else (I, H), w.group_size,
                                         w.double_quant) for w in stored[p]] for p in ("gate", "up", "down"))

    res = {"dequant_only": timed([weights]), **timed([lambda: bf16.loop(x, plan, weights())])}
    res["throughput_vs_best_bf16"] = base_us / res["graph_us"]
    return res


def bench_prefill(bf16, sets, sweep, gen, n_sms, tokens=2048, fragment_sweep=False):
    ids = random_topk(tokens, gen)
    wts = torch.softmax(torch.randn(ids.shape, device=DEV, generator=gen), -1)
    x = torch.randn(tokens, H, device=DEV, dtype=torch.bfloat16, generator=gen)
    plan = Bf16Layer.plan(ids, wts)
    flops = 2 * tokens * TOPK * 3 * H * I
    res = {"tokens": tokens, "flops": flops, "bf16_loop": timed([lambda: bf16.loop(x, plan)])}
    try:
        gplan = Bf16Layer.grouped_plan(ids, wts)
        res["bf16_grouped_mm"] = timed([lambda: bf16.grouped(x, gplan)])
        res["bf16_grouped_mm"]["rel_err_vs_loop"] = rel_err(bf16.grouped(x, gplan), bf16.loop(x, plan))
    except Exception as exc:
        res["bf16_grouped_mm"] = {"error": repr(exc)[:300]}
    base = min(v["graph_us"] for k, v in res.items() if k.startswith("bf16") and "graph_us" in v)
    for k in ("bf16_loop", "bf16_grouped_mm"):
        if "graph_us" in res[k]:
            res[k]["TFLOPs"] = flops / res[k]["graph_us"] / 1e6
            log(f"prefill {k:16s} {res[k]['graph_us']:9.1f} us {res[k]['TFLOPs']:.0f} TFLOP/s")
    for name, (experts, _) in sets.items():
        try:
            t = timed([lambda: kernels.fused_moe(x, ids, wts, experts)])
        except Exception as exc:
            res[name] = {"error": repr(exc)[:500]}
            log(f"prefill {name}: {exc!r}")
            continue
        t["config"] = kmoe.choose_config(tokens * TOPK, experts, n_sms).__dict__
        if any(experts.fragment):
            t["fragment_config"] = kfrag.choose_fragment_config(tokens * TOPK, experts, n_sms).__dict__
        t["TFLOPs"] = flops / t["graph_us"] / 1e6
        t["throughput_vs_best_bf16"] = base / t["graph_us"]
        t["throughput_vs_bf16_loop"] = res["bf16_loop"]["graph_us"] / t["graph_us"]
        res[name] = t
        log(f"prefill {name:16s} {t['graph_us']:9.1f} us {t['TFLOPs']:.0f} TFLOP/s x{t['throughput_vs_best_bf16']:.2f}")
    if "int4" in sets:
        alt = res["int4_dequant_then_bf16_loop"] = dequant_then_loop(sets["int4"][0], bf16, x, plan, base)
        log(f"prefill int4 dequantized then the BF16 loop {alt['graph_us']:9.1f} us "
            f"(dequant {alt['dequant_only']['graph_us']:.1f}) x{alt['throughput_vs_best_bf16']:.2f}")
        res["check_int4_rel_err"] = check_against_bf16(sets["int4"][0], x, ids, wts, bf16)
        log(f"prefill check int4: relative error {res['check_int4_rel_err']:.2e} vs BF16 on dequantized weights")
    if sweep and "int4_legacy" in sets:
        sweep_configs(res, sets, ("int4_legacy",), PREFILL_SWEEP, tokens * TOPK, n_sms,
                      lambda experts, cfg: graph_ms([lambda: kmoe.fused_moe(x, ids, wts, experts, cfg)]) * 1e3,
                      "throughput_vs_best_bf16", base, "prefill")
    if fragment_sweep and "int4" in sets:
        sweep_fragments(res, sets, ("int4",), FRAGMENT_SWEEP["prefill"],
                        lambda experts, cfg: graph_ms([lambda: kmoe.fused_moe(x, ids, wts, experts,
                                                                              fragment_config=cfg)]) * 1e3,
                        lambda experts, cfg: kmoe.fused_moe(x, ids, wts, experts, fragment_config=cfg),
                        "throughput_vs_best_bf16", base, "prefill")
    return res


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/moe_kernels_h200.json")
    parser.add_argument("--sweep", action="store_true", help="also time alternative tilings of the other kernels")
    parser.add_argument("--fragment-sweep", action="store_true", help="also time alternative fragment tilings")
    parser.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes even if importable")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated sections to run (default all: {','.join(PARTS)})")
    parser.add_argument("--sets", default=",".join(EXPERT_SETS),
                        help=f"comma-separated expert sets to time (default all: {','.join(EXPERT_SETS)})")
    parser.add_argument("--batches", default="1,16", help="comma-separated decode batch sizes (default 1,16)")
    args = parser.parse_args(argv)
    parts, set_names = set(args.parts.split(",")), args.sets.split(",")
    if not parts or parts - set(PARTS):
        parser.error(f"--parts takes a comma-separated subset of {','.join(PARTS)}, got {args.parts!r}")
    if set(set_names) - set(EXPERT_SETS):
        parser.error(f"--sets takes a comma-separated subset of {','.join(EXPERT_SETS)}, got {args.sets!r}")
    batches = [int(b) for b in args.batches.split(",")]
    if any(b not in DECODE_SWEEP for b in batches):
        parser.error(f"--batches takes a comma-separated subset of {','.join(map(str, DECODE_SWEEP))}")
    if not torch.cuda.is_available():
        print("moe_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    bnb = None
    if not args.no_bnb:
        try:
            import bitsandbytes as bnb
        except Exception as exc:  # optional baseline
            log(f"bitsandbytes unavailable: {exc!r}")
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device=DEV).manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    report = {
        "device": torch.cuda.get_device_name(0), "sms": props.multi_processor_count,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
                     "python": platform.python_version(),
                     "bitsandbytes": getattr(bnb, "__version__", None)},
        "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "shapes": {"hidden": H, "intermediate": I, "experts": E, "top_k": TOPK},
    }
    started = time.time()
    with torch.inference_mode():
        report["copy_TBps"], report["fill_TBps"] = copy_bandwidth(), fill_bandwidth()
        log(f"{report['device']}: copy {report['copy_TBps']:.2f} TB/s, fill {report['fill_TBps']:.2f} TB/s")
        if "dequant" in parts:
            report["dequant"] = bench_dequant(report["copy_TBps"], args.sweep, gen, bnb)
            save(report, args.out)
        if not parts & {"decode", "prefill"}:
            return _finish(report, started, args.out)
        bf16 = Bf16Layer(gen)
        sets = {}
        for name in set_names:
            quants = EXPERT_SETS[name]
            experts, stored = build_experts(quants, gen, False if name.endswith("_legacy") else None)
            sets[name] = (experts, expert_bytes(experts))
            report.setdefault("expert_sets", {})[name] = {
                "schemes": [q[0] for q in quants], "stored_bytes": stored,
                "bits_per_weight": 8 * stored / (E * 3 * H * I), "fragment_experts": sum(experts.fragment)}
        xs, ids, wts = routings(16, 1, gen)
        report["checks"] = {}
        for name in [n for n in ("int4", "mixed_4.25", "nf4") if n in sets]:
            try:
                report["checks"][name] = check_against_bf16(sets[name][0], xs[0], ids[0], wts[0], bf16)
            except Exception as exc:
                report["checks"][name] = repr(exc)[:300]
        log(f"checks (relative error vs BF16 on dequantized weights): {report['checks']}")
        if "decode" in parts:
            bnb_loop = bnb_layer(gen) if bnb is not None else None
            report["decode"] = bench_decode(bf16, sets, args.sweep, gen, bnb_loop, props.multi_processor_count,
                                            batches, args.fragment_sweep)
            save(report, args.out)
            del bnb_loop
        if "prefill" in parts:
            try:
                report["prefill"] = bench_prefill(bf16, sets, args.sweep, gen, props.multi_processor_count,
                                                  fragment_sweep=args.fragment_sweep)
            except Exception as exc:  # keep the decode figures if prefill breaks
                report["prefill"] = {"error": repr(exc)[:500]}
                log(f"prefill failed: {exc!r}")
    return _finish(report, started, args.out)


def _finish(report, started, out) -> int:
    """Seconds, the target figures that the run measured, saved."""
    report["seconds"] = time.time() - started
    try:
        report["targets"] = targets(report)
    except KeyError as exc:
        report["targets"] = {"error": f"missing figure {exc}"}
    save(report, out)
    log(json.dumps(report["targets"], indent=1))
    return 0


def save(report, path) -> None:
    """Write what has been measured so far (a run cut short still leaves its figures)."""
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def targets(r) -> dict:
    """The issue's targets, each with the measured figure and whether it is met."""
    d1, d16, pf = r["decode"]["batch_1"], r["decode"]["batch_16"], r["prefill"]
    deq = {f"{row['scheme']}{'-dq' if row['double_quant'] else ''}": row["fraction_of_copy"]
           for row in r["dequant"]["rows"] if not row["scheme"].startswith("bitsandbytes")}
    out = {
        "dequant_min_fraction_of_copy (>= 0.85)": min(deq.values()),
        "dequant_fraction_by_scheme": deq,
        "decode_b1_nf4_speedup (>= 3.0)": d1["nf4"]["speedup_vs_bf16"],
        "decode_b1_int4_speedup (>= 3.0)": d1["int4"]["speedup_vs_bf16"],
        "decode_b16_nf4_speedup (>= 2.0)": d16["nf4"]["speedup_vs_bf16"],
        "decode_b16_int4_speedup (>= 2.0)": d16["int4"]["speedup_vs_bf16"],
        "mixed_4.25_vs_int4_time_b1 (<= 1.0)": d1["mixed_4.25"]["graph_us"] / d1["int4"]["graph_us"],
        "mixed_4.25_vs_int4_time_b16 (<= 1.0)": d16["mixed_4.25"]["graph_us"] / d16["int4"]["graph_us"],
        "mixed_4.0_vs_int4_time_b1 (<= 1.0)": d1["mixed_4.0"]["graph_us"] / d1["int4"]["graph_us"],
        "mixed_4.0_vs_int4_time_b16 (<= 1.0)": d16["mixed_4.0"]["graph_us"] / d16["int4"]["graph_us"],
        "mixed_4.25_per_scheme_launches_vs_int4_time_b1":
            d1["mixed_4.25_per_scheme_launches"].get("graph_us", math.nan) / d1["int4"]["graph_us"],
        "mixed_4.25_per_scheme_launches_vs_int4_time_b16":
            d16["mixed_4.25_per_scheme_launches"].get("graph_us", math.nan) / d16["int4"]["graph_us"],
        "prefill_nf4_vs_best_bf16 (>= 0.8)": pf["nf4"]["throughput_vs_best_bf16"],
        "prefill_int4_vs_best_bf16 (>= 0.8)": pf["int4"]["throughput_vs_best_bf16"],
        "prefill_int4_dequantized_then_bf16_loop_vs_best_bf16":
            pf["int4_dequant_then_bf16_loop"]["throughput_vs_best_bf16"],
        "prefill_int4_vs_grouped_mm": pf["bf16_grouped_mm"]["graph_us"] / pf["int4"]["graph_us"],
    }
    for key, res in (("decode_b1", d1), ("decode_b16", d16), ("prefill", pf)):
        for name in ("int4", "nf4"):
            if f"{name}_best" in res:
                figure = "throughput_vs_best_bf16" if key == "prefill" else "speedup_vs_bf16"
                out[f"{key}_{name}_best_swept_config"] = {figure: res[f"{name}_best"][figure],
                                                          "config": res[f"{name}_best"]["config"]}
    if "bitsandbytes_nf4" in d1:
        bnb_us = d1["bitsandbytes_nf4"].get("graph_us", d1["bitsandbytes_nf4"].get("eager_us"))
        out["decode_b1_nf4_vs_bitsandbytes (>= 4.0)"] = bnb_us / d1["nf4"]["graph_us"]
    return out


if __name__ == "__main__":
    sys.exit(main())
