"""The Hub: ``moeconv upload`` through the real huggingface_hub client, model cards, heat maps, offline sources.

The client runs in a subprocess whose environment points it at the loopback
server of ``hub_server.py`` (``HF_ENDPOINT`` is read when huggingface_hub is
imported), so every request it really makes is answered and recorded; nothing
of the client is mocked and nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from hub_server import FakeHub, write_hf_cache

#: token -> (user, namespaces it may write to)
TOKENS = {"hf_alice": ("alice", {"alice", "moe-org"}), "hf_bob": ("bob", {"bob"})}
CARD = textwrap.dedent(
    """\
    ---
    base_model: mistralai/Mixtral-8x7B-v0.1
    base_model_relation: quantized
    library_name: moeconv
    tags: [moeconv, moe, quantized]
    pipeline_tag: text-generation
    ---
    # tiny-moe

    Routed experts quantized per expert with moeconv.
    """
)
#: (layer, expert) -> scheme: mixed precision, so the heat map has something to show.
SCHEMES = {(layer, expert): ("int4", "nf4", "int8")[(layer + expert) % 3] for layer in range(2) for expert in range(4)}
ROWS, COLS = 32, 64


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def converted_template(tmp_path_factory) -> Path:
    """A tiny, valid converted folder (2 layers x 4 experts, mixed schemes, 2+ shards) with its model card."""
    ShardedWriter = pytest.importorskip("moeconv.format.writer").ShardedWriter
    quant = pytest.importorskip("moeconv.quant")
    QuantSpec, quantize = quant.QuantSpec, quant.quantize

    gen = torch.Generator().manual_seed(0)
    out = tmp_path_factory.mktemp("converted") / "out"
    writer = ShardedWriter(out, max_shard_bytes=8 * 1024)
    for (layer, expert), scheme in SCHEMES.items():
        spec = QuantSpec(scheme)
        for proj, key in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            shape = (COLS, ROWS) if proj == "down" else (ROWS, COLS)
            name = f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{key}.weight"
            weight = torch.randn(shape, generator=gen).to(torch.bfloat16)
            meta = {"scheme": scheme, "group_size": spec.group_size, "double_quant": spec.double_quant,
                    "shape": list(shape), "dtype": "bfloat16", "role": "routed_expert",
                    "layer": layer, "expert": expert, "proj": proj}
            writer.add_quantized(name, quantize(weight.float(), spec, name), meta)
    for layer in range(2):
        gate = torch.randn(4, ROWS, generator=gen).to(torch.bfloat16)
        writer.add_tensor(f"model.layers.{layer}.block_sparse_moe.gate.weight", gate, router=True)
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_hidden_layers": 2,
              "num_local_experts": 4, "hidden_size": ROWS, "intermediate_size": COLS,
              "quantization_config": {"quant_method": "moeconv", "format_version": "1.0"}}
    writer.finalize(config, {})
    (out / "README.md").write_text(CARD)
    assert len(list(out.glob("*.safetensors"))) >= 2, "the fixture should exercise several LFS files"
    return out


@pytest.fixture
def converted(converted_template: Path, tmp_path: Path) -> Path:
    """A private copy of the converted folder, free to damage."""
    return Path(shutil.copytree(converted_template, tmp_path / "out"))


@pytest.fixture
def hub():
    with FakeHub(TOKENS) as server:
        yield server


def _env(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    """A client environment that can only talk to ``endpoint``: no inherited token, proxy or cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_DISABLE_XET="1",  # the loopback server speaks LFS basic transfer, not Xet
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY="*",
    )
    env.update(extra)
    return env


