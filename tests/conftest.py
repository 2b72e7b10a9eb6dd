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


def _smollm2_available() -> bool:
    from coral_fast.models import ModelNotAvailable, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except ModelNotAvailable:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    from coral_fast.kernels._dispatch import interpreter_enabled

    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    skip_interpreter = pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (the CPU runs)")
    # CI (the CPU) installs the GGUF and must fail without it; the GPU image has no registry to get it
    skip_smollm2 = pytest.mark.skip(reason="no SmolLM2 GGUF on this GPU machine")
    smollm2 = None
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "interpreter" in item.keywords and not interpreter_enabled():
            item.add_marker(skip_interpreter)
        if "smollm2" in item.keywords and HAS_CUDA:
            smollm2 = _smollm2_available() if smollm2 is None else smollm2
            if not smollm2:
                item.add_marker(skip_smollm2)


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
