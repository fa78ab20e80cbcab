"""An interrupted write never looks like a valid model, and can be resumed."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from format_helpers import random_parts
from moeconv.commands.verify import command as verify
from moeconv.format import PARTIAL_DIR, ShardedWriter
from moeconv_numpy import FormatError, open_model

ENTRY = {"scheme": "int4", "group_size": 16, "shape": [8, 32], "dtype": "bfloat16", "role": "routed_expert",
         "layer": 0, "proj": "gate"}


def _add_experts(writer: ShardedWriter, experts: range, skip=frozenset()) -> dict[str, dict]:
    added = {}
    for e in experts:
        name = f"model.layers.0.mlp.experts.{e}.gate_proj.weight"
        if name in skip:
            continue
        parts = random_parts("int4", (8, 32), 16, False, np.random.default_rng(e))
        writer.add_quantized(name, parts, {**ENTRY, "expert": e})
        added[name] = parts
    return added


def _assert_rejected(path) -> str:
    with pytest.raises(FormatError) as err:
        open_model(path)
    result = CliRunner().invoke(verify, [str(path)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    return str(err.value)


def test_exception_mid_conversion_leaves_nothing_that_looks_valid(tmp_path):
    out = tmp_path / "out"
    writer = ShardedWriter(out, max_shard_bytes=300)
    with pytest.raises(RuntimeError):
        _add_experts(writer, range(5))
        raise RuntimeError("the converter crashed")
    assert sorted(os.listdir(out)) == [PARTIAL_DIR]
    assert len(list((out / PARTIAL_DIR).glob("shard-*.safetensors"))) >= 2  # closed shards were written
    assert "config.json" in _assert_rejected(out)


def test_crash_while_writing_a_shard_leaves_only_a_temporary_file(tmp_path, monkeypatch):
    out = tmp_path / "out"
    writer = ShardedWriter(out, max_shard_bytes=300)
    _add_experts(writer, range(2))
    real_fsync = os.fsync

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        _add_experts(writer, range(2, 6))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert any(p.name.endswith(".tmp") for p in (out / PARTIAL_DIR).iterdir())
    _assert_rejected(out)


@pytest.mark.parametrize("last_step", ["model.safetensors.index.json", "config.json"])
def test_crash_during_finalize_leaves_no_config(tmp_path, monkeypatch, last_step):
    out = tmp_path / "out"
    writer = ShardedWriter(out, max_shard_bytes=300)
    _add_experts(writer, range(4))
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == last_step:
            raise OSError("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="power cut"):
        writer.finalize({"model_type": "mixtral"})
    assert not (out / "config.json").exists()
    assert "missing" in _assert_rejected(out)


def test_resume_keeps_completed_shards_and_drops_damaged_ones(tmp_path):
    out = tmp_path / "out"
    writer = ShardedWriter(out, max_shard_bytes=300)
    _add_experts(writer, range(6))  # closed shards on disk; the open one is lost
    del writer
    partial = out / PARTIAL_DIR
    shards = sorted(partial.glob("shard-*.safetensors"))
    assert len(shards) >= 3
    (partial / "shard-00099.safetensors.tmp").write_bytes(b"half a shard")
    damaged = shards[-1]
    blob = bytearray(damaged.read_bytes())
    blob[-1] ^= 0xFF
    damaged.write_bytes(bytes(blob))

    with pytest.raises(ValueError, match="unfinished conversion"):
        ShardedWriter(out)
    resumed = ShardedWriter(out, max_shard_bytes=300, resume=True)
    done = set(resumed.completed_weights)
    assert done and len(done) < 6 and not damaged.exists()
    assert not list(partial.glob("*.tmp"))
    assert all(f"{w}.qweight" in resumed.completed_tensors for w in done)
    assert all(resumed.completed_weights[w]["expert"] == int(w.split(".")[5]) for w in done)
    with pytest.raises(ValueError, match="already used"):
        _add_experts(resumed, range(6))  # re-adding a completed weight is caught
    added = _add_experts(resumed, range(6), skip=done)
    resumed.add_tensor("model.layers.0.mlp.gate.weight", torch.zeros(6, 32, dtype=torch.bfloat16), router=True)
    resumed.finalize({"model_type": "mixtral"})

    m = open_model(out)
    m.verify()
    assert sorted(m.weights) == sorted(f"model.layers.0.mlp.experts.{e}.gate_proj.weight" for e in range(6))
    for name, parts in added.items():
        assert m.tensor(f"{name}.qweight").tobytes() == parts["qweight"].tobytes()
    assert not (out / PARTIAL_DIR).exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sum(1 for _ in out.glob("model-*.safetensors")) == len(set(index["weight_map"].values()))
