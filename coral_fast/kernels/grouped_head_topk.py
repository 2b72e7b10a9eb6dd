"""Grouped LM head with fused top-k and log-sum-exp: one Triton kernel, its PyTorch reference beside it.

For M rows, each with its own A active vocabulary groups, return the top-k token ids and their
log-probabilities under a softmax over the union of the row's active groups:

    logits[m, v] = hidden[m] . weight[v]          for v in the row's active groups only
    logprobs     = logits - logsumexp(logits)     (fp32), top-k sorted descending

Layout: `weight` is re-laid so group g owns rows [offsets[g], offsets[g+1]); `order[row]` is the
original token id of re-laid row `row` (see coral_fast.grouping).

Kernel plan (two launches, no host synchronisation, nothing the size of the logits hits memory):
1. `_grouped_head_partials_kernel`, grid (row blocks, vocab tiles, groups), row blocks fastest so
   the programs that share a weight tile run together. A program finds in `groups` which rows of its
   block chose its group (none: it returns at once), streams its [BLOCK_V, H] weight tile once for
   all of them (tl.dot, fp32 accumulation), and in the epilogue writes per chosen row the tile's
   (max, sum of exp) and its top-KT logits with their re-laid row ids, sorted descending.
2. `_merge_topk_kernel`, one program per row: log-sum-exp over the row's tile partials and top-k over
   its candidates, then `logit - lse` and `order[row]` -> original ids.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from coral_fast.kernels._dispatch import dot_needs_fp32, resolve_impl

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency; the reference still works
    triton = None

MAX_K = 64  # largest k the Triton path supports (the bound)


# ---------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------
def grouped_head_topk_reference(
    hidden: Tensor, weight: Tensor, offsets: Tensor, order: Tensor, groups: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Plain PyTorch, fp32: full logits, mask to the active vocabulary, log_softmax, topk.

    hidden: [M, H]; weight: [V, H] re-laid; offsets: [G+1]; order: [V]; groups: [M, A] int.
    Returns ids [M, k] int64 (original ids), logprobs [M, k] fp32 sorted descending.
    """
    V = weight.shape[0]
    offsets = offsets.to(hidden.device)
    group_of_row = torch.bucketize(torch.arange(V, device=hidden.device), offsets[1:], right=True)
    active = (group_of_row[None, None, :] == groups.long()[:, :, None]).any(dim=1)  # [M, V]
    logits = hidden.float() @ weight.float().T
    logits = logits.masked_fill(~active, float("-inf"))
    logprobs = torch.log_softmax(logits, dim=-1)
    values, rows = torch.topk(logprobs, k, dim=-1)
    return order.to(hidden.device)[rows], values


