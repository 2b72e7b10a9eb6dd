"""Grouped LM head with fused top-k and log-sum-exp: one Triton kernel, its PyTorch reference beside it.

For M rows, each with its own A active vocabulary groups, return the top-k token ids and their
log-probabilities under a softmax over the union of the row's active groups:

    logits[m, v] = hidden[m] . weight[v]          for v in the row's active groups only
    logprobs     = logits - logsumexp(logits)     (fp32), top-k sorted descending

Layout: `weight` is re-laid so group g owns rows [offsets[g], offsets[g+1]); `order[row]` is the
original token id of re-laid row `row` (see coral_fast.grouping).

Kernel plan (two launches, no host synchronisation, nothing the size of the logits hits memory):
1. `_grouped_head_partials_kernel`, a persistent grid over work items (active group, vocab tile,
   row block); each program first derives the union of the rows' groups from `groups` itself, row blocks fastest so the programs that share a weight tile run together. An item
   finds in `groups` which rows of its block chose its group, streams its [BLOCK_V, H] weight tile
   once for all of them (tl.dot, fp32 accumulation), and in the epilogue writes per chosen row the
   tile's (max, sum of exp) and its top-KT logits with their re-laid row ids, sorted descending.
2. `_merge_topk_kernel`, one program per row: log-sum-exp over the row's tile partials, the k tiles
   with the largest maxima (only they can hold the top k), top-k over their k*KT candidates, then
   `logit - lse` and `order[row]` -> original ids.
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
MERGE_BLOCK_P = 1024  # tile partials (max, sum) the merge reads per chunk
MERGE_BLOCK_C = 4096  # packed candidate keys the merge reads per chunk


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
MIN_KEY_HOST = -(2**63)

if triton is not None:
    MIN_KEY = tl.constexpr(MIN_KEY_HOST)  # below every packed (logit, row) key: "no candidate"

    @triton.jit
    def _pack_key(val, row):
        """(fp32 logit, int32 row) -> int64 whose signed order is the logit's order (ties: larger row)."""
        bits = val.to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        return (ordered.to(tl.int64) << 32) | (row.to(tl.int64) & 0xFFFFFFFF)

    @triton.jit
    def _unpack_key(key):
        ordered = (key >> 32).to(tl.int32)
        bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
        val = tl.where(key == MIN_KEY, float("-inf"), bits.to(tl.float32, bitcast=True))
        return val, (key & 0xFFFFFFFF).to(tl.int32)

    @triton.jit
    def _gpu_fence(NUM_THREADS: tl.constexpr):
        """fence.acq_rel.gpu in every thread of the program (one element per thread); returns 1."""
        one = tl.inline_asm_elementwise(
            "fence.acq_rel.gpu;\n\tmov.u32 $0, $1;", "=r,r", [tl.full((NUM_THREADS,), 1, tl.int32)],
            dtype=tl.int32, is_pure=False, pack=1,
        )
        return tl.max(one, axis=0)

    @triton.jit
    def _merge_row(
        m, key_ptr, part_max_ptr, part_sum_ptr, order_ptr, ids_ptr, logprobs_ptr, NP, K, V,
        KT: tl.constexpr, K_POW2: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Row m: log-sum-exp over its NP tile partials, top-K over its NP*KT packed candidate keys
        (K rounds of one int64 max each, chunk by chunk against the running top-K), ids via order."""
        offs_p = tl.arange(0, BLOCK_P)
        run_max = tl.full((), -1.0e30, tl.float32)  # finite start: no inf - inf
        run_sum = tl.full((), 0.0, tl.float32)
        for p0 in range(0, NP, BLOCK_P):
            ok = p0 + offs_p < NP
            pm = tl.load(part_max_ptr + m * NP + p0 + offs_p, mask=ok, other=float("-inf"), cache_modifier=".cg")
            ps = tl.load(part_sum_ptr + m * NP + p0 + offs_p, mask=ok, other=0.0, cache_modifier=".cg")
            new_max = tl.maximum(run_max, tl.max(pm, axis=0))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(ps * tl.exp(pm - new_max), axis=0)
            run_max = new_max
        lse = run_max + tl.log(run_sum)

        NC = NP * KT
        slots = tl.arange(0, K_POW2)
        offs_c = tl.arange(0, BLOCK_C)
        top = tl.full((K_POW2,), MIN_KEY, tl.int64)
        for c0 in range(0, NC, BLOCK_C):
            cand = tl.load(key_ptr + m * NC + c0 + offs_c, mask=c0 + offs_c < NC, other=MIN_KEY, cache_modifier=".cg")
            nxt = tl.full((K_POW2,), MIN_KEY, tl.int64)
            for r in range(0, K):
                best = tl.maximum(tl.max(cand, axis=0), tl.max(top, axis=0))
                nxt = tl.where(slots == r, best, nxt)
                cand = tl.where(cand == best, MIN_KEY, cand)
                top = tl.where(top == best, MIN_KEY, top)
            top = nxt
        val, row = _unpack_key(top)
        out_ok = slots < K
        # clamp: with check=False and k beyond the active vocabulary, -inf slots carry arbitrary rows
        safe_row = tl.minimum(tl.maximum(row, 0), V - 1)
        ids = tl.load(order_ptr + safe_row, mask=out_ok, other=0)
        tl.store(ids_ptr + m * K + slots, ids, mask=out_ok)
        tl.store(logprobs_ptr + m * K + slots, val - lse, mask=out_ok)

    @triton.jit
    def _grouped_head_partials_kernel(
        hidden_ptr, weight_ptr, groups_ptr, offsets_ptr,
        key_ptr, part_max_ptr, part_sum_ptr,
        counter_ptr, order_ptr, ids_ptr, logprobs_ptr,
        M, H, A, G, NT, NMB, K, V,
        stride_hm, stride_wv, stride_gm,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
        A_POW2: tl.constexpr, G_POW2: tl.constexpr, BLOCK_P: tl.constexpr,
        EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr, KT: tl.constexpr,
        FUSED: tl.constexpr, FENCE: tl.constexpr, NUM_THREADS: tl.constexpr,
        K_POW2: tl.constexpr, MERGE_BLOCK_P: tl.constexpr, MERGE_BLOCK_C: tl.constexpr,
    ):
        """Persistent: work item = (active group j, vocab tile t, row block mb), mb fastest so the
        programs sharing a weight tile run side by side. (A flat loop over (item, K step), so the
        pipeline runs across items, was measured: 2% faster at M=1, up to 50% slower at M=64 with many
        items a program; docs/head.md.) FUSED: the last program to finish merges every row (an
        atomic count of finished programs, reset by that program), so there is one launch."""
        # the union of the rows' groups, compacted: every program derives it from `groups` (M*A ints)
        # itself, so there is no host unique(), no extra launch, and no item for an unused group
        gids = tl.arange(0, G_POW2)
        present = tl.zeros((G_POW2,), tl.int32)
        offs_p = tl.arange(0, BLOCK_P)
        for p0 in range(0, M * A, BLOCK_P):
            pair = p0 + offs_p
            chosen_g = tl.load(groups_ptr + (pair // A) * stride_gm + pair % A, mask=pair < M * A, other=-1)
            present = tl.maximum(present, tl.max((chosen_g[None, :] == gids[:, None]).to(tl.int32), axis=1))
        present = tl.where(gids < G, present, 0)
        rank = tl.where(present > 0, tl.cumsum(present, axis=0) - 1, -1)  # j-th active group has rank j
        n_items = tl.sum(present, axis=0) * NT * NMB

        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        offs_k = tl.arange(0, BLOCK_K)
        local = tl.arange(0, BLOCK_V)
        slots = tl.arange(0, A_POW2)
        lanes = tl.arange(0, BLOCK_M)

        for item in range(pid, n_items, nprog):
            mb = item % NMB
            tile = (item // NMB) % NT
            g = tl.sum(tl.where(rank == item // (NMB * NT), gids, 0), axis=0)
            rows = mb * BLOCK_M + lanes
            chosen_groups = tl.load(
                groups_ptr + rows[:, None] * stride_gm + slots[None, :],
                mask=(rows[:, None] < M) & (slots[None, :] < A), other=-1,
            )
            hit = chosen_groups == g
            chosen = tl.max(hit.to(tl.int32), axis=1) > 0  # [BLOCK_M]: row chose group g
            slot = tl.sum(tl.where(hit, slots[None, :], 0), axis=1)  # where g sits in the row's list
            group_end = tl.load(offsets_ptr + g + 1).to(tl.int32)
            lo = tl.load(offsets_ptr + g).to(tl.int32) + tile * BLOCK_V
            cols = lo + local
            col_ok = cols < group_end
            # a row block with no chosen row, or a tile past the end of a smaller group, skips the
            # dot; the latter still writes (-inf, 0) partials because the merge reads all NT tiles
            any_chosen = tl.max(chosen.to(tl.int32), axis=0) > 0
            k_end = tl.where(any_chosen & (lo < group_end), H, 0)

            acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
            h_ptrs = hidden_ptr + rows[:, None] * stride_hm + offs_k[None, :]
            w_ptrs = weight_ptr + cols[:, None].to(tl.int64) * stride_wv + offs_k[None, :]
            for k0 in range(0, k_end, BLOCK_K):
                if EVEN_K:
                    h = tl.load(h_ptrs, mask=chosen[:, None], other=0.0)
                    w = tl.load(w_ptrs, mask=col_ok[:, None], other=0.0)
                else:
                    k_ok = (k0 + offs_k) < H
                    h = tl.load(h_ptrs, mask=chosen[:, None] & k_ok[None, :], other=0.0)
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
            part = (rows * A + slot) * NT + tile  # [BLOCK_M] index of (row, slot, tile)
            tl.store(part_max_ptr + part, tile_max, mask=chosen)
            tl.store(part_sum_ptr + part, tile_sum, mask=chosen)
            # the tile's top-KT as packed (logit, row) keys, by rounds of argmax
            for r in range(0, tl.where(any_chosen, KT, 0)):
                best, arg = tl.max(logits, axis=1, return_indices=True)
                tl.store(key_ptr + part * KT + r, _pack_key(best, lo + arg), mask=chosen)
                logits = tl.where(local[None, :] == arg[:, None], float("-inf"), logits)

        if FUSED:
            # threadFenceReduction pattern: every thread fences its partial stores, barrier, one
            # counted arrival per program; the last arrival sees all partials
            if FENCE:
                one = _gpu_fence(NUM_THREADS)
            else:
                one = 1
            tl.debug_barrier()
            done = tl.atomic_add(counter_ptr, one, sem="acq_rel", scope="gpu")
            if done == nprog - 1:
                if FENCE:
                    _gpu_fence(NUM_THREADS)
                tl.debug_barrier()
                for m in range(0, M):
                    _merge_row(m, key_ptr, part_max_ptr, part_sum_ptr, order_ptr, ids_ptr, logprobs_ptr,
                               A * NT, K, V, KT, K_POW2, MERGE_BLOCK_P, MERGE_BLOCK_C)
                tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")  # ready for the next launch

    @triton.jit
    def _merge_topk_kernel(
        key_ptr, part_max_ptr, part_sum_ptr, order_ptr, ids_ptr, logprobs_ptr,
        NP, K, V,
        KT: tl.constexpr, K_POW2: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """One program per row (the unfused path)."""
        _merge_row(tl.program_id(0), key_ptr, part_max_ptr, part_sum_ptr, order_ptr, ids_ptr, logprobs_ptr,
                   NP, K, V, KT, K_POW2, BLOCK_P, BLOCK_C)


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int
    programs_per_sm: int = 2  # persistent grid: at most this many programs per multiprocessor
    fuse_merge: bool = False  # the last program merges (one launch) instead of a merge kernel per row


def default_config(M: int, H: int, k: int) -> KernelConfig:
    """Config by a small heuristic on M and H (no autotune: nothing to warm up before graph capture).

    From the H200 sweep and the H100 variants of 2026-11-23 (docs/head.md): 3 stages (4 or 5 were
    slower at M=1 and much slower at M=64); the fused merge measured no gain, so it is off.
    """
    if M <= 16:
        if H >= 2048:
            return KernelConfig(16, 128, 128, num_warps=4, num_stages=3, programs_per_sm=2)
        return KernelConfig(16, 128, 64, num_warps=4, num_stages=3, programs_per_sm=4)
    return KernelConfig(64, 64, 128, num_warps=4, num_stages=3, programs_per_sm=2)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


_SM_COUNT: dict = {}
_COUNTERS: dict = {}  # device -> int32 [1], zero between launches (the fused merge resets it)


def _num_programs_cap(device: torch.device, per_sm: int) -> int:
    if device.type != "cuda":
        return 3  # interpreter: few programs, so the persistent loop runs several items each
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index] * per_sm


def _counter(device: torch.device) -> Tensor | None:
    """The fused merge's arrival counter for `device`, made on the first call outside graph capture
    (None while capturing before any call: the caller then takes the two-launch path)."""
    key = (device.type, device.index if device.index is not None else
           (torch.cuda.current_device() if device.type == "cuda" else 0))
    counter = _COUNTERS.get(key)
    if counter is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counter = _COUNTERS[key] = torch.zeros(1, device=device, dtype=torch.int32)
    return counter


def grouped_head_topk_triton(
    hidden: Tensor, weight: Tensor, offsets: Tensor, order: Tensor, groups: Tensor, k: int,
    max_group_size: int, config: KernelConfig | None = None, out: tuple[Tensor, Tensor] | None = None,
    _merge: bool = True,
) -> tuple[Tensor, Tensor]:
    """Launch the kernels; inputs are assumed valid (GroupedLMHead.topk checks them).

    hidden: [M, H] (weight's dtype); weight: [V, H] re-laid, rows contiguous; offsets: [G+1] int64;
    order: [V] int64; groups: [M, A] int32/int64, contiguous rows; max_group_size: host int.
    out: optional (ids [M, k] int64, logprobs [M, k] fp32) to write into.
    `_merge=False` (benchmark breakdown): the partials only, no merge of either kind.
    The fused path counts finished programs in one counter per device: calls on one device must not
    run concurrently on different streams (calls in stream order, graphs included, are fine).
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
    NMB = triton.cdiv(M, cfg.block_m)
    KT = min(k, cfg.block_v)
    device = hidden.device
    # one workspace (fewer allocator calls on the hot path): packed candidate keys, tile max, tile sum
    NP, NC = M * A * NT, M * A * NT * KT
    work = torch.empty(NC + NP, device=device, dtype=torch.int64)
    keys = work[:NC]
    part_max = work[NC:].view(torch.float32)[:NP]
    part_sum = work[NC:].view(torch.float32)[NP:]
    if out is None:
        ids = torch.empty((M, k), device=device, dtype=torch.int64)
        logprobs = torch.empty((M, k), device=device, dtype=torch.float32)
    else:
        ids, logprobs = out

    fused = cfg.fuse_merge and _merge
    counter = _counter(device) if fused else None
    fused = counter is not None
    MA = M * A
    G_POW2 = max(16, _next_pow2(G))
    # at most min(G, M*A) groups are active: known on the host, so the grid needs no sync
    max_items = min(G, MA) * NT * NMB
    grid = (min(max_items, _num_programs_cap(device, cfg.programs_per_sm)),)
    merge_meta = dict(
        K_POW2=max(16, _next_pow2(k)),
        MERGE_BLOCK_P=min(MERGE_BLOCK_P, max(16, _next_pow2(A * NT))),
        MERGE_BLOCK_C=min(MERGE_BLOCK_C, max(16, _next_pow2(A * NT * KT))),
    )
    _grouped_head_partials_kernel[grid](
        hidden, weight, groups, offsets,
        keys, part_max, part_sum,
        counter if fused else ids, order, ids, logprobs,
        M, H, A, G, NT, NMB, k, V,
        hidden.stride(0), weight.stride(0), groups.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_K=block_k,
        A_POW2=_next_pow2(A), G_POW2=G_POW2, BLOCK_P=min(max(16, _next_pow2(MA)), max(16, 8192 // G_POW2)),
        EVEN_K=(H % block_k == 0), DOT_FP32=dot_needs_fp32(device), KT=KT,
        FUSED=fused, FENCE=device.type == "cuda", NUM_THREADS=32 * cfg.num_warps, **merge_meta,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if fused or not _merge:
        return ids, logprobs
    _merge_topk_kernel[(M,)](
        keys, part_max, part_sum, order, ids, logprobs,
        A * NT, k, V,
        KT=KT, K_POW2=merge_meta["K_POW2"], BLOCK_P=merge_meta["MERGE_BLOCK_P"],
        BLOCK_C=merge_meta["MERGE_BLOCK_C"],
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
