"""ShardedWriter -> moeconv_numpy round trips: what is written is read back, byte for byte."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import moeconv_numpy
from format_helpers import CONFIG, build_model, random_parts, read_raw, shard_paths
from moeconv.format import ShardedWriter
from moeconv_numpy import FormatError, open_model
from moeconv_numpy.schemes import SCHEMES, tensor_layout


def _raw_bytes(value) -> bytes:
    if isinstance(value, torch.Tensor):
        return value.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if value.dim() else (
            value.reshape(1).view(torch.uint8).numpy().tobytes()
        )
    return np.ascontiguousarray(value).tobytes()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("roundtrip") / "model"
    return path, build_model(path)


def test_weights_metadata_round_trip(model):
    path, written = model
    m = open_model(path)
    assert set(m.weights) == set(written["weights"])
    for name, (parts, entry) in written["weights"].items():
        info = m.weights[name]
        assert (info.scheme, info.group_size, info.double_quant) == (entry["scheme"], entry["group_size"],
                                                                     entry.get("double_quant", False))
        assert list(info.shape) == entry["shape"] and info.role == entry["role"] and info.proj == entry["proj"]
        assert info.bits == SCHEMES[entry["scheme"]].bits
        assert info.expert == entry.get("expert") and info.layer == entry["layer"]
        assert set(info.tensors) == set(parts)
    assert m.weights["model.layers.0.mlp.shared_expert.gate_proj.weight"].extra == {"method": "rtn"}


def test_every_stored_tensor_comes_back_byte_for_byte(model):
    path, written = model
    m = open_model(path)
    for name, (parts, _entry) in written["weights"].items():
        for suffix, part in parts.items():
            assert m.tensor(f"{name}.{suffix}").tobytes() == part.tobytes()
    for name, value in written["plain"].items():
        info = m.tensor_info(name)
        got = m.tensor(name)
        assert tuple(info.shape) == tuple(value.shape)
        if info.dtype == "BF16":
            np.testing.assert_array_equal(got, value.float().numpy())  # widened exactly
        elif info.dtype == "BOOL":
            np.testing.assert_array_equal(got, value)
        else:
            assert got.tobytes() == _raw_bytes(value)
    assert sorted(m.plain_tensor_names) == sorted(written["plain"])
    assert sorted(m.routers) == sorted(written["routers"])


def test_dequantize_equals_the_function_on_the_written_parts(model):
    path, written = model
    m = open_model(path)
    for name, (parts, entry) in written["weights"].items():
        direct = moeconv_numpy.dequantize(parts, entry["scheme"], entry["shape"], entry["group_size"],
                                          entry.get("double_quant", False))
        got = m.dequantize(name)
        assert got.dtype == np.float32 and got.shape == tuple(entry["shape"])
        assert got.tobytes() == direct.tobytes()


def test_directory_index_config_and_extra_files(model):
    path, written = model
    files = sorted(p.name for p in path.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(files) == {*shards, "config.json", "model.safetensors.index.json", "tokenizer.json", "README.md"}
    config = json.loads((path / "config.json").read_text())
    assert {k: config[k] for k in CONFIG} == CONFIG
    assert config["quantization_config"] == {"quant_method": "moeconv", "format_version": "1.0", "scheme": "mixed"}
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["moeconv_version"] == "1.0"
    sizes = [sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in read_raw(p)[0].items() if k != "__metadata__")
             for p in shard_paths(path)]
    assert index["metadata"]["total_size"] == sum(sizes)
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    assert (path / "tokenizer.json").read_bytes() == b'{"version": "1.0"}'
    report = open_model(path).verify()
    assert (report.shards, report.weights) == (len(shards), len(written["weights"]))


def test_shards_respect_the_byte_limit_and_keep_weights_whole(model):
    path, _ = model
    m = open_model(path)
    for shard in shard_paths(path):
        header, data = read_raw(shard)
        # limit 2000 bytes: a shard only exceeds it when a single item is larger
        meta = json.loads(header["__metadata__"]["moeconv"])
        names = [k for k in header if k != "__metadata__"]
        assert len(data) <= 2000 or len(meta["weights"]) + len([n for n in names if n in m.plain_tensor_names]) == 1
        for weight in meta["weights"]:
            assert all(t in header for t in m.weights[weight].tensors.values())


def test_shards_are_standard_safetensors_with_aligned_tensors(model):
    path, written = model
    for shard in shard_paths(path):
        header, _ = read_raw(shard)
        n = int.from_bytes(shard.read_bytes()[:8], "little")
        assert n % 8 == 0 and header["__metadata__"]["format"] == "pt"
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                entry = header[name]
                size = t.element_size()
                assert entry["data_offsets"][0] % size == 0  # aligned for memory mapping
                if name in written["plain"] and isinstance(written["plain"][name], torch.Tensor):
                    assert torch.equal(t, written["plain"][name])


def test_same_adds_give_identical_bytes(tmp_path):
    build_model(tmp_path / "a", seed=3)
    build_model(tmp_path / "b", seed=3)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_single_shard_is_named_model_safetensors(tmp_path):
    writer = ShardedWriter(tmp_path / "one")
    writer.add_tensor("x", torch.ones(3))
    writer.finalize({"model_type": "t"})
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "config.json", "model.safetensors", "model.safetensors.index.json"
    ]
    assert open_model(tmp_path / "one").tensor("x").tolist() == [1.0, 1.0, 1.0]


def test_torch_parts_on_any_device_and_numpy_parts_are_equivalent(tmp_path):
    rng = np.random.default_rng(1)
    parts = random_parts("nf4", (8, 64), 64, True, rng)
    w1 = ShardedWriter(tmp_path / "np")
    w2 = ShardedWriter(tmp_path / "pt")
    entry = {"scheme": "nf4", "group_size": 64, "double_quant": True, "shape": [8, 64], "dtype": "bfloat16",
             "role": "dense", "layer": 2}
    w1.add_quantized("lin.weight", parts, entry)
    w2.add_quantized("lin.weight", {k: torch.from_numpy(v) for k, v in parts.items()}, {**entry, "shape": (8, 64)})
    w1.finalize({})
    w2.finalize({})
    assert (tmp_path / "np" / "model.safetensors").read_bytes() == (tmp_path / "pt" / "model.safetensors").read_bytes()


# -- input validation -----------------------------------------------------------
ENTRY = {"scheme": "int4", "group_size": 8, "shape": [2, 16], "dtype": "bfloat16", "role": "routed_expert",
         "layer": 0, "expert": 1, "proj": "up"}


def _int4_parts():
    return random_parts("int4", (2, 16), 8, False, np.random.default_rng(0))


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda p, e: p.pop("zeros"), "do not match"),
        (lambda p, e: p.update(qweight=np.zeros((2, 9), np.uint8)), r"'qweight' is U8 \[2, 9\].*needs U8 \[2, 8\]"),
        (lambda p, e: p.update(scales=np.zeros((2, 2), np.float32)), "part 'scales' is F32"),
        (lambda p, e: e.update(scheme="int5"), "unknown scheme"),
        (lambda p, e: e.update(role="expert"), "role must be"),
        (lambda p, e: e.update(expert=None), "needs integer layer and expert"),
        (lambda p, e: e.update(group_size=0), "group size"),
        (lambda p, e: e.update(bits=3), "bits is 3"),
        (lambda p, e: e.update(double_quant=True), "double quantization"),
        (lambda p, e: e.update(note=object()), "JSON-serializable"),
        (lambda p, e: e.pop("dtype"), "lacks dtype"),
    ],
)
def test_add_quantized_rejects_bad_input_naming_the_weight(tmp_path, change, problem):
    parts, entry = _int4_parts(), dict(ENTRY)
    change(parts, entry)
    writer = ShardedWriter(tmp_path / "out")
    with pytest.raises(ValueError, match=problem) as err:
        writer.add_quantized("model.layers.0.experts.1.w3.weight", parts, entry)
    assert "model.layers.0.experts.1.w3.weight" in str(err.value)


def test_mxfp4_nan_scale_is_rejected(tmp_path):
    parts = random_parts("mxfp4", (2, 32), 32, False, np.random.default_rng(0))
    parts["scales"][1, 0] = 255
    with pytest.raises(ValueError, match="255"):
        ShardedWriter(tmp_path / "o").add_quantized("e.weight", parts, {**ENTRY, "scheme": "mxfp4", "group_size": 32,
                                                                        "shape": [2, 32]})


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, torch.uint8])
def test_routers_must_be_bf16_or_wider(tmp_path, dtype):
    writer = ShardedWriter(tmp_path / "o")
    with pytest.raises((ValueError, TypeError), match="gate.weight"):
        writer.add_tensor("model.layers.0.mlp.gate.weight", torch.zeros(2, 4).to(dtype), router=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_wide_router_dtypes_are_kept(tmp_path, dtype):
    writer = ShardedWriter(tmp_path / "o")
    gate = torch.tensor([[1.0, -2.5, float("nan")]], dtype=dtype)  # NaN in a plain tensor is stored as is
    writer.add_tensor("gate.weight", gate, router=True)
    writer.finalize({})
    m = open_model(tmp_path / "o")
    assert m.routers == ["gate.weight"] and m.tensor_info("gate.weight").dtype == {
        torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}[dtype]
    assert np.isnan(m.tensor("gate.weight")[0, 2]) and m.tensor("gate.weight")[0, 1] == -2.5


def test_names_must_be_unique_across_tensors_and_weights(tmp_path):
    writer = ShardedWriter(tmp_path / "o")
    writer.add_quantized("a.weight", _int4_parts(), ENTRY)
    with pytest.raises(ValueError, match="already used"):
        writer.add_tensor("a.weight.scales", torch.zeros(1))
    with pytest.raises(ValueError, match="already used"):
        writer.add_tensor("a.weight", torch.zeros(1))
    writer.add_tensor("b.weight.qweight", torch.zeros(1))
    with pytest.raises(ValueError, match="already used"):
        writer.add_quantized("b.weight", _int4_parts(), ENTRY)


def test_output_directory_and_finalize_rules(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        ShardedWriter(tmp_path / "busy")
    with pytest.raises(ValueError, match="max_shard_bytes"):
        ShardedWriter(tmp_path / "z", 0)
    writer = ShardedWriter(tmp_path / "o")
    with pytest.raises(ValueError, match="nothing to write"):
        writer.finalize({})
    writer.add_tensor("x", torch.zeros(2))
    with pytest.raises(ValueError, match="quantization_config for 'bitsandbytes'"):
        writer.finalize({"quantization_config": {"quant_method": "bitsandbytes"}})
    for bad in ("config.json", "../evil", "model.safetensors", ""):
        with pytest.raises(ValueError, match="extra file name"):
            writer.finalize({}, {bad: b"x"})
    writer.finalize({"quantization_config": {"quant_method": "moeconv", "format_version": "0.9", "scheme": "int4"}})
    assert json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]["format_version"] == "1.0"
    with pytest.raises(RuntimeError, match="finalized"):
        writer.add_tensor("y", torch.zeros(1))
    with pytest.raises(FormatError):  # the reader is not fooled by a non-model directory either
        open_model(tmp_path / "busy")


def test_every_scheme_round_trips_through_the_real_quantizer(tmp_path):
    quant = pytest.importorskip("moeconv.quant", reason="moeconv.quant (the quantizers) is not available")
    weight = torch.randn(6, 100, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    writer = ShardedWriter(tmp_path / "q", 4096)
    specs = {}
    for i, scheme in enumerate(SCHEMES):
        for dq in ((False, True) if scheme in ("nf4", "fp4") else (False,)):
            spec = quant.QuantSpec(scheme, 32, dq)
            name = f"model.layers.0.experts.{len(specs)}.w1.weight"
            parts = quant.quantize(weight, spec, name)
            assert {k: (v.dtype, tuple(v.shape)) for k, v in parts.items()}.keys() == tensor_layout(
                scheme, (6, 100), 32, dq).keys()
            writer.add_quantized(name, parts, {"scheme": scheme, "group_size": 32, "double_quant": dq,
                                               "shape": [6, 100], "dtype": "bfloat16", "role": "routed_expert",
                                               "layer": 0, "expert": len(specs), "proj": "gate"})
            specs[name] = (spec, quant.dequantize(parts, spec, (6, 100)))
    writer.finalize({})
    m = open_model(tmp_path / "q")
    m.verify()
    for name, (spec, expected) in specs.items():
        assert m.dequantize(name).tobytes() == expected.numpy().tobytes(), spec
