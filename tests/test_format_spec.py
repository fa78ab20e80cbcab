"""spec/FORMAT.md stays true: its tables, its worked example and the dynamic map file match the code."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from moeconv_numpy.schemes import DYNAMIC_MAP, E2M1_VALUES, FP4_CODE, NF4_CODE, stored_bits

ROOT = Path(__file__).resolve().parents[1]
SPEC = (ROOT / "spec" / "FORMAT.md").read_text()
VECTORS = ROOT / "spec" / "vectors"


def _make_vectors():
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_code_tables_in_appendix_are_exact():
    rows = re.findall(r"^\| (\d+) \| `([01]{4})` \| (\S+) \| `(\S+)` \| (\S+) \| `(\S+)` \| (\S+) \|$", SPEC, re.M)
    assert len(rows) == 16
    for code, bits, nf4, nf4_hex, fp4, fp4_hex, e2m1 in rows:
        i = int(code)
        assert int(bits, 2) == i
        for table, dec, hexv in ((NF4_CODE, nf4, nf4_hex), (FP4_CODE, fp4, fp4_hex)):
            assert np.float32(float(dec)).tobytes() == table[i].tobytes()
            assert np.float32(float.fromhex(hexv)).tobytes() == table[i].tobytes()
        assert np.float32(float(e2m1)).tobytes() == E2M1_VALUES[i].tobytes()


def test_dynamic_map_file_lists_every_entry_exactly():
    text = (VECTORS / "dynamic_map.txt").read_text()
    lines = [line.split() for line in text.splitlines() if not line.startswith("#")]
    assert [int(index) for index, _, _ in lines] == list(range(256))
    values = np.array([float.fromhex(hexv) for _, hexv, _ in lines], np.float32)
    assert values.tobytes() == DYNAMIC_MAP.tobytes()
    assert np.array([float(dec) for _, _, dec in lines], np.float32).tobytes() == DYNAMIC_MAP.tobytes()


def test_bits_per_weight_table_matches_stored_bits():
    rows = re.findall(r"^\| `([a-z0-9-]+)`(?:, `fp4`)? \| ([\d /]+) \| (yes|no) \| (\d) \| ([\d./ *]+) \|", SPEC, re.M)
    assert len(rows) == 11
    for scheme, groups, dq, code_bits, values in rows:
        groups = [int(g) for g in groups.split("/")]
        values = [float(v.strip("* ")) for v in values.split("/")]
        for g, value in zip(groups, values, strict=True):
            exact = stored_bits(scheme, (4096, 4096), g, dq == "yes") / 4096**2
            assert round(exact, 4) == value, (scheme, g, dq)
    assert round(stored_bits("nf4", (4096, 4096), 64, True) / 4096**2, 3) == 4.127


def test_worked_example_hexdump_and_json_match_the_writer(tmp_path):
    mv = _make_vectors()
    mv.write_worked_example(tmp_path)
    written = tmp_path / "worked_example"
    blob = (written / "model.safetensors").read_bytes()
    assert blob == (VECTORS / "worked_example" / "model.safetensors").read_bytes()
    assert f"The file `model.safetensors` ({len(blob)} bytes), complete:\n\n```\n{mv.hexdump(blob)}\n```" in SPEC
    n = int.from_bytes(blob[:8], "little")
    assert f"header length `N = {n:#x} = {n}`" in SPEC and f"`8 + {n} + 24 = {len(blob)}`" in SPEC
    for name in ("model.safetensors.index.json", "config.json"):
        text = (written / name).read_text()
        assert text == (VECTORS / "worked_example" / name).read_text()
        assert f"```json\n{text}```" in SPEC, name


def test_worked_example_dequantizes_as_the_spec_says():
    import moeconv_numpy

    mv = _make_vectors()
    w = moeconv_numpy.open_model(VECTORS / "worked_example").dequantize(mv.EXAMPLE_NAME)
    assert w[0, 0] == np.float32(0.4998779296875)
    assert float(w[1, 4]).hex() == "-0x1.8008880000000p+1" and "`-0x1.800888p+1`" in SPEC
    np.testing.assert_allclose(w, mv.EXAMPLE_WEIGHT, atol=0.01)


@pytest.mark.parametrize("section", ["## 13. Limits a reader must enforce", "## 11. Versioning", "## 12. Integrity",
                                     "## 10. Routers", "### 9.1", "### 9.2", "### 9.3", "## 16. Worked example"])
def test_spec_has_every_required_section(section):
    assert section in SPEC


def test_cases_manifest_lists_every_vector_directory():
    manifest = json.loads((VECTORS / "cases.json").read_text())
    dirs = {c["dir"] for c in manifest["cases"]}
    found = {p.name for p in VECTORS.iterdir() if p.is_dir() and not p.name.startswith("_")}
    assert dirs == found - {"mixed", "worked_example"}
