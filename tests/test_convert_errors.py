"""Bad sources and bad requests: one clear line naming the file / tensor / option, and OUT untouched."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from click.testing import CliRunner

import tiny_models as tm
from moeconv.cli import main


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return tm.build("mixtral", tmp_path_factory.mktemp("errors") / "mixtral")


@pytest.fixture
def src(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "src")


def fails(*args) -> str:
    """Run the CLI, expect failure, return the error line (and check it is a single line)."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code != 0, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1, result.output
    return error[0]


def _one_expert(src):
    """(shard file, name) of one routed-expert weight of the tiny Mixtral."""
    name = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    return tm.shard_files(src)[name], name


def test_unsupported_architecture_lists_supported(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=64)).save_pretrained(tmp_path / "llama")
    line = fails("convert", tmp_path / "llama", tmp_path / "out")
    assert "unsupported architecture" in line and "'llama'" in line
    for model_type in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "phimoe", "switch_transformers"):
        assert model_type in line
    assert not (tmp_path / "out").exists()


def test_remote_code_is_never_executed(src, tmp_path):
    marker = tmp_path / "executed"
    (src / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="custom_moe", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomMoE"})
    (src / "config.json").write_text(json.dumps(config))
    line = fails("convert", src, tmp_path / "out")
    assert "unsupported architecture" in line and "custom_moe" in line
    assert not marker.exists() and "modeling_custom" not in sys.modules
    assert not (tmp_path / "out").exists()


def test_missing_shard(src, tmp_path):
    file, _ = _one_expert(src)
    (src / file).unlink()
    line = fails("convert", src, tmp_path / "out")
    assert file in line and "model.safetensors.index.json" in line and "does not exist" in line
    assert not (tmp_path / "out").exists()


def test_shapes_disagree_with_config(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 128
    (src / "config.json").write_text(json.dumps(config))
    line = fails("convert", src, tmp_path / "out")
    assert "intermediate_size=128" in line and "has shape [64, 96]" in line and ".safetensors" in line
    assert not (tmp_path / "out").exists()


def test_fewer_experts_than_config(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["num_local_experts"] = 3
    (src / "config.json").write_text(json.dumps(config))
    line = fails("convert", src, tmp_path / "out")
    assert "expert 3" in line and "3 experts per layer" in line


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_an_expert_names_file_and_tensor(src, tmp_path, bad):
    file, name = _one_expert(src)

    def poison(tensors):
        if name in tensors:
            tensors[name][3, 5] = bad
        return tensors

    tm.rewrite(src, poison)
    out = tmp_path / "out"
    line = fails("convert", src, out, "--max-shard-size", "20KB")
    assert file in line and name in line
    assert not out.exists()  # everything written before the bad tensor was removed


def test_nan_in_existing_empty_out_leaves_it_empty(src, tmp_path):
    file, name = _one_expert(src)
    tm.rewrite(src, lambda t: {**t, name: torch.full_like(t[name], float("nan"))} if name in t else t)
    out = tmp_path / "out"
    out.mkdir()
    fails("convert", src, out)
    assert out.is_dir() and not list(out.iterdir())


def test_unsupported_dtype(src, tmp_path):
    file, name = _one_expert(src)
    tm.rewrite(src, lambda t: {**t, name: t[name].to(torch.int8)} if name in t else t)
    line = fails("convert", src, tmp_path / "out")
    assert name in line and "I8" in line and file in line
    assert not (tmp_path / "out").exists()


def test_fp8_without_scales(src, tmp_path):
    _, name = _one_expert(src)
    tm.rewrite(src, lambda t: {**t, name: t[name].to(torch.float8_e4m3fn)} if name in t else t)
    line = fails("convert", src, tmp_path / "out")
    assert name in line and "F8_E4M3" in line


def test_pickle_checkpoint_refused_unless_allowed(pristine, tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(pristine / "config.json", src)
    torch.save(tm.read_all(pristine), src / "pytorch_model.bin")
    line = fails("convert", src, tmp_path / "out")
    assert "pickle" in line and "--allow-pickle" in line
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out"), "--allow-pickle"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "config.json").is_file()


def test_out_not_empty_is_left_alone(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = fails("convert", src, out)
    assert "not empty" in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_out_that_cannot_be_created_names_the_path(src, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    line = fails("convert", src, blocker / "out")
    assert str(blocker / "out") in line and "Not a directory" in line
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("args, message", [
    (["--scheme", "int5"], "unknown scheme"),
    (["--scheme", "nf4", "--group-size", "48"], "block size"),
    (["--quantize-dense", "fp7"], "unknown scheme"),
    (["--method", "gptq"], "--calib"),
    (["--zeta", "2.0"], "--avg-bits"),
    (["--max-shard-size", "lots"], "max-shard-size"),
])
def test_bad_options(src, tmp_path, args, message):
    line = fails("convert", src, tmp_path / "out", *args)
    assert message in line
    assert not (tmp_path / "out").exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_that_runs_code_is_refused_even_when_allowed(pristine, tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(pristine / "config.json", src)
    marker = tmp_path / "executed"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, src / "pytorch_model.bin")
    line = fails("convert", src, tmp_path / "out", "--allow-pickle")
    assert "weights-only" in line and "pytorch_model.bin" in line
    assert not marker.exists() and not (tmp_path / "out").exists()
