"""``moeconv inspect``: the per-weight table, totals and the two averages over routed experts."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from format_helpers import build_model, read_raw, shard_paths
from moeconv.commands.inspect import command as inspect
from moeconv_numpy.schemes import SCHEMES


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "model"
    return path, build_model(path)


def test_json_averages_count_codes_and_every_stored_byte(model):
    path, written = model
    result = CliRunner().invoke(inspect, [str(path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    # recompute from the files: bytes of every part as stored, and numel from the shapes
    stored = {}
    for shard in shard_paths(path):
        header, _ = read_raw(shard)
        for name, entry in header.items():
            if name != "__metadata__":
                stored[name] = entry["data_offsets"][1] - entry["data_offsets"][0]
    experts = {n: e for n, (p, e) in written["weights"].items() if e["role"] == "routed_expert"}
    numel = sum(e["shape"][0] * e["shape"][1] for e in experts.values())
    stored_bits = sum(8 * stored[f"{n}.{s}"] for n, (p, e) in written["weights"].items() if n in experts for s in p)
    code_bits = sum(SCHEMES[e["scheme"]].bits * e["shape"][0] * e["shape"][1] for e in experts.values())
    assert summary["avg_bits_per_expert_weight"] == pytest.approx(stored_bits / numel, rel=1e-12)
    assert summary["avg_code_bits_per_expert_weight"] == pytest.approx(code_bits / numel, rel=1e-12)
    assert summary["avg_bits_per_expert_weight"] > summary["avg_code_bits_per_expert_weight"]
    totals = summary["totals"]
    assert totals["tensor_bytes"] == sum(stored.values())
    assert totals["routed_expert_weights"] == len(experts) and totals["routers"] == len(written["routers"])
    assert totals["bf16_bytes"] > totals["tensor_bytes"]
    rows = {r["tensor"]: r for r in summary["weights"]}
    for name, (parts, entry) in written["weights"].items():
        assert rows[name]["bytes"] == sum(stored[f"{name}.{s}"] for s in parts)
        assert (rows[name]["scheme"], rows[name]["group_size"]) == (entry["scheme"], entry["group_size"])
    assert [r["layer"] for r in summary["weights"]] == sorted(r["layer"] for r in summary["weights"])


def test_table_lists_every_weight_by_layer_with_totals(model):
    path, written = model
    result = CliRunner().invoke(inspect, [str(path)])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split()[:6] == ["layer", "expert", "proj", "role", "scheme", "bits"]
    for name in [*written["weights"], *written["plain"]]:
        assert sum(line.endswith(name) for line in lines) == 1, name
    assert any(line.startswith("routed experts") and "avg stored bits/weight" in line for line in lines)
    assert any("BF16 would be" in line for line in lines)


def test_damaged_model_gives_one_line(model, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = CliRunner().invoke(inspect, [str(tmp_path)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "not a moeconv model" in result.output and "Traceback" not in result.output
