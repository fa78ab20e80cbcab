"""Fused 3-D expert adapters (GraniteMoE, Llama 4, DBRX, gpt-oss BF16 and MXFP4), end to end.

Each source is a tiny random model built with transformers and saved sharded,
so key names, shapes and orientations are what ``save_pretrained`` (and the Hub
releases) have on disk; the gpt-oss MXFP4 source is that model with its expert
tensors rewritten as the release stores them (``*_blocks`` ``U8 [E, out, in/32, 16]``
+ ``*_scales``).  Each is converted with the defaults, verified, compared per
expert with weights cut from the source by hand (independently of the
adapters: orientation and gate/up order are written out here), dequantized
back to the source's own fused layout and loaded by plain transformers; the
PyTorch loader's logits on the converted model equal transformers' on the
dequantized checkpoint.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from click.testing import CliRunner

import tiny_models as tm
from moeconv.adapters import AdapterError
from moeconv.cli import main
from moeconv.pipeline import Options, convert, plan_conversion
from moeconv.quant import QuantSpec
from moeconv.quant.mxfp4 import quantize_mxfp4
from moeconv.source import open_local
from moeconv_numpy import open_model
from test_convert_adapters import nf4_dq_bound, same_bits, stored

#: Llama 4's rotary buffer is complex; casting the tiny model to BF16 warns about it (harmless here).
pytestmark = pytest.mark.filterwarnings("ignore:Casting complex values to real:UserWarning")

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
E, I, H = 4, 32, 64
TEXT4 = dict(SMALL, intermediate_size=I, intermediate_size_mlp=96, num_local_experts=E, num_experts_per_tok=1,
             interleave_moe_layer_step=2, head_dim=16)  # layer 0 dense, layer 1 MoE with a shared expert
VISION4 = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=16, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64)


def _configs():
    T = transformers
    return {
        "granitemoe": (T.GraniteMoeForCausalLM, T.GraniteMoeConfig(**SMALL, intermediate_size=I, num_local_experts=E,
                                                                    num_experts_per_tok=2)),
        "llama4_text": (T.Llama4ForCausalLM, T.Llama4TextConfig(**TEXT4)),
        "llama4": (T.Llama4ForConditionalGeneration, T.Llama4Config(text_config=TEXT4, vision_config=VISION4)),
        "dbrx": (T.DbrxForCausalLM, T.DbrxConfig(
            d_model=H, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=128,
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={"ffn_hidden_size": I, "moe_num_experts": E, "moe_top_k": 2})),
        "gpt_oss": (T.GptOssForCausalLM, T.GptOssConfig(**SMALL, intermediate_size=I, num_local_experts=E,
                                                         num_experts_per_tok=2, head_dim=16, sliding_window=16)),
    }


#: arch -> (fused expert tensors, router tensors, number of routed-expert weights)
EXPECTED = {
    "granitemoe": (r".*block_sparse_moe\.(input|output)_linear\.weight", r".*block_sparse_moe\.router\.layer\.weight", 24),
    "llama4_text": (r".*feed_forward\.experts\.(gate_up|down)_proj", r".*feed_forward\.router\.weight", 12),
    "llama4": (r".*feed_forward\.experts\.(gate_up|down)_proj", r".*feed_forward\.router\.weight", 12),
    "dbrx": (r".*ffn\.experts\.mlp\.(w1|v1|w2)", r".*ffn\.router\.layer\.weight", 24),
    "gpt_oss": (r".*mlp\.experts\.(gate_up|down)_proj", r".*mlp\.router\.(weight|bias)", 24),
    "gpt_oss_mxfp4": (r".*mlp\.experts\.(gate_up|down)_proj_(blocks|scales)", r".*mlp\.router\.(weight|bias)", 24),
}


def build(arch: str, path):
    """A tiny random BF16 ``arch`` model (std 0.05, like tiny_models.build) saved in ``path`` in several shards."""
    cls, config = _configs()[arch]
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size=tm.SHARD)
    return path


def to_mxfp4_release(path) -> None:
    """Rewrite a saved BF16 gpt-oss checkpoint as the MXFP4 release stores it, in place.

    ``experts.gate_up_proj [E, H, 2I]`` / ``down_proj [E, I, H]`` (``[in, out]``) become
    ``*_blocks U8 [E, out, in/32, 16]`` and ``*_scales U8 [E, out, in/32]`` of the
    ``[out, in]`` rows (names and shapes as in ``openai/gpt-oss-20b`` and
    transformers' ``integrations/mxfp4.py``), quantized with moeconv's MXFP4.
    """

    def change(tensors):
        out = {}
        for name, t in tensors.items():
            if re.fullmatch(r".*mlp\.experts\.(gate_up|down)_proj", name):
                rows = t.transpose(1, 2).float()
                parts, finite = quantize_mxfp4(rows.reshape(-1, rows.shape[-1]))
                assert finite
                out[name + "_blocks"] = parts["qweight"].view(*rows.shape[:2], -1, 16).contiguous()
                out[name + "_scales"] = parts["scales"].view(*rows.shape[:2], -1).contiguous()
            else:
                out[name] = t
        return out

    tm.rewrite(path, change)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config, indent=2))


def bf16_equivalent(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The source with MXFP4 expert pairs replaced by transformers' own dequantization (BF16 ``[E, in, out]``)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    out = {}
    for name, t in tensors.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            base = name.removesuffix("_blocks")
            out[base] = convert_moe_packed_tensors(t, tensors[base + "_scales"], dtype=torch.bfloat16)
        else:
            out[name] = t
    return out


def split_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Logical name -> ``[out, in]`` expert weight, cut from BF16 fused tensors by hand."""
    out = {}

    def put(prefix, e, proj, w):
        out[f"{prefix}.{e}.{proj}_proj.weight"] = w

    for name, t in tensors.items():
        if m := re.fullmatch(r"(.*block_sparse_moe)\.(input|output)_linear\.weight", name):  # [E, 2I, H] / [E, H, I]
            for e in range(t.shape[0]):
                if m[2] == "input":
                    put(m[1] + ".experts", e, "gate", t[e, :I]), put(m[1] + ".experts", e, "up", t[e, I:])
                else:
                    put(m[1] + ".experts", e, "down", t[e])
        elif m := re.fullmatch(r"(.*feed_forward\.experts)\.(gate_up|down)_proj", name):  # [E, H, 2I] / [E, I, H]
            for e in range(t.shape[0]):
                if m[2] == "gate_up":
                    put(m[1], e, "gate", t[e][:, :I].T), put(m[1], e, "up", t[e][:, I:].T)
                else:
                    put(m[1], e, "down", t[e].T)
        elif m := re.fullmatch(r"(.*ffn\.experts)\.mlp\.(w1|v1|w2)", name):  # [E*I, H] each
            per = t.view(-1, I, t.shape[-1])
            for e in range(per.shape[0]):
                put(m[1], e, {"w1": "gate", "v1": "up", "w2": "down"}[m[2]], per[e].T if m[2] == "w2" else per[e])
        elif m := re.fullmatch(r"(.*mlp\.experts)\.(gate_up|down)_proj", name):  # gpt-oss [E, H, 2I] interleaved
            for e in range(t.shape[0]):
                if m[2] == "gate_up":
                    put(m[1], e, "gate", t[e][:, 0::2].T), put(m[1], e, "up", t[e][:, 1::2].T)
                else:
                    put(m[1], e, "down", t[e].T)
    return out


def _cli(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """arch -> (source dir, converted dir, dequantized dir), each built, converted and dequantized once."""
    root = tmp_path_factory.mktemp("fused")
    cache: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in cache:
            src = root / arch
            if arch == "gpt_oss_mxfp4":
                to_mxfp4_release(build("gpt_oss", src))
            else:
                build(arch, src)
            out, dst = root / f"{arch}-out", root / f"{arch}-bf16"
            _cli("convert", src, out)
            _cli("dequantize", out, dst)
            cache[arch] = (src, out, dst)
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_convert_verify_dequantize(arch, converted):
    src, out, dst = converted(arch)
    fused_pattern, router_pattern, n_weights = EXPECTED[arch]
    fused_re, router_re = re.compile(fused_pattern), re.compile(router_pattern)
    source = tm.read_all(src)
    assert len(set(tm.shard_files(src).values())) > 1  # really sharded
    fused = {n for n in source if fused_re.fullmatch(n)}
    assert fused
    ref = split_experts(bf16_equivalent(source))
    assert len(ref) == n_weights

    assert f"({n_weights} quantized weights)" in _cli("verify", out)
    model = open_model(out)
    assert set(model.weights) == set(ref)
    mxfp4 = arch == "gpt_oss_mxfp4"
    for name, info in model.weights.items():
        layer, expert, proj = re.search(r"\.(\d+)\..*experts\.(\d+)\.(gate|up|down)_proj\.weight$", name).groups()
        assert (info.role, info.layer, info.expert, info.proj) == ("routed_expert", int(layer), int(expert), proj)
        assert info.shape == tuple(ref[name].shape)
        got, w = torch.from_numpy(model.dequantize(name)), ref[name].float()
        if mxfp4:  # carried through: transformers' own dequantization, exactly
            assert (info.scheme, info.group_size) == ("mxfp4", 32)
            assert torch.equal(got, w), f"{name}: MXFP4 not carried through exactly"
        else:
            assert (info.scheme, info.group_size, info.double_quant) == ("nf4", 64, True)
            err = (got - w).abs()
            assert (err <= nf4_dq_bound(w)).all(), f"{name}: error {err.max()} above the NF4 bound"
            assert err.max() > 0
    routers = {n for n in source if router_re.fullmatch(n)}
    assert routers and set(model.routers) == routers
    for name in set(source) - fused:  # routers, biases, norms, attention, embeddings: bit for bit
        assert same_bits(stored(out, name), source[name]), f"{name} is not kept as stored"

    restored = tm.read_all(dst)
    want = bf16_equivalent(source)  # the MXFP4 release comes back in gpt-oss's BF16 layout
    assert set(restored) == set(want)
    assert "quantization_config" not in json.loads((dst / "config.json").read_text())
    for name, t in want.items():
        assert (restored[name].dtype, restored[name].shape) == (t.dtype, t.shape), name
        if not fused_re.fullmatch(name) and not (mxfp4 and name.endswith("_proj")):
            assert same_bits(restored[name], t), name
    for name, w in split_experts(restored).items():  # the fused layout is rebuilt exactly (orientation, gate/up order)
        assert torch.equal(w, torch.from_numpy(model.dequantize(name)).bfloat16()), name
    if mxfp4:
        for name in want:
            if name.endswith("_proj"):
                assert same_bits(restored[name], want[name]), f"{name} differs from transformers' MXFP4 dequantization"
    config = json.loads((dst / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    _, info = cls.from_pretrained(dst, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_mxfp4_bytes_carried_through_unchanged(converted):
    """Each expert's gate (even rows), up (odd rows) and down bytes are the release's bytes."""
    src, out, _ = converted("gpt_oss_mxfp4")
    source = tm.read_all(src)
    checked = 0
    for name, blocks in source.items():
        if m := re.fullmatch(r"(.*mlp\.experts)\.(gate_up|down)_proj_blocks", name):
            scales = source[name.removesuffix("_blocks") + "_scales"]
            rows = {"gate": slice(0, None, 2), "up": slice(1, None, 2)} if m[2] == "gate_up" else {"down": slice(None)}
            for e in range(blocks.shape[0]):
                for proj, sel in rows.items():
                    logical = f"{m[1]}.{e}.{proj}_proj.weight"
                    assert torch.equal(stored(out, logical + ".qweight"), blocks[e, sel].reshape(-1, blocks.shape[2] * 16))
                    assert torch.equal(stored(out, logical + ".scales"), scales[e, sel])
                    checked += 1
    assert checked == 24


def test_mxfp4_assignment_requantizes_only_the_named_weight(converted, tmp_path):
    """A scheme assignment overrides the carry-through for its weight (from the exact MXFP4 values)."""
    src, out, _ = converted("gpt_oss_mxfp4")
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    conv = plan_conversion(open_local(src), Options(), {name: QuantSpec("int4", 32)})
    specs = {t.item.name: t.spec for t in conv.tasks if t.item.role == "routed_expert"}
    assert specs.pop(name) == QuantSpec("int4", 32)
    assert set(specs.values()) == {QuantSpec("mxfp4")}
    convert(conv, tmp_path / "mixed")
    model, carried = open_model(tmp_path / "mixed"), open_model(out)
    assert model.weights[name].scheme == "int4"
    groups = torch.from_numpy(carried.dequantize(name)).view(I, -1, 32)  # the exact MXFP4 values
    err = (torch.from_numpy(model.dequantize(name)).view(I, -1, 32) - groups).abs()
    step = (groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)) / 15  # int4 RTN: error <= step / 2
    assert (err <= 0.51 * step.unsqueeze(-1) + 1e-6).all() and err.max() > 0
    other = "model.layers.0.mlp.experts.0.gate_proj.weight"
    assert same_bits(stored(tmp_path / "mixed", other + ".qweight"), stored(out, other + ".qweight"))


def test_kept_fused_experts_are_restored_bit_exact(converted, tmp_path):
    """``--keep`` on experts of a fused tensor stores them plain per expert; dequantize re-fuses them unchanged."""
    src, _, _ = converted("granitemoe")
    out, dst = tmp_path / "kept", tmp_path / "kept-bf16"
    _cli("convert", src, out, "--keep", "*.experts.0.*")
    model = open_model(out)
    assert not any(info.expert == 0 for info in model.weights.values()) and len(model.weights) == 18
    _cli("dequantize", out, dst)
    source, restored = tm.read_all(src), tm.read_all(dst)
    name = "model.layers.0.block_sparse_moe.input_linear.weight"
    assert same_bits(restored[name][0], source[name][0])  # expert 0 kept: bit for bit
    assert not torch.equal(restored[name][1], source[name][1])  # expert 1 quantized


def test_config_mismatch_and_missing_scales_name_the_tensor(converted):
    src, _, _ = converted("gpt_oss_mxfp4")
    source = open_local(src)
    source.config["intermediate_size"] = 64
    with pytest.raises(AdapterError, match=r"model-\d+-of-\d+\.safetensors: tensor '.*_proj_blocks' .*intermediate_size=64"):
        plan_conversion(source, Options())
    source = open_local(src)
    del source.tensors["model.layers.0.mlp.experts.down_proj_scales"]
    with pytest.raises(AdapterError, match=r"down_proj_blocks.* has no companion .*down_proj_scales"):
        plan_conversion(source, Options())


#: The PyTorch loader maps these model types (multimodal ``llama4`` is not mapped; see the report).
LOADER_ARCHS = ["granitemoe", "llama4_text", "dbrx", "gpt_oss", "gpt_oss_mxfp4"]


@pytest.mark.parametrize("arch", LOADER_ARCHS)
def test_loader_logits_equal_dequantized_checkpoint(arch, converted):
    from moeconv_torch import load_model

    _, out, dst = converted(arch)
    ref = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.bfloat16, experts_implementation="eager")
    model = load_model(out)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(ids).logits.float(), ref(ids).logits.float()
    torch.testing.assert_close(got, want, rtol=0, atol=2 * 2**-8 * want.abs().max().item())
