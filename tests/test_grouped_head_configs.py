"""Grouped LM head: the kernel pair at small tile configs (odd sizes, k=1 and k = BLOCK_V = 64, k
above a small group's size, a chunked merge with heavy ties), the merge's fallback without tl.topk
(which the interpreter also runs for speed, except where a test sets INTERPRETER_TOPK),
programmatic dependent launch on and off (GPU), against the fp64 oracle: through the interpreter on the
CPU and in bf16 on the GPU. Also the packed key's order on hand-picked values, and the merge alone on
hand-made tile partials with a known answer."""
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
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (V, H, G, M, A, k, grouping, block_v): odd sizes, k=1 and 64 (k = BLOCK_V: whole-tile top-k),
# M=1 and many rows, A=1 and A=G, k above a small group's size
CASES = [
    (1001, 40, 7, 1, 1, 1, "contiguous", 32),
    (1001, 40, 7, 1, 7, 64, "contiguous", 64),
    (777, 24, 5, 33, 2, 64, "counts", 32),
    (613, 16, 3, 19, 3, 10, "contiguous", 16),
    (2999, 24, 11, 2, 4, 10, "counts", 64),
]
# PDL is CUDA only (sm_90+; elsewhere the plain launch): both ways on the GPU, one on the CPU. Keys that
# carry original token ids or re-laid rows (KernelConfig.ids_in_keys): both everywhere ("counts" cases
# re-lay the vocabulary, so a row named where an id belongs gives wrong ids)
PDL = [True, False] if DEVICE == "cuda" else [True]
MATRIX = [(pdl, ids, c) for pdl in PDL for ids in (False, True) for c in CASES]


def _run(case_fields, cfg, k, dtype, weight=None, grouping=None, hidden=None):
    V, H, G, M, A = case_fields
    grouping = grouping or _grouping("contiguous", V, G)
    if weight is None:
        weight = (torch.randn(V, H, device=DEVICE) / H**0.5).to(dtype)
    if hidden is None:
        hidden = torch.randn(M, H, device=DEVICE).to(dtype)
    groups = _random_groups(M, A, G, DEVICE)
    head = GroupedLMHead(weight, grouping)
    ids = torch.full((M, k), -7, dtype=torch.int64, device=DEVICE)  # poisoned: unwritten slots fail
    logprobs = torch.full((M, k), float("nan"), device=DEVICE)
    kernel.grouped_head_topk_triton(hidden, head.weight, head.offsets, head.order, groups, k,
                                    head.max_group_size, cfg, out=(ids, logprobs))
    return ids, logprobs, hidden, weight, grouping, groups


@needs_triton
@pytest.mark.parametrize("pdl,ids_in_keys,case", MATRIX,
                         ids=[f"pdl{int(p)}-ids{int(d)}-{i}" for i, (p, d, _) in enumerate(MATRIX)])
def test_config_matches_oracle(pdl, ids_in_keys, case, monkeypatch, seed):
    V, H, G, M, A, k, kind, block_v = case
    if M * k <= 64:  # the interpreter's bitonic tl.topk is slow: the merge's tl.topk path where small
        monkeypatch.setattr(kernel, "INTERPRETER_TOPK", True)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    cfg = kernel.KernelConfig(16, block_v, 16, 4, 2, 2, gather=False, pdl=pdl, ids_in_keys=ids_in_keys)
    ids, logprobs, hidden, weight, grouping, groups = _run((V, H, G, M, A), cfg, k, dtype,
                                                           grouping=_grouping(kind, V, G))
    atol = 2e-3 if dtype == torch.bfloat16 else 1e-4
    _assert_topk_matches(ids, logprobs, hidden.float(), weight.float(), grouping, groups, k, atol=atol)


