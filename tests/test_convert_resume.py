"""Interrupted conversions resume to byte-identical output, and never look complete before they are.

Two kinds of interruption: an exception raised after N weights through the
pipeline's progress hook (the process survives), and a real SIGKILL of a
``moeconv convert`` child process in the middle of writing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tiny_models as tm
from moeconv.format import PARTIAL_DIR
from moeconv.pipeline import ConvertError, Options, convert, plan_conversion
from moeconv.source import open_source
from moeconv_numpy import FormatError, open_model

SHARD = 12_000  # bytes: the tiny Mixtral gives a dozen output shards


class Interrupt(Exception):
    pass


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _conv(src: Path, **kw):
    return plan_conversion(open_source(src), Options(max_shard_bytes=SHARD, **kw))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return tm.build("mixtral", tmp_path_factory.mktemp("resume") / "src")


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference") / "out"
    convert(_conv(source), out)
    return files(out)


def _stop_after(n: int):
    count = {"n": 0}

    def progress(task):
        count["n"] += 1
        if count["n"] == n:
            raise Interrupt

    return progress


@pytest.mark.parametrize("after", [1, 13, 33])
def test_exception_then_resume_is_byte_identical(source, reference, tmp_path, after):
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        convert(_conv(source), out, progress=_stop_after(after))
    assert sorted(os.listdir(out)) == [PARTIAL_DIR]  # nothing looks complete
    with pytest.raises(FormatError):
        open_model(out)
    written = len(list((out / PARTIAL_DIR).glob("shard-*.safetensors")))
    result = convert(_conv(source), out)
    assert result.tasks_resumed > 0 or written == 0
    assert files(out) == reference
    assert len(reference) > 5  # several shards, so resuming skipped real work


def test_parallel_workers_write_the_same_bytes(source, reference, tmp_path):
    convert(_conv(source), tmp_path / "out", workers=3)
    assert files(tmp_path / "out") == reference


def test_resume_with_other_arguments_is_refused(source, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        convert(_conv(source), out, progress=_stop_after(30))
    assert list((out / PARTIAL_DIR).glob("shard-*.safetensors"))
    with pytest.raises(ConvertError, match="other arguments"):
        convert(_conv(source, keep=("*.w2.weight",)), out)


_CHILD = textwrap.dedent("""
    import os, signal, sys
    from moeconv.pipeline import Options, convert, plan_conversion
    from moeconv.source import open_source
    src, out, after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    seen = []
    def progress(task):
        seen.append(task)
        if len(seen) == after:
            os.kill(os.getpid(), signal.SIGKILL)
    convert(plan_conversion(open_source(src), Options(max_shard_bytes={shard})), out, progress=progress)
""").format(shard=SHARD)


@pytest.mark.parametrize("after", [7, 29])
def test_sigkill_then_resume_is_byte_identical(source, reference, tmp_path, after):
    """A real SIGKILL in the middle of a conversion; the re-run (the CLI) finishes it byte-identically."""
    out = tmp_path / "out"
    child = subprocess.run([sys.executable, "-c", _CHILD, str(source), str(out), str(after)], capture_output=True)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    assert sorted(os.listdir(out)) == [PARTIAL_DIR]
    assert list((out / PARTIAL_DIR).glob("shard-*.safetensors"))  # some work was saved
    rerun = subprocess.run(
        [sys.executable, "-c", "from moeconv.cli import main; main()", "convert", str(source), str(out),
         "--max-shard-size", str(SHARD)],
        capture_output=True, text=True,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed" in rerun.stdout
    produced = files(out)
    # The CLI adds its model card; every other file is byte-identical to the uninterrupted API run.
    assert produced.pop("README.md").startswith(b"---\n")
    assert produced == reference

