"""One call of the grouped head per case, bracketed by cudaProfilerStart/Stop, for Nsight Compute:

    ncu --profile-from-start off --clock-control none --set full --import-source yes \
        -o $OUT/head python3 -m coral_fast.benchmarks.head_profile --cases llama3:1:random,gemma3:16:shared

Each case warms up (Triton's compile, three calls) outside the profiled range, so the report holds
exactly the two kernels (partials, merge) of one call per case, in the order of --cases. A case may
name a config instead of the default: llama3:64:shared:m64v64k64s3p4 (w8 for 8 warps).
"""
from __future__ import annotations

import argparse
import re

import torch

from coral_fast.benchmarks import head as hb
from coral_fast.kernels.grouped_head_topk import grouped_head_topk_triton


def parse_config(spec: str):
    """'m64v64k64s3p4' (optionally 'w8') -> a candidate KernelConfig, as the sweep builds them."""
    fields = dict(re.findall(r"([mvkspw])(\d+)", spec))
    return hb._kc(int(fields["m"]), int(fields["v"]), int(fields["k"]), int(fields["s"]), int(fields["p"]),
                  warps=int(fields.get("w", 4)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="llama3:1:random,gemma3:1:random,gemma3:16:shared,llama3:64:shared")
    args = ap.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    head_name, head = None, None
    for case in args.cases.split(","):
        name, M, routing, *spec = case.split(":")
        M = int(M)
        cfg = parse_config(spec[0]) if spec else None
        H = hb.ALL_SHAPES[name][1]
        if name != head_name:
            head = None  # one shape's weights on the GPU at a time
            torch.cuda.empty_cache()
            head_name, (_, _, head) = name, hb.shape_head(name, device)
        hidden = torch.randn(M, H, device=device).to(torch.bfloat16)
        groups = hb._groups(M, routing, gen, device)

        def call():
            if cfg is None:
                return head.topk(hidden, groups, hb.TOP_K, check=False)
            return grouped_head_topk_triton(hidden, head.weight, head.offsets, head.order, groups, hb.TOP_K,
                                            head.max_group_size, cfg)

        for _ in range(3):
            call()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        call()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        print(f"profiled {case}", flush=True)


if __name__ == "__main__":
    main()
