"""Grouped LM head: the epilogue / merge variants (old argmax rounds, packed int64 keys, bitonic
tl.topk; one-warp merge; prefetched offsets) against the fp64 oracle, through the interpreter on the
CPU and in bf16 on the GPU. Also the packed key's order on hand-picked values."""
import dataclasses

import pytest
import torch

from coral_fast import GroupedLMHead, VocabGrouping
from coral_fast.kernels._dispatch import interpreter_enabled

from test_grouped_head import _assert_topk_matches, _grouping, _random_groups

kernel = pytest.importorskip("coral_fast.kernels.grouped_head_topk")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

needs_triton = pytest.mark.skipif(
    not (interpreter_enabled() or torch.cuda.is_available()), reason="Triton needs TRITON_INTERPRET=1 or a GPU"
)
HAS_TOPK = hasattr(tl, "topk")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

VARIANTS = {  # name -> KernelConfig fields
    "old": kernel.OLD_VARIANT,
    "old-merge-1warp": dict(kernel.OLD_VARIANT, merge_warps=1),
    "packed": dict(epilogue="packed", merge="packed"),
    "packed-merge-4warps": dict(epilogue="packed", merge="packed", merge_warps=4),
    "packed-no-prefetch": dict(epilogue="packed", merge="packed", prefetch_offsets=False),
    "topk": dict(epilogue="topk", merge="topk"),
    "packed-epi-topk-merge": dict(epilogue="packed", merge="topk"),
    "topk-epi-packed-merge": dict(epilogue="topk", merge="packed"),
    "packed-pdl": dict(epilogue="packed", merge="packed", pdl=True),  # CUDA only: the packed path on the CPU
}


def _config(name, base):
    fields = VARIANTS[name]
    if "topk" in (fields.get("epilogue"), fields.get("merge")) and not HAS_TOPK:
        pytest.skip("this triton has no tl.topk")
    return dataclasses.replace(base, **fields)


# (V, H, G, M, A, k, grouping, block_v): odd sizes, k=1 and 64 (k = BLOCK_V: whole-tile top-k),
# M=1 and many rows, A=1 and A=G, k above a small group's size
CASES = [
    (1001, 40, 7, 1, 1, 1, "contiguous", 32),
    (1001, 40, 7, 1, 7, 64, "contiguous", 64),
    (777, 24, 5, 33, 2, 64, "counts", 32),
    (613, 16, 3, 19, 3, 10, "contiguous", 16),
    (2999, 24, 11, 2, 4, 10, "counts", 64),
]


# the interpreter is slow (a tl.topk over a tile is many numpy ops, minutes for 33 rows): on the CPU
# every case for the default, the small ones for the bitonic variant, one for the rest; num_warps
# means nothing there
if DEVICE == "cpu":
    MATRIX = [("packed", c) for c in CASES] + [("topk", CASES[i]) for i in (0, 3)] + [
        (v, CASES[3]) for v in VARIANTS if v not in ("packed", "topk") and "warp" not in v and "pdl" not in v
    ]
else:
    MATRIX = [(v, c) for v in VARIANTS for c in CASES]


@needs_triton
@pytest.mark.parametrize("variant,case", MATRIX, ids=[f"{v}-{i}" for i, (v, _) in enumerate(MATRIX)])
def test_variant_matches_oracle(variant, case, seed):
    V, H, G, M, A, k, kind, block_v = case
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    cfg = _config(variant, kernel.KernelConfig(16, block_v, 16, 4, 2, 2, gather=False))
    grouping = _grouping(kind, V, G)
    weight = (torch.randn(V, H, device=DEVICE) / H**0.5).to(dtype)
    hidden = torch.randn(M, H, device=DEVICE).to(dtype)
    groups = _random_groups(M, A, G, DEVICE)
    head = GroupedLMHead(weight, grouping)
    ids = torch.full((M, k), -7, dtype=torch.int64, device=DEVICE)
    logprobs = torch.full((M, k), float("nan"), device=DEVICE)
    kernel.grouped_head_topk_triton(hidden, head.weight, head.offsets, head.order, groups, k,
                                    head.max_group_size, cfg, out=(ids, logprobs))
    atol = 2e-3 if dtype == torch.bfloat16 else 1e-4
    _assert_topk_matches(ids, logprobs, hidden.float(), weight.float(), grouping, groups, k, atol=atol)


