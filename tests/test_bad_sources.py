"""Hostile or broken source checkpoints, beyond ``test_convert_errors.py``: one clear line, OUT exactly as it was.

``test_convert_errors.py`` covers the plain cases with OUT absent (a missing
shard, config shapes, NaN/Inf in an expert, I8 and unscaled FP8 experts, a
``.bin`` with and without ``--allow-pickle``, ``auto_map`` on an unknown
architecture).  Here each bad source is converted into an OUT that is absent,
an existing empty directory, or holds the unfinished run of the same
conversion (a resumable ``.moeconv-partial``), and OUT must be byte-for-byte
what it was before; the error must be one line naming the file and the
tensor.  Also: sources that lie about their sizes, point outside their
directory, hide code in pickles or ``auto_map`` on a supported architecture,
carry infinite FP8 scales, or store a router as integers.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import tiny_models as tm
from moeconv.cli import main
from moeconv.format import PARTIAL_DIR
from moeconv.pipeline import Options, convert, plan_conversion
from moeconv.source import open_source

SHARD = "20000"


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return tm.build("mixtral", tmp_path_factory.mktemp("bad") / "mixtral")


@pytest.fixture
def src(pristine, tmp_path) -> Path:
    return shutil.copytree(pristine, tmp_path / "src")


def snapshot(path: Path):
    """Everything under ``path`` (relative name -> bytes; directories -> None), or None when it is absent."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def interrupted_run(src: Path, out: Path) -> None:
    """A run of the same conversion the CLI would do, stopped after 5 tensors: OUT holds a resumable partial."""
    def stop(task):
        stop.count += 1
        if stop.count == 5:
            raise Stop

    stop.count = 0
    with pytest.raises(Stop):
        convert(plan_conversion(open_source(src), Options(max_shard_bytes=int(SHARD))), out, progress=stop)
    assert list((out / PARTIAL_DIR).glob("shard-*.safetensors"))


@pytest.fixture(params=["absent", "empty", "unfinished run"])
def out(request, src, tmp_path) -> Path:
    """OUT in each state a conversion may start from (the partial is made before the source is damaged)."""
    path = tmp_path / "out"
    if request.param == "empty":
        path.mkdir()
    elif request.param == "unfinished run":
        interrupted_run(src, path)
    return path


def fails(src: Path, out: Path, *args) -> str:
    """Run ``moeconv convert``; expect exactly one 'Error:' line and no traceback, and OUT unchanged."""
    before = snapshot(out)
    result = CliRunner().invoke(main, ["convert", str(src), str(out), "--max-shard-size", SHARD, *map(str, args)])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # a click error, not a crash
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert snapshot(out) == before, "OUT changed"
    return errors[0]


def expert(layer: int = 1, e: int = 2, proj: str = "w2") -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{e}.{proj}.weight"


def file_of(src: Path, name: str) -> str:
    return tm.shard_files(src)[name]


def edit_header(path: Path, edit) -> None:
    """Rewrite a safetensors header in place (data untouched): ``edit(header dict)``."""
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])


# -- missing and lying files ----------------------------------------------------------------------------------------


def test_missing_shard(src, out):
    name = expert()
    (src / file_of(src, name)).unlink()
    line = fails(src, out)
    assert file_of(src, name) in line and "does not exist" in line


def test_tensor_listed_in_the_index_but_not_in_its_shard(src, out):
    name = expert()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.block_sparse_moe.experts.0.w9.weight"] = file_of(src, name)
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    line = fails(src, out)
    assert "experts.0.w9.weight" in line and file_of(src, name) in line and "not in the file" in line


