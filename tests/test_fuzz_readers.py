"""Hostile files: mutated valid models read back exactly or raise FormatError, fast and in bounded memory.

The mutation engine and the oracle live in ``benchmarks/fuzz_campaign.py``
(which runs the 10,000-case campaign); here hypothesis drives a few hundred
derandomized cases, every truncation and data bit flip is tried exhaustively
on small models, and each reader bug the campaign found has a regression case.
Every case asserts: outcome "ok" (values equal the seed's) or FormatError
naming a file of the model; at most 1 s of CPU; a traced allocation peak
within 2 x the model's bytes + a small fixed allowance.
"""

from __future__ import annotations

import json
import random
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fuzz_campaign as fc  # noqa: E402
from moeconv_numpy import FormatError, open_model  # noqa: E402

try:  # the PyTorch loader's paths are fuzzed too where torch is installed
    import moeconv_torch.loading  # noqa: F401
    import safetensors.torch  # noqa: F401

    TORCH = True
except ImportError:
    TORCH = False

FUZZ = settings(
    max_examples=150, derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def seeds(workdir) -> dict[str, fc.Seed]:
    if not fc.VECTORS.is_dir():
        pytest.skip(f"{fc.VECTORS} (the conformance vectors used as seeds) is absent")
    loaded = {s.name: s for s in fc.load_seeds(workdir if TORCH else None)}
    for seed in loaded.values():  # warm up imports and caches outside the timed, traced cases
        fc.write_model(seed.files, workdir / "warm")
        fc.read_everything(workdir / "warm", seed, TORCH)
    return loaded


def assert_sound(outcome: fc.Outcome, what) -> None:
    assert outcome.kind in ("ok", "FormatError"), f"{what}: {outcome.kind}: {outcome.detail}"
    assert outcome.cpu_s <= fc.TIME_LIMIT_S, f"{what}: {outcome.cpu_s:.2f} s of CPU"
    assert outcome.peak_bytes <= outcome.budget_bytes, (
        f"{what}: allocated {outcome.peak_bytes} B for {outcome.file_bytes} B of files")


def case(seeds, workdir, seed: str, edit) -> fc.Outcome:
    """Apply ``edit(files)`` to a copy of ``seed`` and read it (with the PyTorch paths when available)."""
    files = dict(seeds[seed].files)
    edit(files)
    fc.write_model(files, workdir / "case")
    return fc.run_case(workdir / "case", seeds[seed], TORCH)


# -- random mutations ---------------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_random_mutations_read_back_or_raise_format_error(seeds, workdir, data):
    seed = seeds[data.draw(st.sampled_from(sorted(seeds)), label="seed")]
    rng = data.draw(st.randoms(use_true_random=False), label="rng")
    done, outcome = fc.fuzz_case(seed, rng, workdir / "case", TORCH)
    assert_sound(outcome, f"{seed.name} after {done}")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(data=st.data(), value=JSON)
def test_any_json_value_in_any_field(seeds, workdir, data, value):
    """Any JSON value in any field of a tensor entry, a weight entry, the index or config.json."""
    seed = data.draw(st.sampled_from(["mixed", "nf4-dq", "int3", "mxfp4"]), label="seed")
    where = data.draw(st.sampled_from(["tensor", "weight", "index", "config"]), label="where")
    shard = "model-00001-of-00005.safetensors" if seed == "mixed" else "model.safetensors"

    def edit(files):
        header, body = fc.split_shard(files[shard])
        meta = json.loads(header["__metadata__"]["moeconv"])
        if where == "tensor":
            name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")), label="tensor")
            header[name][data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]), label="key")] = value
        elif where == "weight":
            entry = meta["weights"][data.draw(st.sampled_from(sorted(meta["weights"])), label="weight")]
            entry[data.draw(st.sampled_from(sorted(fc.FIELD_VALUES)), label="key")] = value
        elif where in ("index", "config"):
            name = "model.safetensors.index.json" if where == "index" else "config.json"
            doc = json.loads(files[name])
            section = doc["metadata"] if where == "index" else doc["quantization_config"]
            section[data.draw(st.sampled_from(sorted(section)), label="key")] = value
            files[name] = json.dumps(doc).encode()
        header["__metadata__"]["moeconv"] = json.dumps(meta)
        files[shard] = fc.join_shard(json.dumps(header), body)

    assert_sound(case(seeds, workdir, seed, edit), f"{where} field = {value!r}")