@needs_triton
@pytest.mark.parametrize("use_topk,ids_in_keys", [(True, False), (False, False), (True, True)])
def test_chunked_merge_with_ties(use_topk, ids_in_keys, monkeypatch, seed):
    """More tiles than one merge chunk (the running top merged with each chunk's), k above the tile
    width, heavy ties (5 distinct weight rows), gathered row blocks, a re-laid vocabulary; the merge
    with tl.topk and with its fallback (rounds of one max, for a triton without tl.topk); keys naming
    re-laid rows and original ids."""
    monkeypatch.setattr(kernel, "MERGE_BLOCK_P", 16)
    monkeypatch.setattr(kernel, "INTERPRETER_TOPK", True)
    if not use_topk:
        monkeypatch.setattr(kernel, "HAS_TOPK", False)
    elif not kernel.HAS_TOPK:
        pytest.skip("this triton has no tl.topk")
    V, H, G, M, A, k = 701, 16, 4, 3, 3, 37
    grouping = VocabGrouping.from_token_counts(torch.rand(V), G)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # not fp32 on the GPU: tf32 dot
    weight = torch.randn(5, H)[torch.randint(0, 5, (V,))].to(DEVICE, dtype)
    cfg = kernel.KernelConfig(16, 16, 16, 4, 2, 2, gather=True, ids_in_keys=ids_in_keys)
    ids, logprobs, hidden, weight, grouping, groups = _run((V, H, G, M, A), cfg, k, dtype, weight, grouping)
    _assert_topk_matches(ids, logprobs, hidden.float(), weight.float(), grouping, groups, k,
                         atol=1e-4 if DEVICE == "cpu" else 2e-3)


@needs_triton
def test_merge_fallback_without_topk(monkeypatch, seed):
    """The merge's rounds fallback on one chunk (k=1 and k = BLOCK_V)."""
    monkeypatch.setattr(kernel, "HAS_TOPK", False)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    for V, H, G, M, A, k, kind, block_v in (CASES[0], CASES[3]):
        cfg = kernel.KernelConfig(16, block_v, 16, 4, 2, 2, gather=False)
        ids, logprobs, hidden, weight, grouping, groups = _run((V, H, G, M, A), cfg, k, dtype,
                                                               grouping=_grouping(kind, V, G))
        _assert_topk_matches(ids, logprobs, hidden.float(), weight.float(), grouping, groups, k,
                             atol=2e-3 if dtype == torch.bfloat16 else 1e-4)


