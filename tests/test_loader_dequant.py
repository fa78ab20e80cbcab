"""moeconv_torch's dequantization and packed modules against the reference reader (moeconv_numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import moeconv_numpy
from moeconv_numpy.schemes import SCHEMES
from moeconv_torch import PackedWeight, QuantizedExperts, QuantizedLinear, WeightSpec, dequantize
from test_loader_model import random_parts


def reference(parts: dict, spec: WeightSpec) -> np.ndarray:
    arrays = {k: v.numpy() for k, v in parts.items()}
    return moeconv_numpy.dequantize(arrays, spec.scheme, spec.shape, spec.group_size, spec.double_quant)


def packed(spec: WeightSpec, seed: int) -> PackedWeight:
    gen = torch.Generator().manual_seed(seed)
    return PackedWeight(spec, random_parts(spec.scheme, spec.shape, spec.group_size, spec.double_quant, gen))


#: every scheme; shapes whose columns are not a multiple of the group and whose element count is odd;
#: (600, 520) with group 32 gives more than 256 nf4 blocks, i.e. several double-quant super-blocks
SPECS = [WeightSpec(s, (33, 200)) for s in SCHEMES] + [
    WeightSpec("int3", (5, 70), 16),
    WeightSpec("int3-sym", (7, 96), 32),
    WeightSpec("nf4", (33, 65), 64, True),
    WeightSpec("fp4", (33, 65), 32, True),
    WeightSpec("nf4", (600, 520), 32, True),
    WeightSpec("fp4", (31, 31), 128, False),
    WeightSpec("mxfp4", (3, 33)),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.scheme}-g{s.group_size}{'-dq' if s.double_quant else ''}-{s.shape[0]}x{s.shape[1]}")
def test_dequantize_is_bit_exact_with_reference(spec):
    weight = packed(spec, seed=SPECS.index(spec))
    got = dequantize(weight.parts, spec.scheme, spec.shape, spec.group_size, spec.double_quant)
    want = reference(weight.parts, spec)
    assert got.dtype == torch.float32 and tuple(got.shape) == spec.shape
    # compare bit patterns: also tells -0.0 (fp4 code 8) from 0.0
    np.testing.assert_array_equal(got.numpy().view(np.uint32), want.view(np.uint32))


def test_dequantize_rejects_parts_that_do_not_fit_the_layout():
    spec = WeightSpec("int4", (8, 64), 32)
    parts = dict(packed(spec, 0).parts)
    parts["scales"] = parts["scales"].float()
    with pytest.raises(ValueError, match="'scales'.*F16"):
        dequantize(parts, spec.scheme, spec.shape, spec.group_size)


def test_quantized_linear_equals_linear_with_reference_weight():
    spec = WeightSpec("int4", (48, 96), 32)
    weight = packed(spec, 1)
    bias = torch.randn(48, dtype=torch.bfloat16)
    layer = QuantizedLinear.from_packed(weight, bias=bias)
    x = torch.randn(5, 96, dtype=torch.bfloat16)
    w = torch.from_numpy(reference(weight.parts, spec)).to(torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, w, bias))


def make_experts(hidden=64, inter=96, n=4):
    """A QuantizedExperts whose experts all differ in scheme, plus their reference float32 weights."""
    schemes = [("nf4", 64, True), ("int2", 32, False), ("int8-sym", 64, False), ("mxfp4", 32, False)]
    weights = {"gate": [], "up": [], "down": []}
    for e in range(n):
        scheme, group, dq = schemes[e % len(schemes)]
        for proj, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
            weights[proj].append(packed(WeightSpec(scheme, shape, group, dq), seed=10 * e + len(weights[proj])))
    return QuantizedExperts.from_packed(weights["gate"], weights["up"], weights["down"]), weights


def test_experts_mix_schemes_in_one_layer_and_match_dense_reference():
    experts, weights = make_experts()
    assert [len(p.groups) for p in (experts.gate_proj, experts.up_proj, experts.down_proj)] == [4, 4, 4]
    tokens, top_k = 7, 2
    x = torch.randn(tokens, 64, dtype=torch.bfloat16)
    index = torch.stack([torch.randperm(4)[:top_k] for _ in range(tokens)])
    scores = torch.softmax(torch.randn(tokens, top_k), -1)
    dense = {proj: [torch.from_numpy(reference(w.parts, w.spec)).to(torch.bfloat16) for w in ws] for proj, ws in weights.items()}
    want = torch.zeros(tokens, 64)
    for t in range(tokens):
        for k in range(top_k):
            e = int(index[t, k])
            h = F.silu(F.linear(x[t], dense["gate"][e])) * F.linear(x[t], dense["up"][e])
            want[t] += float(scores[t, k]) * F.linear(h, dense["down"][e]).float()
    got = experts(x, index, scores)
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=2 * 2**-8 * want.abs().max().item())


def test_experts_run_only_the_routed_experts(monkeypatch):
    experts, _ = make_experts()
    ran = []
    original = experts.expert_forward
    monkeypatch.setattr(experts, "expert_forward", lambda e, x: ran.append(e) or original(e, x))
    experts(torch.randn(3, 64, dtype=torch.bfloat16), torch.tensor([[2, 0], [2, 0], [0, 2]]), torch.full((3, 2), 0.5))
    assert ran == [0, 2]


def test_packed_bytes_survive_dtype_casts_and_state_dict_round_trip():
    experts, weights = make_experts()
    before = {k: v.clone() for k, v in experts.state_dict().items()}
    experts.half()
    after = experts.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a cast changed packed bytes"
    empty = QuantizedExperts([w.spec for w in weights["gate"]], [w.spec for w in weights["up"]], [w.spec for w in weights["down"]])
    empty.load_state_dict(after)
    x, index, scores = torch.randn(4, 64, dtype=torch.bfloat16), torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]]), torch.full((4, 2), 0.5)
    assert torch.equal(empty(x, index, scores), experts(x, index, scores))


def test_adopting_the_kernels_layout_keeps_one_copy_and_the_same_results():
    kernels = pytest.importorskip("moeconv_torch.kernels")
    from moeconv_torch import backend

    experts, _ = make_experts(inter=128)
    x, index, scores = torch.randn(5, 64, dtype=torch.bfloat16), torch.randint(0, 4, (5, 2)), torch.full((5, 2), 0.5)
    before, own_bytes = experts(x, index, scores), sum(b.numel() for b in experts.buffers())
    assert backend._kernel_store(kernels, experts) is experts.kernel_store is not None
    projs = (experts.gate_proj, experts.up_proj, experts.down_proj)
    assert all(b.numel() == 0 for p in projs for b in p.buffers()), "the grouped copy was not released"
    assert sum(b.numel() * b.element_size() for b in experts.buffers()) < 1.2 * own_bytes
    assert torch.equal(experts(x, index, scores), before)


def test_layers_the_kernels_cannot_read_keep_the_torch_path():
    kernels = pytest.importorskip("moeconv_torch.kernels")
    from moeconv_torch import backend

    experts, _ = make_experts(inter=96)  # nf4 blocks of 64 would straddle rows of 96 columns
    assert backend._kernel_store(kernels, experts) is None
    assert experts.kernel_declined and experts.kernel_store is None
    assert all(b.numel() > 0 for b in experts.gate_proj.buffers())
