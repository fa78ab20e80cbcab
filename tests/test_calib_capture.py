"""Routed calibration capture: per-expert statistics equal a direct computation from the router's top-k."""

from __future__ import annotations

import pytest
import torch
import transformers as T
import tiny_models as tm

from moeconv.calib.capture import ARCHS, MoEArch, iterate_moe_layers

HIDDEN, INTER, EXPERTS = 32, 48, 4


def tiny_mixtral(seed: int = 0, experts: int = EXPERTS) -> torch.nn.Module:
    return tm.mixtral_in_memory(seed, experts)


def block_inputs(model, ids, arch: MoEArch = ARCHS["mixtral"]) -> dict[int, torch.Tensor]:
    """Each MoE block's input [T, H] (float32) from ONE full forward of the model: the independent reference."""
    seen, handles = {}, []
    for i, layer in enumerate(model.get_submodule(arch.layers)):
        block = getattr(layer, arch.block)
        if hasattr(block, arch.experts):
            handles.append(block.register_forward_pre_hook(
                lambda _m, args, i=i: seen.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]).float())))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def direct_stats(block, x: torch.Tensor, top_k: int, soft_for=()):
    """Token counts, Hessians and probability mass computed from scratch from the router weight and top-k."""
    probs = torch.softmax(x @ block.gate.weight.float().T, dim=-1)
    routed = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, probs.topk(top_k, dim=-1).indices, True)
    gate_up, down_in = block.experts.gate_up_proj.float(), []
    h_in, h_mid, tokens = [], [], []
    for e in range(probs.shape[1]):
        w = routed[:, e].float() + (probs[:, e] * ~routed[:, e] if e in soft_for else 0)
        g, u = (x @ gate_up[e].T).chunk(2, dim=-1)
        z = torch.nn.functional.silu(g) * u
        h_in.append((x * w[:, None]).T @ x)
        h_mid.append((z * w[:, None]).T @ z)
        tokens.append(routed[:, e].sum())
        down_in.append(z)
    return torch.stack(tokens).float(), torch.stack(h_in), torch.stack(h_mid), probs.sum(0)


def test_routed_statistics_match_direct_computation():
    model = tiny_mixtral()
    ids = torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(1))
    reference = block_inputs(model, ids)
    layers = list(iterate_moe_layers(model, ids, min_tokens=0, batch_size=2))
    assert [layer.index for layer in layers] == [0, 1]
    for layer in layers:
        tokens, h_in, h_mid, mass = direct_stats(layer.block, reference[layer.index], top_k=2)
        stats = layer.stats
        assert torch.equal(stats.tokens, tokens)
        assert stats.tokens.sum() == 2 * ids.numel() and stats.n_tokens == ids.numel()
        torch.testing.assert_close(stats.h_in, h_in, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(stats.h_mid, h_mid, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(stats.prob_mass, mass, rtol=1e-5, atol=1e-4)
        assert stats.starved == [] and torch.all(stats.soft_tokens == 0)


def test_starved_experts_get_probability_weighted_tokens():
    model = tiny_mixtral(seed=2)
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(3))
    reference = block_inputs(model, ids)
    threshold = 31  # 120 routed slots over 4 experts: some experts fall below, some not
    for layer in iterate_moe_layers(model, ids, min_tokens=threshold):
        stats = layer.stats
        starved = [e for e in range(EXPERTS) if stats.tokens[e] < threshold]
        assert stats.starved == starved
        tokens, h_in, h_mid, mass = direct_stats(layer.block, reference[layer.index], 2, soft_for=starved)
        torch.testing.assert_close(stats.h_in, h_in, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(stats.h_mid, h_mid, rtol=1e-4, atol=1e-3)
        probs = torch.softmax(reference[layer.index] @ layer.block.gate.weight.float().T, -1)
        for e in range(EXPERTS):
            routed = (probs.topk(2, -1).indices == e).any(-1)
            expected = probs[~routed, e].sum() if e in starved else torch.tensor(0.0)
            torch.testing.assert_close(stats.soft_tokens[e], expected)


def test_expert_with_zero_tokens_is_finite():
    model = tiny_mixtral(seed=4, experts=8)
    ids = torch.randint(0, 64, (1, 3), generator=torch.Generator().manual_seed(5))  # 6 routed slots < 8 experts
    for layer in iterate_moe_layers(model, ids):
        stats = layer.stats
        assert (stats.tokens == 0).any()
        assert stats.starved == list(range(8))  # all below the default threshold max(hidden, inter)
        for t in (stats.h_in, stats.h_mid, stats.mean_abs_in(), stats.mean_abs_mid()):
            assert torch.isfinite(t).all()
        assert torch.all(stats.effective_tokens > 0)


def test_layers_are_sequential_the_loop_body_changes_what_the_next_layer_sees():
    model = tiny_mixtral(seed=6)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(7))
    untouched = [layer.stats.h_in.clone() for layer in iterate_moe_layers(model, ids)]
    changed = []
    for layer in iterate_moe_layers(model, ids):
        changed.append(layer.stats.h_in.clone())
        with torch.no_grad():
            layer.experts.down_proj.mul_(3.0)  # the next layer's input must reflect this
    torch.testing.assert_close(changed[0], untouched[0])
    assert not torch.allclose(changed[1], untouched[1])


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_other_architectures_through_their_description(arch):
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    if arch == "qwen3_moe":
        config = T.Qwen3MoeConfig(**common, intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                                  num_experts_per_tok=2, head_dim=8)
        model_cls, moe_layers = T.Qwen3MoeForCausalLM, [0, 1]
    else:
        config = T.DeepseekV3Config(
            **{**common, "num_key_value_heads": 4}, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=4,
            n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1,
            q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
        model_cls, moe_layers = T.DeepseekV3ForCausalLM, [1]
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    reference = block_inputs(model, ids, ARCHS[arch])
    layers = list(iterate_moe_layers(model, ids, min_tokens=0))
    assert [layer.index for layer in layers] == moe_layers  # DeepSeek's dense first layer is run, not yielded
    for layer in layers:
        x = reference[layer.index]
        _, _, index = layer.block.gate(x.to(layer.block.gate.weight.dtype))
        expected = torch.bincount(index.reshape(-1), minlength=4).float()
        assert torch.equal(layer.stats.tokens, expected)
        mask = (index == 1).any(-1)
        torch.testing.assert_close(layer.stats.h_in[1], x[mask].T @ x[mask], rtol=1e-4, atol=1e-3)
