"""Fused MoE kernels against a float32 reference built from the spec's dequantization formulas.

Runs in Triton's interpreter without CUDA (tests/conftest.py), compiled on a
GPU.  Shapes are tiny; every path (gemv with split-K, tensor-core dot, routing
kernel and its torch twin, more variants than one launch takes, gate and up of
different schemes) is forced through an explicit ``MoeConfig``.
"""

import dataclasses
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from test_kernels_dequant import DEVICE, random_parts, ref_dequantize, to_torch  # noqa: E402

from moeconv_torch.kernels import PackedExperts, PackedWeight, fused_moe  # noqa: E402
from moeconv_torch.kernels import align, fragments, moe, tiles  # noqa: E402

H, I = 64, 128


def triton_cdiv(a, b):
    return -(-a // b)


def weight_like(scheme, shape, group_size, double_quant, rng):
    """Random packed weight with weight-like magnitudes (mxfp4 exponents near 2^-6)."""
    parts = random_parts(scheme, shape, group_size, double_quant, rng, scale=0.05)
    if scheme == "mxfp4":
        parts["scales"] = rng.integers(118, 124, parts["scales"].shape, dtype=np.uint8)
    return parts, (scheme, group_size, double_quant)


def make_layer(quants, rng, hidden=H, inter=I, fragments_allowed=True, scaled_after_product=False):
    """quants: per expert ((gate scheme, gs, dq), (up ...), (down ...)) -> (PackedExperts, float32 weights).

    The float32 weights are what the kernels multiply by: the spec's weights
    rounded to bfloat16, or for experts in the fragment layout the fragment
    kernels' own rounding (``fragments.kernel_weights``, checked against the
    spec in tests/test_kernels_fragments.py), none for weights whose groups
    are whole tiles when the kernels scale products (``scaled_after_product``).
    """
    packed = {"gate": [], "up": [], "down": []}
    stored = {"gate": [], "up": [], "down": []}
    for q in quants:
        for proj, (scheme, gs, dq) in zip(("gate", "up", "down"), q):
            shape = (hidden, inter) if proj == "down" else (inter, hidden)
            parts, _ = weight_like(scheme, shape, gs, dq, rng)
            packed[proj].append(PackedWeight(to_torch(parts), scheme, gs, dq))
            stored[proj].append((parts, scheme, shape, gs, dq))
    experts = PackedExperts.build(packed["gate"], packed["up"], packed["down"], hidden=hidden, intermediate=inter,
                                  fragments_allowed=fragments_allowed)
    dense = {proj: [] for proj in stored}
    for proj, weights in stored.items():
        for e, (parts, scheme, shape, gs, dq) in enumerate(weights):
            if experts.fragment[e]:
                rounded = not (scaled_after_product and gs % 64 == 0)
                w = fragments.kernel_weights(to_torch(parts, "cpu"), scheme, shape, gs, torch.bfloat16, rounded)
            else:
                w = torch.from_numpy(ref_dequantize(parts, scheme, shape, gs, dq)).to(torch.bfloat16).float()
            dense[proj].append(w)
    return experts, dense


def reference(x, ids, wts, dense):
    """float32 MoE with bfloat16 weights and a bfloat16 intermediate, as a BF16 model computes it."""
    xf = x.float().cpu()
    out = torch.zeros(x.shape[0], x.shape[1])
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            g, u = dense["gate"][e] @ xf[t], dense["up"][e] @ xf[t]
            h = (torch.nn.functional.silu(g) * u).to(torch.bfloat16).float()
            out[t] += float(wts[t, j]) * (dense["down"][e] @ h)
    return out


def routing(t, e, k, rng):
    ids = torch.from_numpy(np.stack([rng.choice(e, k, replace=False) for _ in range(t)]))
    wts = torch.softmax(torch.from_numpy(rng.standard_normal((t, k))).float(), dim=-1)
    return ids.to(DEVICE), wts.to(DEVICE)


def assert_close(got, want):
    err = (got.float().cpu() - want).norm() / want.norm()
    assert torch.isfinite(got.float()).all()
    assert err < 1e-2, f"relative error {err:.2e}"


# split_k=2 with these K steps cuts the down projection (I = 128) into two chunks.
GEMV = moe.MoeConfig("gemv", 1, 64, 32, 32, 2, 4, 1, unroll=2)
DOT = moe.MoeConfig("dot", 16, 64, 64, 64, 2, 4, 1)
MIXED = [
    (("int4", 64, False),) * 3,
    (("nf4", 64, True), ("nf4", 64, True), ("int8", 64, False)),
    (("int3-sym", 64, False), ("int3-sym", 64, False), ("mxfp4", 32, False)),
    (("int2", 32, False), ("fp4", 64, False), ("int4-sym", 128, False)),
]


@pytest.mark.parametrize("config", [GEMV, DOT], ids=["gemv", "dot"])
def test_mixed_schemes_match_reference(config):
    assert triton_cdiv(I, moe.k_step(config)) >= config.split_k == 2
    rng = np.random.default_rng(11)
    experts, dense = make_layer(MIXED, rng)
    t = 3 if config.mode == "gemv" else 12
    x = torch.from_numpy(rng.standard_normal((t, H))).to(torch.bfloat16).to(DEVICE)
    ids, wts = routing(t, len(MIXED), 2, rng)
    got = moe.fused_moe(x, ids, wts, experts, config)
    assert got.dtype == torch.bfloat16 and got.shape == (t, H)
    assert_close(got, reference(x, ids.cpu(), wts.cpu(), dense))


def test_more_variants_than_one_launch_and_float16():
    quants = [(("int4", 64, False),) * 3, (("int8", 64, False),) * 3, (("int2", 64, False),) * 3,
              (("nf4", 64, False),) * 3, (("mxfp4", 32, False),) * 3, (("int3", 64, False),) * 3]
    rng = np.random.default_rng(5)
    experts, dense = make_layer(quants, rng, fragments_allowed=False)  # every expert in these kernels
    assert len(experts.up_variants) > moe.MAX_VARIANTS
    x = torch.from_numpy(rng.standard_normal((4, H))).to(torch.float16).to(DEVICE)
    ids = torch.tensor([[0, 5], [4, 1], [2, 3], [5, 4]], device=DEVICE)
    wts = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.9, 0.1], [0.2, 0.8]], device=DEVICE)
    for per_launch in (1, 4):
        got = moe.fused_moe(x, ids, wts, experts, dataclasses.replace(GEMV, variants_per_launch=per_launch))
        assert got.dtype == torch.float16
        assert_close(got, reference(x, ids.cpu(), wts.cpu(), dense))


