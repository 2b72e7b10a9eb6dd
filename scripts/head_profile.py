"""One call of the grouped head per case, bracketed by cudaProfilerStart/Stop, for Nsight Compute:

    ncu --profile-from-start off --clock-control none --set full --import-source yes \
        -o $OUT/head python3 scripts/head_profile.py --cases llama3:1:random,gemma3:16:shared

Each case warms up (Triton's compile, three calls) outside the profiled range, so the report holds
exactly the two kernels (partials, merge) of one call per case, in the order of --cases.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coral_fast.benchmarks import head as hb  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="llama3:1:random,gemma3:1:random,gemma3:16:shared,llama3:64:shared")
    args = ap.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    head_name, head = None, None
    for case in args.cases.split(","):
        name, M, routing = case.split(":")
        M = int(M)
        H = hb.SHAPES[name][1]
        if name != head_name:
            head = None  # one shape's weights on the GPU at a time
            torch.cuda.empty_cache()
            head_name, (_, _, head) = name, hb.shape_head(name, device)
        hidden = torch.randn(M, H, device=device).to(torch.bfloat16)
        groups = hb._groups(M, routing, gen, device)
        for _ in range(3):
            head.topk(hidden, groups, hb.TOP_K, check=False)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        head.topk(hidden, groups, hb.TOP_K, check=False)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        print(f"profiled {case}", flush=True)


if __name__ == "__main__":
    main()
