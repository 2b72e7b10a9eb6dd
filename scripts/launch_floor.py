"""How close can any kernel get to the grouped head's bytes floor under the bench's one-call timing?

Times, with `coral_fast.benchmarks.head`'s own method (CUDA-graph replay after a 256 MiB L2-flushing
read, CUDA events, median): an empty Triton kernel, two empty kernels back to back (the partials +
merge pattern), and the fastest of a few plain streaming reads (each program sums its chunk: no
matmul, no top-k) of exactly the active bytes of the head's M=1 and shared-routing cases. Prints a
markdown table. Usage: python scripts/launch_floor.py [--out FILE]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from coral_fast.benchmarks import head as hb  # noqa: E402


@triton.jit
def _empty_kernel(x_ptr):
    pass


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def one_call_us(fn, flush):
    """The bench's one-call column: a captured graph replayed after an L2 flush (one input set here)."""
    return hb._time_us(hb._rotating(hb._graphs(lambda i: fn())), flush)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    device = torch.device("cuda")
    flush = torch.empty(hb.FLUSH_BYTES // 4, device=device).uniform_()
    bw = hb._copy_bandwidth(device, flush)
    dummy = torch.zeros(1, device=device)
    lines = [f"{torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
             f"copy bandwidth {bw / 1e12:.2f} TB/s", "",
             "| what | bytes (MB) | floor (us) | 1.3 x floor (us) | one call a graph (us) | best read config |",
             "|---|---|---|---|---|---|"]
    empty = one_call_us(lambda: _empty_kernel[(1,)](dummy), flush)
    lines.append(f"| empty Triton kernel | 0 | 0 | 0 | {empty:.1f} | - |")
    two = one_call_us(lambda: (_empty_kernel[(1,)](dummy), _empty_kernel[(1,)](dummy)), flush)
    lines.append(f"| two empty kernels | 0 | 0 | 0 | {two:.1f} | - |")
    G = hb.NUM_GROUPS
    cases = []
    for name in ("gemma3", "llama3", "qwen2.5"):
        V, H = hb.SHAPES[name]
        group_rows = -(-V // G)
        for label, groups in (("M=1 (4 groups)", 4), ("shared (6 groups)", 6)):
            cases.append((f"{name} {label}", groups * group_rows * H * 2))
    for label, nbytes in cases:
        x = torch.randn(nbytes // 2, device=device).to(torch.bfloat16)
        n = x.numel()
        floor = nbytes / bw * 1e6
        best = None
        for block, iters, warps in ((4096, 4, 4), (4096, 8, 4), (4096, 16, 8), (8192, 8, 8), (2048, 8, 4)):
            grid = (triton.cdiv(n, block * iters),)
            out = torch.empty(grid[0], device=device)
            us = one_call_us(lambda: _read_kernel[grid](x, out, n, BLOCK=block, ITERS=iters, num_warps=warps), flush)
            if best is None or us < best[0]:
                best = (us, f"{block} x {iters}, {warps} warps, {grid[0]} programs")
        lines.append(f"| read of {label} | {nbytes / 1e6:.1f} | {floor:.1f} | {1.3 * floor:.1f} | {best[0]:.1f} | {best[1]} |")
        del x
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
