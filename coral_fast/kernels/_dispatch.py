"""Choosing between a Triton kernel and its PyTorch reference (`impl="auto"|"triton"|"reference"`)."""
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
