"""Shared pytest options: GPU tests skip cleanly without CUDA; slow and real-model tests are opt-in.

Without CUDA, Triton kernels run in Triton's interpreter (numpy on the CPU), so tests marked ``triton`` check the
GPU kernels' logic on any machine with the ``triton`` package. The variable must be set before any kernel is
defined, hence here, before test modules import the runtime.
"""

import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")
    parser.addoption("--realmodel", action="store_true", help="run tests that record from the real pretrained model")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


if "TRITON_INTERPRET" not in os.environ and not _cuda_available():
    os.environ["TRITON_INTERPRET"] = "1"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    has_cuda = None
    has_triton = _triton_available()
    for item in items:
        if "triton" in item.keywords:
            if not has_triton:
                item.add_marker(pytest.mark.skip(reason="needs the triton package (interpreted on CPU)"))
            elif os.environ.get("TRITON_INTERPRET") != "1":
                # With CUDA the kernels compile for the GPU and can't take CPU tensors; their gpu twins run instead.
                item.add_marker(pytest.mark.skip(reason="interpreter tests: run without CUDA or TRITON_INTERPRET=1"))
        if "gpu" in item.keywords:
            if has_cuda is None:
                has_cuda = _cuda_available()
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow: pass --runslow"))
        if "realmodel" in item.keywords and not config.getoption("--realmodel"):
            item.add_marker(pytest.mark.skip(reason="real model: pass --realmodel"))