# -- exhaustive damage ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", ["mixed", "nf4-dq", "worked_example"])
def test_truncation_at_every_region_boundary_is_a_format_error(seeds, workdir, seed):
    for shard in fc._shards(seeds[seed].files):
        for at in fc.boundaries(seeds[seed].files[shard]):
            outcome = case(seeds, workdir, seed, lambda files: files.update({shard: files[shard][:at]}))
            assert_sound(outcome, f"{shard}[:{at}]")
            assert outcome.kind == "FormatError", f"{shard} truncated at {at} was accepted"


@pytest.mark.parametrize("seed", ["worked_example", "int3"])
def test_every_data_bit_flip_is_a_checksum_error(seeds, workdir, seed):
    blob = seeds[seed].files["model.safetensors"]
    start = 8 + int.from_bytes(blob[:8], "little")
    for i in range(start, len(blob)):
        flipped = blob[:i] + bytes([blob[i] ^ (1 << (i % 8))]) + blob[i + 1:]
        outcome = case(seeds, workdir, seed, lambda files: files.update({"model.safetensors": flipped}))
        assert outcome.kind == "FormatError" and "checksum" in outcome.detail, (i, outcome.detail)


def test_every_length_field_bit_flip_is_a_format_error(seeds, workdir):
    blob = seeds["worked_example"].files["model.safetensors"]
    for bit in range(64):
        flipped = (int.from_bytes(blob[:8], "little") ^ (1 << bit)).to_bytes(8, "little") + blob[8:]
        outcome = case(seeds, workdir, "worked_example", lambda files: files.update({"model.safetensors": flipped}))
        assert_sound(outcome, f"length bit {bit}")
        assert outcome.kind == "FormatError"


# -- regressions: each of these crashed, hung or misjudged a layout before the reader was fixed ------------------


def _edit_shard(seed: str, edit_header=None, edit_meta=None):
    shard = "model-00001-of-00005.safetensors" if seed == "mixed" else "model.safetensors"

    def edit(files):
        header, body = fc.split_shard(files[shard])
        if edit_meta is not None:
            meta = json.loads(header["__metadata__"]["moeconv"])
            edit_meta(meta)
            header["__metadata__"]["moeconv"] = json.dumps(meta)
        if edit_header is not None:
            edit_header(header)
        files[shard] = fc.join_shard(json.dumps(header), body)

    return edit


def _first_weight(meta) -> dict:
    return meta["weights"][sorted(meta["weights"])[0]]


def _first_tensor(header) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


REGRESSIONS = {
    # TypeError: unhashable type (dtype looked up in a dict)
    "dtype is an object": (_edit_shard("int4", edit_header=lambda h: _first_tensor(h).update(dtype={"U8": 1})),
                           "unsupported dtype"),
    # ValueError from int() of a 5000-digit major version (CPython's int/str limit)
    "5000-digit version": (_edit_shard("int4", edit_meta=lambda m: m.update(version="9" * 5000 + ".0")),
                           "is not supported"),
    # OverflowError from float division in tensor_layout; 71 / 10**400 also rounded n_groups down to 0
    "group size 10**400": (_edit_shard("int4", edit_meta=lambda m: _first_weight(m).update(group_size=10**400)),
                           "but scheme"),
    "shape [10**400, 1] nf4": (_edit_shard("nf4", edit_meta=lambda m: _first_weight(m).update(shape=[10**400, 1])),
                               "but scheme"),
    "shape [1, 10**400] int4": (_edit_shard("int4", edit_meta=lambda m: _first_weight(m).update(shape=[1, 10**400])),
                                "but scheme"),
    # a claimed 2**40-element tensor must be refused before anything is allocated or mapped
    "2**40-byte tensor claim": (_edit_shard("int4", edit_header=lambda h: _first_tensor(h).update(
        shape=[2**40], dtype="U8", data_offsets=[0, 2**40])), "fall outside"),
    "shape product overflows 2**64": (_edit_shard("int4", edit_header=lambda h: _first_tensor(h).update(
        shape=[2**32] * 8)), "needs"),
    # accepted here but refused by serde_json, so safetensors (the PyTorch loader) crashed on a "valid" file
    "unpaired surrogate in __metadata__": (_edit_shard("int4", edit_header=lambda h: h["__metadata__"].update(
        note="\ud800")), "surrogate"),
    "unpaired surrogate in the moeconv JSON": (_edit_shard("int4", edit_meta=lambda m: m.update(note="\udfff")),
                                               "surrogate"),
    "Unicode digits in the version": (_edit_shard("int4", edit_meta=lambda m: m.update(version="\u0661.0")),
                                      "must be a"),
}


