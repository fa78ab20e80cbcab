"""How the quantizers walk a large weight: in cache-sized chunks, spread over the CPU's threads.

Every quantizer turns one chunk (a few rows, or a run of whole blocks) into
its output slices with whole-tensor torch ops, so chunks are independent and
write disjoint parts of the outputs.  On the CPU they are handed to a pool of
``torch.get_num_threads()`` Python threads while torch's own intra-op
threading is set to 1 (and restored afterwards): torch releases the GIL inside
ops, so the threads run in parallel, and no op pays an OpenMP fork/join.  That
barrier per op is what makes intra-op threading fragile here -- on a 2-core
machine shared with other processes, 2 OpenMP threads quantized 10-20x slower
than 1 thread (measured), while a pool of 2 never does worse than 1.  A
consequence: during a CPU ``quantize`` call, torch work on other threads of
the process also runs with 1 intra-op thread.

On a GPU the chunks only bound the size of temporaries and run in order.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["CHUNK_ELEMENTS", "GPU_CHUNK_ELEMENTS", "chunk_elements", "for_each_chunk", "padded_rows", "use_fused"]

#: Elements per chunk on the CPU (2 MiB of float32): large enough to amortize
#: op dispatch and GIL hand-offs between the pool's threads, small enough that
#: a chunk's temporaries stay in cache instead of streaming full-size float32
#: copies of the weight through memory (2**17..2**20 measured; 2**19 was best).
CHUNK_ELEMENTS = 1 << 19
#: The same on a GPU, where launch overhead, not cache, sets the size: a
#: Mixtral expert matrix (58.7M elements) is one chunk.  H100, INT4 g64, MB/s of
#: BF16 input for 2^20 / 2^22 / 2^24 / 2^26: 4.8k / 20k / 34k / 52k
#: (benchmarks/results/quant_throughput_cuda.json).
GPU_CHUNK_ELEMENTS = 1 << 26

T = TypeVar("T")
_TRITON = importlib.util.find_spec("triton") is not None


def use_fused(weight: torch.Tensor, fused: bool | None) -> bool:
    """Whether a quantizer with a fused Triton kernel (NF4/FP4, MXFP4, INT) skips the chunks for one launch.

    ``fused`` None means: when the weight is on CUDA and Triton is installed.
    ``fused=True`` on a CPU tensor runs the kernel in Triton's interpreter
    (how the tests check it against the torch code).
    """
    return weight.is_cuda and _TRITON if fused is None else fused


def chunk_elements(device: torch.device) -> int:
    """How many elements one chunk holds on ``device``."""
    return CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS


def for_each_chunk(total: int, chunk: int, device: torch.device, body: Callable[[int, int], T]) -> list[T]:
    """``[body(start, stop) for each chunk of range(total)]``, in parallel on the CPU (see module docs)."""
    bounds = [(start, min(total, start + chunk)) for start in range(0, total, chunk)]
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or len(bounds) == 1:
        return [body(start, stop) for start, stop in bounds]
    grad_enabled = torch.is_grad_enabled()  # thread-local in torch: carry the caller's mode over

    def run(start: int, stop: int) -> T:
        with torch.set_grad_enabled(grad_enabled):
            return body(start, stop)

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moeconv-quant") as pool:
            futures = [pool.submit(run, start, stop) for start, stop in bounds]
            return [future.result() for future in futures]
    finally:
        torch.set_num_threads(threads)


def padded_rows(weight: torch.Tensor, r0: int, r1: int, padded: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of a 2-D weight as a new float32 ``[r1 - r0, padded]`` buffer, zero past its columns.

    The row-chunked quantizers work in place on this copy; zero padding to whole
    groups changes no group's range, maximum or largest magnitude.
    """
    cols = weight.shape[1]
    buf = torch.empty(r1 - r0, padded, dtype=torch.float32, device=weight.device)
    buf[:, :cols].copy_(weight[r0:r1])
    if padded != cols:
        buf[:, cols:] = 0
    return buf
