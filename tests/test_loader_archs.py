"""The loader on every MoE architecture it maps: logits equal the dequantized checkpoint's, generate works.

Each case builds a tiny random model of one transformers architecture, gives
every routed expert (and, where the architecture has them, shared experts or
dense MLPs) random packed weights of mixed schemes, writes the reference
dequantized checkpoint with ``save_pretrained`` and the converted directory
with the format's writer, then loads both.  The expert names in the converted
files follow the format's rule for fused sources
(``<experts prefix>.<e>.<gate_proj|up_proj|down_proj>.weight``); the loader
reads only the metadata (layer, expert, proj) to place them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moeconv_torch import QuantizedExperts, QuantizedLinear, WeightSpec, load_model
from moeconv_torch.architectures import ARCHITECTURES, find_experts_modules
from test_loader_model import MIXED, VOCAB, random_parts, reference_dequantize, write_converted

COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@dataclass
class Case:
    model_type: str
    config: dict
    #: how the transformers experts module stores gate/up/down (to write the reference weights)
    layout: str
    #: saved tensor names holding routed experts (dropped from the converted plain tensors)
    experts_source: str
    #: saved tensor names listed as routers
    routers: str
    #: (module-name regex, role) of nn.Linear layers to quantize too
    linears: list[tuple[str, str]] = field(default_factory=list)


CASES = [
    Case("qwen2_moe", dict(SMALL, intermediate_size=128, moe_intermediate_size=96, shared_expert_intermediate_size=64,
                           num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]),
         "concat", r"mlp\.experts\.\d+\.", r"mlp\.(gate|shared_expert_gate)\.weight$",
         [(r"mlp\.shared_expert\.(gate|up|down)_proj$", "shared_expert")]),
    Case("qwen3_moe", dict(SMALL, intermediate_size=128, moe_intermediate_size=96, num_experts=4, num_experts_per_tok=2,
                           head_dim=16, decoder_sparse_step=1, mlp_only_layers=[]),
         "concat", r"mlp\.experts\.\d+\.", r"mlp\.gate\.weight$"),
    Case("deepseek_v3", dict(SMALL, num_hidden_layers=3, num_key_value_heads=4, intermediate_size=128,
                             moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                             first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=32,
                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
         "concat", r"mlp\.experts\.\d+\.", r"mlp\.gate\.(weight|e_score_correction_bias)$",
         [(r"layers\.0\.mlp\.(gate|up|down)_proj$", "dense"), (r"mlp\.shared_experts\.(gate|up|down)_proj$", "shared_expert")]),
    Case("deepseek_v2", dict(SMALL, num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32,
                             n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                             n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                             qk_nope_head_dim=8, v_head_dim=16),
         "concat", r"mlp\.experts\.\d+\.", r"mlp\.gate\.weight$"),
    Case("olmoe", dict(SMALL, intermediate_size=128, num_experts=4, num_experts_per_tok=2),
         "concat", r"mlp\.experts\.\d+\.", r"mlp\.gate\.weight$"),
    Case("phimoe", dict(SMALL, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2),
         "concat", r"block_sparse_moe\.experts\.\d+\.", r"block_sparse_moe\.gate\.weight$"),
    Case("granitemoe", dict(SMALL, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2),
         "concat", r"block_sparse_moe\.(input|output)_linear\.", r"router\.layer\.weight$"),
    Case("granitemoeshared", dict(SMALL, intermediate_size=128, shared_intermediate_size=64, num_local_experts=4,
                                  num_experts_per_tok=2),
         "concat", r"block_sparse_moe\.(input|output)_linear\.", r"router\.layer\.weight$",
         [(r"shared_mlp\.(input|output)_linear$", "shared_expert")]),
    Case("gpt_oss", dict(SMALL, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                         sliding_window=16),
         "gpt_oss", r"mlp\.experts\.(gate_up|down)_proj$", r"mlp\.router\.(weight|bias)$"),
    Case("llama4_text", dict(SMALL, intermediate_size=128, intermediate_size_mlp=128, num_local_experts=4,
                             num_experts_per_tok=1, head_dim=16, interleave_moe_layer_step=1),
         "llama4", r"feed_forward\.experts\.(gate_up|down)_proj$", r"feed_forward\.router\.weight$",
         [(r"feed_forward\.shared_expert\.(gate|up|down)_proj$", "shared_expert")]),
    Case("dbrx", dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=256,
                      ffn_config=dict(ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2),
                      attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0)),
         "dbrx", r"ffn\.experts\.mlp\.(w1|v1|w2)$", r"ffn\.router\.layer\.weight$"),
]


def set_expert_weight(module: torch.nn.Module, layout: str, expert: int, proj: str, w: torch.Tensor) -> None:
    """Write expert ``expert``'s logical ``[out, in]`` weight into a transformers experts module."""
    if layout == "dbrx":
        mlp = module.mlp
        n = module.num_experts
        target = {"gate": mlp.w1, "up": mlp.v1, "down": mlp.w2}[proj].view(n, -1, module.hidden_size)[expert]
        target.copy_(w.T if proj == "down" else w)
        return
    if proj == "down":
        module.down_proj[expert].copy_(w if layout == "concat" else w.T)
        return
    inter = w.shape[0]
    fused = module.gate_up_proj[expert]
    if layout == "concat":
        fused[(0 if proj == "gate" else inter) : (inter if proj == "gate" else 2 * inter)].copy_(w)
    elif layout == "gpt_oss":
        fused[:, 0 if proj == "gate" else 1 :: 2].copy_(w.T)
    else:  # llama4
        fused[:, (0 if proj == "gate" else inter) : (inter if proj == "gate" else 2 * inter)].copy_(w.T)


