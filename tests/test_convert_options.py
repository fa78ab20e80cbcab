"""``moeconv convert`` options: schemes, --keep, --quantize-dense, --dry-run, plug-in assignment and
quantizer, Hub sources from the offline cache, and the model card."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

import tiny_models as tm
from moeconv.cli import main
from moeconv.pipeline import Options, convert, plan_conversion
from moeconv.quant import QuantSpec, quantize
from moeconv.source import open_source
from moeconv_numpy import open_model


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return tm.build("qwen2_moe", tmp_path_factory.mktemp("options") / "qwen2")


def ok(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_scheme_group_size_and_double_quant(qwen2, tmp_path):
    ok("convert", qwen2, tmp_path / "out", "--scheme", "int4", "--group-size", "128", "--no-double-quant")
    model = open_model(tmp_path / "out")
    assert {(w.scheme, w.group_size, w.double_quant) for w in model.weights.values()} == {("int4", 128, False)}
    ok("convert", qwen2, tmp_path / "nf4", "--no-double-quant")
    model = open_model(tmp_path / "nf4")
    assert {(w.scheme, w.group_size, w.double_quant) for w in model.weights.values()} == {("nf4", 64, False)}


def test_mxfp4_takes_its_own_block_size(qwen2, tmp_path):
    ok("convert", qwen2, tmp_path / "out", "--scheme", "mxfp4")
    assert {w.group_size for w in open_model(tmp_path / "out").weights.values()} == {32}


def test_keep_and_quantize_dense(qwen2, tmp_path):
    out = tmp_path / "out"
    ok("convert", qwen2, out, "--quantize-dense", "int8", "--keep", "model.layers.1.mlp.experts.3.*",
       "--keep", "*.o_proj.weight")
    model = open_model(out)
    weights = model.weights
    roles = {}
    for name, w in weights.items():
        roles.setdefault(w.role, set()).add(w.scheme)
    assert roles == {"routed_expert": {"nf4"}, "shared_expert": {"int8"}, "dense": {"int8"}}
    assert "model.layers.1.mlp.experts.3.up_proj.weight" not in weights
    assert "model.layers.1.mlp.experts.2.up_proj.weight" in weights
    assert "model.layers.0.self_attn.q_proj.weight" in weights
    assert weights["model.layers.0.mlp.shared_expert.gate_proj.weight"].proj == "gate"
    plain = set(model.plain_tensor_names)
    for kept in ("model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight",
                 "model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.shared_expert_gate.weight",
                 "model.layers.0.self_attn.q_proj.bias"):
        assert kept in plain
    source = tm.read_all(qwen2)
    assert torch.equal(torch.from_numpy(model.tensor("lm_head.weight")), source["lm_head.weight"].float())


def test_dry_run_writes_nothing(qwen2, tmp_path):
    output = ok("convert", qwen2, tmp_path / "out", "--dry-run")
    assert "dry run" in output and "routed_expert" in output and "shared_expert" in output
    assert not (tmp_path / "out").exists()


def test_assignment_and_quantizer_plug_in(qwen2, tmp_path):
    """What an allocator and GPTQ/AWQ plug in: a per-weight spec and a per-weight quantize function."""
    source = open_source(qwen2)
    layer0 = [n for n in source.tensors if n.startswith("model.layers.0.mlp.experts.")]
    assignment = {n: QuantSpec("int3", 32) for n in layer0}
    calls = []

    def quantizer(weight, spec, name):
        calls.append((name, spec))
        return quantize(weight, spec, name)

    conv = plan_conversion(source, Options(), assignment)
    convert(conv, tmp_path / "out", quantizer=quantizer)
    weights = open_model(tmp_path / "out").weights
    for name, w in weights.items():
        assert (w.scheme, w.group_size) == (("int3", 32) if name in assignment else ("nf4", 64))
    assert sorted(calls) == sorted((n, assignment.get(n, QuantSpec("nf4", 64, True))) for n in weights)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["mixed_precision"] is True


def test_assignment_must_name_routed_experts(qwen2):
    from moeconv.pipeline import ConvertError

    with pytest.raises(ConvertError, match="not a routed-expert weight"):
        plan_conversion(open_source(qwen2), Options(), {"model.embed_tokens.weight": QuantSpec("int4")})


def test_mixed_precision_from_the_allocator(qwen2, tmp_path):
    output = ok("convert", qwen2, tmp_path / "out", "--avg-bits", "3.0", "--alloc", "maxvar", "--bit-levels", "4,3,2",
                "--budget", "code-bits")
    model = open_model(tmp_path / "out")
    schemes = {w.scheme for w in model.weights.values()}
    assert len(schemes) > 1 and schemes <= {"int4", "int3", "int2"}
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["mixed_precision"] and qc["allocation"]["alloc"] == "maxvar"
    assert (tmp_path / "out" / "bit_allocation.png").is_file()
    assert "bit_allocation.png" in (tmp_path / "out" / "README.md").read_text()
    assert "allocation" in output or "routed experts" in output


def test_hub_id_from_offline_cache_and_model_card(qwen2, tmp_path, monkeypatch):
    """A Hub repo id resolves from a pre-populated HF cache with HF_HUB_OFFLINE=1; the card names it."""
    from moeconv.hub import validate_model_card

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--acme--tiny-qwen2"
    shutil.copytree(qwen2, repo / "snapshots" / commit)
    (repo / "snapshots" / commit / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    # huggingface_hub reads these variables at import: set its constants too.
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    ok("convert", "acme/tiny-qwen2", tmp_path / "out")
    card = validate_model_card(tmp_path / "out" / "README.md").data.to_dict()
    assert card["base_model"] == "acme/tiny-qwen2" and card["base_model_relation"] == "quantized"
    assert card["library_name"] == "moeconv" and card["pipeline_tag"] == "text-generation"
    assert card["license"] == "apache-2.0" and "nf4" in card["tags"]
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["source"] == {"repo_id": "acme/tiny-qwen2", "revision": commit}
    text = (tmp_path / "out" / "README.md").read_text()
    assert "| routed_expert | nf4, group 64 + double quant |" in text
    result = CliRunner().invoke(main, ["convert", "acme/missing", str(tmp_path / "out2")])
    assert result.exit_code != 0 and "not in the local Hugging Face cache" in result.output


def test_push_to_hub_without_token_fails_before_converting(qwen2, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(hf, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(hf, "ENDPOINT", "http://127.0.0.1:9")  # never the real Hub, whatever happens
    result = CliRunner().invoke(main, ["convert", str(qwen2), str(tmp_path / "out"), "--push-to-hub", "acme/x"])
    assert result.exit_code != 0 and "token" in result.output
    assert not (tmp_path / "out").exists()


def test_calibrated_methods_use_the_calibration_parts(qwen2, tmp_path, monkeypatch):
    """--method gptq/awq: the calibration driver is asked for every routed expert's spec, and the written
    parts are the ones it returned (here: an all-zero weight, easy to recognize), never RTN of the source."""
    import moeconv.calib as calib

    seen = {}

    def fake_calibrate(src, calib_file, spec_for, config, *, n_samples, device):
        seen.update(src=src, method=config.method, awq_input=config.awq_input)
        result = calib.CalibResult()
        for layer in range(2):
            for expert in range(4):
                for proj, shape in (("gate", (32, 64)), ("up", (32, 64)), ("down", (64, 32))):
                    spec = spec_for(layer, expert, proj)
                    result.parts[(layer, expert, proj)] = (spec, quantize(torch.zeros(shape), spec))
        return result

    monkeypatch.setattr(calib, "calibrate_checkpoint", fake_calibrate)
    text = tmp_path / "calib.txt"
    text.write_text("calibration text")
    ok("convert", qwen2, tmp_path / "out", "--method", "awq", "--scheme", "int4", "--calib", text)
    assert seen == {"src": qwen2.resolve(), "method": "awq", "awq_input": "none"}
    model = open_model(tmp_path / "out")
    assert model.quantization_config["method"] == "awq"
    for name, w in model.weights.items():
        assert w.scheme == "int4" and not model.dequantize(name).any(), name
