"""`coral-fast bench head`: the grouped LM head with fused top-k against dense cuBLAS + torch.topk
and against the naive gather, with the bytes floor beside each row.

    coral-fast bench head [--out FILE.md] [--shapes llama3,qwen2.5,gemma3] [--cases M:routing,...] [--quick]
    coral-fast bench head --sweep [--out FILE.md] [--shapes ...] [--cases ...]
    coral-fast bench head --shapes llama3 --cases 1:random --quick     # the eager-vs-graph case, ~20 s

The table checks the kernel against the reference (bf16, same inputs) and times it with CUDA events
(L2 flushed by a 256 MiB read before every call, median), rotating 8 input sets (hidden rows and group
choices): one call a CUDA-graph replay, and one graph of 16 back-to-back calls on 16 input sets / 16.
The eager column is what a caller of `GroupedLMHead.topk` in plain PyTorch code waits for: the wall
time of one call with the default checks, from an idle device (synchronised, L2 flushed) until its
result is on the device (synchronised again); its host part (the call's return) beside it. Target
(issue 16): eager <= 1.3 x graph + 30 us. `--quick`: the table's graph and eager columns only.
The floor is the bytes of the weight rows that must be read once (the union of the active groups over
all rows) over the device-to-device copy bandwidth measured in the same run. `--sweep` instead times
the default config against the candidate configs of SWEEP_PLAN side by side (each checked first).
Without a GPU it times the PyTorch reference on scaled-down shapes (CPU smoke run).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from coral_fast.grouping import VocabGrouping
from coral_fast.head import GroupedLMHead
from coral_fast.kernels.grouped_head_topk import (
    KernelConfig,
    _num_programs_cap,
    default_config,
    grouped_head_topk_reference,
    grouped_head_topk_triton,
)

MAX_ERR = 2e-3  # bf16 operands, fp32 accumulation: larger log-prob errors fail the run

SHAPES = {  # name -> (V, H): the three shapes, the table's default
    "llama3": (128256, 4096),
    "qwen2.5": (152064, 3584),
    "gemma3": (262144, 640),
}
# the draft loop's own head (SmolLM2-135M: tied embedding, 49152 x 576), for --shapes and the sweep
EXTRA_SHAPES = {"smollm2": (49152, 576)}
ALL_SHAPES = {**SHAPES, **EXTRA_SHAPES}
CPU_SHAPES = {"llama2-like/2": (16000, 1024), "gemma3/16": (16384, 640)}
NUM_GROUPS, ACTIVE, TOP_K, NSETS = 32, 4, 10, 8
# (M, routing): "random" = each row draws A of G groups; "shared" = rows draw A of the same 6
CASES = [(1, "random"), (16, "shared"), (16, "random"), (64, "shared"), (64, "random")]
NCHAIN = 16  # calls in one graph for the chained timing


@dataclass
class Row:
    shape: str
    M: int
    routing: str
    ours_us: float  # CUDA graph replay
    ours_eager_us: float  # one eager call, default checks, wall time from idle to result
    eager_host_us: float | None
    dense_us: float  # CUDA graph replay
    naive_us: float | None
    floor_union_us: float
    floor_all_us: float
    max_err: float
    config: str
    dobench_us: float | None = None  # ours, graph, timed by triton's do_bench (zeroing flush)
    chain_us: float | None = None  # ours: one graph of NCHAIN calls on NCHAIN input sets, time / NCHAIN


def _groups(M, routing, gen, device, avoid=()):
    """[M, ACTIVE] group ids; `avoid`: groups to leave out where enough others remain (the chained
    timing keeps consecutive calls off each other's groups, so none finds its weights in L2)."""
    allowed = torch.tensor([g for g in range(NUM_GROUPS) if g not in set(avoid)], dtype=torch.long)
    needed = 6 if routing == "shared" else (ACTIVE if M == 1 else NUM_GROUPS)
    if allowed.numel() < needed:
        allowed = torch.arange(NUM_GROUPS)
    if routing == "shared":
        pool = allowed[torch.randperm(allowed.numel(), generator=gen)[:6]]
    else:
        pool = allowed if M == 1 else torch.arange(NUM_GROUPS)
    rows = [pool[torch.randperm(pool.numel(), generator=gen)[:ACTIVE]] for _ in range(M)]
    return torch.stack(rows).to(device)


def _naive_topk(hidden, weight, groups, k):
    """Gather each row's groups (a copy of the weights per row), einsum, log-softmax, topk."""
    M, A = groups.shape
    V, H = weight.shape
    per = V // NUM_GROUPS
    w = weight.view(NUM_GROUPS, per, H)[groups]  # [M, A, per, H]: the copies that make it slow
    logits = torch.einsum("mh,mavh->mav", hidden, w).float().reshape(M, A * per)
    values, flat = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
    ids = groups.gather(1, flat // per) * per + flat % per
    return ids, values


FLUSH_BYTES = 256 * 1024 * 1024


def _time_us(fn, flush, reps=60, warmup=3) -> float:
    """Median device time of fn() in us, L2 flushed before each call by *reading* 256 MiB.

    triton.testing.do_bench flushes by zeroing a buffer, which leaves L2 full of dirty lines that the
    timed kernel then pays to write back: no cost that a draft loop sees, and a visible one next to a
    30 us floor (the table's do_bench column shows it). A read leaves L2 clean.
    """
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        flush.sum()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def eager_call_us(fn, flush=None, reps=30) -> tuple[float, float]:
    """One eager call from an idle device: (median wall us until its result is on the device, median us
    until the call returns to the host). `fn()` takes no argument (rotate inputs inside it); `flush`:
    a buffer read before each call so that its bytes come from HBM."""
    import time as _time

    fn()
    torch.cuda.synchronize()
    walls, hosts = [], []
    for _ in range(reps):
        if flush is not None:
            flush.sum()
        torch.cuda.synchronize()
        t0 = _time.perf_counter()
        fn()
        t1 = _time.perf_counter()
        torch.cuda.synchronize()
        t2 = _time.perf_counter()
        walls.append((t2 - t0) * 1e6)
        hosts.append((t1 - t0) * 1e6)
    return statistics.median(walls), statistics.median(hosts)


def _copy_bandwidth(device, flush) -> float:
    """Bytes read + written per second of a 1 GiB device-to-device copy (median)."""
    src = torch.randn(256 * 1024 * 1024, device=device)
    dst = torch.empty_like(src)
    us = _time_us(lambda: dst.copy_(src), flush, reps=30)
    del src, dst
    return 2 * 1024**3 / (us * 1e-6)


def _cfg_str(c: KernelConfig) -> str:
    return (f"m{c.block_m} v{c.block_v} k{c.block_k} w{c.num_warps} s{c.num_stages} p{c.programs_per_sm}"
            + ("" if c.gather else " rows-in-order") + (" ids-in-keys" if getattr(c, "ids_in_keys", False) else "")
            + (" tma" if getattr(c, "tma", False) and not c.gather else ""))


def shape_head(name: str, device) -> tuple[torch.Tensor, VocabGrouping, GroupedLMHead]:
    """The bench's head for a shape of ALL_SHAPES: random bf16 weight [V, H], G=NUM_GROUPS contiguous groups."""
    V, H = ALL_SHAPES[name]
    weight = (torch.randn(V, H, device=device) / H**0.5).to(torch.bfloat16)
    grouping = VocabGrouping.contiguous(V, NUM_GROUPS)
    return weight, grouping, GroupedLMHead(weight, grouping)


def _logprob_err(head, weight, grouping, hidden, groups, ids, logprobs) -> float:
    """Max |log-prob error| of a top-k result against the fp32 reference: the reference's values, and the
    log-prob that the full fp32 log-softmax gives each returned id."""
    _, ref_lp = grouped_head_topk_reference(hidden, weight, head.offsets, head.order, groups, TOP_K)
    V = weight.shape[0]
    logits = (hidden.float() @ weight.float().T).masked_fill(
        ~_active_mask(grouping, groups, V, weight.device), float("-inf"))
    full = torch.log_softmax(logits, dim=-1)
    return max(float((logprobs - ref_lp).abs().max()), float((full.gather(1, ids) - logprobs).abs().max()))


def run_gpu(shapes, cases, quick: bool, log=print) -> tuple[list[Row], float]:
    import triton.testing

    device = torch.device("cuda")
    flush = torch.empty(FLUSH_BYTES // 4, device=device).uniform_()
    bench = lambda fn, reps=60: _time_us(fn, flush, reps)  # noqa: E731
    bw = _copy_bandwidth(device, flush)
    log(f"device-to-device copy bandwidth: {bw / 1e12:.2f} TB/s")
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name in shapes:
        V, H = ALL_SHAPES[name]
        weight, grouping, head = shape_head(name, device)
        for M, routing in cases:
            inp = case_inputs(head, weight, grouping, M, routing, gen, bw)
            hiddens, groups = inp.hiddens, inp.groups
            floor_all = V * H * 2 / bw * 1e6
            cfg = default_config(M, H, TOP_K)

            # correctness first, on every input set, same call as timed
            max_err = max(_logprob_err(head, weight, grouping, h, g, *head.topk(h, g, TOP_K, impl="triton", check=True))
                          for h, g in zip(hiddens, groups))

            def ours(i):
                return head.topk(hiddens[i], groups[i], TOP_K, impl="triton", check=False)

            def ours_eager(i):  # what an eager caller runs: the public API, default checks
                return head.topk(hiddens[i], groups[i], TOP_K)

            def dense(i):
                return torch.topk(hiddens[i] @ weight.T, TOP_K, dim=-1)

            def naive(i):
                return _naive_topk(hiddens[i], weight, groups[i], TOP_K)

            ours_graphs = _rotating(_graphs(ours))
            ours_graph_us = bench(ours_graphs)
            eager_us, eager_host_us = eager_call_us(_rotating(ours_eager), flush)
            dobench_us = chain_us = naive_us = None
            if not quick:
                dobench_us = triton.testing.do_bench(ours_graphs, warmup=10, rep=100, return_mode="median") * 1e3
                chain_us = _time_chain_us(
                    lambda i: head.topk(inp.chain_h[i], inp.chain_g[i], TOP_K, impl="triton", check=False), NCHAIN,
                    flush)
                naive_us = bench(_rotating(naive), reps=20)
            dense_us = bench(_rotating(_graphs(dense)))
            row = Row(name, M, routing, ours_graph_us, eager_us, eager_host_us, dense_us, naive_us, inp.floor_us,
                      floor_all, max_err, _cfg_str(cfg), dobench_us=dobench_us, chain_us=chain_us)
            log(format_row(row))
            rows.append(row)
        del weight, head
        torch.cuda.empty_cache()
    return rows, bw


def _warm_up(fn, n):
    """fn(0) .. fn(n-1) once on a side stream before capture (Triton compiles, allocator pools fill)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(n):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)


def _graphs(fn):
    """One CUDA graph per input set (the draft loop captures the head the same way)."""
    _warm_up(fn, NSETS)
    graphs = []
    for i in range(NSETS):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(i)
        graphs.append(graph)
    return lambda i: graphs[i].replay()


def _rotating(fn):
    """A no-argument callable that feeds fn the next input set each call."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % NSETS
        return fn(state["i"])

    return call


def _chain_inputs(M, H, routing, gen, device, n=NCHAIN):
    """n input sets (hidden, groups), each set's groups kept off the previous two sets' groups."""
    hiddens, groups, recent = [], [], []
    for _ in range(n):
        g = _groups(M, routing, gen, device, avoid=[x for r in recent[-2:] for x in r])
        recent.append(g.unique().tolist())
        hiddens.append(torch.randn(M, H, device=device).to(torch.bfloat16))
        groups.append(g)
    return hiddens, groups


def _time_chain_us(fn, n, flush, reps=30) -> float:
    """One CUDA graph of fn(0) .. fn(n-1) back to back (each on its own input set), replayed after an
    L2 flush (256 MiB read); median graph time / n. Counts the launch gaps inside a graph (as the draft
    loop's graph sees them) but the event and graph-launch overhead only once per n calls."""
    _warm_up(fn, n)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            fn(i)
    us = _time_us(graph.replay, flush, reps=reps)
    del graph
    return us / n


def _active_mask(grouping, groups, V, device):
    group_of = grouping.group_of.to(device)
    return (group_of[None, None, :] == groups[:, :, None]).any(dim=1)


def run_cpu(log=print) -> list[Row]:
    """No GPU: time the reference, dense + topk and the naive gather on scaled-down shapes."""
    def bench(fn, n=7):
        fn()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e6

    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, (V, H) in CPU_SHAPES.items():
        weight = torch.randn(V, H) / H**0.5
        grouping = VocabGrouping.contiguous(V, NUM_GROUPS)
        head = GroupedLMHead(weight, grouping)
        for M, routing in [(1, "random"), (16, "shared"), (16, "random")]:
            h = torch.randn(M, H)
            g = _groups(M, routing, gen, "cpu")
            ours_us = bench(lambda: head.topk(h, g, TOP_K, impl="reference"))
            dense_us = bench(lambda: torch.topk(h @ weight.T, TOP_K, dim=-1))
            naive_us = bench(lambda: _naive_topk(h, weight, g, TOP_K))
            row = Row(name, M, routing, ours_us, ours_us, None, dense_us, naive_us, float("nan"), float("nan"), 0.0,
                      "reference")
            log(format_row(row))
            rows.append(row)
    return rows

# ---------------------------------------------------------------------------------------------------
# Configs side by side: `coral-fast bench head --sweep` (the cases the default still misses)
# ---------------------------------------------------------------------------------------------------
def _kc(m, v, k, stages, per_sm, warps=4, ids=None, gather=False, tma=True):
    """A candidate config; original ids in the keys with 16-row blocks (as `default_config`); `gather`:
    row blocks of the rows that chose the item's group, not rows in order; `tma=False`: pointer loads
    instead of TMA descriptors (rows in order; default_config itself asks for TMA with 16-row blocks at
    small H only)."""
    return KernelConfig(m, v, k, warps, stages, per_sm, gather=gather,
                        ids_in_keys=(m <= 16) if ids is None else ids, tma=tma)


# Work items of the partials kernel = active groups x ceil(group size / block_v) x ceil(M / block_m),
# run by min(items, SMs x programs_per_sm) persistent programs; how many are resident at once is bound
# by registers and shared memory (`coral_fast/benchmarks/head_regs.py` counts them for sm_90). The
# default runs first in every case ("default, pdl off" too with `--pdl-off`). Results of the sweeps:
# bench/results/head_sweep_h100.md.
_M64_TMA = [  # Llama-3 / Qwen2.5 M=64: TMA tiles leave shared memory alone to bound the programs an SM
    _kc(64, 64, 128, 3, 2, tma=False),  # the default by pointer loads: TMA's gain
    _kc(64, 64, 64, 3, 4),  # 48 KB: 4 resident
    _kc(64, 64, 64, 4, 3),  # 64 KB: 3
    _kc(64, 64, 128, 2, 3),  # 64 KB: 3
    _kc(64, 64, 64, 3, 3),  # 48 KB: 3 launched (4 fit)
]
_M64_TMA_SMALL_H = [  # Gemma-3 (H=640) M=64
    _kc(64, 64, 64, 4, 3, tma=False),  # pointer loads
    _kc(64, 64, 64, 3, 4),  # 48 KB: 4
    _kc(64, 64, 64, 2, 4),  # 32 KB: 4
    _kc(64, 64, 128, 3, 2),  # 96 KB: 2
    _kc(64, 64, 128, 2, 3),  # 64 KB: 3
]
SWEEP_PLAN = {  # shape -> [(M, routing, [candidate configs])]
    "llama3": [(64, "shared", _M64_TMA), (64, "random", _M64_TMA)],
    "qwen2.5": [(64, "shared", _M64_TMA), (64, "random", _M64_TMA)],
    "smollm2": [  # the loop's head: the root (M=1) and a frontier of 10 siblings; TMA tiles vs pointer loads
        (1, "random", [_kc(16, 128, 128, 3, 3, tma=False)]),
        (10, "shared", [_kc(16, 128, 128, 3, 3, tma=False)]),
    ],
    "gemma3": [(64, "shared", _M64_TMA_SMALL_H), (64, "random", _M64_TMA_SMALL_H)],
}


def _check_config(head, weight, grouping, cfg, M, H, routing, gen, device, nsets=4,
                  kernel=grouped_head_topk_triton) -> float:
    """Fresh inputs, poisoned outputs, against the fp32 reference: max |logprob error|; raises on
    unwritten outputs, bad ids, or an id whose own log-prob is not the one returned. `kernel`: the
    launcher to check (another version of `grouped_head_topk_triton`, or the same)."""
    V = weight.shape[0]
    worst = 0.0
    for _ in range(nsets):
        h = torch.randn(M, H, device=device).to(torch.bfloat16)
        g = _groups(M, routing, gen, device)
        ids = torch.full((M, TOP_K), -7, dtype=torch.int64, device=device)
        lp = torch.full((M, TOP_K), float("nan"), device=device)
        kernel(h, weight, head.offsets, head.order, g, TOP_K, head.max_group_size, cfg, out=(ids, lp))
        torch.cuda.synchronize()
        if not bool(torch.isfinite(lp).all()) or bool((ids < 0).any()) or bool((ids >= V).any()):
            raise AssertionError("unwritten, non-finite or out-of-range outputs")
        if not bool((lp[:, 1:] <= lp[:, :-1] + 1e-6).all()):
            raise AssertionError("not sorted descending")
        err = _logprob_err(head, weight, grouping, h, g, ids, lp)
        if any(ids[m].unique().numel() != TOP_K for m in range(M)):
            raise AssertionError("repeated ids in a row")
        worst = max(worst, err)
    return worst


SIDE_BY_SIDE_HEADER = [
    "| case | floor (us) | version / config | items / programs | err | graph 1 call (us), x2 | / floor "
    f"| {NCHAIN}-call graph per call (us), x2 | / floor | partials alone (us) |",
    "|---|---|---|---|---|---|---|---|---|---|",
]


@dataclass
class CaseInputs:
    """One case's inputs, shared by every kernel timed on it (see `compare_kernels`)."""

    head: GroupedLMHead
    weight: torch.Tensor
    grouping: VocabGrouping
    M: int
    H: int
    routing: str
    gen: torch.Generator
    hiddens: list  # NSETS x [M, H] bf16, rotated through by the one-call timing
    groups: list  # NSETS x [M, ACTIVE]
    chain_h: list  # NCHAIN x [M, H], for the chained timing (no call finds its weights in L2)
    chain_g: list
    floor_us: float
    active: float  # mean number of active groups


def case_inputs(head, weight, grouping, M, routing, gen, bw) -> CaseInputs:
    H = weight.shape[1]
    device = weight.device
    hiddens = [torch.randn(M, H, device=device).to(torch.bfloat16) for _ in range(NSETS)]
    groups = [_groups(M, routing, gen, device) for _ in range(NSETS)]
    chain_h, chain_g = _chain_inputs(M, H, routing, gen, device)
    sizes = grouping.group_sizes
    floor = statistics.mean(int(sizes[g.unique().cpu()].sum()) for g in groups) * H * 2 / bw * 1e6
    active = statistics.mean(g.unique().numel() for g in groups)
    return CaseInputs(head, weight, grouping, M, H, routing, gen, hiddens, groups, chain_h, chain_g, floor, active)


def compare_kernels(case: str, inp: CaseInputs, entries, flush, log=print) -> list[str]:
    """Kernels side by side on one case: entries = [(label, kernel, cfg)], `kernel` with the signature of
    `grouped_head_topk_triton` (another version of it, or the same with another config). Each is checked
    on fresh inputs against the reference (`_check_config`) and captured, then all are timed in two
    interleaved passes (one call a graph replay; NCHAIN calls a graph, per call), so drift hits every
    entry alike, and the partials kernel alone once. A failing entry is logged and gets a FAILED row.
    Returns the table rows (columns of SIDE_BY_SIDE_HEADER)."""
    import traceback

    head, device, M = inp.head, inp.weight.device, inp.M
    rows, results = [], {}
    for label, kernel, cfg in entries:  # check and build graphs first, then time
        items = round(inp.active * -(-head.max_group_size // cfg.block_v) * -(-M // cfg.block_m))
        shape = f"{items} / {min(items, _num_programs_cap(device, cfg.programs_per_sm))}"
        try:
            t0 = time.perf_counter()
            err = _check_config(head, inp.weight, inp.grouping, cfg, M, inp.H, inp.routing, inp.gen, device,
                                kernel=kernel)
            if not err <= MAX_ERR:
                raise AssertionError(f"max err {err:.2e} > {MAX_ERR}")

            def call(i, kernel=kernel, cfg=cfg, hs=inp.hiddens, gs=inp.groups, merge=True):
                return kernel(hs[i], inp.weight, head.offsets, head.order, gs[i], TOP_K, head.max_group_size, cfg,
                              _merge=merge)

            results[label] = dict(err=err, single=_rotating(_graphs(call)), call=call, t=[], c=[], shape=shape,
                                  build_s=time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001
            log(f"  {label:34s}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
            log("    " + traceback.format_exc(limit=3).replace("\n", "\n    ")[-1500:])
            rows.append(f"| {case} | {inp.floor_us:.1f} | {label} | {shape} | FAILED: {type(exc).__name__} "
                        "| - | - | - | - | - |")
    for _ in range(2):
        for label, r in results.items():
            try:
                r["t"].append(_time_us(r["single"], flush))
                r["c"].append(_time_chain_us(
                    lambda i, call=r["call"]: call(i % NCHAIN, hs=inp.chain_h, gs=inp.chain_g), NCHAIN, flush))
            except Exception as exc:  # noqa: BLE001
                log(f"  {label:34s}: timing FAILED {type(exc).__name__}: {str(exc)[:300]}")
    floor = inp.floor_us
    for label, r in results.items():
        try:
            partials = f"{_time_us(_rotating(_graphs(lambda i, call=r['call']: call(i, merge=False))), flush):.1f}"
        except Exception as exc:  # noqa: BLE001
            partials = f"failed ({type(exc).__name__})"
        if len(r["t"]) < 2 or len(r["c"]) < 2:
            rows.append(f"| {case} | {floor:.1f} | {label} | {r['shape']} | {r['err']:.1e} | timing failed "
                        "| - | - | - | - |")
            continue
        t, c = r["t"], r["c"]
        rows.append(f"| {case} | {floor:.1f} | {label} | {r['shape']} | {r['err']:.1e} "
                    f"| {t[0]:.1f} / {t[1]:.1f} | {min(t) / floor:.2f} | {c[0]:.1f} / {c[1]:.1f} "
                    f"| {min(c) / floor:.2f} | {partials} |")
        log(f"  {label:34s}: graph {t[0]:6.1f} / {t[1]:6.1f} us ({min(t) / floor:.2f}x)  chained "
            f"{c[0]:6.1f} / {c[1]:6.1f} us ({min(c) / floor:.2f}x)  partials {partials}  "
            f"items/programs {r['shape']}  err {r['err']:.1e}  [check+capture {r['build_s']:.1f}s]")
    return rows


def run_sweep(plan, cases=None, log=print, table_path=None, device="cuda", pdl_off=False) -> list[str]:
    """Each config of each case of `plan` (shape -> [(M, routing, configs)]; the default first, then
    with `pdl_off` the default without pdl) side by side (`compare_kernels`). Returns the table's lines (saved
    after every case, so a run cut short by a timeout keeps its finished cases)."""
    import dataclasses

    device = torch.device(device)
    flush = torch.empty(FLUSH_BYTES // 4, device=device).uniform_()
    bw = _copy_bandwidth(device, flush)
    log(f"device-to-device copy bandwidth: {bw / 1e12:.2f} TB/s")
    table = list(SIDE_BY_SIDE_HEADER)
    gen = torch.Generator().manual_seed(0)

    def save():
        if table_path:
            with open(table_path, "w") as f:
                f.write("\n".join(table) + "\n")

    for name, shape_cases in plan.items():
        H = ALL_SHAPES[name][1]
        weight, grouping, head = shape_head(name, device)
        for M, routing, candidates in shape_cases:
            if cases is not None and (M, routing) not in cases:
                continue
            save()
            case = f"{name} M={M} {routing}"
            inp = case_inputs(head, weight, grouping, M, routing, gen, bw)
            log(f"== {case}: floor {inp.floor_us:.1f} us")
            base = default_config(M, H, TOP_K)
            configs = [("default " + _cfg_str(base), base)]
            if pdl_off:
                configs.append(("default, pdl off", dataclasses.replace(base, pdl=False)))
            configs += [(_cfg_str(c), c) for c in candidates]
            table += compare_kernels(case, inp, [(label, grouped_head_topk_triton, cfg) for label, cfg in configs],
                                     flush, log)
        del weight, head
        torch.cuda.empty_cache()
    save()
    return table


HEADER = (
    "| shape (V x H) | M | routing | ours, graph (us) | ours, eager 1 call, checks on (us) | eager host part (us) "
    "| eager / (1.3 graph + 30) | dense cuBLAS + topk, graph (us) "
    "| naive gather, eager (us) | floor, union (us) | floor, all rows (us) | ours / floor | dense / ours "
    f"| ours, graph, do_bench (us) | ours, {NCHAIN} calls a graph, per call (us) | chained / floor "
    "| max err | config |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(r: Row) -> str:
    V, H = {**ALL_SHAPES, **CPU_SHAPES}.get(r.shape, (0, 0))
    naive = f"{r.naive_us:.1f}" if r.naive_us is not None else "-"
    dob = f"{r.dobench_us:.1f}" if r.dobench_us is not None else "-"
    chain = f"{r.chain_us:.1f}" if r.chain_us is not None else "-"
    chain_ratio = f"{r.chain_us / r.floor_union_us:.2f}" if r.chain_us is not None else "-"
    cfg = r.config
    host = f"{r.eager_host_us:.1f}" if r.eager_host_us is not None else "-"
    return (
        f"| {r.shape} {V} x {H} | {r.M} | {r.routing} | {r.ours_us:.1f} | {r.ours_eager_us:.1f} | {host} "
        f"| {r.ours_eager_us / (1.3 * r.ours_us + 30):.2f} | {r.dense_us:.1f} "
        f"| {naive} "
        f"| {r.floor_union_us:.1f} | {r.floor_all_us:.1f} | {r.ours_us / r.floor_union_us:.2f} "
        f"| {r.dense_us / r.ours_us:.2f} | {dob} | {chain} | {chain_ratio} | {r.max_err:.1e} | {cfg} |"
    )


def verdicts(rows: list[Row]) -> list[str]:
    """The issue's targets, row by row."""
    out = []
    for r in rows:
        eager_target = 1.3 * r.ours_us + 30
        out.append(f"{r.shape} M={r.M} {r.routing}: eager {r.ours_eager_us:.1f} us with checks on (target <= "
                   f"1.3 x graph + 30 = {eager_target:.1f}, issue 16): "
                   f"{'MET' if r.ours_eager_us <= eager_target else 'MISSED'}")
        if r.dobench_us is None:  # --quick: the eager target only
            continue
        ratio, speedup = r.ours_us / r.floor_union_us, r.dense_us / r.ours_us
        if r.M == 1:
            ok = ratio <= 1.3 and (speedup >= 6 or r.shape != "llama3")
            out.append(f"{r.shape} M=1: {ratio:.2f}x floor (target <= 1.3), {speedup:.1f}x dense "
                       f"(target >= 6 for llama3): {'MET' if ok else 'MISSED'}")
        else:
            ok = ratio <= 1.3 and speedup >= 1 / 1.1
            out.append(f"{r.shape} M={r.M} {r.routing}: {ratio:.2f}x union floor (target <= 1.3), "
                       f"{speedup:.2f}x dense (target >= 0.91): {'MET' if ok else 'MISSED'}")
    return out


def environment() -> str:
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "CPU"
    return (f"device: {device}; torch {torch.__version__}; triton {triton.__version__}; "
            f"date {datetime.date.today().isoformat()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="coral-fast bench head", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the table (markdown, with device/versions/date) to this file")
    parser.add_argument("--shapes", help="comma list of " + ",".join(ALL_SHAPES)
                        + " (default: " + ",".join(SHAPES) + "; the sweep: "
                        + ",".join(SWEEP_PLAN) + ")")
    parser.add_argument("--sweep", action="store_true", help="time the default against SWEEP_PLAN's configs "
                        "instead of the table (shapes: SWEEP_PLAN's unless --shapes)")
    parser.add_argument("--pdl-off", action="store_true", help="the sweep also times the default without "
                        "programmatic dependent launch")
    parser.add_argument("--quick", action="store_true", help="graph and eager columns only (no naive gather, "
                        "do_bench or chained timing); with --shapes llama3 --cases 1:random: issue 16's case")
    parser.add_argument("--cases", help="comma list of M:routing (default: all five; the sweep: its own)")
    args = parser.parse_args(argv)
    shapes = [s for s in (args.shapes or ",".join(SWEEP_PLAN if args.sweep else SHAPES)).split(",") if s]
    for s in shapes:
        if s not in ALL_SHAPES:
            parser.error(f"unknown shape {s!r}; choose from {', '.join(ALL_SHAPES)}")
    cases = CASES
    if args.cases:
        cases = []
        for c in args.cases.split(","):
            m, _, routing = c.partition(":")
            if not (m.isdigit() and int(m) >= 1 and routing in ("random", "shared")):
                parser.error(f"--cases: {c!r} is not M:routing (M >= 1, routing random or shared)")
            cases.append((int(m), routing))
    if args.sweep:
        if not torch.cuda.is_available():
            parser.error("--sweep needs a CUDA device")
        plan = {s: SWEEP_PLAN[s] for s in shapes if s in SWEEP_PLAN}
        table = run_sweep(plan, cases if args.cases else None, table_path=args.out, pdl_off=args.pdl_off)
        text = "\n".join([f"# grouped LM head configs: G={NUM_GROUPS}, {ACTIVE} active, top-{TOP_K}, bf16", "",
                          environment(), "", *table]) + "\n"
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return 1 if "FAILED" in text else 0
    lines = [f"# grouped LM head: G={NUM_GROUPS}, {ACTIVE} active, top-{TOP_K}, bf16", "", environment(), ""]
    lines += ["`ours` runs `GroupedLMHead.topk(..., check=False)` with the default config (heuristic, no "
              "autotune); graph = CUDA-graph replay, as the draft loop calls it. Routing: `random` = each row "
              "draws 4 of 32 groups; `shared` = rows draw 4 of the same 6 groups (siblings in a draft tree). "
              "Floor = bytes of the union of the rows' active groups / copy bandwidth.", ""]
    if torch.cuda.is_available():
        rows, bw = run_gpu(shapes, cases, args.quick)
        lines += [f"copy bandwidth (floor): {bw / 1e12:.2f} TB/s; medians of CUDA-event timings, L2 flushed "
                  f"by a 256 MiB read before every call, {NSETS} rotating input sets", ""]
    else:
        print("no CUDA device: timing the PyTorch reference on scaled-down shapes (CPU smoke run)")
        rows = run_cpu()
    lines += [HEADER] + [format_row(r) for r in rows]
    if torch.cuda.is_available():
        lines += ["", "targets (issue 2):", ""] + [f"- {v}" for v in verdicts(rows)]
    bad = [r for r in rows if not r.max_err <= MAX_ERR]
    if bad:
        lines += ["", f"CORRECTNESS FAILED (max err > {MAX_ERR}): " + ", ".join(f"{r.shape} M={r.M} {r.routing}" for r in bad)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
