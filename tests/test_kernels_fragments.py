"""The fragment layout (int2/3/4/8 codes where each GPU thread reads them) and its fused MoE kernels.

The layout conversions are plain torch and are checked exactly, both ways and
against the definition of where each code goes.  The kernels run in Triton's
interpreter without CUDA (tests/conftest.py) and compiled on a GPU, where the
inline asm that depends on the tensor cores' register layout runs for real;
they are compared with the float32 reference of tests/test_kernels_moe.py.
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
from test_kernels_moe import assert_close, make_layer, reference, routing  # noqa: E402

from moeconv_torch.dequant import unpack_codes  # noqa: E402
from moeconv_torch.kernels import PackedExperts, PackedWeight, fragments, moe  # noqa: E402
from moeconv_torch.kernels import align, fragment_moe  # noqa: E402
from moeconv_torch.kernels.fragment_moe import FragmentConfig, _warp_mma, run_fragments  # noqa: E402

H, I = 64, 128


def three_bit_word(words, mt, kt, r0, lane_c, blk):
    """A block's word of 3-bit lanes, block 3's put together from the spare nibbles as the kernels do."""
    a, b = words[mt, kt, (4 * r0 + lane_c) * 2], words[mt, kt, (4 * r0 + lane_c) * 2 + 1]
    c = words[mt, kt, 64 + 4 * r0 + lane_c]
    return [a, b, c, (a >> 12) & 0x000F000F | (b >> 8) & 0x00F000F0 | (c >> 4) & 0x0F000F00][blk]


@pytest.mark.parametrize("scheme", ["int2", "int3", "int4", "int8", "nf4"])
def test_lanes_hold_each_code_where_the_layout_says_and_convert_back(scheme):
    rng = np.random.default_rng(len(scheme))
    n, k = 32, 192
    bits = fragments.lane_bits(scheme)
    table = scheme == "nf4"
    qweight = torch.from_numpy(rng.integers(0, 256, (n * k // 2,) if table else (n, k * bits // 8), dtype=np.uint8))
    lanes = fragments.to_fragments(qweight, scheme, (n, k))
    assert lanes.shape == fragments.lane_shape(scheme, (n, k)) and lanes.dtype == fragments.LANE_DTYPE[bits]
    if table:  # bitsandbytes order: the first code of a byte in its high nibble
        codes = torch.stack((qweight >> 4, qweight & 15), dim=-1).view(n, k).long()
    else:
        codes = unpack_codes(qweight, bits, k).long()
    words = lanes.long() & ((1 << (8 * lanes.element_size())) - 1)
    for r in range(n):
        for c in range(k):
            rh, r0, blk, kh, lane_c, kl = (r // 8) % 2, r % 8, (c // 16) % 4, (c // 8) % 2, (c // 2) % 4, c % 2
            if bits == 3:
                word, pos = three_bit_word(words, r // 16, c // 64, r0, lane_c, blk), 3 * (rh + 2 * kh) + 16 * kl
            elif bits == 8:
                word, pos = words[r // 16, c // 64, r0, lane_c, 2 * blk + kh], 8 * (rh + 2 * kl)
            elif table:
                word, pos = words[r // 16, c // 64, r0, lane_c, blk], 4 * (kl + 2 * rh + 4 * kh)
            else:
                word, pos = words[r // 16, c // 64, r0, lane_c, blk], bits * (rh + 2 * kh + 4 * kl)
            assert (int(word) >> pos) & ((1 << bits) - 1) == codes[r, c]
    assert torch.equal(fragments.from_fragments(lanes, scheme, (n, k), qweight.shape), qweight)


@pytest.mark.parametrize("scheme, shape, group, reason", [
    ("mxfp4", (32, 64), 32, "no fragment layout"),
    ("nf4", (32, 192), 128, "straddle rows"),
    ("int4", (24, 64), 64, "whole 16 x 64 tiles"),
    ("int4", (32, 96), 32, "whole 16 x 64 tiles"),
    ("int4", (32, 64), 8, "group size 8"),
    ("int8", (32, 192), 96, "group size 96"),
])
def test_weights_without_a_fragment_layout_say_why(scheme, shape, group, reason):
    assert reason in fragments.fragment_unsupported(scheme, shape, group)


@pytest.mark.parametrize("scheme, group", [("int4", 128), ("int2-sym", 64), ("int8", 192), ("nf4", 64), ("fp4", 128)])
def test_supported_shapes_and_groups(scheme, group):
    assert fragments.fragment_unsupported(scheme, (48, 384), group) is None


def test_scale_pairs_centre_the_codes():
    parts = {"scales": torch.tensor([[0.5, -0.25]], dtype=torch.float16),
             "zeros": torch.tensor([[3.0, 7.5]], dtype=torch.float16)}
    pairs = fragments.scale_pairs(parts, "int4", (1, 128), 64, torch.float32)
    assert pairs.tolist() == [[[0.5, 2.5], [-0.25, -0.125]]]  # (s, (8 - z) s): (c - 8) s + (8 - z) s = (c - z) s
    assert fragments.scale_pairs({"scales": parts["scales"]}, "int4-sym", (1, 128), 64, torch.bfloat16)[..., 1].eq(0).all()
    absmax = {"absmax": torch.tensor([0.5, 2.0, 1.0, 4.0])}
    assert fragments.scale_pairs(absmax, "nf4", (2, 128), 64, torch.float32).tolist() == \
        [[[0.5, 0.0], [2.0, 0.0]], [[1.0, 0.0], [4.0, 0.0]]]


@pytest.mark.parametrize("scheme, group, dq", [("int4", 64, False), ("int8", 32, False), ("int2-sym", 64, False),
                                               ("nf4", 64, True), ("fp4", 128, False)])
def test_kernel_weights_stay_within_a_few_bfloat16_roundings_of_the_spec(scheme, group, dq):
    rng = np.random.default_rng(2)
    shape = (64, 256)
    parts = random_parts(scheme, shape, group, dq, rng, scale=0.05)
    spec = torch.from_numpy(ref_dequantize(parts, scheme, shape, group, dq))
    got = fragments.kernel_weights(to_torch(parts, "cpu"), scheme, shape, group, torch.bfloat16)
    assert 0 < float((got - spec).norm() / spec.norm()) < 4e-3


FRAGMENT_SETS = [
    (("int4", 64, False),) * 3,
    (("int8", 64, False),) * 3,
    (("int2", 32, False),) * 3,
    (("int4-sym", 128, False),) * 3,
    (("int3", 64, False), ("int3-sym", 32, False), ("int3", 64, False)),
]
TABLE_SETS = [(("nf4", 64, True),) * 3, (("fp4", 32, False),) * 3, (("nf4", 64, False), ("nf4", 64, False), ("int8", 64, False))]
DECODE = FragmentConfig(16, 64, 64, 2, 4, 1)
SCALED_PRODUCTS = dataclasses.replace(DECODE, scale_after_product=True)
NARROW = dataclasses.replace(SCALED_PRODUCTS, block_m=8, warp_mma=True)
AHEAD = dataclasses.replace(NARROW, scales_ahead=True, up_split_k=2, down_block_n=128)


@pytest.mark.parametrize("sets", [FRAGMENT_SETS, TABLE_SETS], ids=["int", "table"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("config, tokens",
                         [(DECODE, 3), (SCALED_PRODUCTS, 3), (NARROW, 20), (AHEAD, 3),
                          (FragmentConfig(64, 128, 64, 1, 4, 2), 40)],
                         ids=["decode", "scaled-products", "narrow-blocks", "scales-ahead", "batch"])
def test_fragment_experts_match_reference(config, tokens, dtype, sets):
    rng = np.random.default_rng(7)
    experts, dense = make_layer(sets, rng, scaled_after_product=config.scale_after_product)
    assert all(experts.fragment) and not experts.up_variants
    x = torch.from_numpy(rng.standard_normal((tokens, H))).to(dtype).to(DEVICE)
    ids, wts = routing(tokens, len(sets), 2, rng)
    got = moe.fused_moe(x, ids, wts, experts, fragment_config=config)
    assert got.dtype == dtype and got.shape == (tokens, H)
    assert_close(got, reference(x, ids.cpu(), wts.cpu(), dense))


@pytest.mark.parametrize("quant", [FRAGMENT_SETS[0], FRAGMENT_SETS[3], TABLE_SETS[0]],
                         ids=["int4", "int4-sym", "nf4"])
def test_products_scaled_after_the_product_multiply_by_unrounded_weights(quant):
    """Scaled after the product, the kernels are nearer the unrounded weights than scaled before, and nearer
    them than the rounded ones: the scales do not silently fall back to rounding each weight."""
    rng = np.random.default_rng(8)
    experts, exact = make_layer([quant, quant], rng, scaled_after_product=True)
    x = torch.from_numpy(rng.standard_normal((3, H))).to(torch.bfloat16).to(DEVICE)
    ids, wts = routing(3, 2, 2, rng)
    want = reference(x, ids.cpu(), wts.cpu(), exact)

    def err(config):
        got = moe.fused_moe(x, ids, wts, experts, fragment_config=config).float().cpu()
        return float((got - want).norm() / want.norm())

    assert err(SCALED_PRODUCTS) < 0.75 * err(DECODE)
    assert err(SCALED_PRODUCTS) < 3e-3


def test_fragment_and_other_experts_share_one_layer():
    """int4/int8 experts in the fragment kernels, mxfp4 and int3 in groups of 48 in the others, one output;
    one variant a launch."""
    quants = [FRAGMENT_SETS[0], (("mxfp4", 32, False),) * 3, FRAGMENT_SETS[1], (("int3", 48, False),) * 3]
    rng = np.random.default_rng(3)
    experts, dense = make_layer(quants, rng)
    assert experts.fragment == (True, False, True, False)
    assert len(experts.fragment_up_variants) == 2 and len(experts.up_variants) == 2
    x = torch.from_numpy(rng.standard_normal((6, H))).to(torch.bfloat16).to(DEVICE)
    ids, wts = routing(6, len(quants), 2, rng)
    want = reference(x, ids.cpu(), wts.cpu(), dense)
    assert_close(moe.fused_moe(x, ids, wts, experts, fragment_config=DECODE), want)
    one_each = dataclasses.replace(DECODE, variants_per_launch=1)
    assert_close(moe.fused_moe(x, ids, wts, experts, fragment_config=one_each), want)


@pytest.mark.parametrize("sort_in_prepare", [True, False], ids=["sort-in-prepare", "torch-sort"])
@pytest.mark.parametrize("sets", [FRAGMENT_SETS, TABLE_SETS], ids=["int", "table"])
def test_the_fragment_kernels_zero_the_output_they_add_into(sets, sort_in_prepare, monkeypatch):
    """``run_fragments`` zeroes the float32 output itself (with the activations' sums, or alone for table codes,
    which need none): whatever the buffer held before cannot leak into the layer.  Pairs sorted in
    ``_prepare_kernel`` or, past ``ALIGN_KERNEL_MAX``, by torch first."""
    if not sort_in_prepare:
        monkeypatch.setattr(fragment_moe, "ALIGN_KERNEL_MAX", 0)
    rng = np.random.default_rng(11)
    experts, dense = make_layer(sets, rng, scaled_after_product=True)
    x = torch.from_numpy(rng.standard_normal((2, H))).to(torch.bfloat16).to(DEVICE)
    ids, wts = routing(2, len(sets), 2, rng)
    out = torch.full((2, H), float("nan"), dtype=torch.float32, device=DEVICE)
    run_fragments(x, ids.reshape(-1).contiguous(), wts.reshape(-1).contiguous(), 2, experts, AHEAD, out,
                  moe.INTERPRET)
    assert_close(out.to(torch.bfloat16), reference(x, ids.cpu(), wts.cpu(), dense))


def test_prepare_kernel_zeroes_sums_and_sorts_in_one_launch():
    """Whatever the buffers held: ``out`` and the tickets come back zero, the sums are those of each 64
    activations, and program 0's sort matches ``align.align_pairs``."""
    rng = np.random.default_rng(5)
    t, hid, e, bm = 3, 192, 4, 8
    x = torch.from_numpy(rng.standard_normal((t, hid))).to(torch.bfloat16).to(DEVICE)
    topk = torch.from_numpy(rng.integers(0, e, t * 2)).to(torch.int32).to(DEVICE)
    out = torch.full((t, hid), float("nan"), dtype=torch.float32, device=DEVICE)
    sums = torch.full((t, hid // 64), float("nan"), dtype=torch.float32, device=DEVICE)
    tickets = torch.full((2100,), 7, dtype=torch.int32, device=DEVICE)  # more than one program's 1024
    ids, blk, meta = align.kernel_buffers(t * 2, e, bm, DEVICE)
    fragment_moe.launch(fragment_moe._prepare_kernel, (t, 1), x, x.stride(0), sums, out, tickets, hid,
                        tickets.numel(), topk, ids, blk, t * 2, e, SUMS=True, TILES=16, SORT=True, **meta)
    assert not out.any() and not tickets.any()
    assert_close(sums, x.float().reshape(t, hid // 64, 64).sum(-1).cpu())
    want_ids, want_blk, n_blocks = align.align_pairs(topk, e, bm)
    assert torch.equal(ids[:n_blocks * bm], want_ids[:n_blocks * bm]) and torch.equal(blk[:n_blocks], want_blk[:n_blocks])


def test_rows_past_the_last_block_of_a_program_and_several_k_splits():
    """I = 192 rows of gate/up in programs of 128 rows (the last half empty, and its tile of h past I), down
    split 3 ways."""
    rng = np.random.default_rng(9)
    experts, dense = make_layer([FRAGMENT_SETS[0], FRAGMENT_SETS[2]], rng, hidden=H, inter=192)
    x = torch.from_numpy(rng.standard_normal((4, H))).to(torch.bfloat16).to(DEVICE)
    ids, wts = routing(4, 2, 2, rng)
    want = reference(x, ids.cpu(), wts.cpu(), dense)
    for scaled, ahead in ((False, False), (True, False), (True, True)):
        config = FragmentConfig(16, 128, 64, 3, 4, 1, scale_after_product=scaled, scales_ahead=ahead)
        assert_close(moe.fused_moe(x, ids, wts, experts, fragment_config=config), want)


def test_gate_and_up_in_k_pieces_and_in_separate_programs():
    """Gate/up split along K (the last piece to finish joins the float32 partials) or into one program each
    (``_gated_kernel`` joins them)."""
    rng = np.random.default_rng(4)
    experts, dense = make_layer([FRAGMENT_SETS[0], FRAGMENT_SETS[1], FRAGMENT_SETS[3]], rng, hidden=192, inter=128)
    x = torch.from_numpy(rng.standard_normal((2, 192))).to(torch.bfloat16).to(DEVICE)
    ids, wts = routing(2, 3, 2, rng)
    want = reference(x, ids.cpu(), wts.cpu(), dense)
    for pieces, separate, scaled in ((2, False, False), (3, False, False), (1, True, False), (2, True, False),
                                     (2, False, True), (1, True, True)):
        config = dataclasses.replace(DECODE, up_split_k=pieces, split_gate_up=separate, scale_after_product=scaled)
        assert_close(moe.fused_moe(x, ids, wts, experts, fragment_config=config), want)


@pytest.mark.parametrize("k_step", [2, 4])
def test_several_k_tiles_a_step_and_the_tiles_left_over(k_step):
    """3 K tiles of gate/up and 5 of down, whole and split in two: whole steps first, then single tiles."""
    rng = np.random.default_rng(k_step)
    experts, dense = make_layer([FRAGMENT_SETS[0], TABLE_SETS[0]], rng, hidden=192, inter=320)
    x = torch.from_numpy(rng.standard_normal((3, 192))).to(torch.bfloat16).to(DEVICE)
    ids, wts = routing(3, 2, 2, rng)
    want = reference(x, ids.cpu(), wts.cpu(), dense)
    for split, scaled in ((1, False), (2, False), (2, True)):
        config = dataclasses.replace(DECODE, k_step=k_step, split_k=split, warp_mma=k_step == 2,
                                     scale_after_product=scaled)
        assert_close(moe.fused_moe(x, ids, wts, experts, fragment_config=config), want)


@pytest.mark.parametrize("field, value", [("block_m", 4), ("block_m", 48), ("up_block_n", 96), ("num_warps", 8),
                                          ("k_step", 3), ("split_k", 0)])
def test_tilings_the_kernels_cannot_run_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"FragmentConfig.{field} "):
        dataclasses.replace(DECODE, **{field: value})


def test_wgmma_products_of_more_than_8192_outputs_a_program_are_refused():
    """Measured wrong on an H200 (``FragmentConfig.__post_init__``); the same tiles on mma.sync are allowed."""
    prefill = FragmentConfig(128, 64, 64, 1, 4, 3)
    with pytest.raises(ValueError, match="FragmentConfig.down_block_n times block_m"):
        dataclasses.replace(prefill, down_block_n=128)
    with pytest.raises(ValueError, match="FragmentConfig.up_block_n times block_m"):
        dataclasses.replace(prefill, up_block_n=128)
    assert dataclasses.replace(prefill, down_block_n=128, warp_mma=True).down_block_n == 128
    assert dataclasses.replace(prefill, block_m=64, up_block_n=128).up_block_n == 128


def test_wgmma_down_programs_of_128_rows_are_refused_for_blocks_of_64_tokens_or_more():
    """Within 8,192 outputs but measured wrong on an H200 (``FragmentConfig.__post_init__``)."""
    with pytest.raises(ValueError, match="FragmentConfig.down_block_n must be <= 64 on wgmma"):
        FragmentConfig(64, 64, 128, 1, 4, 3)
    assert FragmentConfig(32, 64, 128, 1, 4, 3).down_block_n == 128
    assert FragmentConfig(64, 64, 128, 1, 4, 3, warp_mma=True).down_block_n == 128


def test_scaled_products_need_gate_up_programs_of_whole_h_tiles():
    assert dataclasses.replace(DECODE, up_block_n=32).up_block_n == 32
    with pytest.raises(ValueError, match="FragmentConfig.up_block_n .*scale_after_product"):
        dataclasses.replace(SCALED_PRODUCTS, up_block_n=32)


def test_warp_mma_is_asked_for_only_while_the_kernels_compile_and_leaves_a_users_setting_alone(monkeypatch):
    monkeypatch.delenv("DISABLE_MMA_V3", raising=False)
    with _warp_mma(True):
        assert os.environ["DISABLE_MMA_V3"] == "1"
    assert "DISABLE_MMA_V3" not in os.environ
    with _warp_mma(False):
        assert "DISABLE_MMA_V3" not in os.environ
    monkeypatch.setenv("DISABLE_MMA_V3", "0")
    with _warp_mma(True):
        assert os.environ["DISABLE_MMA_V3"] == "0"
    assert os.environ["DISABLE_MMA_V3"] == "0"


def test_fragment_experts_give_back_their_stored_parts_and_can_be_declined():
    rng = np.random.default_rng(1)
    parts = {proj: [to_torch(random_parts("int4", shape, 64, False, rng)) for _ in range(2)]
             for proj, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I)))}
    weights = {proj: [PackedWeight(p, "int4", 64) for p in ps] for proj, ps in parts.items()}
    experts = PackedExperts.build(weights["gate"], weights["up"], weights["down"], hidden=H, intermediate=I)
    assert experts.fragment == (True, True) and experts.u8.numel() <= 1  # codes are held once, as lanes
    for proj in ("gate", "up", "down"):
        for e in range(2):
            got = experts.weight(proj, e).parts
            assert all(torch.equal(got[k].cpu(), parts[proj][e][k].cpu()) for k in parts[proj][e])
    plain = PackedExperts.build(weights["gate"], weights["up"], weights["down"], hidden=H, intermediate=I,
                                fragments_allowed=False)
    assert plain.fragment == (False, False) and plain.lanes.numel() == 1 and len(plain.up_variants) == 1
