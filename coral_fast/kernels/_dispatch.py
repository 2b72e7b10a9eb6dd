"""Choosing between a Triton kernel and its PyTorch reference (`impl="auto"|"triton"|"reference"`)."""
import functools
import os

import torch

IMPLS = ("auto", "triton", "reference")


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def resolve_impl(impl: str, device: torch.device) -> str:
    """Return "triton" or "reference" for tensors on `device`.

    "auto" takes Triton on CUDA and the reference elsewhere. "triton" on CPU tensors runs the same
    kernel through the interpreter, which must be switched on before triton is imported.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if impl == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(
            "impl='triton' on CPU tensors runs through the Triton interpreter: set "
            "TRITON_INTERPRET=1 in the environment before importing triton (or coral_fast)"
        )
    return impl


def dot_needs_fp32(device: torch.device) -> bool:
    """The interpreter's bf16 `tl.dot` multiplies raw bit patterns (triton issue 11584): upcast there."""
    return device.type != "cuda"


@functools.lru_cache(maxsize=None)
def _cuda_properties(index: int):
    return torch.cuda.get_device_properties(index)


def cuda_properties(device: torch.device):
    """The CUDA device's properties (SM count, compute capability), read once per device: the kernels'
    launch rules ask on every call."""
    return _cuda_properties(device.index if device.index is not None else torch.cuda.current_device())