def test_index_pointing_outside_the_checkpoint_is_refused(src, out, tmp_path):
    """A shard name with a path in it would read a file outside the checkpoint directory."""
    name = expert()
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(src / file_of(src, name), outside)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    moved = file_of(src, name)
    index["weight_map"] = {k: ("../elsewhere.safetensors" if v == moved else v) for k, v in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    line = fails(src, out)
    assert "../elsewhere.safetensors" in line and "model.safetensors.index.json" in line


def test_truncated_shard_is_refused_before_anything_is_written(src, out):
    name = expert()
    path = src / file_of(src, name)
    path.write_bytes(path.read_bytes()[:-100])
    line = fails(src, out)
    assert file_of(src, name) in line and "truncated" in line


def test_header_shape_that_disagrees_with_its_bytes(src, out):
    name = expert()
    edit_header(src / file_of(src, name), lambda h: h[name].update(shape=[64, 95]))
    line = fails(src, out)
    assert name in line and file_of(src, name) in line and "[64, 95]" in line


# -- shapes that disagree with config.json ----------------------------------------------------------------------------


def test_one_expert_with_another_shape(src, out):
    """One expert (not the config) is off: its own tensor is named, with the config keys it contradicts."""
    name = expert(1, 3, "w1")
    tm.rewrite(src, lambda t: {**t, name: t[name][:, :63].contiguous()} if name in t else t)
    line = fails(src, out)
    assert name in line and file_of(src, name) in line and "intermediate_size" in line and "hidden_size" in line


def test_hidden_size_disagrees(src, out):
    config = json.loads((src / "config.json").read_text())
    config["hidden_size"] = 72
    (src / "config.json").write_text(json.dumps(config))
    line = fails(src, out)
    assert "hidden_size=72" in line and ".safetensors" in line and "tensor 'model.layers." in line


def test_layer_beyond_num_hidden_layers(src, out):
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (src / "config.json").write_text(json.dumps(config))
    line = fails(src, out)
    assert "model.layers.1." in line and "1 layers" in line and ".safetensors" in line


# -- NaN / Inf ------------------------------------------------------------------------------------------------------


def test_nan_in_a_late_expert_leaves_out_exactly_as_it_was(src, out):
    """Found mid-run (the earlier tensors are already written, or resumed): everything this run wrote goes."""
    name = expert(1, 3, "w3")
    tm.rewrite(src, lambda t: {**t, name: torch.where(t[name] > 0.05, float("nan"), t[name])} if name in t else t)
    line = fails(src, out)
    assert name in line and file_of(src, name) in line and "NaN" in line


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_fp8_scale_names_the_weight(tmp_path, bad):
    """DeepSeek-V3 FP8: an infinite or NaN weight_scale_inv block makes the widened weight non-finite."""
    src = tm.make_fp8(tm.build("deepseek_v3", tmp_path / "ds"))
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    tm.rewrite(src, lambda t: {**t, name + "_scale_inv": t[name + "_scale_inv"].index_fill(1, torch.tensor([0]), bad)}
               if name in t else t)
    line = fails(src, tmp_path / "out")
    assert name in line and file_of(src, name) in line


def test_nan_in_a_shared_expert_quantized_with_quantize_dense(tmp_path):
    src = tm.build("qwen2_moe", tmp_path / "qwen")
    name = "model.layers.1.mlp.shared_expert.up_proj.weight"
    tm.rewrite(src, lambda t: {**t, name: torch.full_like(t[name], float("nan"))} if name in t else t)
    line = fails(src, tmp_path / "out", "--quantize-dense", "int8")
    assert name in line and file_of(src, name) in line


# -- dtypes ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["U16", "Q4_0"])
def test_expert_dtype_the_converter_cannot_read(src, out, dtype):
    """U16 has BF16's size; Q4_0 is no safetensors dtype at all: both are refused at planning, by name."""
    name = expert()
    edit_header(src / file_of(src, name), lambda h: h[name].update(dtype=dtype))
    line = fails(src, out)
    assert name in line and dtype in line and file_of(src, name) in line


def test_router_stored_as_integers_is_refused(src, out):
    """A router must be a float tensor: converting I32 logits weights to BF16 silently would change routing."""
    router = "model.layers.0.block_sparse_moe.gate.weight"
    tm.rewrite(src, lambda t: {**t, router: (t[router] * 1000).to(torch.int32)} if router in t else t)
    line = fails(src, out)
    assert router in line and "I32" in line and file_of(src, router) in line


# -- code hidden in the checkpoint ------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this would create the marker file: what a malicious pytorch_model.bin does."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_not_executed_even_with_allow_pickle(pristine, tmp_path, writer):
    """torch.save's zip format and a bare (legacy) pickle: refused by the weights-only unpickler, by name."""
    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(pristine / "config.json", src)
    marker = tmp_path / "executed"
    state = tm.read_all(pristine)
    state["model.norm.weight"] = _Payload(marker)
    if writer == "torch.save":
        torch.save(state, src / "pytorch_model.bin")
    else:
        with open(src / "pytorch_model.bin", "wb") as f:
            pickle.dump(state, f)
    line = fails(src, tmp_path / "out", "--allow-pickle")
    assert not marker.exists()
    assert "pytorch_model.bin" in line and "weights-only" in line


def test_sharded_pickle_checkpoint_is_refused_without_the_flag(pristine, tmp_path):
    src = tmp_path / "bins"
    src.mkdir()
    shutil.copy(pristine / "config.json", src)
    state = tm.read_all(pristine)
    names = sorted(state)
    torch.save({k: state[k] for k in names[::2]}, src / "pytorch_model-00001-of-00002.bin")
    torch.save({k: state[k] for k in names[1::2]}, src / "pytorch_model-00002-of-00002.bin")
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        k: f"pytorch_model-0000{1 + i % 2}-of-00002.bin" for i, k in enumerate(names)}}))
    line = fails(src, tmp_path / "out")
    assert "pickle" in line and "--allow-pickle" in line and "execute code" in line


def test_safetensors_are_used_and_a_bin_next_to_them_is_never_unpickled(src, tmp_path):
    marker = tmp_path / "executed"
    with open(src / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _Payload(marker)}, f)
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out"), "--allow-pickle"])
    assert result.exit_code == 0, result.output
    assert not marker.exists() and (tmp_path / "out" / "config.json").is_file()


def test_auto_map_on_a_supported_architecture_is_never_imported(src, tmp_path):
    """model_type mixtral plus auto_map and modeling/configuration/tokenizer code: converted, nothing executed."""
    marker = tmp_path / "executed"
    for module in ("modeling_evil", "configuration_evil", "tokenization_evil"):
        (src / f"{module}.py").write_text(f"open({str(marker)!r}, 'a').write({module!r})\n")
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (src / "config.json").write_text(json.dumps(config))
    (src / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": [
        "tokenization_evil.EvilTokenizer", None]}}))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", str(src), str(out)])
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    assert not any(m.endswith("_evil") for m in sys.modules)
    assert not list(out.glob("*.py"))  # code files are not copied into the converted model
    assert json.loads((out / "tokenizer_config.json").read_text())["auto_map"]  # copied through, as data
