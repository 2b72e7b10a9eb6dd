"""Eager launches of the project's Triton kernels without Triton's per-call Python work.

`kernel[grid](...)` binds every argument, specialises each one (type, 16-byte alignment of pointers,
ints equal to 1 or divisible by 16), turns that into the compiled-kernel cache key, looks it up and
then launches: on the H200's host most of an eager op's time, twice a call (docs/head.md). Here the
first launch of a specialisation goes through Triton as usual, and the CompiledKernel it returns is
kept under our own key: the caller's `meta` (a dict cached per shape that fixes every constexpr and
launch option) plus the same per-argument specialisation Triton computes, taken over the arguments
that change between calls. Later launches with that key call the compiled kernel's launcher
(`CompiledKernel.run`, the interface of triton 3.3 to 3.9) directly.

Direct launches happen only for CUDA tensors, outside CUDA-graph capture (captured launches, the
engine's, stay Triton's own) and torch.compile tracing, with no Triton launch hooks set (profilers),
outside the interpreter, and unless CORAL_FAST_DIRECT_LAUNCH=0. Anything else takes the normal
launch, as does every call after a triton whose internals differ has been detected.
"""
from __future__ import annotations

import os

import torch

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton
    TensorDescriptor = None

try:
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - triton < 3.4: no direct launches
    _knobs = None

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_ENV_ON = os.environ.get("CORAL_FAST_DIRECT_LAUNCH", "1") != "0"
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
_broken = False  # set once a direct launch failed: this triton's launcher differs


class _Unkeyable(Exception):
    """An argument of a type the key does not know: launch normally."""


def arg_key(value):
    """What Triton's specialisation of one runtime argument depends on: a tensor's dtype and whether
    its pointer is 16-byte aligned; an int's width and whether it is 1 or divisible by 16; a TMA
    descriptor's dtype, block, shape, strides and padding; bools and None themselves; any float."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    kind = type(value)
    if kind is int:
        return value == 1, value % 16 == 0, _I32_MIN <= value <= _I32_MAX, value < 0
    if kind is bool or value is None:
        return value
    if kind is float:
        return float
    if TensorDescriptor is not None and kind is TensorDescriptor:
        return (value.base.dtype, value.base.data_ptr() % 16 == 0, tuple(value.block_shape), tuple(value.shape),
                tuple(value.strides), value.padding)
    raise _Unkeyable(kind.__name__)


def _hooks_set() -> bool:
    """Triton launch hooks (proton, other profilers) want Triton's own launch: None or an empty
    HookChain (triton 3.9) is unset."""
    for hook in (_knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def direct_launch_allowed(device: torch.device) -> bool:
    """Whether a launch on `device` may skip Triton's launcher (module docstring)."""
    if _broken or not _ENV_ON or _INTERPRET or _knobs is None or device.type != "cuda":
        return False
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return False
    return not _hooks_set()


class Launcher:
    """One @triton.jit kernel's eager launches; `dynamic`: the names of the parameters a caller passes
    per call (pointers, strides, descriptors), every other parameter comes from `meta`.

        launch = Launcher(_my_kernel, dynamic=("x_ptr", "out_ptr", "stride_x"))
        launch(grid, meta, x, out, x.stride(0))   # meta: {"N": 128, "BLOCK": 64, "num_warps": 4}

    `meta` must be the same dict object for the same values (the callers cache it per shape with
    lru_cache): its identity is part of the key, and the cache holds it so the id is never reused.
    """

    def __init__(self, fn, dynamic: tuple[str, ...], max_entries: int = 512):
        self.fn = fn
        self.dynamic = tuple(dynamic)
        names = list(getattr(fn, "arg_names", ()))
        missing = [n for n in self.dynamic if n not in names]
        if missing:
            raise ValueError(f"{getattr(fn, '__name__', fn)} has no parameters {missing}")
        self.param_names = names
        self.dynamic_positions = tuple(names.index(n) for n in self.dynamic)
        self.entries: dict = {}
        self.max_entries = max_entries
        self.direct_launches = 0  # counted for the tests

    def key(self, meta: dict, device_index: int, values: tuple):
        """The cache key of a call; None where an argument cannot be keyed (normal launch)."""
        try:
            return (id(meta), device_index, *[arg_key(v) for v in values])
        except _Unkeyable:
            return None

    def __call__(self, grid: tuple, meta: dict, *values, device: torch.device, direct: bool = True):
        """Launch on `grid` (1 to 3 ints) with the `dynamic` parameters' values in that order; returns
        the CompiledKernel (None from the interpreter). direct=False: always Triton's launch (the
        custom ops that torch.compile runs)."""
        global _broken
        key = None
        if direct and direct_launch_allowed(device):
            index = torch.cuda.current_device()  # Triton compiles and loads per current device
            key = self.key(meta, index, values)
            entry = self.entries.get(key) if key is not None else None
            if entry is not None:
                kernel, run, function, packed, template, _ = entry
                args = template.copy()
                for pos, value in zip(self.dynamic_positions, values):
                    args[pos] = value
                grid = (*grid, 1, 1)
                try:
                    run(grid[0], grid[1], grid[2], torch._C._cuda_getCurrentRawStream(index), function, packed,
                        None, _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook, *args)
                except TypeError:  # the launcher's signature is not the one this module knows
                    _broken = True
                    self.entries.clear()
                else:
                    self.direct_launches += 1
                    return kernel
        kwargs = dict(meta)
        kwargs.update(zip(self.dynamic, values))
        kernel = self.fn[grid](**kwargs)
        if key is not None and not _broken:
            self._remember(key, meta, kernel, kwargs)
        return kernel

    def _remember(self, key, meta, kernel, kwargs) -> None:
        if hasattr(kernel, "result") or not all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata")):
            return  # an asynchronous compile's future, or another CompiledKernel: keep the normal launch
        if any(n not in kwargs for n in self.param_names):
            return  # a parameter left to its default: the template would be incomplete
        if len(self.entries) >= self.max_entries:
            self.entries.clear()
        template = [kwargs[n] for n in self.param_names]
        for pos in self.dynamic_positions:
            template[pos] = None  # hold no caller tensor (a KV cache) past its call
        # `meta` rides along in the entry, so its id (part of the key) stays taken
        self.entries[key] = (kernel, kernel.run, kernel.function, kernel.packed_metadata, template, meta)
