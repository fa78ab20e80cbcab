"""moeconv_numpy (and ``moeconv verify``/``inspect``) work without importing torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from format_helpers import build_model

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    # torch is installed here, so "not imported" is checked on sys.modules, and a
    # meta-path hook makes any attempt to import it fail loudly.
    guard = textwrap.dedent(
        """
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch must not be imported here")
        sys.meta_path.insert(0, NoTorch())
        """
    )
    return subprocess.run([sys.executable, "-c", guard + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_reference_loader_reads_and_dequantizes_without_torch(tmp_path):
    build_model(tmp_path / "m")
    result = _run(
        f"""
        import moeconv_numpy, numpy as np
        model = moeconv_numpy.open_model({str(tmp_path / 'm')!r})
        report = model.verify()
        for name in model.weights:
            w = model.dequantize(name)
            assert w.dtype == np.float32 and w.shape == model.weights[name].shape
        for name in model.plain_tensor_names:
            model.tensor(name)
        assert "torch" not in sys.modules and "transformers" not in sys.modules and "click" not in sys.modules
        print("weights", report.weights)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["weights", "13"]


def test_verify_and_inspect_commands_do_not_import_torch(tmp_path):
    build_model(tmp_path / "m")
    result = _run(
        f"""
        from click.testing import CliRunner
        from moeconv.cli import main
        for args in (["verify"], ["inspect", "--json"]):
            out = CliRunner().invoke(main, [*args, {str(tmp_path / 'm')!r}])
            assert out.exit_code == 0, out.output
        assert "torch" not in sys.modules
        """
    )
    assert result.returncode == 0, result.stderr
