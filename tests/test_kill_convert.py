"""``moeconv convert`` killed with SIGKILL at random points, and run out of disk space.

Each conversion is a real ``moeconv`` process (``moeconv.cli.main`` with the
command-line arguments) that the test kills with SIGKILL.  Starting Python
and importing torch takes seconds on a loaded 2-core machine, so the
processes are forked from a "zygote" subprocess that imported moeconv once and
never ran a torch operation (so forking it is safe); everything after the fork
is exactly the CLI.  Kill points are spread over the run by polling the
output directory: as soon as the run has claimed OUT, at random times, after
a random number of finished shards, while a shard is half-written (``.tmp``),
and inside ``finalize()``.

After each kill: ``moeconv verify`` rejects the directory with one line, the
directory does not look complete, and re-running the same command finishes
with files byte-identical to an uninterrupted run.  Disk full: OUT on a small
tmpfs (skipped where mounting is not allowed) gives one clear line and leaves
no temporary files behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import tiny_models as tm
from moeconv.format import PARTIAL_DIR
from moeconv.pipeline import RUN_FILE

SHARD = "12000"  # bytes: the tiny Mixtral converts to a dozen shards, so kills land between and inside them

_ZYGOTE = textwrap.dedent("""
    import json, os, sys
    from moeconv.cli import main
    import moeconv.commands.convert, moeconv.commands.verify, moeconv.pipeline, moeconv.modelcard  # noqa: F401
    from moeconv.adapters import REGISTRY  # noqa: F401  (every import done once, before any fork)

    def child(argv, log):
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = 0
        try:
            main(argv, prog_name="moeconv")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 3
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "run":
            pid = os.fork()
            if pid == 0:
                child(request["argv"], request["log"])
            print(json.dumps({"pid": pid}), flush=True)
        else:
            _, status = os.waitpid(request["pid"], 0)
            print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