@needs_triton
@pytest.mark.parametrize("variant", ["packed", "topk", "packed-epi-topk-merge"])
def test_variant_chunked_merge_with_ties(variant, monkeypatch, seed):
    """More tiles than one merge chunk (the running-top path), k above the tile width, heavy ties
    (5 distinct weight rows), gathered row blocks."""
    monkeypatch.setattr(kernel, "MERGE_BLOCK_P", 16)
    V, H, G, M, A, k = 701, 16, 4, 3, 3, 37
    grouping = VocabGrouping.from_token_counts(torch.rand(V), G)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # not fp32 on the GPU: tf32 dot
    weight = torch.randn(5, H)[torch.randint(0, 5, (V,))].to(DEVICE, dtype)
    hidden = torch.randn(M, H, device=DEVICE).to(dtype)
    groups = _random_groups(M, A, G, DEVICE)
    cfg = _config(variant, kernel.KernelConfig(16, 16, 16, 4, 2, 2, gather=True))
    head = GroupedLMHead(weight, grouping)
    ids, logprobs = kernel.grouped_head_topk_triton(
        hidden, head.weight, head.offsets, head.order, groups, k, head.max_group_size, cfg
    )
    _assert_topk_matches(ids, logprobs, hidden.float(), weight.float(), grouping, groups, k,
                         atol=1e-4 if DEVICE == "cpu" else 2e-3)


def test_mismatched_epilogue_and_merge_raise():
    V, H, G = 100, 16, 5
    head = GroupedLMHead(torch.randn(V, H), VocabGrouping.contiguous(V, G))
    groups = torch.tensor([[0, 1]])
    for fields in (dict(epilogue="argmax", merge="packed"), dict(epilogue="packed", merge="rounds")):
        cfg = dataclasses.replace(kernel.default_config(1, H, 3), **fields)
        with pytest.raises(ValueError, match="does not read"):
            kernel.grouped_head_topk_triton(torch.randn(1, H), head.weight, head.offsets, head.order, groups, 3,
                                            head.max_group_size, cfg)


if kernel.triton is not None:

    @triton.jit
    def _roundtrip_kernel(val_ptr, row_ptr, key_ptr, val_out_ptr, row_out_ptr, N, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        ok = offs < N
        key = kernel._pack_key(tl.load(val_ptr + offs, mask=ok), tl.load(row_ptr + offs, mask=ok))
        tl.store(key_ptr + offs, key, mask=ok)
        tl.store(val_out_ptr + offs, kernel._key_value(key), mask=ok)
        tl.store(row_out_ptr + offs, kernel._key_row(key), mask=ok)


@needs_triton
def test_packed_key_order_and_roundtrip(seed):
    """Keys order as (value, then lower row first); value and row come back bit for bit."""
    special = [float("-inf"), float("inf"), -0.0, 0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, -1.0, 1.0, 1.0]
    vals = torch.cat([torch.tensor(special), torch.randn(50) * 30, torch.randn(2).repeat(5)]).float()
    rows = torch.randint(0, 2**31 - 1, (vals.numel(),), dtype=torch.int32)
    rows[:3] = torch.tensor([0, 2**31 - 1, 5], dtype=torch.int32)
    vals, rows = vals.to(DEVICE), rows.to(DEVICE)
    N = vals.numel()
    key = torch.empty(N, dtype=torch.int64, device=DEVICE)
    val_out = torch.full((N,), float("nan"), device=DEVICE)
    row_out = torch.full((N,), -7, dtype=torch.int32, device=DEVICE)
    _roundtrip_kernel[(1,)](vals, rows, key, val_out, row_out, N, BLOCK=128)
    assert torch.equal(val_out.view(torch.int32), vals.view(torch.int32))  # -0.0 stays -0.0
    assert torch.equal(row_out, rows)
    key, vals, rows = key.cpu(), vals.cpu().double(), rows.cpu().long()
    for i in range(N):
        for j in range(N):
            if (vals[i], -rows[i]) > (vals[j], -rows[j]) and not (vals[i] == 0 and vals[j] == 0):
                assert key[i] > key[j], (vals[i], rows[i], vals[j], rows[j])
