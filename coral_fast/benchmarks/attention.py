"""`coral-fast bench attention`: tree attention vs SDPA with a tree mask and FlexAttention (GPU).

Every row times, in one run and on the same inputs:
  ours       coral_fast.tree_attention (Triton), check=False
  sdpa_mask  F.scaled_dot_product_attention with a boolean [T, L+T] mask and enable_gqa=True
  sdpa_none  the same without a mask: a lower bound for what SDPA can do at this size
  flex       torch.compile(flex_attention) with a block mask built from the same tree
and prints the bytes-of-KV floor (K and V read once at the measured copy bandwidth) beside them.

Timing: each function is captured in a CUDA graph that calls it once on each of several input sets
(more bytes than twice the L2 cache, so every call reads its K/V from HBM), the graph is replayed
`--reps` times and the median per-call time is reported (no launch overhead, cold L2). Results are
checked against each other in the same run (relative error vs sdpa_mask).

Eager columns: what a caller of `tree_attention` in plain PyTorch code waits for, one call with the
default checks (check=True) from an idle device until its result is on the device (wall time, the
next input set each call): given the DraftTree, and given a new bool mask tensor each call (checked
and packed every time: the worst case). Target (issue 16): eager <= 1.3 x graph + 30 us.
`--quick`: Llama-3-8B heads at B=1, T=64, L=8192 (the issue's case) and B=8, no FlexAttention:
    coral-fast bench attention --quick
"""
from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from coral_fast.benchmarks.head import eager_call_us

COPY_BANDWIDTH = 3.0e12  # bytes/s, device-to-device copy on the H100 (FACTS.md); --bandwidth overrides

# (label, Hq, Hkv, D)
HEADS = {
    "llama3-8b": (32, 8, 128),
    "smollm2": (9, 3, 64),
    "gemma3-270m": (4, 1, 256),
}


def eagle_like_parents(num_nodes: int, generator: torch.Generator) -> torch.Tensor:
    """A bushy tree like EAGLE-2's: each node's parent is among the few nodes before it at the previous level."""
    parents = [-1] * min(num_nodes, 8)
    level_start, level_end = 0, len(parents)
    while len(parents) < num_nodes:
        width = min(num_nodes - len(parents), 16)
        for _ in range(width):
            parents.append(int(torch.randint(level_start, level_end, (1,), generator=generator)))
        level_start, level_end = level_end, len(parents)
    return torch.tensor(parents, dtype=torch.int64)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def time_cold(fn_for_set: Callable[[int], object], num_sets: int, reps: int) -> tuple:
    """Median us per call: a CUDA graph calling fn once per input set, replayed `reps` times.

    Falls back to eager timing with events around the same loop if capture fails. Returns (us, how).
    """
    for i in range(num_sets):  # warm-up: compilation, autotuning, allocator
        fn_for_set(i)
    torch.cuda.synchronize()
    how = "graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(num_sets):
                fn_for_set(i)
        run = graph.replay
        run()
    except Exception:  # noqa: BLE001 - some baselines do not capture; time them eagerly instead
        torch.cuda.synchronize()
        how = "eager"

        def run():
            for i in range(num_sets):
                fn_for_set(i)

    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(reps):
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0 / num_sets)
    return statistics.median(samples), how


