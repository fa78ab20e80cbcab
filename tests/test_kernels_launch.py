"""The launch cache: which launches reuse a compiled kernel's launcher, and with which arguments.

Triton is replaced by a recording stand-in, so this runs without a GPU and
without the interpreter's bypass; the real kernels go through ``launch`` in
every fused-MoE test, compiled on the GPU.
"""

import pytest
import torch

pytest.importorskip("triton")

from moeconv_torch.kernels import launch as launch_module  # noqa: E402
from moeconv_torch.kernels.launch import cdiv, launch, next_power_of_2  # noqa: E402


class FakeCompiled:
    """A compiled kernel: ``[grid]`` gives a launcher that records its arguments."""

    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("fast", (grid[0], grid[1], grid[2]), args))  # as Triton's runner


class FakeKernel:
    """A JIT function of parameters ``x, n, BLOCK, FLAG``: ``[grid](...)`` compiles (recorded) and launches."""

    arg_names = ["x", "n", "BLOCK", "FLAG"]

    def __init__(self):
        self.calls = []
        self.compiled = FakeCompiled(self.calls)

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("triton", grid, args, kwargs))
            return self.compiled
        return run


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(launch_module, "_INTERPRET", False)
    monkeypatch.setattr(launch_module, "_current_device", lambda: 0)
    monkeypatch.setattr(launch_module, "_LAUNCHERS", {})
    return FakeKernel()


def test_second_launch_calls_the_launcher_with_arguments_in_signature_order(kernel):
    x, y = torch.zeros(8), torch.ones(8)
    assert launch(kernel, (4,), x, 8, BLOCK=64, FLAG=True, num_warps=4) is kernel.compiled
    launch(kernel, (4,), y, 8, BLOCK=64, FLAG=True, num_warps=4)
    assert [c[0] for c in kernel.calls] == ["triton", "fast"]
    assert kernel.calls[1][1] == (4, 1, 1)
    assert kernel.calls[1][2][0] is y and kernel.calls[1][2][1:] == (8, 64, True)


@pytest.mark.parametrize("change", ["grid", "int", "constexpr", "option", "dtype", "alignment"])
def test_anything_triton_specialises_on_goes_back_through_triton(kernel, change):
    base = torch.zeros(16)
    launch(kernel, (4,), base, 8, BLOCK=64, FLAG=True, num_warps=4)
    x, grid, n, kw = base, (4,), 8, dict(BLOCK=64, FLAG=True, num_warps=4)
    if change == "grid":
        grid = (5,)
    elif change == "int":
        n = 9
    elif change == "constexpr":
        kw["BLOCK"] = 128
    elif change == "option":
        kw["num_warps"] = 8
    elif change == "dtype":
        x = torch.zeros(16, dtype=torch.float16)
    else:
        x = base[1:]  # 4 bytes past a 16-byte boundary
    launch(kernel, grid, x, n, **kw)
    assert [c[0] for c in kernel.calls] == ["triton", "triton"]


def test_the_table_starts_over_when_full(kernel, monkeypatch):
    monkeypatch.setattr(launch_module, "_MAX_LAUNCHERS", 2)
    x = torch.zeros(4)
    for n in (1, 2, 3):
        launch(kernel, (1,), x, n, BLOCK=1, FLAG=False)
    assert len(launch_module._LAUNCHERS) == 1
    launch(kernel, (1,), x, 3, BLOCK=1, FLAG=False)
    assert [c[0] for c in kernel.calls] == ["triton", "triton", "triton", "fast"]


def test_host_arithmetic():
    assert [cdiv(a, 4) for a in (0, 1, 4, 5)] == [0, 1, 1, 2]
    assert [next_power_of_2(n) for n in (0, 1, 2, 3, 8, 9)] == [1, 1, 2, 4, 8, 16]
