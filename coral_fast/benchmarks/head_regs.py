"""Registers, shared memory and resident programs an SM of the grouped head's partials kernel, for
sm_90, compiled on a machine without a GPU (Triton ships ptxas and cuobjdump). No device time.

Which programs an SM can be resident decides whether `programs_per_sm` is real: 65536 registers an SM
/ (128 threads x regs), and 228 KB of shared memory (1 KB a block reserved). The counts are those of
the Triton that runs this script: the GPU stack runs triton 3.6, whose counts differ from 3.9's (M=1:
190 vs 160 registers), so for exact numbers run it with 3.6, which needs no torch here:
    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0
    /tmp/t36/bin/python coral_fast/benchmarks/head_regs.py [--version tree|REV|file.py] [--cases ...]
Cases: NAME:M:H:BLOCK_M:BLOCK_V:BLOCK_K:STAGES[:WARPS] (groups of 8192 rows, as Gemma-3's), or
"default" (default_config at the bench's shapes, M = 1, 16, 64, with their group sizes).
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import re
import subprocess
import sys
import tempfile
import types

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository (run as a file: no torch needed)
SMEM_PER_SM, SMEM_RESERVED, REGS_PER_SM = 228 * 1024, 1024, 65536


def _stub_torch():
    """The kernel file imports torch for its host code only; the jitted functions need triton alone."""
    try:
        import torch  # noqa: F401
        return
    except ImportError:
        pass
    torch = types.ModuleType("torch")
    torch.Tensor = type("Tensor", (), {})
    torch.device = type("device", (), {})
    sys.modules["torch"] = torch
    dispatch = types.ModuleType("coral_fast.kernels._dispatch")
    for name in ("cuda_properties", "dot_needs_fp32", "resolve_impl"):
        setattr(dispatch, name, lambda *a, **k: None)
    for pkg in ("coral_fast", "coral_fast.kernels"):
        sys.modules.setdefault(pkg, types.ModuleType(pkg))
    sys.modules["coral_fast.kernels._dispatch"] = dispatch


def load_kernel_module(version: str):
    if version == "tree":
        src = (ROOT / "coral_fast/kernels/grouped_head_topk.py").read_text()
    elif version.endswith(".py"):
        src = pathlib.Path(version).read_text()
    else:
        src = subprocess.run(["git", "show", f"{version}:coral_fast/kernels/grouped_head_topk.py"], cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout
    path = pathlib.Path(tempfile.mkdtemp()) / "grouped_head_topk_version.py"
    path.write_text(src)
    _stub_torch()
    spec = importlib.util.spec_from_file_location("grouped_head_topk_version", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def compile_partials(mod, M, H, block_m, block_v, block_k, stages, warps=4, ids_in_keys=None, A=4, G=32,
                     group_rows=8192, tma=None):
    """Compile as `grouped_head_topk_triton` would launch it (bf16, int64 groups, EVEN_K, PDL on), with
    the launcher's specialisations of integer arguments: a 1 becomes a constant (NMB at M <= BLOCK_M, M
    at M=1), a multiple of 16 is marked divisible. Without the former the M=64 kernel compiles to 161
    registers instead of the 193 the GPU runs (checked against the launched kernel's n_regs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = mod._grouped_head_partials_kernel
    ids_in_keys = block_m <= 16 if ids_in_keys is None else ids_in_keys
    nt = -(-group_rows // block_v)  # NT: its divisibility by 16 is specialised on too
    pointers = dict(hidden_ptr="*bf16", weight_ptr="*bf16", groups_ptr="*i64", offsets_ptr="*i64",
                    order_ptr="*i64", part_key_ptr="*i64", part_max_ptr="*fp32", part_sum_ptr="*fp32")
    ints = dict(M=M, H=H, A=A, G=G, NT=nt, NMB=-(-M // block_m), KT=10, stride_hm=H, stride_wv=H, stride_gm=A)
    consts = dict(BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, A_POW2=triton.next_power_of_2(A),
                  G_POW2=max(16, triton.next_power_of_2(G)), BLOCK_P=max(16, triton.next_power_of_2(M * A)),
                  GATHER=False, M_POW2=max(16, triton.next_power_of_2(M)), EVEN_K=H % block_k == 0,
                  DOT_FP32=False, PDL=True, ONE_ROW=M == 1, ONE_BLOCK=M <= block_m, IDS_IN_KEYS=ids_in_keys)
    if "KEPT_SLOTS" in kernel.arg_names:  # versions with the epilogue's register buffer of round keys
        consts["KEPT_SLOTS"] = mod._kept_slots(ints["KT"])
    if "TMA" in kernel.arg_names:  # versions with TMA tiles: as told, else 64-row blocks (bf16 rows: 16-byte aligned)
        tma = block_m >= 64 if tma is None else tma
        consts["TMA"] = tma
        if tma:
            pointers.update(h_desc=f"tensordesc<bf16[{block_m}, {block_k}]>",
                            w_desc=f"tensordesc<bf16[{block_v}, {block_k}]>")
        else:
            consts.update(h_desc=None, w_desc=None)
    consts.update({p.name: ints[p.name] for p in kernel.params if p.is_constexpr and p.name in ints})
    unspecialised = {p.name for p in kernel.params if p.do_not_specialize}
    consts.update({name: 1 for name, value in ints.items() if value == 1 and name not in unspecialised})
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        signature[name] = pointers.get(name) or ("constexpr" if name in consts else "i32")
        if (name in pointers and not name.endswith("_desc")) or (name in ints and name not in consts.keys() | unspecialised and ints[name] % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    cubin = pathlib.Path(tempfile.mkdtemp()) / "partials.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                           text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    smem = compiled.metadata.shared
    regs_allocated = -(-regs // 8) * 8  # a thread's registers are allocated in units of 8
    resident = min(REGS_PER_SM // (32 * warps * regs_allocated), SMEM_PER_SM // (smem + SMEM_RESERVED))
    return regs, stack, smem, resident


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", default="tree", help="tree (default), a git revision, or a kernel .py file")
    ap.add_argument("--cases", default="default")
    args = ap.parse_args()
    import triton

    mod = load_kernel_module(args.version)
    cases = []
    for spec in args.cases.split(","):
        if spec == "default":
            for shape, H, group_rows in (("llama3", 4096, 4008), ("qwen2.5", 3584, 4752), ("gemma3", 640, 8192)):
                for M in (1, 16, 64):
                    c = mod.default_config(M, H, 10)
                    cases.append((f"{shape} M={M} default", M, H, c.block_m, c.block_v, c.block_k, c.num_stages,
                                  c.num_warps, c.ids_in_keys, c.programs_per_sm, group_rows, getattr(c, "tma", False)))
        else:
            name, *nums = spec.split(":")
            M, H, bm, bv, bk, stages, *warps = map(int, nums)
            cases.append((name, M, H, bm, bv, min(bk, H), stages, warps[0] if warps else 4, None, None, 8192, None))
    print(f"triton {triton.__version__}, sm_90; resident = min(registers, shared memory) programs an SM")
    for name, M, H, bm, bv, bk, stages, warps, ids, per_sm, group_rows, tma in cases:
        regs, stack, smem, resident = compile_partials(mod, M, H, bm, bv, bk, stages, warps, ids,
                                                       group_rows=group_rows, tma=tma)
        launched = f", launched {per_sm}" if per_sm else ""
        print(f"{name:26s} m{bm} v{bv} k{bk} s{stages} w{warps}{' tma' if tma or (tma is None and bm >= 64) else ''}: {regs} regs, stack {stack} B, "
              f"smem {smem / 1024:.0f} KB -> {resident} resident{launched}")


if __name__ == "__main__":
    main()
