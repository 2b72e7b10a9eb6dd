import os

# Triton decides at decoration time whether a kernel is interpreted: switch the interpreter on
# before anything imports triton when no GPU is present (CI: 2-core CPU).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture
def seed():
    """A fresh seed per test run, printed so a failure can be replayed."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    print(f"seed={value}")
    return value


@pytest.fixture
def one_thread():
    """Small ops on a busy 2-core machine: OpenMP spin-waits make 2 threads far slower than 1."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
