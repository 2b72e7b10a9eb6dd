"""Host time of eager calls: the launch floor on this machine, and the two drop-in ops against it.

    python -m coral_fast.benchmarks.eager_host [--calls 200] [--out DIR] [--profile] [--top 25]

Floor rows (host microseconds a call, mean over `--calls` back-to-back calls, nothing synchronised in
between; the device work of each is a few microseconds, so the host sets the pace):
- an empty Triton kernel with the tree-attention split kernel's argument list (9 pointers, 21 ints,
  a float, 9 constexprs), launched by `kernel[grid](...)` (Triton's launcher) and by `_launch.Launcher`
  (what the ops use: Triton's launcher once, then the compiled kernel's own);
- `torch.cuda.CUDAGraph.replay()` of a graph of one such kernel;
- a tiny torch op, `x.copy_(y)` on 16 bytes.
Then GroupedLMHead.topk (Llama-3 shape 128256 x 4096, M=1, 4 of 32 groups, k=10, default checks) and
tree_attention (32q/8kv/d128, B=1, T=64 tree, L=8192, a DraftTree): wall time a call (synchronised
after each) and its host part through the public API (graph replay under the hood, `_replay.py`), with
the replay off (direct launches, CORAL_FAST_EAGER_GRAPHS=0 in effect) and with Triton's launch too
(CORAL_FAST_DIRECT_LAUNCH=0 as well), beside the same call replayed in the caller's own CUDA graph; the
target (issue 16) is checked on the public API's wall time. `--out DIR`: the tables also to DIR/eager_host.md and
DIR/eager_host.json. `--profile`: cProfile of the eager calls, functions by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch

from coral_fast.benchmarks.floors import time_graph_ms

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _empty_kernel(p0, p1, p2, p3, p4, p5, p6, p7, p8,
                      i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10, i11, i12, i13, i14, i15, i16, i17, i18, i19,
                      i20, f0,
                      C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr, C4: tl.constexpr,
                      C5: tl.constexpr, C6: tl.constexpr, C7: tl.constexpr, C8: tl.constexpr):
        pass
except ImportError:  # pragma: no cover
    triton = None

_EMPTY_META = dict(C0=4, C1=128, C2=64, C3=64, C4=False, C5=False, C6=False, C7=False, C8=False, num_warps=4)
_INTS = (64 * 128, 128, 128, 8256 * 128 * 8, 8256 * 128, 128, 8256 * 128 * 8, 8256 * 128, 128, 0, 3, 0,
         64 * 128 * 32, 64 * 128, 128, 8, 64, 8256, 1024, 9, 0)


def _host_us(fn, calls: int) -> float:
    """Mean host time of `calls` back-to-back calls (no synchronisation between them)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host