@pytest.mark.parametrize("name", REGRESSIONS)
def test_regression_cases_are_format_errors(seeds, workdir, name):
    edit, message = REGRESSIONS[name]
    outcome = case(seeds, workdir, "nf4" if "nf4" in name else "int4", edit)
    assert_sound(outcome, name)
    assert outcome.kind == "FormatError" and message in outcome.detail, outcome.message


@pytest.mark.skipif(not TORCH, reason="needs torch for moeconv_torch")
def test_two_weights_for_one_expert_slot_are_refused_by_the_torch_loader(seeds, workdir):
    """read_plan used to keep one of them silently (and fail later with a misleading message)."""
    def weights(blob: bytes) -> dict:
        return json.loads(fc.split_shard(blob)[0]["__metadata__"]["moeconv"])["weights"]

    seed = seeds["format_helpers_mixtral"]
    shard = next(n for n in fc._shards(seed.files) if any(e["proj"] == "up" for e in weights(seed.files[n]).values()))

    def edit(files):
        header, body = fc.split_shard(files[shard])
        meta = json.loads(header["__metadata__"]["moeconv"])
        next(e for e in meta["weights"].values() if e["proj"] == "up")["proj"] = "down"
        header["__metadata__"]["moeconv"] = json.dumps(meta)
        files[shard] = fc.join_shard(json.dumps(header), body)

    outcome = case(seeds, workdir, "format_helpers_mixtral", edit)
    assert outcome.kind == "FormatError" and "is also described by" in outcome.message, outcome


def test_duplicate_router_in_a_long_list_is_found_in_linear_time(seeds, workdir):
    """Was list.count() per router: O(n^2), many minutes for this 4 MB header; now well under a second.

    Memory is bounded by the file, but not by 2x: CPython's JSON parser makes
    an ~80-byte str object of every ~36-byte quoted name, so a header that is
    nothing but short strings costs about 5x its size (at most 5x the
    100 MiB header limit).  The bound asserted here is that, not 2x.
    """
    names = [f"model.layers.{i}.mlp.gate.weight" for i in range(100_000)]
    edit = _edit_shard("int4", edit_meta=lambda m: m.update(routers=names + names[-1:]))
    outcome = case(seeds, workdir, "int4", edit)
    assert outcome.kind == "FormatError" and "listed twice" in outcome.detail
    assert outcome.cpu_s <= fc.TIME_LIMIT_S
    assert outcome.peak_bytes <= 6 * outcome.file_bytes


def test_a_huge_header_string_is_not_held_three_times(seeds, workdir):
    """The header's bytes are dropped before parsing, so a 4 MB string costs ~2x, not 3x, its size."""
    outcome = case(seeds, workdir, "int4", _edit_shard(
        "int4", edit_header=lambda h: h["__metadata__"].update(padding="x" * 4_000_000)))
    assert outcome.kind == "ok"
    assert outcome.peak_bytes <= 2 * outcome.file_bytes + fc.ALLOWANCE, outcome.peak_bytes


@pytest.mark.skipif(not TORCH, reason="the model is written with moeconv's writer, which needs torch")
def test_bf16_tensor_read_allocates_only_its_float32_result(tmp_path):
    from format_helpers import build_model

    build_model(tmp_path / "m", max_shard_bytes=10**6)
    with open_model(tmp_path / "m") as model:
        name = "model.embed_tokens.weight"
        model.tensor(name)  # checksum and mapping first
        tracemalloc.start()
        value = model.tensor(name)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert value.dtype.name == "float32" and peak < value.nbytes + 4096, (peak, value.nbytes)


def test_accepted_mutations_are_really_read(seeds, workdir):
    """Mutations the format allows (unknown keys, a newer minor version) read back every value of the seed."""
    def edit_meta(meta):
        meta["version"] = "1.9"
        meta["future_top_level"] = [1, {"x": None}]
        for entry in meta["weights"].values():
            entry["future_field"] = {"nested": True}

    outcome = case(seeds, workdir, "mixed", _edit_shard("mixed", edit_meta=edit_meta))
    assert outcome.kind == "ok" and outcome.checked_values >= 5, outcome


def test_format_error_names_the_file(seeds, workdir):
    rng = random.Random(5)
    files = dict(seeds["mixed"].files)
    fc.m_truncate_boundary(rng, files)
    fc.write_model(files, workdir / "named")
    with pytest.raises(FormatError) as err:
        open_model(workdir / "named").verify()
    assert str(workdir / "named") in str(err.value) and "\n" not in str(err.value)