def test_gemv_rows_that_end_inside_a_tile_and_unaligned_codes():
    """K not a multiple of the K tile (per-element bounds), int3 groups too small for 32-bit words (byte path)."""
    hidden, inter = 96, 80
    quants = [(("int3", 16, False), ("int2", 16, False), ("int4", 64, False)),
              (("int4-sym", 32, False), ("int3", 32, False), ("int8", 16, False)),
              (("nf4", 32, True), ("int3", 64, False), ("int2", 32, False))]
    rng = np.random.default_rng(7)
    experts, dense = make_layer(quants, rng, hidden, inter)
    x = torch.from_numpy(rng.standard_normal((2, hidden))).to(torch.bfloat16).to(DEVICE)
    ids, wts = routing(2, len(quants), 2, rng)
    config = moe.MoeConfig("gemv", 1, 32, 32, 64, 1, 4, 1, unroll=2)
    assert hidden % config.block_k and inter % config.block_k
    assert_close(moe.fused_moe(x, ids, wts, experts, config), reference(x, ids.cpu(), wts.cpu(), dense))


def test_gemv_guards_follow_the_shapes():
    """Unguarded reads only where every N block and K step lies inside the weight; each guard has a test above."""
    for rows, block_n, k in ((I, GEMV.up_block_n, H), (H, GEMV.down_block_n, I)):  # test_mixed_schemes...
        assert tiles.gemv_bounds(rows, block_n, k, GEMV.block_k, GEMV.unroll) == tiles.BOUNDS_NONE
    assert tiles.gemv_bounds(80, 32, 96, 64, 2) == tiles.BOUNDS_ELEMENT  # test_gemv_rows_that_end_inside_a_tile...
    default = moe.choose_config(2, make_layer([(("int4", 64, False),) * 3], np.random.default_rng(0))[0], 132)
    assert tiles.gemv_bounds(I, default.up_block_n, H, default.block_k, default.unroll) == tiles.BOUNDS_TILE
    assert tiles.gemv_bounds(100, 64, 512, 64, 4) == tiles.BOUNDS_TILE  # rows ending inside an N block