def _eager_us(fn, calls: int) -> tuple[float, float]:
    """(median wall us of one call from an idle device to its result, median host part)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    walls, hosts = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e6)
        hosts.append((t1 - t0) * 1e6)
    return statistics.median(walls), statistics.median(hosts)


def _graph_us(fn, reps: int = 50) -> float:
    """Median device time in us of `fn` replayed from a CUDA graph (events around each replay)."""
    return time_graph_ms(fn, reps=reps, warmup=1) * 1e3


def floor_rows(calls: int) -> list[tuple[str, float]]:
    from coral_fast.kernels._launch import Launcher

    dev = torch.device("cuda")
    bufs = [torch.empty(64, device=dev) for _ in range(9)]
    args = (*bufs, *_INTS, 0.125)
    names = _empty_kernel.arg_names[:len(args)]
    launch = Launcher(_empty_kernel, dynamic=tuple(names))
    grid = (1, 1, 1)
    rows = [("empty Triton kernel, 31 runtime args, kernel[grid](...)",
             _host_us(lambda: _empty_kernel[grid](*args, **_EMPTY_META), calls)),
            ("same kernel through _launch.Launcher (direct)",
             _host_us(lambda: launch(grid, _EMPTY_META, *args, device=dev), calls))]
    if launch.direct_launches == 0:
        rows[-1] = (rows[-1][0] + " [direct launch NOT taken: normal launch]", rows[-1][1])
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        _empty_kernel[grid](*args, **_EMPTY_META)
        torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        _empty_kernel[grid](*args, **_EMPTY_META)
    rows.append(("CUDAGraph.replay() of that one kernel", _host_us(graph.replay, calls)))
    x, y = torch.zeros(4, device=dev), torch.ones(4, device=dev)
    rows.append(("x.copy_(y), 16 bytes", _host_us(lambda: x.copy_(y), calls)))
    return rows


def _profile(name, fn, calls, top):
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
        torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    print(f"## profile: {name}\n{out.getvalue()}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m coral_fast.benchmarks.eager_host")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--out", help="also write eager_host.md and eager_host.json to this directory")
    p.add_argument("--profile", action="store_true", help="cProfile of the eager calls too")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    if args.calls < 1 or args.top < 1:
        print("eager_host: --calls and --top must be positive", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() or triton is None:
        print("eager_host: needs a CUDA GPU and triton", file=sys.stderr)
        return 2
    from coral_fast.grouping import VocabGrouping
    from coral_fast.head import GroupedLMHead
    from coral_fast.kernels import _launch
    from coral_fast.kernels._replay import eager_graphs
    from coral_fast.kernels.tree_attention import tree_attention
    from coral_fast.tree import DraftTree

    lines = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  calls=args.calls, floors=[], ops=[])
    emit(f"{report['device']}; torch {torch.__version__}; triton {triton.__version__}\n")
    emit("| floor: what | host us a call |\n|---|---|")
    for what, us in floor_rows(args.calls):
        emit(f"| {what} | {us:.1f} |")
        report["floors"].append(dict(what=what, host_us=round(us, 2)))

    dev = torch.device("cuda")
    V, H, G = 128256, 4096, 32
    head = GroupedLMHead(torch.randn(V, H, dtype=torch.bfloat16, device=dev) * 0.02, VocabGrouping.contiguous(V, G))
    hidden = torch.randn(1, H, dtype=torch.bfloat16, device=dev)
    groups = torch.randperm(G, device=dev)[:4][None]
    T, L = 64, 8192
    parents = [-1] + [max(-1, (i - 1) // 3) for i in range(1, T)]
    tree = DraftTree.from_parents(torch.tensor(parents), device=dev)
    q = torch.randn(1, 32, T, 128, dtype=torch.bfloat16, device=dev)
    k = torch.randn(1, 8, L + T, 128, dtype=torch.bfloat16, device=dev)
    v = torch.randn_like(k)
    ops = [("GroupedLMHead.topk llama3 M=1, 4 of 32 groups", lambda: head.topk(hidden, groups, 10),
            lambda: head.topk(hidden, groups, 10, check=False)),
           ("tree_attention B=1 T=64 L=8192, DraftTree", lambda: tree_attention(q, k, v, tree),
            lambda: tree_attention(q, k, v, tree, check=False))]
    emit("\n| op | graph (us) | eager API, replay: wall / host (us) | eager direct, replay off: wall / host (us) "
         "| eager Triton launch: wall / host (us) | target 1.3 graph + 30 | API met |\n|---|---|---|---|---|---|---|")
    for name, fn, captured in ops:
        graph = _graph_us(captured)
        replays = eager_graphs.replays
        wall, host = _eager_us(fn, args.calls)
        replayed = eager_graphs.replays - replays >= args.calls  # the timed calls all replayed
        eager_graphs.enabled = False
        try:
            wall_d, host_d = _eager_us(fn, args.calls)
            _launch._ENV_ON = False
            try:
                wall_t, host_t = _eager_us(fn, args.calls)
            finally:
                _launch._ENV_ON = True
        finally:
            eager_graphs.enabled = True
        target = 1.3 * graph + 30
        met = wall <= target
        note = "" if replayed else " [replay NOT taken]"
        emit(f"| {name} | {graph:.1f} | {wall:.1f} / {host:.1f}{note} | {wall_d:.1f} / {host_d:.1f} "
             f"| {wall_t:.1f} / {host_t:.1f} | {target:.1f} | {'MET' if met else 'MISSED'} |")
        report["ops"].append(dict(
            op=name, graph_us=round(graph, 2), api_wall_us=round(wall, 2), api_host_us=round(host, 2),
            api_replayed=replayed, direct_wall_us=round(wall_d, 2), direct_host_us=round(host_d, 2),
            triton_wall_us=round(wall_t, 2), triton_host_us=round(host_t, 2), target_us=round(target, 2), met=met))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "eager_host.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(args.out, "eager_host.json"), "w") as f:
            json.dump(report, f, indent=1)
    if args.profile:
        for name, fn, _ in ops:
            _profile(name, fn, args.calls, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
