"""The PyTorch loader end to end on tiny random Mixtral checkpoints built in the test.

A converted directory is written with the format's writer from hand-built
packed parts (random codes with realistic scales), so these tests need
neither the quantizers nor the converter.  The reference is the same
checkpoint dequantized by the reference reader (``moeconv_numpy``), stored in
BF16 and loaded by plain transformers.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

import moeconv_numpy
import moeconv_torch
from moeconv.format.writer import ShardedWriter
from moeconv_numpy.schemes import scheme_info, tensor_layout
from moeconv_torch import QuantizedExperts, WeightSpec, load_model
from moeconv_torch.perplexity import perplexity

WORDS = [f"w{i}" for i in range(150)]
VOCAB = 160
#: (scheme, group size, double quant), cycled over experts so every layer mixes schemes
MIXED = [("nf4", 64, True), ("int4", 32, False), ("int2-sym", 64, False), ("mxfp4", 32, False)]


def random_parts(scheme: str, shape, group_size: int, double_quant: bool, gen: torch.Generator) -> dict:
    """Valid packed parts with random codes and scales of a trained model's magnitude (|w| ~ 0.01-0.1)."""
    info = scheme_info(scheme)
    parts = {}
    for suffix, (dtype, dims) in tensor_layout(scheme, tuple(shape), group_size, double_quant).items():
        rand = torch.rand(dims, generator=gen)
        if suffix == "qweight" or suffix == "absmax_q":
            parts[suffix] = torch.randint(0, 256, dims, generator=gen, dtype=torch.uint8)
        elif suffix == "scales" and info.family == "mxfp4":
            parts[suffix] = torch.randint(119, 123, dims, generator=gen, dtype=torch.uint8)
        elif suffix == "scales":
            parts[suffix] = ((0.5 + rand) * 0.06 / (1 << info.bits)).half()
        elif suffix == "zeros":
            parts[suffix] = ((1 << (info.bits - 1)) + rand - 0.5).half()
        elif suffix == "absmax":
            parts[suffix] = 0.02 + 0.04 * rand
        elif suffix == "absmax_scale":
            parts[suffix] = 0.01 * (1 + rand)
        else:  # absmax_offset
            parts[suffix] = torch.full(dims, 0.04)
    return parts


def reference_dequantize(parts: dict, spec: WeightSpec) -> torch.Tensor:
    """The reference reader's float32 weight for torch parts."""
    arrays = {k: v.numpy() for k, v in parts.items()}
    w = moeconv_numpy.dequantize(arrays, spec.scheme, spec.shape, spec.group_size, spec.double_quant)
    return torch.from_numpy(np.array(w))


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_mixtral_config(**overrides):
    kwargs = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, vocab_size=VOCAB, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return AutoConfig.for_model("mixtral", **kwargs)


def mixtral_name(layer: int, expert: int, proj: str) -> str:
    leaf = {"gate": "w1", "up": "w3", "down": "w2"}[proj]
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{leaf}.weight"


