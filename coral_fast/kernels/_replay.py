"""Eager calls of an op replayed from CUDA graphs it captured itself: one graph launch instead of two
Triton launches.

On the H200 one Triton launch costs ~38 us of host time, a CUDA-graph replay ~5 us and a tiny copy
~9 us (bench/results/eager_host_h200.md), so an eager call of a two-kernel op that copies its inputs
into a graph's buffers and replays it costs less than launching the kernels. An op hands its launch to
`eager_graphs(...)` with its arguments sorted in two kinds (the op knows which is which):

- streamed: the per-call activations (hidden rows, queries, masks, lengths). The graph has its own
  static copies of them; each call copies its values in with one `torch._foreach_copy_` (over flat byte
  views where the tensors are of mixed dtypes and contiguous: one launch, where it would otherwise make
  one copy per tensor).
- resident: weights, tables, KV buffers. The graph reads them where they lie, so in-place updates are
  seen; their data_ptr is part of the key, so another tensor (a new weight) is another graph.

The key is (op name, device, the op's Python config, shape/stride/dtype of each streamed tensor,
data_ptr/shape/stride/dtype of each resident one). The graph writes static outputs; a call returns
clones of them, or copies them into the caller's `out` (never a view of a static buffer, which the
next replay overwrites). Several outputs lie in one byte buffer (captured a second time with them as
`out`), so the clone is one copy and the outputs are views of it. The kernels are the direct launch's,
so the results are bit-identical.

When: the backend is usable (CUDA tensors on the current device, the current stream is the device's
default stream, not torch.compile tracing) and a key has been seen `min_calls` (2) times, so a one-off
call does not pay a capture (milliseconds). Anything else launches directly (`_launch.py`). The
default-stream rule keeps CUDA-graph capture out (torch captures on side streams only, so the user's
capture and the engine's get the op's own launches), and also the warm-up runs that torch documents on a
side stream before a capture, which would otherwise capture graphs of their own; and replays from
several streams, which would race on the shared buffers. At most `capacity` (16) graphs, least
recently used out first, share one memory pool per device: what a graph allocates while it runs is
dead when it ends, and all replays are serialised on the default stream under one lock. A key whose
graph was evicted is not captured again while the cache remembers it (`remember` keys), so a loop over
more keys than the capacity settles into replaying some and launching the rest directly instead of
capturing on every call. CORAL_FAST_EAGER_GRAPHS=0 switches it all off.
"""
from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

_NEVER = -1  # a seen-count: this key is not captured (evicted once, or its capture failed)


class CudaGraphBackend:
    """Capture and replay with torch.cuda.CUDAGraph (the seam: tests inject a fake with the same two
    methods)."""

    def __init__(self):
        self._pools: dict[int, tuple] = {}  # device index -> the graphs' shared memory pool
        self._default_streams: dict[int, int] = {}  # device index -> its default stream's handle

    def usable(self, device: torch.device) -> bool:
        """Whether an eager call on `device` may replay (module docstring)."""
        if device.type != "cuda" or torch.compiler.is_compiling() or device.index != torch.cuda.current_device():
            return False
        default = self._default_streams.get(device.index)
        if default is None:
            default = self._default_streams[device.index] = torch.cuda.default_stream(device).cuda_stream
        return torch._C._cuda_getCurrentRawStream(device.index) == default

    def capture(self, fn: Callable[[], tuple], device: torch.device) -> tuple[Callable[[], None], tuple]:
        """Warm `fn` up on a side stream, capture it into the device's pool; -> (replay, its outputs)."""
        with torch.cuda.device(device):
            if device.index not in self._pools:
                self._pools[device.index] = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads' CUDA calls during the capture are not the capture's business
            with torch.cuda.graph(graph, pool=self._pools[device.index], stream=side,
                                  capture_error_mode="thread_local"):
                outputs = fn()
        return graph.replay, outputs


