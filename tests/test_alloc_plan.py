"""``moeconv plan``: the table, the JSON, the errors, and that ``convert --avg-bits`` writes what the plan says."""

from __future__ import annotations

import json

import pytest
import tiny_models as tm
import torch
from alloc_synthetic import save_char_tokenizer, write_checkpoint, write_routers
from click.testing import CliRunner
from moeconv_numpy import open_model

from moeconv.cli import main


def run(*args, code=0, stdout=False):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.stdout if stdout else result.output


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    norms = [[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]
    return write_checkpoint(tmp_path_factory.mktemp("plan") / "m", hidden=128, inter=256, router_norms=norms)


def listing(path):
    return sorted((p.name, p.stat().st_mtime_ns) for p in path.iterdir())


def test_table_names_every_expert_and_writes_nothing(ckpt):
    before = listing(ckpt)
    out = run("plan", ckpt, "--avg-bits", "3.0", "--budget", "code-bits")
    assert listing(ckpt) == before
    assert "allocation: paper; budget: 3 code bits per routed-expert weight" in out
    assert "note: no --router-reference" in out
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert sorted((int(r[0]), int(r[1])) for r in rows) == [(layer, e) for layer in range(2) for e in range(4)]
    # Λ = final norm here: the smallest norms of each layer get the most bits (no MaxVar outliers)
    by = {(int(r[0]), int(r[1])): r[2] for r in rows}
    assert by[(0, 0)] == "int4/g64" and by[(0, 3)] == "int2/g64" and by[(1, 3)] == "int4/g64" and by[(1, 0)] == "int2/g64"
    assert "layer 0: int2/g64 x1, int3/g64 x2, int4/g64 x1" in out  # 4 experts: 1 high, 2 middle, 1 low
    assert "predicted:" in out and "3.0000 code bits/weight" in out


def test_json_with_a_router_reference(ckpt, tmp_path):
    reference = write_routers(tmp_path / "init.safetensors",
                              {f"model.layers.{i}.block_sparse_moe.gate.weight": torch.full((4, 128), 0.25) for i in range(2)})
    plan = json.loads(run("plan", ckpt, "--avg-bits", "3.5", "--router-reference", reference, "--json", stdout=True))
    assert plan["alloc"] == "paper" and plan["budget"]["mode"] == "stored"
    assert len(plan["experts"]) == 8
    for expert in plan["experts"]:
        s = expert["signals"]
        assert s["lambda"] == pytest.approx(abs(s["router_norm"] - s["reference_router_norm"]), rel=1e-6)
        assert s["reference_router_norm"] == pytest.approx(0.25 * 128**0.5, rel=1e-6)
    predicted = plan["predicted"]
    assert predicted["stored_bits"] == sum(e["stored_bits"] for e in plan["experts"])
    assert predicted["avg_bits_per_expert_weight"] == pytest.approx(3.5)
    assert "router_init" not in plan["notes"][0] and str(reference) in plan["notes"][0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--alloc", "paper"], "needs --avg-bits"),
        (["--avg-bits", "3", "--bit-levels", "4,x"], "comma-separated integers"),
        (["--avg-bits", "3", "--bit-levels", "4,3,1"], "no int scheme has 1 bits"),
        (["--avg-bits", "3", "--alloc", "sensitivity"], "needs --calib FILE"),
        (["--avg-bits", "1.5"], "below the lowest level"),
    ],
)
def test_errors_name_the_option(ckpt, args, message):
    out = run("plan", ckpt, *args, code=2 if "x" in args[-1] else 1)
    assert message in out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tm.build("mixtral", tmp_path_factory.mktemp("tiny") / "mixtral")
    save_char_tokenizer(path)
    calib = path.parent / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return path, calib


def test_sensitivity_from_the_command_line(tiny):
    path, calib = tiny
    out = run("plan", path, "--avg-bits", "4.5", "--alloc", "sensitivity", "--calib", calib, "--group-size", "32")
    assert "damage" in out.splitlines()[3] and "exact knapsack" in out and "note: calibration:" in out
    assert "/g64" not in out and "/g128" not in out  # --group-size restricts the candidates


@pytest.mark.parametrize("alloc", ["paper", "sensitivity"])
def test_convert_writes_the_planned_choices(tiny, tmp_path, alloc):
    path, calib = tiny
    args = ["--avg-bits", "3.5", "--alloc", alloc] + (["--calib", calib] if alloc == "sensitivity" else [])
    plan = json.loads(run("plan", path, *args, "--json", stdout=True))
    run("convert", path, tmp_path / "out", *args)
    written = open_model(tmp_path / "out").weights
    routed = {(w.layer, w.expert, w.proj): (w.scheme, w.group_size, w.double_quant) for w in written.values()
              if w.role == "routed_expert"}
    planned = {(e["layer"], e["expert"]): (e["scheme"], e["group_size"], e["double_quant"]) for e in plan["experts"]}
    assert len(routed) == 3 * len(planned)
    for (layer, expert, _proj), choice in routed.items():
        assert choice == planned[(layer, expert)]
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["allocation"]["predicted"] == plan["predicted"]


def test_router_reference_from_the_hub_downloads_only_the_router_shard(ckpt, tmp_path):
    """A Hub id as --router-reference: the real huggingface_hub client against the loopback Hub look-alike."""
    import os
    import subprocess
    import sys

    from hub_server import FakeHub
    from safetensors.torch import save

    routers = {f"model.layers.{i}.block_sparse_moe.gate.weight": torch.full((4, 128), 0.5) for i in range(2)}
    files = {
        "model-00001-of-00002.safetensors": save(routers),
        "model-00002-of-00002.safetensors": save({"model.embed_tokens.weight": torch.zeros(64, 128)}),
        "model.safetensors.index.json": json.dumps({"metadata": {}, "weight_map": {
            **{name: "model-00001-of-00002.safetensors" for name in routers},
            "model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}).encode(),
        "config.json": b"{}",
    }
    with FakeHub({}) as hub:
        hub.add_repo("acme/base", files)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
        env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1", NO_PROXY="*",
                   HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1")
        code = "from moeconv.cli import main; main(prog_name='moeconv')"
        done = subprocess.run([sys.executable, "-c", code, "plan", str(ckpt), "--avg-bits", "3.5", "--json",
                               "--router-reference", "acme/base"], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        fetched = [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
    plan = json.loads(done.stdout)
    for expert in plan["experts"]:
        assert expert["signals"]["reference_router_norm"] == pytest.approx(0.5 * 128**0.5, rel=1e-6)
    assert any("model-00001-of-00002" in path for path in fetched)
    assert not any("model-00002-of-00002" in path for path in fetched)