def build_case(case: Case, tmp_path, seed: int = 0):
    """(dequantized reference directory, converted directory) for one architecture case."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(case.model_type, **COMMON, **case.config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    arch = ARCHITECTURES[case.model_type]
    quantized, count = {}, 0

    def quantize(name, shape, meta):
        nonlocal count
        scheme, group, dq = MIXED[count % len(MIXED)]
        count += 1
        parts = random_parts(scheme, shape, group, dq, gen)
        quantized[name] = (parts, {"scheme": scheme, "group_size": group, "double_quant": dq, "shape": list(shape),
                                   "dtype": "bfloat16", **meta})
        return reference_dequantize(parts, WeightSpec(scheme, shape, group, dq)).to(torch.bfloat16)

    with torch.no_grad():
        for layer, path in find_experts_modules(model, arch).items():
            module = model.get_submodule(path)
            hidden = model.config.get_text_config().hidden_size if case.model_type != "dbrx" else config.d_model
            inter = sum(q.numel() for n, q in module.named_parameters() if not n.endswith("bias")) // (3 * module.num_experts * hidden)
            for e in range(module.num_experts):
                for proj in ("gate", "up", "down"):
                    shape = (hidden, inter) if proj == "down" else (inter, hidden)
                    w = quantize(f"{path}.{e}.{proj}_proj.weight", shape,
                                 {"role": "routed_expert", "layer": layer, "expert": e, "proj": proj})
                    set_expert_weight(module, case.layout, e, proj, w)
        for pattern, role in case.linears:
            for name, linear in model.named_modules():
                if isinstance(linear, torch.nn.Linear) and re.search(pattern, name):
                    layer = int(re.search(r"\.(\d+)\.", name).group(1))
                    w = quantize(f"{name}.weight", tuple(linear.weight.shape),
                                 {"role": role, "layer": layer, "expert": None, "proj": None})
                    linear.weight.copy_(w)
    ref_dir, conv_dir = tmp_path / "dequantized", tmp_path / "converted"
    model.save_pretrained(ref_dir)
    write_converted(ref_dir, conv_dir, quantized, expert_pattern=case.experts_source, router_pattern=case.routers)
    return ref_dir, conv_dir, len(quantized)


@pytest.mark.parametrize("case", CASES, ids=[c.model_type for c in CASES])
def test_logits_match_dequantized_checkpoint(case, tmp_path):
    ref_dir, conv_dir, n_quantized = build_case(case, tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.bfloat16, experts_implementation="eager")
    model = load_model(conv_dir)
    placed = sum(3 * m.num_experts for m in model.modules() if isinstance(m, QuantizedExperts))
    placed += sum(isinstance(m, QuantizedLinear) for m in model.modules())
    assert placed == n_quantized, "some quantized weights found no packed module"
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(ids).logits.float(), ref(ids).logits.float()
    torch.testing.assert_close(got, want, rtol=0, atol=2 * 2**-8 * want.abs().max().item())
    prompt = ids[:1, :4]
    out = model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8) and torch.equal(out[:, :4], prompt)