@dataclass
class _Graph:
    replay: Callable[[], None]
    inputs: list  # static copies of the streamed tensors that are not None, in order (byte views if `as_bytes`)
    outputs: tuple  # the static tensors the graph writes
    as_bytes: bool  # the streamed tensors are contiguous: copied in as flat byte views (module docstring)
    packed: Optional[Tensor] = None  # several outputs: the one uint8 buffer they are views of
    layout: tuple = ()  # (dtype, shape, strides, element offset) of each output in `packed` (`_pack`)


def _bytes(t: Tensor) -> Tensor:
    """A contiguous tensor's memory as a uint8 view (last dim times the element size; one view op)."""
    return t.view(torch.uint8)


def _pack(outputs: tuple) -> tuple[Tensor, tuple, tuple]:
    """One uint8 buffer for all `outputs` (each at a 16-byte aligned offset, the total a multiple of 16, so
    the buffer views as any dtype) -> (buffer, layout, views). layout: (dtype, shape, contiguous strides,
    offset in elements of that dtype) of each output."""
    layout, offset = [], 0
    for t in outputs:
        size = t.numel() * t.element_size()
        layout.append((t.dtype, tuple(t.shape), _row_major(t.shape), offset // t.element_size()))
        offset += -(-size // 16) * 16
    packed = torch.empty(offset, dtype=torch.uint8, device=outputs[0].device)
    return packed, tuple(layout), _unpack(packed, layout)


def _row_major(shape) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _unpack(packed: Tensor, layout) -> tuple:
    # two view ops an output (a dtype view of the whole buffer, then its window): this runs on every replay
    return tuple([packed.view(dtype).as_strided(shape, stride, offset) for dtype, shape, stride, offset in layout])


def _contiguous(tensors) -> bool:
    return all(t.dim() > 0 and t.is_contiguous() for t in tensors)


class EagerGraphs:
    """The cache of captured graphs of eager op calls (module docstring).

        outputs = eager_graphs("my_op", launch, (x,), (weight,), (k,), out)
        # launch(streamed, resident, out) -> tuple of output tensors (written into `out` when given)

    `config`: the op's hashable Python arguments that decide its launch (sizes, scale, kernel config).
    Counters `captures` and `replays` are kept for the tests and the benchmark.
    """

    def __init__(self, capacity: int = 16, min_calls: int = 2, remember: int = 1024, backend=None):
        self.capacity, self.min_calls, self.remember = capacity, min_calls, remember
        self.backend = backend if backend is not None else CudaGraphBackend()
        self.enabled = os.environ.get("CORAL_FAST_EAGER_GRAPHS", "1") != "0"
        self.graphs: OrderedDict = OrderedDict()  # key -> _Graph, least recently used first
        self.seen: OrderedDict = OrderedDict()  # key -> calls so far (or _NEVER), for keys without a graph
        self.captures = self.replays = 0
        self._lock = threading.Lock()  # one call's copy-in, replay and copy-out at a time

    def key(self, name: str, device: torch.device, config: tuple, streamed: tuple, resident: tuple) -> tuple:
        # _streamed_key / _resident_key inlined: this runs on every eager call
        return (name, device, config,
                tuple([None if t is None else (t.shape, t.stride(), t.dtype) for t in streamed]),
                tuple([None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype) for t in resident]))

    def __call__(self, name: str, launch: Callable, streamed: tuple, resident: tuple, config: tuple,
                 out: Optional[tuple] = None, validate: Optional[Callable[[bool], None]] = None) -> tuple:
        """streamed: per-call tensors; resident: tensors read in place (None allowed in both: part of the key).
        validate(replaying): the op's checks, left to this call so that a replay skips what its key fixes:
        called with False before any direct launch or capture (every check), with True before a replay
        (only what the key does not fix: values, `out`). The streamed tensors' devices are not in the key:
        a replay copies from wherever they lie, which gives the same result.
        Returns launch's outputs: replayed (clones, or `out` filled) or from the direct launch."""
        device = streamed[0].device
        if not (self.enabled and self.backend.usable(device)):
            if validate is not None:
                validate(False)
            return launch(streamed, resident, out)
        key = self.key(name, device, config, streamed, resident)
        grad = torch.is_grad_enabled()  # copies into the static inputs must not join an autograd graph
        torch._C._set_grad_enabled(False)  # (what torch.no_grad() does, without its per-call object)
        try:
            with self._lock:
                graph = self.graphs.get(key)
                if graph is None:
                    if validate is not None:
                        validate(False)
                    graph = self._admit(key, name, launch, streamed, resident, device)
                else:
                    if validate is not None:
                        validate(True)
                    self.graphs.move_to_end(key)
                if graph is not None:
                    if graph.as_bytes:
                        torch._foreach_copy_(graph.inputs, [t.view(torch.uint8) for t in streamed if t is not None])
                    else:
                        torch._foreach_copy_(graph.inputs, [t for t in streamed if t is not None])
                    graph.replay()
                    self.replays += 1
                    if out is None:
                        if graph.packed is not None:
                            return _unpack(graph.packed.clone(), graph.layout)
                        return tuple([t.clone() for t in graph.outputs])
                    if graph.packed is not None and _contiguous(out):  # one copy of same-dtype byte views
                        torch._foreach_copy_([_bytes(t) for t in out], [_bytes(t) for t in graph.outputs])
                    else:
                        torch._foreach_copy_(list(out), list(graph.outputs))
                    return tuple(out)
        finally:
            torch._C._set_grad_enabled(grad)
        return launch(streamed, resident, out)

    def _admit(self, key, name, launch, streamed, resident, device) -> Optional[_Graph]:
        """The graph of a key seen `min_calls` times, captured now; None: launch directly."""
        calls = self.seen.pop(key, 0)
        if calls == _NEVER or calls + 1 < self.min_calls:
            self._remember(key, calls if calls == _NEVER else calls + 1)
            return None
        inputs = [t.clone() for t in streamed if t is not None]  # this call's values: a valid warm-up
        slots = iter(inputs)
        static = tuple(None if t is None else next(slots) for t in streamed)
        captured = self._capture(name, key, lambda: tuple(launch(static, resident, None)), device)
        if captured is None:
            return None
        replay, outputs = captured
        packed, layout = None, ()
        if len(outputs) > 1 and _contiguous(outputs):
            # again, writing into views of one buffer: a call then clones one buffer, not each output
            packed, layout, views = _pack(outputs)
            captured = self._capture(name, key, lambda: tuple(launch(static, resident, views)), device)
            if captured is None:
                return None
            replay, outputs = captured
        self.captures += 1
        # byte views only where they save launches: several tensors of mixed dtypes, all contiguous
        # (the caller's tensors decide: a clone of a strided one is contiguous; the key fixes the strides)
        as_bytes = len({t.dtype for t in inputs}) > 1 and _contiguous([t for t in streamed if t is not None])
        graph = self.graphs[key] = _Graph(replay, [_bytes(t) for t in inputs] if as_bytes else inputs, outputs,
                                          as_bytes, packed, layout)
        if len(self.graphs) > self.capacity:
            evicted, _ = self.graphs.popitem(last=False)
            self._remember(evicted, _NEVER)
        return graph

    def _capture(self, name, key, fn, device):
        """backend.capture(fn, device), or None (and the key launches directly from now on) if it fails."""
        try:
            return self.backend.capture(fn, device)
        except Exception as error:  # noqa: BLE001 - any failure: this key launches directly from now on
            warnings.warn(f"{name}: CUDA-graph capture failed ({error!r}); launching directly", RuntimeWarning)
            self._remember(key, _NEVER)
            return None

    def _remember(self, key, calls: int) -> None:
        self.seen[key] = calls
        if len(self.seen) > self.remember:
            self.seen.popitem(last=False)

    def clear(self) -> None:
        """Drop every graph and every count (the memory pool is freed with the last graph)."""
        with self._lock:
            self.graphs.clear()
            self.seen.clear()


eager_graphs = EagerGraphs()  # the cache both ops use