@needs_triton
@pytest.mark.parametrize("use_topk", [True, False])
def test_merge_tail_chunk(use_topk, monkeypatch, seed):
    """A row's tile count just past a power of two (4 groups x 18 tiles = 72): the merge's phase A runs
    a 64-tile chunk, then a 16-tile tail chunk, and folds the k=10 candidate triangle."""
    monkeypatch.setattr(kernel, "INTERPRETER_TOPK", True)
    if not use_topk:
        monkeypatch.setattr(kernel, "HAS_TOPK", False)
    elif not kernel.HAS_TOPK:
        pytest.skip("this triton has no tl.topk")
    V, H, G, M, A, k, block_v = 1420, 24, 5, 3, 4, 10, 16
    assert kernel._merge_chunks(A * -(-(V // G) // block_v), 16) == (64, 64, 16)
    assert kernel._fold_shape(k, 16, 16) == (8, 16)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    cfg = kernel.KernelConfig(16, block_v, 16, 4, 2, 2, gather=False)
    ids, logprobs, hidden, weight, grouping, groups = _run((V, H, G, M, A), cfg, k, dtype)
    _assert_topk_matches(ids, logprobs, hidden.float(), weight.float(), grouping, groups, k,
                         atol=2e-3 if dtype == torch.bfloat16 else 1e-4)


# Row blocks of rows in order (16 and 64 rows), tiles by TMA descriptor (the interpreter runs them too)
# and by pointer loads: H not a multiple of the K step (a K tail the descriptor reads as zeros), V not
# a multiple of the tile (tiles past a smaller group's end), more rows than one block (M=70: the last
# block's hidden tile runs past the last row), M=1, k=1 and k above the tile
TMA_CASES = [(1001, 40, 7, 1, 3, 10), (613, 24, 3, 70, 2, 33), (777, 56, 5, 64, 5, 1)]


@needs_triton
@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("case", TMA_CASES, ids=[f"V{c[0]}-H{c[1]}-M{c[3]}-k{c[5]}" for c in TMA_CASES])
def test_tma_tiles_match_oracle(tma, block_m, case, seed):
    V, H, G, M, A, k = case
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    cfg = kernel.KernelConfig(block_m, 32, 32, 4, 2, 2, gather=False, tma=tma, ids_in_keys=block_m == 16)
    ids, logprobs, hidden, weight, grouping, groups = _run((V, H, G, M, A), cfg, k, dtype)
    assert kernel._tma_ok(cfg, False, hidden, weight) is tma  # the path under test is the one taken
    _assert_topk_matches(ids, logprobs, hidden.float(), weight.float(), grouping, groups, k,
                         atol=2e-3 if dtype == torch.bfloat16 else 1e-4)


@needs_triton
def test_tma_falls_back_where_a_descriptor_cannot_describe(seed):
    """Rows that are not 16-byte aligned (a hidden sliced out of a wider buffer) and gathered rows take
    the pointer loads, with the same answer."""
    V, H, G, M, A, k = 613, 24, 3, 9, 2, 5
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    weight = (torch.randn(V, H, device=DEVICE) / H**0.5).to(dtype)
    hidden = torch.randn(M, H + 1, device=DEVICE).to(dtype)[:, :H]  # row stride H + 1: not aligned
    cfg = kernel.KernelConfig(64, 32, 32, 4, 2, 2, gather=False)
    assert not kernel._tma_ok(cfg, False, hidden, weight)
    assert kernel._tma_ok(cfg, False, hidden.contiguous(), weight)
    assert not kernel._tma_ok(dataclasses.replace(cfg, tma=False), False, hidden.contiguous(), weight)
    assert not kernel._tma_ok(cfg, True, hidden.contiguous(), weight)
    ids, logprobs, hidden, weight, grouping, groups = _run((V, H, G, M, A), cfg, k, dtype, weight=weight,
                                                           hidden=hidden)
    _assert_topk_matches(ids, logprobs, hidden.float(), weight.float(), grouping, groups, k,
                         atol=2e-3 if dtype == torch.bfloat16 else 1e-4)


def test_merge_chunks_cover_every_tile():
    """The phase-A chunking covers [0, n) exactly once, with power-of-two chunks of at least k_pow2."""
    for k_pow2 in (16, 64):
        for n in list(range(1, 300)) + [1000, 1023, 1025, 1100, 2100, 4000]:
            block, main, tail = kernel._merge_chunks(n, k_pow2)
            assert block >= k_pow2 and block & (block - 1) == 0 and main % block == 0 and main >= block
            assert tail == 0 or (tail >= k_pow2 and tail & (tail - 1) == 0 and tail < block)
            assert main < n + block and main + tail >= n and (tail == 0 or main < n)


def test_pdl_only_where_supported(monkeypatch):
    """PDL only where the device can run it: never on CPU tensors (interpreter), nor when switched off
    (config field or CORAL_FAST_HEAD_PDL=0); on CUDA exactly for sm_90+."""
    cfg = kernel.default_config(1, 64, 10)
    assert cfg.pdl
    assert not kernel._use_pdl(cfg, torch.device("cpu"))
    assert not kernel._use_pdl(dataclasses.replace(cfg, pdl=False), torch.device("cpu"))
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        want = kernel.HAS_PDL and torch.version.hip is None and torch.cuda.get_device_capability()[0] >= 9
        assert kernel._use_pdl(cfg, cuda) == want
        monkeypatch.setenv("CORAL_FAST_HEAD_PDL", "0")  # read once per device: clear the cache around it
        kernel._pdl_supported.cache_clear()
        try:
            assert not kernel._use_pdl(cfg, cuda)
        finally:
            monkeypatch.delenv("CORAL_FAST_HEAD_PDL")
            kernel._pdl_supported.cache_clear()


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


def _pack_keys(vals: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The kernel's own packed (value, id) int64 keys for 1-D fp32 values and int32 ids."""
    N = vals.numel()
    key = torch.empty(N, dtype=torch.int64, device=DEVICE)
    _roundtrip_kernel[(1,)](vals, ids, key, torch.empty_like(vals), torch.empty_like(ids), N,
                            BLOCK=triton.next_power_of_2(N))
    return key


@needs_triton
@pytest.mark.parametrize("ids_in_keys", [True, False])
def test_merge_on_hand_made_partials(ids_in_keys, monkeypatch, seed):
    """The merge alone, on hand-made tile partials with a known answer. Row 0: tiles 0..5 have maxima
    1 + 10 t ulp and keys one ulp apart, so tile 5, the largest, holds the row's whole top 10 and the
    fold must rank the tiles by their exact maxima (ranked sixth, tile 5 would give only 5 keys). Row
    1: random tiles. The keys name original ids, or re-laid rows that `order` maps to ids."""
    if not kernel.HAS_TOPK:
        pytest.skip("this triton has no tl.topk")
    monkeypatch.setattr(kernel, "INTERPRETER_TOPK", True)
    M, n_tiles, KT, k = 2, 40, 10, 10
    ulp = 2.0**-23
    steps = torch.arange(KT, dtype=torch.float64)
    tile_max = torch.empty(M, n_tiles, dtype=torch.float64)
    tile_max[0, :6] = 1.0 + torch.arange(6, dtype=torch.float64) * 10 * ulp
    tile_max[0, 6:] = torch.rand(n_tiles - 6, dtype=torch.float64) * 0.9
    tile_max[1] = torch.randn(n_tiles, dtype=torch.float64) * 3
    gap = torch.full((M, n_tiles), 0.05, dtype=torch.float64)
    gap[0, :6] = ulp
    vals = (tile_max[:, :, None] - gap[:, :, None] * steps).float()  # [M, n_tiles, KT], descending
    assert vals[0, 5].min() > vals[0, 4].max()  # tile 5 holds row 0's top 10
    V = M * n_tiles * KT
    rows = torch.randperm(V).view(M, n_tiles, KT).int()  # what the keys name
    order = torch.randperm(V)  # re-laid row -> original id
    part_max = vals[:, :, 0].contiguous().reshape(-1)
    part_sum = torch.exp(vals.double() - vals[:, :, :1].double()).sum(-1).float().reshape(-1)
    part_key = _pack_keys(vals.reshape(-1).to(DEVICE), rows.reshape(-1).to(DEVICE))
    out_ids = torch.full((M, k), -7, dtype=torch.int64, device=DEVICE)
    out_lp = torch.full((M, k), float("nan"), device=DEVICE)
    kernel.merge_tile_partials(part_key, part_max.to(DEVICE), part_sum.to(DEVICE), order.to(DEVICE), out_ids, out_lp,
                               n_tiles, KT, V, ids_in_keys=ids_in_keys)
    flat_vals, flat_rows = vals.reshape(M, -1).double(), rows.reshape(M, -1).long()
    ref_vals, where = torch.topk(flat_vals, k, dim=-1)
    ref_ids = torch.gather(flat_rows, 1, where)
    if not ids_in_keys:
        ref_ids = order[ref_ids]
    assert torch.equal(out_ids.cpu(), ref_ids)
    lse = torch.logsumexp(flat_vals, dim=-1, keepdim=True)
    torch.testing.assert_close(out_lp.cpu().double(), ref_vals - lse, atol=1e-5, rtol=0)
