"""Conformance vectors (spec/vectors): the writer reproduces the files, the NumPy reader the values."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import moeconv_numpy

VECTORS = Path(__file__).resolve().parents[1] / "spec" / "vectors"
MANIFEST = json.loads((VECTORS / "cases.json").read_text())


def _expected(case_dir: str) -> np.ndarray:
    shape = MANIFEST["input"]["shape"]
    return np.fromfile(VECTORS / case_dir / "expected.f32", dtype="<f4").reshape(shape)


@pytest.mark.parametrize("case", MANIFEST["cases"], ids=lambda c: c["dir"])
def test_reader_reproduces_expected_values_bit_for_bit(case):
    model = moeconv_numpy.open_model(VECTORS / case["dir"])
    model.verify()
    info = model.weights[case["weight"]]
    assert (info.scheme, info.group_size, info.double_quant) == (case["scheme"], case["group_size"],
                                                                 case["double_quant"])
    assert model.dequantize(case["weight"]).tobytes() == _expected(case["dir"]).tobytes()


def test_mixed_model_reproduces_each_weight():
    model = moeconv_numpy.open_model(VECTORS / "mixed")
    model.verify()
    assert len(model.shard_files) > 1 and len(model.routers) == 2
    for name, case in MANIFEST["mixed"]["weights"].items():
        assert model.dequantize(name).tobytes() == _expected(case).tobytes(), name


def test_expected_values_are_close_to_the_input():
    """A sanity bound, so a vector cannot be internally consistent but wrong: 8-bit error < 1% of the range."""
    weight = np.fromfile(VECTORS / "input.f32", dtype="<f4").reshape(MANIFEST["input"]["shape"])
    for case in ("int8", "int8-sym"):
        error = np.abs(_expected(case) - weight).max(axis=1)
        assert np.all(error <= 0.01 * np.abs(weight).max(axis=1) + 1e-12), case
    assert np.all(_expected("mxfp4")[1] == 0) and np.all(_expected("nf4")[1] == 0)  # the all-zero row stays zero
    assert _expected("nf4")[2, 40] == weight[2, 40]  # the outlier is its block's absmax: exact


def test_writer_and_quantizers_reproduce_every_file_byte_for_byte(tmp_path):
    pytest.importorskip("moeconv.quant", reason="moeconv.quant (the quantizers) is not available")
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    make_vectors = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_vectors)
    make_vectors.main(tmp_path)
    produced = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(VECTORS) for p in VECTORS.rglob("*") if p.is_file()
                       and p.name != "make_vectors.py" and "__pycache__" not in p.parts)
    assert produced == committed
    for rel in produced:
        assert (tmp_path / rel).read_bytes() == (VECTORS / rel).read_bytes(), rel


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("scheme", ["int4", "int3-sym", "nf4", "fp4", "mxfp4"])
def test_non_finite_input_is_rejected_at_write_time(scheme, bad):
    quant = pytest.importorskip("moeconv.quant", reason="moeconv.quant (the quantizers) is not available")
    weight = torch.from_numpy(np.fromfile(VECTORS / "input.f32", dtype="<f4").reshape(MANIFEST["input"]["shape"]))
    weight[3, 17] = bad
    with pytest.raises(ValueError, match="experts.0.w1.weight.*(NaN|Inf)"):
        quant.quantize(weight, quant.QuantSpec(scheme, 32, True), "model.layers.0.experts.0.w1.weight")