def _moeconv(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    code = "from moeconv.cli import main; main(prog_name='moeconv')"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    """The command failed with exactly one line on stderr (no traceback); returns it."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def _commit_requests(hub: FakeHub) -> int:
    return sum(1 for method, path in hub.requests if method == "POST" and "/commit/" in path)


# -- upload -------------------------------------------------------------------------------------
def test_upload_sends_every_file_byte_identical_in_one_commit(converted, hub, tmp_path):
    env = _env(tmp_path, hub.endpoint)
    token_file = Path(env["HF_HOME"]) / "token"  # where `hf auth login` stores it
    token_file.parent.mkdir(parents=True)
    token_file.write_text("hf_alice")

    result = _moeconv(["upload", str(converted), "alice/tiny-moe", "--commit-message", "tiny moe, nf4+int4"], env)
    assert result.returncode == 0, result.stderr

    repo = hub.repos["alice/tiny-moe"]
    assert not repo.private
    upload, initial = repo.history("main")
    assert initial.parent is None and upload.parent == initial.oid
    assert upload.message == "tiny moe, nf4+int4"
    assert _commit_requests(hub) == 1
    assert upload.oid in result.stdout

    local = sorted(p.relative_to(converted).as_posix() for p in converted.rglob("*") if p.is_file())
    remote = hub.files("alice/tiny-moe")
    assert sorted(set(remote) - {".gitattributes"}) == local
    for name in local:
        assert hashlib.sha256(remote[name]).hexdigest() == _sha(converted / name), name
    assert remote["README.md"].decode() == CARD
    shards = [n for n in local if n.endswith(".safetensors")]
    assert all(upload.files[n].lfs for n in shards), "shards must go through LFS"
    assert {hashlib.sha256(remote[n]).hexdigest() for n in shards} <= set(hub.lfs_objects)
    assert hub.unhandled == []


def test_private_branch_reupload_and_download_from_the_hub_id(converted, hub, tmp_path):
    env = _env(tmp_path, hub.endpoint, HF_TOKEN="hf_alice")
    args = ["upload", str(converted), "moe-org/tiny-moe", "--private", "--revision", "dev"]
    assert _moeconv(args, env).returncode == 0

    repo = hub.repos["moe-org/tiny-moe"]
    assert repo.private
    assert len(repo.history("main")) == 1, "main keeps only the initial commit"
    assert len(repo.history("dev")) == 2
    assert repo.history("dev")[1].oid == repo.branches["main"]

    # The repository and the branch exist now: a second upload of the same folder adds no commit.
    again = _moeconv(args, env)
    assert again.returncode == 0, again.stderr
    assert len(repo.history("dev")) == 2

    download = textwrap.dedent(
        """\
        from huggingface_hub import snapshot_download
        from moeconv_numpy import open_model
        path = snapshot_download("moe-org/tiny-moe", revision="dev")
        open_model(path).verify()
        print(path)
        """
    )
    fetched = _python(download, env)
    assert fetched.returncode == 0, fetched.stderr
    snapshot = Path(fetched.stdout.strip().splitlines()[-1])
    for path in converted.rglob("*"):
        if path.is_file():
            assert _sha(snapshot / path.relative_to(converted)) == _sha(path)

    # Offline, with the Hub gone, the same Hub id resolves from the cache.
    hub.stop()
    offline = _python(download, {**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert Path(offline.stdout.strip().splitlines()[-1]) == snapshot
    assert hub.unhandled == []


# -- refusals and errors ------------------------------------------------------------------------
def test_no_token_is_refused_before_any_request(converted, hub, tmp_path):
    line = _one_line_error(_moeconv(["upload", str(converted), "alice/tiny-moe"], _env(tmp_path, hub.endpoint)))
    assert "no Hugging Face token" in line and "HF_TOKEN" in line
    assert hub.requests == []


@pytest.mark.parametrize("repo_id", ["not a repo!", "alice/tiny/moe", "alice/..bad", "alice/x.git", "just-a-name"])
def test_malformed_repo_ids(repo_id):
    from moeconv.hub import UploadError, check_push_target

    with pytest.raises(UploadError, match="malformed repo id"):
        check_push_target(repo_id, token="hf_alice")


def test_offline_mode_is_refused_before_converting_or_uploading(monkeypatch):
    import huggingface_hub.constants

    from moeconv.hub import UploadError, check_push_target

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UploadError, match="HF_HUB_OFFLINE is set"):
        check_push_target("alice/tiny-moe", token="hf_alice")


def test_malformed_repo_id_is_refused_before_any_request(converted, hub, tmp_path):
    env = _env(tmp_path, hub.endpoint, HF_TOKEN="hf_alice")
    line = _one_line_error(_moeconv(["upload", str(converted), "alice/tiny/moe"], env))
    assert "malformed repo id 'alice/tiny/moe'" in line
    assert hub.requests == []


def test_invalid_token_is_reported_as_rejected(converted, hub, tmp_path):
    env = _env(tmp_path, hub.endpoint, HF_TOKEN="hf_not_a_token")
    line = _one_line_error(_moeconv(["upload", str(converted), "alice/tiny-moe"], env))
    assert "rejected the token (401" in line
    assert hub.repos == {}


def test_no_write_permission_is_reported_as_403(converted, hub, tmp_path):
    env = _env(tmp_path, hub.endpoint, HF_TOKEN="hf_bob")
    line = _one_line_error(_moeconv(["upload", str(converted), "moe-org/tiny-moe"], env))
    assert "no permission to write to moe-org/tiny-moe (403" in line
    assert hub.repos == {} and _commit_requests(hub) == 0


def test_network_down_is_reported_in_one_line(converted, tmp_path):
    hub = FakeHub(TOKENS).start()
    endpoint = hub.endpoint
    hub.stop()  # the port is closed now: connections are refused
    line = _one_line_error(_moeconv(["upload", str(converted), "alice/tiny-moe"], _env(tmp_path, endpoint, HF_TOKEN="hf_alice")))
    assert f"cannot reach the Hub at {endpoint}" in line


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda out: _flip_last_byte(sorted(out.glob("*.safetensors"))[-1]), "refusing to upload a damaged conversion"),
        (lambda out: sorted(out.glob("*.safetensors"))[0].unlink(), "refusing to upload a damaged conversion"),
        (lambda out: (out / "config.json").unlink(), "missing config.json"),
        (lambda out: (out / "README.md").unlink(), "missing README.md"),
        (lambda out: (out / "README.md").write_text("# no front matter\n"), "no YAML front matter"),
    ],
    ids=["flipped-byte", "missing-shard", "missing-config", "missing-card", "card-without-metadata"],
)
def test_damaged_or_incomplete_folder_is_refused(converted, damage, expected):
    from moeconv.hub import UploadError, check_conversion

    assert "README.md" in check_conversion(converted)
    damage(converted)
    with pytest.raises(UploadError, match=expected) as err:
        check_conversion(converted)
    assert "moeconv convert" in str(err.value) and "\n" not in str(err.value)


def test_damaged_folder_is_refused_before_any_request(converted, hub, tmp_path):
    shard = sorted(converted.glob("*.safetensors"))[-1]
    _flip_last_byte(shard)
    env = _env(tmp_path, hub.endpoint, HF_TOKEN="hf_alice")
    line = _one_line_error(_moeconv(["upload", str(converted), "alice/tiny-moe"], env))
    assert "refusing to upload a damaged conversion" in line and shard.name in line
    assert hub.requests == []


def test_hidden_files_are_not_uploaded(converted):
    from moeconv.hub import check_conversion

    (converted / ".moeconv-partial").mkdir()
    (converted / ".moeconv-partial" / "leftover.tmp").write_bytes(b"x")
    (converted / ".notes").write_text("local only")
    files = check_conversion(converted)
    assert not any(name.startswith(".") for name in files)
    assert set(files) == {p.name for p in converted.iterdir() if p.is_file() and not p.name.startswith(".")}


def test_upload_help_shows_the_whole_flow(tmp_path):
    result = _moeconv(["upload", "--help"], _env(tmp_path, "http://127.0.0.1:9"))
    assert result.returncode == 0
    for step in ("moeconv convert", "moeconv inspect", "moeconv eval", "moeconv upload", "--push-to-hub",
                 "--private", "--revision", "--commit-message", "HF_TOKEN"):
        assert step in result.stdout, step


# -- model card ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "front_matter, problem",
    [
        ("library_name: moeconv\ntags: [moeconv]\n", None),
        (CARD.split("---")[1].strip() + "\n", None),
        ("tags: [moeconv]\n", "'library_name'"),
        ("library_name: moeconv\ntags: []\n", "'tags'"),
        ("library_name: moeconv\ntags: [moeconv]\nbase_model: mistralai/Mixtral-8x7B-v0.1\n", "'base_model_relation'"),
        ("library_name: moeconv\ntags: [a]\nbase_model: org/m\nbase_model_relation: finetune\n", "'base_model_relation'"),
        ("library_name: moeconv\ntags: [a]\nbase_model_relation: quantized\n", "'base_model' is missing"),
        ("library_name: moeconv\ntags: [a]\nbase_model: not a repo\nbase_model_relation: quantized\n", "'base_model'"),
        ("library_name: moeconv\ntags: [a]\npipeline_tag: Text Generation\n", "'pipeline_tag'"),
        ("library_name: [unclosed\n", "invalid YAML"),
        ("- a\n- b\n", "invalid YAML"),
    ],
)
def test_model_card_validation(tmp_path, front_matter, problem):
    from moeconv.hub import CardError, validate_model_card

    card = tmp_path / "README.md"
    card.write_text(f"---\n{front_matter}---\n# model\n")
    if problem is None:
        assert validate_model_card(card).data.library_name == "moeconv"
    else:
        with pytest.raises(CardError, match=problem) as err:
            validate_model_card(card)
        assert str(card) in str(err.value)


# -- heat map -----------------------------------------------------------------------------------
def test_bit_allocation_grid_matches_the_schemes_written(converted):
    from moeconv.cardplot import bit_allocation
    from moeconv_numpy.schemes import SCHEMES as SCHEME_TABLE, stored_bits

    layers, grid = bit_allocation(converted)
    assert layers.tolist() == [0, 1] and grid.shape == (2, 4)
    for (layer, expert), scheme in SCHEMES.items():
        info = SCHEME_TABLE[scheme]
        dq = info.family in ("nf4", "fp4")  # QuantSpec's default: double quant on for nf4/fp4
        bits = sum(stored_bits(scheme, s, info.default_group_size, dq) for s in [(ROWS, COLS)] * 2 + [(COLS, ROWS)])
        assert grid[layer, expert] == pytest.approx(bits / (3 * ROWS * COLS))
    assert grid[0, 0] != grid[0, 1], "mixed precision must show in the grid"


def test_heat_map_png(converted, tmp_path):
    import matplotlib.image

    from moeconv.cardplot import HEATMAP_NAME, plot_bit_allocation

    png = plot_bit_allocation(converted)
    assert png == converted / HEATMAP_NAME
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert np.unique(image.reshape(-1, image.shape[-1]), axis=0).shape[0] > 10, "a heat map, not a blank image"
    assert plot_bit_allocation(converted, tmp_path / "elsewhere.png") == tmp_path / "elsewhere.png"
    assert (tmp_path / "elsewhere.png").stat().st_size > 0


def test_expert_kept_unquantized_is_nan_in_the_grid(tmp_path):
    from moeconv.cardplot import bit_allocation
    from moeconv_numpy.schemes import stored_bits

    ShardedWriter = pytest.importorskip("moeconv.format.writer").ShardedWriter
    quant = pytest.importorskip("moeconv.quant")

    out = tmp_path / "kept"
    writer = ShardedWriter(out, max_shard_bytes=1 << 20)
    spec = quant.QuantSpec("nf4")
    for expert in (0, 2):  # expert 1 is kept unquantized (as --keep would store it)
        name = f"model.layers.3.block_sparse_moe.experts.{expert}.w1.weight"
        meta = {"scheme": "nf4", "group_size": spec.group_size, "double_quant": spec.double_quant,
                "shape": [ROWS, COLS], "dtype": "bfloat16", "role": "routed_expert",
                "layer": 3, "expert": expert, "proj": "gate"}
        writer.add_quantized(name, quant.quantize(torch.randn(ROWS, COLS), spec, name), meta)
    writer.add_tensor("model.layers.3.block_sparse_moe.experts.1.w1.weight", torch.zeros(ROWS, COLS, dtype=torch.bfloat16))
    writer.finalize({"model_type": "mixtral", "quantization_config": {"quant_method": "moeconv"}}, {})

    layers, grid = bit_allocation(out)
    assert layers.tolist() == [3] and grid.shape == (1, 3)
    nf4_bits = stored_bits("nf4", (ROWS, COLS), spec.group_size, True) / (ROWS * COLS)
    assert grid[0, 0] == pytest.approx(nf4_bits) and grid[0, 2] == pytest.approx(nf4_bits)
    assert np.isnan(grid[0, 1])


# -- conversion from Hub sources ----------------------------------------------------------------
@pytest.fixture(scope="module")
def mixtral_files(tmp_path_factory) -> dict[str, bytes]:
    """A tiny random Mixtral (2 layers, 4 experts) as transformers saves it: config, 2+ shards, index."""
    pytest.importorskip("moeconv.commands.convert", reason="`moeconv convert` (converter issue) is not there yet")
    from tiny_models import build

    source = build("mixtral", tmp_path_factory.mktemp("mixtral"), max_shard_size="200KB")
    files = {p.relative_to(source).as_posix(): p.read_bytes() for p in source.rglob("*") if p.is_file()}
    assert sum(name.endswith(".safetensors") for name in files) >= 2
    return files


def _assert_routers_bit_identical(out: Path, files: dict[str, bytes]) -> None:
    from safetensors.torch import load
    from moeconv_numpy import open_model

    weight_map = json.loads(files["model.safetensors.index.json"])["weight_map"]
    with open_model(out) as model:
        model.verify()
        routers = [f"model.layers.{layer}.block_sparse_moe.gate.weight" for layer in range(2)]
        assert sorted(model.routers) == routers
        for name in routers:
            expected = load(files[weight_map[name]])[name].float().numpy()
            assert np.array_equal(model.tensor(name), expected), name  # the reader widens BF16 exactly


def test_convert_from_offline_hf_cache(mixtral_files, tmp_path):
    commit = hashlib.sha1(b"tiny-mixtral").hexdigest()
    cache = tmp_path / "cache"
    write_hf_cache(cache, "moe-org/tiny-mixtral", mixtral_files, commit)

    out = tmp_path / "out"
    # A closed port as endpoint: even a request that slipped past offline mode could not leave the machine.
    env = _env(tmp_path, "http://127.0.0.1:9", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    result = _moeconv(["convert", "moe-org/tiny-mixtral", str(out)], env)
    assert result.returncode == 0, result.stderr
    _assert_routers_bit_identical(out, mixtral_files)


def test_convert_from_the_hub_and_push_to_hub(mixtral_files, hub, tmp_path):
    from moeconv.hub import validate_model_card

    hub.add_repo("moe-org/tiny-mixtral", mixtral_files)
    out = tmp_path / "out"
    env = _env(tmp_path, hub.endpoint, HF_TOKEN="hf_alice")
    result = _moeconv(["convert", "moe-org/tiny-mixtral", str(out), "--push-to-hub", "alice/tiny-mixtral-nf4"], env)
    assert result.returncode == 0, result.stderr
    _assert_routers_bit_identical(out, mixtral_files)

    card = validate_model_card(out / "README.md")
    assert card.data.base_model == "moe-org/tiny-mixtral"
    repo = hub.repos["alice/tiny-mixtral-nf4"]
    assert len(repo.history("main")) == 2, "one commit on top of the repository's initial one"
    remote = hub.files("alice/tiny-mixtral-nf4")
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == local

    # Anyone can now load it by its Hub id (fresh cache): transformers + moeconv_torch give the
    # same logits as the local folder loaded directly, with the experts still packed.
    load = textwrap.dedent(
        f"""\
        import torch, moeconv_torch
        from transformers import AutoModelForCausalLM
        hub_model = AutoModelForCausalLM.from_pretrained("alice/tiny-mixtral-nf4")
        local = moeconv_torch.load_model({str(out)!r})
        ids = torch.arange(24).view(2, 12)
        diff = (hub_model(input_ids=ids).logits - local(input_ids=ids).logits).abs().max().item()
        packed = any(isinstance(m, moeconv_torch.QuantizedExperts) for m in hub_model.modules())
        print(diff, packed)
        """
    )
    loaded = _python(load, {**env, "HF_HOME": str(tmp_path / "fresh_home")})
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split()[-2:] == ["0.0", "True"]
    assert hub.unhandled == []
