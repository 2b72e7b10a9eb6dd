"""Versions of the grouped head's kernel file side by side on the GPU (one device call): each
version's default config on the bench's shapes, checked and timed by the same driver as `coral-fast
bench head --sweep` (`coral_fast.benchmarks.head.compare_kernels`: against the fp32 reference, then
interleaved passes of one call a CUDA graph after an L2 flush, 16 calls a graph / 16, the partials
kernel alone).
Usage: python scripts/head_diag.py --versions old.py,tree [--shapes llama3,gemma3] [--out DIR]

(The first run of this script, 2026-11-23, instead switched parts of the shipped epilogue off to see
where the time goes: bench/results/head_breakdown_h100.md.)
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import tempfile

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coral_fast.benchmarks import head as hb  # noqa: E402


def load_module(src: str, name: str):
    path = pathlib.Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def version_source(rev: str) -> str:
    """The kernel file at a git revision, "tree" (the working tree), or a path to a .py file."""
    import subprocess

    if rev == "tree":
        return (ROOT / "coral_fast/kernels/grouped_head_topk.py").read_text()
    if rev.endswith(".py"):
        return pathlib.Path(rev).read_text()
    return subprocess.run(["git", "show", f"{rev}:coral_fast/kernels/grouped_head_topk.py"], cwd=ROOT,
                          check=True, capture_output=True, text=True).stdout


CASES = [("llama3", 1, "random"), ("llama3", 16, "shared"), ("llama3", 16, "random"), ("llama3", 64, "shared"),
         ("llama3", 64, "random"),
         ("qwen2.5", 1, "random"), ("qwen2.5", 16, "shared"), ("qwen2.5", 16, "random"), ("qwen2.5", 64, "shared"),
         ("qwen2.5", 64, "random"),
         ("gemma3", 1, "random"), ("gemma3", 16, "shared"), ("gemma3", 16, "random"), ("gemma3", 64, "shared"),
         ("gemma3", 64, "random")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--shapes", default="llama3,qwen2.5,gemma3")
    ap.add_argument("--cases", default="", help="comma-separated M:routing to run (default: all)")
    ap.add_argument("--versions", default="tree", help="comma-separated: kernel .py files, git revs, or tree")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = [(pathlib.Path(v).stem, load_module(version_source(v), f"ghk_v{i}"))
                for i, v in enumerate(args.versions.split(","))]
    device = torch.device("cuda")
    flush = torch.empty(hb.FLUSH_BYTES // 4, device=device).uniform_()
    bw = hb._copy_bandwidth(device, flush)
    lines = [f"copy bandwidth {bw / 1e12:.2f} TB/s; {torch.cuda.get_device_name()}; torch {torch.__version__}",
             *hb.SIDE_BY_SIDE_HEADER]
    print(lines[0], flush=True)
    gen = torch.Generator().manual_seed(0)
    for name in args.shapes.split(","):
        H = hb.SHAPES[name][1]
        weight, grouping, head = hb.shape_head(name, device)
        for shape, M, routing in CASES:
            if shape != name or (args.cases and f"{M}:{routing}" not in args.cases.split(",")):
                continue
            inp = hb.case_inputs(head, weight, grouping, M, routing, gen, bw)
            entries = []
            for label, mod in variants:
                cfg = mod.default_config(M, H, hb.TOP_K)
                entries.append((f"{label} {hb._cfg_str(cfg)}", mod.grouped_head_topk_triton, cfg))
            rows = hb.compare_kernels(f"{name} M={M} {routing}", inp, entries, flush)
            print("\n".join(rows), flush=True)
            lines += rows
            (out / "head_diag.md").write_text("\n".join(lines) + "\n")
        del weight, head
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