# ---------------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _grouped_head_partials_kernel(
        hidden_ptr, weight_ptr, groups_ptr, offsets_ptr,
        part_val_ptr, part_row_ptr, part_max_ptr, part_sum_ptr,
        M, H, A, NT, KT,
        stride_hm, stride_wv, stride_gm,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
        A_POW2: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_t = tl.program_id(1)
        g = tl.program_id(2)

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        slots = tl.arange(0, A_POW2)
        chosen_groups = tl.load(
            groups_ptr + rows[:, None] * stride_gm + slots[None, :],
            mask=row_ok[:, None] & (slots[None, :] < A), other=-1,
        )
        hit = chosen_groups == g
        chosen = tl.max(hit.to(tl.int32), axis=1) > 0  # [BLOCK_M]: row chose group g
        if tl.max(chosen.to(tl.int32), axis=0) == 0:
            return
        slot = tl.sum(tl.where(hit, slots[None, :], 0), axis=1)  # where g sits in the row's list

        group_end = tl.load(offsets_ptr + g + 1).to(tl.int32)
        lo = tl.load(offsets_ptr + g).to(tl.int32) + pid_t * BLOCK_V
        cols = lo + tl.arange(0, BLOCK_V)
        col_ok = cols < group_end
        # tiles past the end of a smaller group still write (-inf, 0) partials: the merge reads all NT
        k_end = tl.where(lo < group_end, H, 0)

        acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        h_ptrs = hidden_ptr + rows[:, None] * stride_hm + offs_k[None, :]
        w_ptrs = weight_ptr + cols[:, None].to(tl.int64) * stride_wv + offs_k[None, :]
        for k0 in range(0, k_end, BLOCK_K):
            if EVEN_K:
                h = tl.load(h_ptrs, mask=row_ok[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=col_ok[:, None], other=0.0)
            else:
                k_ok = (k0 + offs_k) < H
                h = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if DOT_FP32:  # interpreter: bf16 tl.dot is wrong there (triton issue 11584)
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, tl.trans(w), acc)
            h_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

        logits = tl.where(col_ok[None, :], acc, float("-inf"))
        tile_max = tl.max(logits, axis=1)
        shift = tl.where(tile_max == float("-inf"), 0.0, tile_max)
        tile_sum = tl.sum(tl.exp(logits - shift[:, None]), axis=1)
        part = (rows * A + slot) * NT + pid_t  # [BLOCK_M] index of (row, slot, tile)
        tl.store(part_max_ptr + part, tile_max, mask=chosen)
        tl.store(part_sum_ptr + part, tile_sum, mask=chosen)

        # the tile's top-KT by rounds of argmax: KT <= 64, cheap next to streaming the tile
        local = tl.arange(0, BLOCK_V)
        for r in range(0, KT):
            best, arg = tl.max(logits, axis=1, return_indices=True)
            tl.store(part_val_ptr + part * KT + r, best, mask=chosen)
            tl.store(part_row_ptr + part * KT + r, lo + arg, mask=chosen)
            logits = tl.where(local[None, :] == arg[:, None], float("-inf"), logits)

    @triton.jit
    def _merge_topk_kernel(
        part_val_ptr, part_row_ptr, part_max_ptr, part_sum_ptr, order_ptr,
        ids_ptr, logprobs_ptr,
        NP, NC, K, V,
        K_POW2: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        m = tl.program_id(0)

        # log-sum-exp over the row's NP tile partials, online; finite start so no inf - inf
        run_max = tl.full((), -1.0e30, tl.float32)
        run_sum = tl.full((), 0.0, tl.float32)
        offs_p = tl.arange(0, BLOCK_P)
        for p0 in range(0, NP, BLOCK_P):
            ok = p0 + offs_p < NP
            pm = tl.load(part_max_ptr + m * NP + p0 + offs_p, mask=ok, other=float("-inf"))
            ps = tl.load(part_sum_ptr + m * NP + p0 + offs_p, mask=ok, other=0.0)
            new_max = tl.maximum(run_max, tl.max(pm, axis=0))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(ps * tl.exp(pm - new_max), axis=0)
            run_max = new_max
        lse = run_max + tl.log(run_sum)

        # top-K over the NC candidates, chunk by chunk, by rounds of argmax against the running list
        slots = tl.arange(0, K_POW2)
        top_val = tl.full((K_POW2,), float("-inf"), tl.float32)
        top_row = tl.zeros((K_POW2,), tl.int32)
        offs_c = tl.arange(0, BLOCK_C)
        for c0 in range(0, NC, BLOCK_C):
            ok = c0 + offs_c < NC
            cand_val = tl.load(part_val_ptr + m * NC + c0 + offs_c, mask=ok, other=float("-inf"))
            cand_row = tl.load(part_row_ptr + m * NC + c0 + offs_c, mask=ok, other=0)
            new_val = tl.full((K_POW2,), float("-inf"), tl.float32)
            new_row = tl.zeros((K_POW2,), tl.int32)
            for r in range(0, K):
                best_c, arg_c = tl.max(cand_val, axis=0, return_indices=True)
                best_t, arg_t = tl.max(top_val, axis=0, return_indices=True)
                take_c = best_c > best_t
                row_c = tl.sum(tl.where(offs_c == arg_c, cand_row, 0), axis=0)
                row_t = tl.sum(tl.where(slots == arg_t, top_row, 0), axis=0)
                new_val = tl.where(slots == r, tl.where(take_c, best_c, best_t), new_val)
                new_row = tl.where(slots == r, tl.where(take_c, row_c, row_t), new_row)
                cand_val = tl.where(offs_c == arg_c, tl.where(take_c, float("-inf"), cand_val), cand_val)
                top_val = tl.where(slots == arg_t, tl.where(take_c, top_val, float("-inf")), top_val)
            top_val = new_val
            top_row = new_row

        out_ok = slots < K
        # clamp: with check=False and k beyond the active vocabulary, -inf slots carry arbitrary rows
        safe_row = tl.minimum(tl.maximum(top_row, 0), V - 1)
        ids = tl.load(order_ptr + safe_row, mask=out_ok, other=0)
        tl.store(ids_ptr + m * K + slots, ids, mask=out_ok)
        tl.store(logprobs_ptr + m * K + slots, top_val - lse, mask=out_ok)


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int


def default_config(M: int, H: int, k: int) -> KernelConfig:
    """Config by a small heuristic on M (no autotune: nothing to warm up before graph capture).

    Small M is a GEMV in disguise: narrow vocab tiles give enough programs to keep HBM busy.
    Larger M: one row block covers every row that chose a group, so each tile is read once.
    """
    if M <= 16:
        return KernelConfig(block_m=16, block_v=64, block_k=128, num_warps=4, num_stages=4)
    if M <= 32:
        return KernelConfig(block_m=32, block_v=64, block_k=128, num_warps=4, num_stages=4)
    return KernelConfig(block_m=64, block_v=128, block_k=64, num_warps=8, num_stages=3)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def grouped_head_topk_triton(
    hidden: Tensor, weight: Tensor, offsets: Tensor, order: Tensor, groups: Tensor, k: int,
    max_group_size: int, config: KernelConfig | None = None, out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Launch the two kernels; inputs are assumed valid (GroupedLMHead.topk checks them).

    hidden: [M, H] (weight's dtype); weight: [V, H] re-laid, rows contiguous; offsets: [G+1] int64;
    order: [V] int64; groups: [M, A] int32/int64, contiguous rows; max_group_size: host int.
    out: optional (ids [M, k] int64, logprobs [M, k] fp32) to write into.
    """
    if triton is None:
        raise RuntimeError("impl='triton' needs the triton package")
    if k > MAX_K:
        raise ValueError(f"the Triton grouped head supports k <= {MAX_K}, got k={k}")
    M, H = hidden.shape
    V = weight.shape[0]
    A = groups.shape[1]
    G = offsets.numel() - 1
    cfg = config or default_config(M, H, k)
    block_k = min(cfg.block_k, max(16, _next_pow2(H)))
    NT = triton.cdiv(max_group_size, cfg.block_v)
    KT = min(k, cfg.block_v)
    device = hidden.device
    part_val = torch.empty((M, A, NT, KT), device=device, dtype=torch.float32)
    part_row = torch.empty((M, A, NT, KT), device=device, dtype=torch.int32)
    part_max = torch.empty((M, A, NT), device=device, dtype=torch.float32)
    part_sum = torch.empty((M, A, NT), device=device, dtype=torch.float32)
    if out is None:
        ids = torch.empty((M, k), device=device, dtype=torch.int64)
        logprobs = torch.empty((M, k), device=device, dtype=torch.float32)
    else:
        ids, logprobs = out
    grid = (triton.cdiv(M, cfg.block_m), NT, G)
    _grouped_head_partials_kernel[grid](
        hidden, weight, groups, offsets,
        part_val, part_row, part_max, part_sum,
        M, H, A, NT, KT,
        hidden.stride(0), weight.stride(0), groups.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_K=block_k,
        A_POW2=_next_pow2(A), EVEN_K=(H % block_k == 0), DOT_FP32=dot_needs_fp32(device),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    NP, NC = A * NT, A * NT * KT
    _merge_topk_kernel[(M,)](
        part_val, part_row, part_max, part_sum, order,
        ids, logprobs,
        NP, NC, k, V,
        K_POW2=max(16, _next_pow2(k)), BLOCK_P=min(1024, max(16, _next_pow2(NP))),
        BLOCK_C=min(4096, max(16, _next_pow2(NC))),
        num_warps=4,
    )
    return ids, logprobs


def grouped_head_topk(
    hidden: Tensor, weight: Tensor, offsets: Tensor, order: Tensor, groups: Tensor, k: int,
    max_group_size: int, impl: str = "auto", config: KernelConfig | None = None,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Dispatch: impl "auto" (Triton on CUDA, reference elsewhere), "triton" or "reference"."""
    if resolve_impl(impl, hidden.device) == "triton":
        return grouped_head_topk_triton(hidden, weight, offsets, order, groups, k, max_group_size, config, out)
    ids, logprobs = grouped_head_topk_reference(hidden, weight, offsets, order, groups, k)
    if out is not None:
        out[0].copy_(ids)
        out[1].copy_(logprobs)
        return out
    return ids, logprobs