""")


class Zygote:
    """Forks ``moeconv`` processes from one interpreter that has already imported moeconv and torch."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self._ask(None)

    def _ask(self, request) -> dict:
        if request is not None:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote died (exit status {self.proc.wait()})")
        return json.loads(line)

    def start(self, argv: list, log: Path) -> int:
        return self._ask({"op": "run", "argv": [str(a) for a in argv], "log": str(log)})["pid"]

    def wait(self, pid: int) -> int:
        """The exit status (negative: killed by that signal)."""
        return self._ask({"op": "wait", "pid": pid})["code"]

    def run(self, argv: list, log: Path) -> tuple[int, str]:
        code = self.wait(self.start(argv, log))
        return code, log.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def exited(pid: int) -> bool:
    """True once the process is a zombie (finished, not yet reaped by the zygote)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def state(out: Path) -> dict:
    """What a poll of OUT sees: finished shards and temporary files inside the partial directory, final files."""
    partial = out / PARTIAL_DIR
    try:
        inside = os.listdir(partial)
    except OSError:
        inside = None
    try:
        final = [n for n in os.listdir(out) if n != PARTIAL_DIR]
    except OSError:
        final = []
    return {"partial": inside is not None,
            "shards": sum(n.startswith("shard-") and n.endswith(".safetensors") for n in inside or ()),
            "tmp": any(n.endswith(".tmp") for n in inside or ()), "final": final}


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return tm.build("mixtral", tmp_path_factory.mktemp("kill") / "src")


@pytest.fixture(scope="module")
def out_path(tmp_path_factory) -> Path:
    """One OUT for every run: the model card names OUT, so byte-identical runs must share it."""
    return tmp_path_factory.mktemp("kill-out") / "out"


@pytest.fixture
def out(out_path) -> Path:
    shutil.rmtree(out_path, ignore_errors=True)
    return out_path


@pytest.fixture(scope="module")
def reference(zygote, source, out_path) -> dict:
    """The uninterrupted run: its files, how many shards it writes and how long it takes."""
    started = time.perf_counter()
    code, log = zygote.run(["convert", source, out_path, "--max-shard-size", SHARD], out_path.parent / "log")
    assert code == 0, log
    produced = files(out_path)
    shutil.rmtree(out_path)
    shards = sum(n.endswith(".safetensors") for n in produced)
    assert shards >= 8, sorted(produced)
    return {"files": produced, "shards": shards, "seconds": time.perf_counter() - started}


#: seed -> what the SIGKILL of that seed hit (a poll of OUT), or None when the run finished first
KILLED: dict[int, dict | None] = {}
# seed -> how to choose its kill point; every kind of moment appears at least twice
PLAN = ["start", "time", "shards", "tmp", "finalize", "time",
        "shards", "tmp", "finalize", "start", "shards", "finalize"]


def kill_trigger(kind: str, rng: random.Random, reference: dict):
    """A predicate on ``state(out)`` and the elapsed time that says when to send SIGKILL."""
    if kind == "time":
        at = rng.uniform(0.0, 0.8 * reference["seconds"])
        return lambda s, t: t >= at
    if kind == "start":  # the run's identity file is written, no shard yet
        return lambda s, t: s["partial"] and s["shards"] == 0
    if kind == "shards":
        k = rng.randrange(reference["shards"])
        return lambda s, t: s["shards"] >= k and not s["final"]
    if kind == "tmp":
        k = rng.randrange(reference["shards"])
        return lambda s, t: s["tmp"] and s["shards"] >= k
    return lambda s, t: bool(s["final"])  # finalize() has begun moving files into OUT


@pytest.mark.parametrize("seed", range(len(PLAN)))
def test_sigkill_at_a_random_point_then_rerun_is_byte_identical(zygote, source, reference, out, tmp_path, seed):
    rng = random.Random(seed)
    argv = ["convert", source, out, "--max-shard-size", SHARD]
    trigger = kill_trigger(PLAN[seed], rng, reference)
    pid = zygote.start(argv, tmp_path / "killed.log")
    started = time.perf_counter()
    seen = state(out)
    while not exited(pid):
        seen = state(out)
        if trigger(seen, time.perf_counter() - started):
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.001)
    code = zygote.wait(pid)
    KILLED[seed] = seen if code == -signal.SIGKILL else None
    if code == -signal.SIGKILL:
        verify_code, verify_log = zygote.run(["verify", out], tmp_path / "verify.log")
        if not (out / "config.json").is_file():  # the usual case: rejected, in one line naming what is missing
            lines = verify_log.strip().splitlines()
            assert verify_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), verify_log
            assert "config.json" in lines[0] or "does not exist" in lines[0], lines[0]
            assert "Traceback" not in verify_log
        else:  # config.json is written last: killed just before the partial directory was removed, a valid model
            assert (out / "model.safetensors.index.json").is_file()
            assert verify_code == 0, verify_log
            if not (out / PARTIAL_DIR / RUN_FILE).exists():
                # killed while the partial directory was being deleted, or after: every output file is final and
                # complete, and the run's identity is gone, so a rerun rightly refuses the non-empty OUT
                assert files(out) == reference["files"]
                return
    else:  # the run ended before the trigger fired (a loaded machine's timing): it must have finished well
        assert code == 0 and PLAN[seed] in ("time", "tmp", "finalize"), (tmp_path / "killed.log").read_text()
        assert files(out) == reference["files"]
        return
    rerun_code, rerun_log = zygote.run(argv, tmp_path / "rerun.log")
    assert rerun_code == 0, f"{PLAN[seed]} kill (state {seen}): {rerun_log}"
    assert files(out) == reference["files"]
    assert not (out / PARTIAL_DIR).exists()


def test_kills_landed_all_over_the_run():
    """Most seeds really killed the process, before the first shard, between shards and inside finalize()."""
    if len(KILLED) < len(PLAN):
        pytest.skip("runs only after every seed of the test above")
    states = [s for s in KILLED.values() if s is not None]
    assert len(states) >= len(PLAN) - 3, KILLED
    assert any(not s["final"] and s["shards"] == 0 for s in states), "no kill before the first shard was written"
    assert any(not s["final"] and s["shards"] > 0 for s in states), "no kill between shards"
    assert any(s["final"] for s in states), "no kill inside finalize()"


def test_damaged_middle_shard_is_redone_in_order(zygote, source, reference, out, tmp_path):
    """A shard that fails its check on resume is redone, with every later one, so the output stays identical."""
    argv = ["convert", source, out, "--max-shard-size", SHARD]
    pid = zygote.start(argv, tmp_path / "killed.log")
    while not exited(pid) and state(out)["shards"] < 5:
        time.sleep(0.001)
    os.kill(pid, signal.SIGKILL)
    assert zygote.wait(pid) == -signal.SIGKILL
    shards = sorted((out / PARTIAL_DIR).glob("shard-*.safetensors"))
    assert len(shards) >= 5
    blob = bytearray(shards[1].read_bytes())
    blob[-1] ^= 0xFF  # bit rot in the second shard
    shards[1].write_bytes(bytes(blob))
    code, log = zygote.run(argv, tmp_path / "rerun.log")
    assert code == 0, log
    assert files(out) == reference["files"]


# -- disk full ------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A mount point for a tmpfs of a chosen size (root and mount(2) needed; skipped otherwise)."""
    mounts = []

    def mount(size: int) -> Path:
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'not root'})")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", str(point)], check=False)


def _needed(reference: dict) -> int:
    """Bytes of tmpfs pages the whole output needs (every file rounded up to 4 KiB pages)."""
    return sum(-(-len(b) // 4096) * 4096 for b in reference["files"].values())


@pytest.mark.parametrize("fraction", [0.2, 0.6, "all but one page"])
def test_disk_full_is_one_clear_line_and_leaves_nothing(zygote, source, reference, small_disk, tmp_path, fraction):
    need = _needed(reference)
    size = need - 4096 if isinstance(fraction, str) else int(need * fraction) // 4096 * 4096
    disk = small_disk(size)
    out = disk / "out"
    code, log = zygote.run(["convert", source, out, "--max-shard-size", SHARD], tmp_path / "full.log")
    errors = [line for line in log.splitlines() if line.startswith("Error:")]
    assert code == 1 and len(errors) == 1, log
    assert "no space left" in errors[0] and str(out) in errors[0], errors[0]
    assert "Traceback" not in log
    assert sorted(os.listdir(disk)) == [], sorted(p.name for p in disk.rglob("*"))  # OUT and every temporary gone
