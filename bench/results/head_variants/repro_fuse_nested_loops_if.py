"""Reproducer (seventh session): triton 3.6's FuseNestedLoops pass fails on sm_90 when the persistent loop
(`tl.range(..., flatten=True)`) holds, after its dot loop, a second loop under a runtime `if` (variant 1):
"'scf.if' op region control flow edge from Region #1 to parent results: source has 2 operands, but target
successor needs 4". Variant 0 (no rounds) and variant 2 (rounds unrolled by tl.static_range) compile.
Compiles for sm_90 on a machine without a GPU: `python repro_fuse_nested_loops_if.py` (triton 3.6).
"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

@triton.jit
def mini(a_ptr, b_ptr, out_ptr, n_items, H, BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, VARIANT: tl.constexpr):
    for item in tl.range(tl.program_id(0), n_items, tl.num_programs(0), flatten=True):
        rows = tl.arange(0, BM)
        cols = item * BV + tl.arange(0, BV)
        acc = tl.zeros((BM, BV), tl.float32)
        a_ptrs = a_ptr + rows[:, None] * H + tl.arange(0, BK)[None, :]
        b_ptrs = b_ptr + cols[:, None] * H + tl.arange(0, BK)[None, :]
        for k0 in range(0, H, BK):
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
            acc = tl.dot(a, tl.trans(b), acc)
            a_ptrs += BK
            b_ptrs += BK
        m = tl.max(acc, axis=1)
        tl.store(out_ptr + item * BM + rows, m)
        if VARIANT == 2:
            for r in tl.static_range(1, 10):
                acc = tl.where(acc == m[:, None], float("-inf"), acc)
                m = tl.max(acc, axis=1)
                tl.store(out_ptr + item * BM + rows + r, m)
        if VARIANT == 1:
            anyp = tl.max(m, axis=0) > 0
            if anyp:
                for r in range(1, 10):
                    acc = tl.where(acc == m[:, None], float("-inf"), acc)
                    m = tl.max(acc, axis=1)
                    tl.store(out_ptr + item * BM + rows + r, m)

for v in (0, 1, 2):
    sig = dict(a_ptr="*bf16", b_ptr="*bf16", out_ptr="*fp32", n_items="i32", H="i32", BM="constexpr", BV="constexpr", BK="constexpr", VARIANT="constexpr")
    attrs = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]], (4,): [["tt.divisibility", 16]]}
    try:
        c = triton.compile(ASTSource(mini, sig, dict(BM=64, BV=64, BK=128, VARIANT=v), attrs), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))
        tt = c.asm["ttgir"]
        print("variant", v, "ok: scf.for", tt.count("scf.for"), "async_copy", tt.count("async_copy_global_to_local"), "smem", c.metadata.shared)
    except Exception as e:
        print("variant", v, "FAILED", str(e)[:80])
