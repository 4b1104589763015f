"""Where the runtime's kernels run: the Triton kernels on CUDA tensors, the torch references on CPU tensors.

Tests may also run the kernels on CPU tensors, interpreted by Triton (``TRITON_INTERPRET=1``, which
tests/conftest.py sets without CUDA), by setting ``NOSASIM_KERNELS_ON_CPU=1``: then a whole decode goes through
the same launches as on a GPU, and the CPU CI checks how they fit together, not only each kernel alone. The
variables are read at every call, so a test can switch them for one run.
"""

from __future__ import annotations

import os

import torch


def kernels_on(t: torch.Tensor) -> bool:
    """Whether a kernel taking ``t`` should launch its Triton kernel (triton being importable is the caller's)."""
    if t.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("NOSASIM_KERNELS_ON_CPU") == "1"