class FlexRunner:
    """torch.compile(flex_attention) with a tree block mask; tries kernel options until one compiles."""

    OPTION_SETS = [
        None,
        {"FORCE_USE_FLEX_ATTENTION": True, "BLOCK_M": 16, "BLOCK_N": 64},
        {"FORCE_USE_FLEX_ATTENTION": True, "BLOCK_M": 32, "BLOCK_N": 32, "num_stages": 2},
        {"BLOCK_N": 32, "num_stages": 1},
    ]

    def __init__(self):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self.create_block_mask = create_block_mask
        # one compilation per shape: without this, dynamo gives up after 8 shapes and flex silently
        # falls back to an unfused implementation that materialises the scores
        torch._dynamo.config.recompile_limit = 64
        if hasattr(torch._dynamo.config, "cache_size_limit"):
            torch._dynamo.config.cache_size_limit = 64
        self.flex = torch.compile(flex_attention, dynamic=False)
        self.working_options = "unset"

    def prepare(self, q, k, v, tree_mask, prefix_len):
        num_queries, num_slots = q.shape[2], k.shape[2]

        def mask_mod(b, h, q_idx, kv_idx):
            tree_col = torch.clamp(kv_idx - prefix_len, min=0)
            return (kv_idx < prefix_len) | tree_mask[q_idx, tree_col]

        block_mask = self.create_block_mask(mask_mod, B=None, H=None, Q_LEN=num_queries, KV_LEN=num_slots, device=q.device)
        errors = []
        candidates = self.OPTION_SETS if self.working_options == "unset" else [self.working_options]
        for options in candidates:
            try:
                def call(qq, kk, vv, options=options):
                    return self.flex(qq, kk, vv, block_mask=block_mask, enable_gqa=True, kernel_options=options)

                out = call(q, k, v)
                torch.cuda.synchronize()
                self.working_options = options
                return call, out, options, errors
            except Exception as exc:  # noqa: BLE001 - recorded and reported in the table
                errors.append(f"{options}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
                torch._dynamo.reset()
        return None, None, None, errors


def bench_row(label, heads, batch, num_queries, prefix_len, args, flex_runner, log) -> Dict:
    from coral_fast import DraftTree, tree_attention
    from coral_fast.kernels.tree_attention import _tree_attention_triton

    num_q_heads, num_kv_heads, head_dim = heads
    dtype = torch.bfloat16
    device = torch.device("cuda")
    num_slots = prefix_len + num_queries
    generator = torch.Generator().manual_seed(1000 + 7 * num_queries + prefix_len + batch)
    tree = DraftTree.from_parents(eagle_like_parents(num_queries, generator), device=device)
    kv_bytes = 2 * batch * num_kv_heads * num_slots * head_dim * 2
    set_bytes = kv_bytes + 2 * batch * num_q_heads * num_queries * head_dim * 2
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    num_sets = int(min(64, max(2, math.ceil(3 * l2_bytes / set_bytes))))
    sets = []
    for _ in range(num_sets):
        q = torch.randn(batch, num_q_heads, num_queries, head_dim, dtype=dtype, device=device)
        k = torch.randn(batch, num_kv_heads, num_slots, head_dim, dtype=dtype, device=device)
        v = torch.randn(batch, num_kv_heads, num_slots, head_dim, dtype=dtype, device=device)
        sets.append((q, k, v))
    full_mask = torch.cat(
        [torch.ones(num_queries, prefix_len, dtype=torch.bool, device=device), tree.mask], dim=1
    )  # [T, L + T]
    outs = [torch.empty_like(s[0]) for s in sets]

    def ours(i, **config):
        q, k, v = sets[i]
        if config:
            return _tree_attention_triton(q, k, v, tree.mask_bits.unsqueeze(0), head_dim**-0.5, None, None, None, out=outs[i], **config)
        return tree_attention(q, k, v, tree, check=False, out=outs[i])

    def sdpa_mask(i):
        q, k, v = sets[i]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=full_mask, enable_gqa=True)

    def sdpa_none(i):
        q, k, v = sets[i]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    row = dict(model=label, B=batch, T=num_queries, L=prefix_len, floor_us=kv_bytes / args.bandwidth * 1e6, sets=num_sets)
    ref = sdpa_mask(0)
    row["err_ours"] = rel_err(ours(0), ref)
    row["ours_us"], row["ours_how"] = time_cold(ours, num_sets, args.reps)
    turn = {"i": 0}

    def eager(mask_of):
        def call():
            turn["i"] = (turn["i"] + 1) % num_sets
            q, k, v = sets[turn["i"]]
            return tree_attention(q, k, v, mask_of())
        return call

    row["eager_tree_us"], row["eager_tree_host_us"] = eager_call_us(eager(lambda: tree))
    row["eager_mask_us"], _ = eager_call_us(eager(lambda: tree.mask.clone()))
    from coral_fast.kernels import tree_attention as ta_module

    compiled = getattr(ta_module, "_LAST_KERNEL", None)
    if compiled is not None:
        row["regs"] = f"regs={getattr(compiled, 'n_regs', '?')} spills={getattr(compiled, 'n_spills', '?')}"
    row["sdpa_mask_us"], row["sdpa_mask_how"] = time_cold(sdpa_mask, num_sets, args.reps)
    row["sdpa_none_us"], row["sdpa_none_how"] = time_cold(sdpa_none, num_sets, args.reps)
    row["flex_us"], row["flex_note"] = None, "not run"
    if flex_runner is not None:
        t0 = time.time()
        try:
            q, k, v = sets[0]
            call, out, options, errors = flex_runner.prepare(q, k, v, tree.mask, prefix_len)
            for e in errors:
                log(f"  flex failed: {e}")
            if call is None:
                row["flex_note"] = "compile failed: " + (errors[-1].split(":")[1].strip() if errors else "?")
                flex_runner.failures += 1
            else:
                row["err_flex"] = rel_err(out, ref)
                row["flex_us"], how = time_cold(lambda i: call(*sets[i]), num_sets, args.reps)
                row["flex_note"] = f"options={options} ({how})"
        except Exception as exc:  # noqa: BLE001
            row["flex_note"] = f"failed: {type(exc).__name__}"
            log(f"  flex failed: {type(exc).__name__}: {exc}")
        flex_runner.seconds += time.time() - t0

    row["profile"] = profile_kernels(lambda: ours(0))
    if args.sweep and (batch, num_queries, prefix_len) in args.sweep_shapes:
        sweep = []
        from coral_fast.kernels.tree_attention import TreeAttentionConfig

        auto = TreeAttentionConfig.for_shape(batch, num_kv_heads, num_q_heads // num_kv_heads * num_queries, num_slots, head_dim, device)
        row["auto_cfg"] = repr(auto)
        for cfg in sweep_configs(head_dim, batch):
            try:
                err = rel_err(ours(0, **cfg), ref)
                us, _ = time_cold(lambda i: ours(i, **cfg), num_sets, max(5, args.reps // 2))
                sweep.append((us, err, cfg))
            except Exception as exc:  # noqa: BLE001 - resource limits for big tiles
                sweep.append((float("inf"), float("nan"), dict(cfg, error=type(exc).__name__)))
        sweep.sort(key=lambda item: item[0])
        row["sweep"] = sweep
    del sets
    torch.cuda.empty_cache()
    return row


def sweep_configs(head_dim: int, batch: int) -> List[dict]:
    """Tiles x split counts around the heuristic (the one-wave rule picks the splits by default)."""
    tiles = [(64, 64, 4), (64, 32, 4), (64, 128, 4), (128, 64, 8), (128, 32, 8)]
    splits = (1, 2, 4, 8) if batch == 1 else (1, 2)
    return [
        dict(block_m=m, block_n=n, num_warps=w, num_stages=3 if head_dim < 256 else 2, num_splits=sp)
        for m, n, w in tiles
        for sp in splits
        if not (head_dim >= 256 and n > 64)
    ]


def profile_kernels(fn, reps: int = 20) -> str:
    """Device time per kernel of `fn` (torch.profiler), to see the split and merge kernels apart."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    lines = []
    for evt in prof.key_averages():
        total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if total and evt.count:
            lines.append(f"      {evt.key[:60]:60s} {total / evt.count:8.1f} us x{evt.count}")
    return "\n".join(lines)


def format_table(rows: List[Dict], device_name: str) -> str:
    lines = [
        "Tree attention, bf16, median us per call: a CUDA graph calls each function once on each of several "
        "input sets (>= 3x the L2 size in all, so K/V come from HBM), replayed 20-30 times. "
        f"Device: {device_name}; torch {torch.__version__}; triton {__import__('triton').__version__}; "
        f"{datetime.date.today().isoformat()}.",
        "",
        "Eager: one call with check=True, wall time from an idle device to the result (DraftTree; a new bool "
        "mask each call, checked and packed); target eager <= 1.3 x graph + 30 us.",
        "",
        "| heads (q/kv/d) | B | T | L | ours | ours eager, DraftTree (host part) | eager / (1.3 ours + 30) "
        "| ours eager, new bool mask | SDPA + tree mask | SDPA no mask | FlexAttention | KV floor | vs SDPA mask "
        "| vs Flex | err ours | ",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        heads = HEADS[r["model"]]
        flex = f"{r['flex_us']:.1f}" if r.get("flex_us") else r.get("flex_note", "")
        vs_flex = f"{r['flex_us'] / r['ours_us']:.2f}x" if r.get("flex_us") else "-"
        lines.append(
            f"| {r['model']} {heads[0]}/{heads[1]}/{heads[2]} | {r['B']} | {r['T']} | {r['L']} | {r['ours_us']:.1f} | "
            f"{r['eager_tree_us']:.1f} ({r['eager_tree_host_us']:.1f}) | "
            f"{r['eager_tree_us'] / (1.3 * r['ours_us'] + 30):.2f} | {r['eager_mask_us']:.1f} | "
            f"{r['sdpa_mask_us']:.1f} | {r['sdpa_none_us']:.1f} | {flex} | {r['floor_us']:.1f} | "
            f"{r['sdpa_mask_us'] / r['ours_us']:.2f}x | {vs_flex} | {r['err_ours']:.1e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="coral-fast bench attention", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only Llama-3-8B heads at B=1, T=64, L=8192 and B=8, "
                        "T=64, L=8192, without FlexAttention")
    parser.add_argument("--only", default=None, help="comma-separated rows model:B:T:L, e.g. llama3-8b:1:64:8192,smollm2:1:64:512")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compilation takes minutes)")
    parser.add_argument("--flex-budget-s", type=float, default=100.0, help="stop trying FlexAttention after this long")
    parser.add_argument("--sweep", action="store_true", help="also time a sweep of kernel configurations on key shapes")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--bandwidth", type=float, default=COPY_BANDWIDTH, help="bytes/s for the floor column")
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("coral-fast bench attention needs a CUDA GPU", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name()

    def log(msg):
        print(msg, flush=True)

    shapes = [("llama3-8b", b, t, l) for b in (1, 8) for t in (16, 64) for l in (512, 2048, 8192)]
    # the headline shapes first, so FlexAttention's time budget goes to them
    headline = [("llama3-8b", 1, 64, 8192), ("llama3-8b", 8, 64, 8192), ("llama3-8b", 1, 16, 2048)]
    shapes = headline + [s for s in shapes if s not in headline]
    shapes += [(m, 1, 64, l) for m in ("smollm2", "gemma3-270m") for l in (512, 2048)]
    if args.quick:
        shapes = headline[:2]
        args.no_flex = True
    if args.only:
        shapes = []
        for item in args.only.split(","):
            fields = item.split(":")
            if len(fields) != 4 or fields[0] not in HEADS or not all(f.isdigit() and int(f) > 0 for f in fields[1:]):
                parser.error(f"--only: {item!r} is not model:B:T:L (model one of {', '.join(HEADS)}, B, T, L >= 1)")
            shapes.append((fields[0], int(fields[1]), int(fields[2]), int(fields[3])))
    args.sweep_shapes = {(1, 64, 8192), (8, 64, 8192)}

    flex_runner = None
    if not args.no_flex:
        try:
            flex_runner = FlexRunner()
            flex_runner.seconds, flex_runner.failures = 0.0, 0
        except Exception as exc:  # noqa: BLE001
            log(f"FlexAttention unavailable: {type(exc).__name__}: {exc}")

    rows = []
    for label, batch, num_queries, prefix_len in shapes:
        use_flex = flex_runner if (flex_runner and label == "llama3-8b" and flex_runner.seconds < args.flex_budget_s and flex_runner.failures < 3) else None
        try:
            row = bench_row(label, HEADS[label], batch, num_queries, prefix_len, args, use_flex, log)
        except Exception as exc:  # noqa: BLE001 - one broken row must not lose the others
            log(f"{label} B={batch} T={num_queries} L={prefix_len}: FAILED {type(exc).__name__}: {exc}")
            continue
        if use_flex is None and flex_runner is not None and label == "llama3-8b":
            row["flex_note"] = "skipped (budget)"
        rows.append(row)
        flex_text = f"{row['flex_us']:.1f} [{row['flex_note']}]" if row["flex_us"] else row["flex_note"]
        log(
            f"{label} B={batch} T={num_queries} L={prefix_len}: ours {row['ours_us']:.1f} us ({row['ours_how']}), "
            f"eager {row['eager_tree_us']:.1f} us (host {row['eager_tree_host_us']:.1f}; new bool mask "
            f"{row['eager_mask_us']:.1f}), "
            f"sdpa_mask {row['sdpa_mask_us']:.1f} ({row['sdpa_mask_how']}), sdpa_none {row['sdpa_none_us']:.1f}, "
            f"flex {flex_text}, floor {row['floor_us']:.1f}, err {row['err_ours']:.1e}"
            + (f", flex err {row['err_flex']:.1e}" if "err_flex" in row else "")
        )
        if "regs" in row:
            log(f"    kernel: {row['regs']} auto={row.get('auto_cfg', '')}")
        if "profile" in row:
            log("    profile (eager, warm L2):\n" + row["profile"])
        for us, err, cfg in row.get("sweep", [])[:10]:
            log(f"    sweep {us:8.1f} us  err {err:.1e}  {cfg}")
    table = format_table(rows, device_name)
    print()
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
