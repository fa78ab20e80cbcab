"""Test-session setup that must run before any test module imports Triton kernels."""

import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter; the variable is
# read when a kernel is decorated, so it is set before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
