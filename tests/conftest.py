"""Shared pytest options: GPU tests skip cleanly without CUDA; slow and real-model tests are opt-in."""

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


def pytest_collection_modifyitems(config, items):
    has_cuda = None
    for item in items:
        if "gpu" in item.keywords:
            if has_cuda is None:
                has_cuda = _cuda_available()
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow: pass --runslow"))
        if "realmodel" in item.keywords and not config.getoption("--realmodel"):
            item.add_marker(pytest.mark.skip(reason="real model: pass --realmodel"))
