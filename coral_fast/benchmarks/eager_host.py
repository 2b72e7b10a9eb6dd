"""Where the host time of an eager call goes: cProfile over many eager calls of the two drop-in ops.

    python -m coral_fast.benchmarks.eager_host [--calls 200] [--top 25]

GroupedLMHead.topk (Llama-3 shape 128256 x 4096, M=1, 4 of 32 groups, k=10, default checks) and
tree_attention (32q/8kv/d128, B=1, T=64 tree, L=8192, a DraftTree), each called `--calls` times after
a warm-up, synchronising after every call; prints the mean wall time a call and the functions with the
largest own time (tottime), so the launcher's Python cost can be read function by function.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import torch


def _profile(name, fn, calls, top):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / calls * 1e6
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
        torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    print(f"## {name}: {wall:.1f} us a call (wall, synchronised, no profiler)\n{out.getvalue()}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m coral_fast.benchmarks.eager_host")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("eager_host: needs a CUDA GPU", file=sys.stderr)
        return 2
    from coral_fast.grouping import VocabGrouping
    from coral_fast.head import GroupedLMHead
    from coral_fast.kernels.tree_attention import tree_attention
    from coral_fast.tree import DraftTree

    dev = torch.device("cuda")
    V, H, G = 128256, 4096, 32
    head = GroupedLMHead(torch.randn(V, H, dtype=torch.bfloat16, device=dev) * 0.02, VocabGrouping.contiguous(V, G))
    hidden = torch.randn(1, H, dtype=torch.bfloat16, device=dev)
    groups = torch.randperm(G, device=dev)[:4][None]
    _profile("GroupedLMHead.topk llama3 M=1", lambda: head.topk(hidden, groups, 10), args.calls, args.top)

    T, L = 64, 8192
    parents = [-1] + [max(-1, (i - 1) // 3) for i in range(1, T)]
    tree = DraftTree.from_parents(torch.tensor(parents), device=dev)
    q = torch.randn(1, 32, T, 128, dtype=torch.bfloat16, device=dev)
    k = torch.randn(1, 8, L + T, 128, dtype=torch.bfloat16, device=dev)
    v = torch.randn_like(k)
    _profile("tree_attention B=1 T=64 L=8192", lambda: tree_attention(q, k, v, tree), args.calls, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