def build_mixtral(tmp_path: Path, specs=MIXED, seed: int = 0, **config_overrides) -> tuple[Path, Path]:
    """(dequantized BF16 HF directory, converted directory) of one random tiny Mixtral.

    Expert ``e`` of layer ``l`` uses ``specs[(l + e) % len(specs)]`` for all three projections.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = tiny_mixtral_config(**config_overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    hidden, inter = config.hidden_size, config.intermediate_size
    quantized = {}
    for layer, block in enumerate(model.model.layers):
        experts = block.mlp.experts
        for e in range(config.num_local_experts):
            scheme, group, dq = specs[(layer + e) % len(specs)]
            for proj, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
                spec = WeightSpec(scheme, shape, group, dq)
                parts = random_parts(scheme, shape, group, dq, gen)
                w = reference_dequantize(parts, spec).to(torch.bfloat16)
                with torch.no_grad():
                    if proj == "down":
                        experts.down_proj[e] = w
                    else:
                        experts.gate_up_proj[e, (0 if proj == "gate" else inter) : (inter if proj == "gate" else 2 * inter)] = w
                meta = {"scheme": scheme, "group_size": group, "double_quant": dq, "shape": list(shape),
                        "dtype": "bfloat16", "role": "routed_expert", "layer": layer, "expert": e, "proj": proj}
                quantized[mixtral_name(layer, e, proj)] = (parts, meta)
    ref_dir, conv_dir = tmp_path / "dequantized", tmp_path / "converted"
    model.save_pretrained(ref_dir)
    make_tokenizer().save_pretrained(ref_dir)
    write_converted(ref_dir, conv_dir, quantized, expert_pattern=r"\.experts\.\d+\.w[123]\.weight$",
                    router_pattern=r"block_sparse_moe\.gate\.weight$")
    return ref_dir, conv_dir


def write_converted(ref_dir: Path, out_dir: Path, quantized: dict, expert_pattern: str, router_pattern: str,
                    max_shard_bytes: int = 64_000) -> Path:
    """Converted directory: ``ref_dir``'s tensors minus those matching ``expert_pattern``, plus ``quantized``."""
    import re

    from safetensors.torch import load_file

    writer = ShardedWriter(out_dir, max_shard_bytes=max_shard_bytes)
    for shard in sorted(ref_dir.glob("*.safetensors")):
        for name, tensor in load_file(shard).items():
            if re.search(expert_pattern, name) or name in quantized:
                continue
            writer.add_tensor(name, tensor, router=re.search(router_pattern, name) is not None)
    for name, (parts, meta) in quantized.items():
        writer.add_quantized(name, parts, meta)
    config = json.loads((ref_dir / "config.json").read_text())
    extra = [p for p in ref_dir.iterdir() if p.suffix != ".safetensors" and p.name not in ("config.json", "model.safetensors.index.json")]
    return writer.finalize(config, extra_files=extra)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> tuple[Path, Path]:
    return build_mixtral(tmp_path_factory.mktemp("mixtral"))


def reference_model(ref_dir: Path):
    """The dequantized checkpoint through plain transformers (eager experts: the same arithmetic order)."""
    return AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.bfloat16, experts_implementation="eager")


IDS = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))


def test_load_model_matches_dequantized_checkpoint_and_generates(mixtral):
    ref_dir, conv_dir = mixtral
    model, ref = load_model(conv_dir), reference_model(ref_dir)
    assert all(isinstance(layer.mlp.experts, QuantizedExperts) for layer in model.model.layers)
    assert model.model.layers[0].mlp.gate.weight.dtype == torch.bfloat16
    with torch.no_grad():
        got, want = model(IDS).logits.float(), ref(IDS).logits.float()
    torch.testing.assert_close(got, want, rtol=0, atol=2 * 2**-8 * want.abs().max().item())
    prompt = IDS[:1, :5]
    out = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False))


def test_from_pretrained_goes_through_the_quantizer_registry(mixtral):
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    ref_dir, conv_dir = mixtral
    assert AUTO_QUANTIZER_MAPPING["moeconv"] is moeconv_torch.MoeconvHfQuantizer
    model, info = AutoModelForCausalLM.from_pretrained(conv_dir, output_loading_info=True)
    assert isinstance(model.hf_quantizer, moeconv_torch.MoeconvHfQuantizer)
    assert isinstance(model.model.layers[1].mlp.experts, QuantizedExperts)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and not info["mismatched_keys"]
    with torch.no_grad():
        got, want = model(IDS).logits, load_model(conv_dir)(IDS).logits
    assert torch.equal(got, want)


def test_from_pretrained_with_device_map_auto(mixtral):
    _, conv_dir = mixtral
    model = AutoModelForCausalLM.from_pretrained(conv_dir, device_map="auto")
    assert isinstance(model.model.layers[0].mlp.experts, QuantizedExperts)
    ids = IDS.to(model.device)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_model(conv_dir, device=model.device)(ids).logits)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights share one)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            total += tensor.untyped_storage().nbytes()
    return total


