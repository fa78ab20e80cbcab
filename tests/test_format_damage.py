"""Damaged models: one clear line from the NumPy reader and from ``moeconv verify``, never a traceback.

Each case copies a small valid model, damages it in one way, and checks that
``open_model(...).verify()`` raises FormatError naming the file (and the
tensor where there is one) and that ``moeconv verify`` exits 1 with exactly one
line.  No case may allocate memory sized by the damaged header.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner

from format_helpers import build_model, edit_moeconv_meta, read_raw, shard_paths, write_raw
from moeconv.commands.verify import command as verify
from moeconv_numpy import FormatError, open_model


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "model"
    build_model(path, max_shard_bytes=4000)
    return path


@pytest.fixture
def model(pristine, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(pristine, copy)
    return copy


def first_shard(model: Path) -> Path:
    return shard_paths(model)[0]


def quantized_tensor(model: Path) -> str:
    header, _ = read_raw(first_shard(model))
    return next(name for name in header if name.endswith(".qweight"))


# -- the damages ------------------------------------------------------------------
def truncate(model):
    shard = first_shard(model)
    shard.write_bytes(shard.read_bytes()[:-5])
    return shard, None


def extend(model):
    shard = first_shard(model)
    shard.write_bytes(shard.read_bytes() + b"\0" * 7)
    return shard, None


def flip_data_byte(model):
    shard = first_shard(model)
    header, data = read_raw(shard)
    name = quantized_tensor(model)
    begin = header[name]["data_offsets"][0]
    blob = bytearray(shard.read_bytes())
    blob[len(blob) - len(data) + begin] ^= 0x01
    shard.write_bytes(bytes(blob))
    return shard, name


def garbage_header(model):
    shard = first_shard(model)
    blob = bytearray(shard.read_bytes())
    blob[8:40] = b"\x93\x01garbage!garbage!garbage!garbag"
    shard.write_bytes(bytes(blob))
    return shard, None


def huge_header_length(model):
    shard = first_shard(model)
    blob = bytearray(shard.read_bytes())
    blob[:8] = (2**60).to_bytes(8, "little")
    shard.write_bytes(bytes(blob))
    return shard, None


def tiny_file(model):
    shard = first_shard(model)
    shard.write_bytes(b"\x01\x02")
    return shard, None


def missing_shard(model):
    shard = shard_paths(model)[-1]
    shard.unlink()
    return shard, None


def shard_major_version(model):
    shard = first_shard(model)
    edit_moeconv_meta(shard, lambda meta: meta.update(version="2.0"))
    return shard, None


def config_major_version(model):
    path = model / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["format_version"] = "2.1"
    path.write_text(json.dumps(config))
    return path, None


def index_major_version(model):
    path = model / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["metadata"]["moeconv_version"] = "3.0"
    path.write_text(json.dumps(index))
    return path, None


def shape_disagrees_with_bytes(model):
    shard = first_shard(model)
    header, data = read_raw(shard)
    name = quantized_tensor(model)
    header[name]["shape"][0] += 1
    write_raw(shard, header, data)
    return shard, name


def overlapping_offsets(model):
    shard = first_shard(model)
    header, data = read_raw(shard)
    entries = sorted((e["data_offsets"][0], k) for k, e in header.items() if k != "__metadata__")
    (_, first), (_, second) = entries[0], entries[1]
    size = header[first]["data_offsets"][1] - header[first]["data_offsets"][0]
    header[second]["data_offsets"] = [header[first]["data_offsets"][0] + 2, header[first]["data_offsets"][0] + 2 + (
        header[second]["data_offsets"][1] - header[second]["data_offsets"][0])]
    assert size > 2
    write_raw(shard, header, data)
    return shard, second


def checksum_missing(model):
    shard = first_shard(model)
    name = quantized_tensor(model)
    edit_moeconv_meta(shard, lambda meta: meta["checksums"].pop(name))
    return shard, name


def layout_mismatch(model):
    shard = first_shard(model)
    name = quantized_tensor(model).removesuffix(".qweight")
    def double_group_size(meta):
        meta["weights"][name]["group_size"] *= 2

    edit_moeconv_meta(shard, double_group_size)
    return shard, None


def unknown_dtype(model):
    shard = first_shard(model)
    header, data = read_raw(shard)
    name = quantized_tensor(model)
    header[name]["dtype"] = "F8_E4M3"
    write_raw(shard, header, data)
    return shard, name


def router_quantized_dtype(model):
    shard = next(p for p in shard_paths(model) if json.loads(read_raw(p)[0]["__metadata__"]["moeconv"])["routers"])
    header, data = read_raw(shard)
    router = json.loads(header["__metadata__"]["moeconv"])["routers"][0]
    header[router]["dtype"] = "I16"
    write_raw(shard, header, data)
    return shard, router


def index_points_elsewhere(model):
    path = model / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    name = quantized_tensor(model)
    index["weight_map"][name] = shard_paths(model)[-1].name
    path.write_text(json.dumps(index))
    return first_shard(model), name


def shard_path_escape(model):
    path = model / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../../etc/passwd.safetensors"
    path.write_text(json.dumps(index))
    return path, name


def deep_json_nesting(model):
    shard = first_shard(model)
    raw = b"[" * 100000 + b"]" * 100000
    raw += b" " * (-len(raw) % 8)
    shard.write_bytes(len(raw).to_bytes(8, "little") + raw)
    return shard, None


def config_missing(model):
    (model / "config.json").unlink()
    return model / "config.json", None


DAMAGES = {
    truncate: "truncated",
    extend: "belong to no tensor",
    flip_data_byte: "checksum mismatch",
    garbage_header: "not UTF-8|not valid JSON",
    huge_header_length: "over the 104857600-byte limit",
    tiny_file: "too short",
    missing_shard: "missing",
    shard_major_version: "version 2.0 is not supported",
    config_major_version: "version 2.1 is not supported",
    index_major_version: "version 3.0 is not supported",
    shape_disagrees_with_bytes: "needs .* bytes but data_offsets span",
    overlapping_offsets: "overlaps",
    checksum_missing: "no checksum",
    layout_mismatch: "needs",
    unknown_dtype: "unsupported dtype 'F8_E4M3'",
    router_quantized_dtype: "routers must be",
    index_points_elsewhere: "listed in model.safetensors.index.json but not stored|maps it elsewhere",
    shard_path_escape: "not a plain",
    deep_json_nesting: "not valid JSON",
    config_missing: "config.json: file is missing",
}


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_numpy_reader_names_the_damage(model, damage):
    path, tensor = damage(model)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=DAMAGES[damage]) as err:
            open_model(model).verify()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(err.value)
    assert "\n" not in message and path.name in message
    if tensor is not None:
        assert tensor in message
    assert peak < 64 * 2**20  # nothing sized by a lying header was allocated


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_verify_command_prints_one_line(model, damage):
    path, _ = damage(model)
    result = CliRunner().invoke(verify, [str(model)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and path.name in lines[0]
    assert "Traceback" not in result.output


def test_sound_model_verifies_and_unknown_optional_fields_are_ignored(model):
    def add_unknown(meta):
        meta["future_top_level"] = {"x": 1}
        for entry in meta["weights"].values():
            entry["future_field"] = [1, 2]

    for shard in shard_paths(model):
        edit_moeconv_meta(shard, add_unknown)
        edit_moeconv_meta(shard, lambda meta: meta.update(version="1.7"))
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"]["future"] = True
    (model / "config.json").write_text(json.dumps(config))
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["metadata"]["future"] = "yes"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))

    report = open_model(model).verify()
    assert report.weights == len(open_model(model).weights) > 0
    result = CliRunner().invoke(verify, [str(model)])
    assert result.exit_code == 0 and result.output.startswith("ok: ")


def test_checksum_is_checked_when_a_tensor_is_read(model):
    _, name = flip_data_byte(model)
    m = open_model(model)
    with pytest.raises(FormatError, match="checksum mismatch"):
        m.tensor(name)
    with pytest.raises(FormatError, match="checksum mismatch"):
        m.dequantize(name.removesuffix(".qweight"))


def test_verify_subprocess_exit_status_and_single_line(model):
    code = "from moeconv.cli import main; main()"
    ok = subprocess.run([sys.executable, "-c", code, "verify", str(model)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: ")
    huge_header_length(model)
    bad = subprocess.run([sys.executable, "-c", code, "verify", str(model)], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "104857600" in bad.stderr
    assert "Traceback" not in bad.stderr