def test_default_dispatch_uses_both_paths():
    rng = np.random.default_rng(2)
    experts, dense = make_layer([(("int4", 64, False),) * 3] * 4, rng)
    for t in (1, 10):
        x = torch.from_numpy(rng.standard_normal((t, H))).to(torch.bfloat16).to(DEVICE)
        ids, wts = routing(t, 4, 2, rng)
        assert moe.choose_config(t * 2, experts, 132).mode == ("gemv" if t == 1 else "dot")
        assert_close(fused_moe(x, ids, wts, experts), reference(x, ids.cpu(), wts.cpu(), dense))


@pytest.mark.parametrize("kernel", [True, False], ids=["triton", "torch"])
def test_align_pairs_groups_by_expert(kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr(align, "ALIGN_KERNEL_MAX", 0)
    rng = np.random.default_rng(4)
    e, bm = 5, 4
    topk = torch.from_numpy(rng.integers(0, e, (9, 2))).to(DEVICE)
    ids, blk, n_blocks = align.align_pairs(topk, e, bm)
    ids, blk, flat = ids.cpu().long(), blk.cpu().long(), topk.reshape(-1).cpu()
    counts = torch.bincount(flat, minlength=e)
    assert n_blocks >= int(((counts + bm - 1) // bm).sum())
    seen = []
    for b in range(n_blocks):
        members = ids[b * bm:(b + 1) * bm]
        real = members[members < flat.numel()]
        if blk[b] < 0:
            assert real.numel() == 0
            continue
        assert real.numel() > 0 and bool((flat[real] == blk[b]).all())
        seen += real.tolist()
    assert sorted(seen) == list(range(flat.numel()))
    assert (blk[:n_blocks] >= 0).sum() == int(((counts + bm - 1) // bm).sum())


def test_packed_experts_views_round_trip_and_rejections():
    rng = np.random.default_rng(9)
    quants = MIXED[:2]
    packed = {p: [] for p in ("gate", "up", "down")}
    for q in quants:
        for proj, (scheme, gs, dq) in zip(("gate", "up", "down"), q):
            shape = (H, I) if proj == "down" else (I, H)
            packed[proj].append(PackedWeight(to_torch(weight_like(scheme, shape, gs, dq, rng)[0]), scheme, gs, dq))
    experts = PackedExperts.build(packed["gate"], packed["up"], packed["down"], hidden=H, intermediate=I)
    for proj in ("gate", "up", "down"):
        for e in range(len(quants)):
            view = experts.weight(proj, e)
            assert view.scheme == packed[proj][e].scheme
            for suffix, t in packed[proj][e].parts.items():
                assert torch.equal(view.parts[suffix], t), (proj, e, suffix)
    bad = PackedWeight(packed["gate"][0].parts, "int4", 32)
    with pytest.raises(ValueError, match="expert 0 gate"):
        PackedExperts.build([bad, packed["gate"][1]], packed["up"], packed["down"], hidden=H, intermediate=I)
    odd = PackedWeight(to_torch(random_parts("nf4", (I, H), 128, False, rng)), "nf4", 128)
    with pytest.raises(ValueError, match="straddle"):
        PackedExperts.build([odd, odd], packed["up"], packed["down"], hidden=H, intermediate=I)