def test_meta_load_never_allocates_bf16_sized_expert_buffers(mixtral):
    from torch.utils._python_dispatch import TorchDispatchMode

    _, conv_dir = mixtral
    config = tiny_mixtral_config()
    # BF16 bytes of one projection of all experts of one layer: no real tensor that large may ever exist
    bf16_projection = config.num_local_experts * config.intermediate_size * config.hidden_size * 2
    largest = []

    class LargestAllocation(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and not t.is_meta:
                    largest.append((t.untyped_storage().nbytes(), str(func)))
            return out

    with LargestAllocation():
        model = load_model(conv_dir)
    assert max(largest)[0] < bf16_projection, max(largest)
    plan = moeconv_numpy.open_model(conv_dir)
    packed_in_file = sum(w.nbytes for w in plan.weights.values())
    packed_in_model = sum(model_bytes(layer.mlp.experts) for layer in model.model.layers)
    assert packed_in_model == packed_in_file
    file_size = sum(p.stat().st_size for p in conv_dir.glob("*.safetensors"))
    assert model_bytes(model) <= 1.1 * file_size


def test_layers_mix_schemes_expert_by_expert(mixtral):
    _, conv_dir = mixtral
    model = load_model(conv_dir)
    reader = moeconv_numpy.open_model(conv_dir)
    experts = model.model.layers[1].mlp.experts
    assert {experts.gate_proj.spec(e).scheme for e in range(4)} == {s for s, _, _ in MIXED}
    for e in range(4):
        want = reader.dequantize(mixtral_name(1, e, "down"))
        got = experts.down_proj.dequantize(e)
        np.testing.assert_array_equal(got.numpy().view(np.uint32), want.view(np.uint32))


def damage(conv_dir: Path, how: str) -> Path:
    shards = sorted(conv_dir.glob("model-*.safetensors"))
    if how == "missing shard":
        shards[-1].unlink()
    elif how == "truncated shard":
        data = shards[0].read_bytes()
        shards[0].write_bytes(data[: len(data) // 2])
    elif how == "bad index":
        (conv_dir / "model.safetensors.index.json").write_text("{ not json")
    elif how == "flipped byte":
        data = bytearray(shards[0].read_bytes())
        data[-100] ^= 0xFF
        shards[0].write_bytes(bytes(data))
    return conv_dir


@pytest.mark.parametrize("how", ["missing shard", "truncated shard", "bad index", "flipped byte"])
def test_damaged_directory_gives_one_line_error(mixtral, tmp_path, how):
    from moeconv.cli import main

    conv_dir = damage(Path(shutil.copytree(mixtral[1], tmp_path / "damaged")), how)
    with pytest.raises(moeconv_numpy.FormatError, match=str(tmp_path / "damaged")):
        load_model(conv_dir, verify=True)
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(WORDS))
    result = CliRunner().invoke(main, ["eval", str(conv_dir), "--text", str(text), "--seq-len", "8"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output


def test_eval_command_matches_dequantized_model_perplexity(mixtral, tmp_path):
    from moeconv.cli import main

    ref_dir, conv_dir = mixtral
    text = tmp_path / "eval.txt"
    words = np.random.default_rng(0).choice(WORDS, 400)
    text.write_text(" ".join(words))
    runs = {}
    for name, path in (("converted", conv_dir), ("dequantized", ref_dir)):
        result = CliRunner().invoke(main, ["eval", str(path), "--text", str(text), "--seq-len", "64",
                                           "--max-tokens", "300", "--json", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        runs[name] = json.loads(result.stdout)
    assert runs["converted"]["converted"] and not runs["dequantized"]["converted"]
    assert runs["converted"]["tokens"] == 256 and runs["converted"]["seq_len"] == 64
    ids = make_tokenizer()(text.read_text(), return_tensors="pt").input_ids
    # the loader computes experts in the order of transformers' eager experts: same figure
    eager = perplexity(reference_model(ref_dir), ids, seq_len=64, max_tokens=300)
    assert math.isclose(runs["converted"]["perplexity"], eager, rel_tol=1e-6)
    # an original model goes through plain from_pretrained (default experts implementation)
    default = perplexity(AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.bfloat16), ids, seq_len=64, max_tokens=300)
    assert math.isclose(runs["dequantized"]["perplexity"], default, rel_tol=1e-6)
    assert math.isclose(runs["converted"]["perplexity"], runs["dequantized"]["perplexity"], rel_tol=1e-2)


def test_generate_command_streams_the_completion(mixtral):
    from moeconv.cli import main

    ref_dir, conv_dir = mixtral
    prompt = "w1 w2 w3 w4"
    result = CliRunner().invoke(main, ["generate", str(conv_dir), "--prompt", prompt, "--max-new-tokens", "5",
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    tokenizer = make_tokenizer()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = reference_model(ref_dir).generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=2)
    assert result.stdout.strip() == tokenizer.decode(expected[0], skip_special_tokens=True)
