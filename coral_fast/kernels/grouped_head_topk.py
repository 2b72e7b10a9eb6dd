"""Grouped LM head with fused top-k and log-sum-exp: one Triton kernel, its PyTorch reference beside it.

For M rows, each with its own A active vocabulary groups, return the top-k token ids and their
log-probabilities under a softmax over the union of the row's active groups:

    logits[m, v] = hidden[m] . weight[v]          for v in the row's active groups only
    logprobs     = logits - logsumexp(logits)     (fp32), top-k sorted descending

Layout: `weight` is re-laid so group g owns rows [offsets[g], offsets[g+1]); `order[row]` is the
original token id of re-laid row `row` (see coral_fast.grouping).

Kernel plan (two launches, no host synchronisation, nothing the size of the logits hits memory):
1. `_grouped_head_partials_kernel`, a persistent grid over work items (active group, vocab tile,
   row block); each program first derives the union of the rows' groups from `groups` itself, row
   blocks fastest so the programs that share a weight tile run together. An item finds in `groups`
   which rows of its block chose its group, streams its [BLOCK_V, H] weight tile once for all of
   them (tl.dot, fp32 accumulation), and in the epilogue writes per chosen row the tile's (max, sum
   of exp) and its top-KT logits as packed (logit, re-laid row) int64 keys (with 16-row blocks the key
   names the original token id instead, so the merge needs no `order` lookup). At M=1 the row's groups
   are taken as they are (no union) and the epilogue runs on the one real row of the 16-row dot.
2. `_merge_topk_kernel`, one program per row (one warp): log-sum-exp over the row's tile partials,
   the k tiles with the largest maxima (only they can hold the top k), top-k (bitonic `tl.topk`) over
   the k(k+1)/2 of their candidate keys that can still be in it, then `logit - lse` and (where the
   keys name re-laid rows) `order[row]` -> original ids. On Hopper it is launched by programmatic
   dependent launch: it starts while the first kernel runs and waits on the device
   (`griddepcontrol.wait`), not on the stream.

Invalid rows (both paths, no host synchronisation): a row whose group ids are out of [0, G) or
repeated, whose active vocabulary holds fewer than k tokens, or whose log-sum-exp is not finite (a NaN
or inf in its hidden state, or logits past fp32's range) comes out as ids -1 and log-probs NaN. The
merge decides it from the row's own groups and log-sum-exp; nothing is read back to the host.

Op: `coral_fast::grouped_head_topk` (torch.library.custom_op below) is what `torch.compile` sees of
the launches. Measured configs and timings: bench/results/head_h200.md and head_h100.md.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from coral_fast.kernels._dispatch import cuda_properties, dot_needs_fp32, resolve_impl
from coral_fast.kernels._launch import Launcher
from coral_fast.kernels._replay import eager_graphs

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency; the reference still works
    triton = None
try:  # host-side TMA descriptors (triton >= 3.4; the interpreter runs them too)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

MAX_K = 64  # largest k the Triton path supports (the bound)
MERGE_BLOCK_P = 1024  # tile partials the merge reads per chunk
GATHER_MAX_M = 256  # up to this many rows, each work item gathers the rows that chose its group


# ---------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------
def grouped_head_topk_reference(
    hidden: Tensor, weight: Tensor, offsets: Tensor, order: Tensor, groups: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Plain PyTorch, fp32: full logits, mask to the active vocabulary, log_softmax, topk.

    hidden: [M, H]; weight: [V, H] re-laid; offsets: [G+1]; order: [V]; groups: [M, A] int.
    Returns ids [M, k] int64 (original ids), logprobs [M, k] fp32 sorted descending; invalid rows
    (see the module docstring) as ids -1, logprobs NaN, like the kernel.
    """
    V = weight.shape[0]
    G = offsets.numel() - 1
    offsets = offsets.to(hidden.device)
    groups = groups.long()
    group_of_row = torch.bucketize(torch.arange(V, device=hidden.device), offsets[1:], right=True)
    active = (group_of_row[None, None, :] == groups[:, :, None]).any(dim=1)  # [M, V]
    logits = hidden.float() @ weight.float().T
    logits = logits.masked_fill(~active, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    values, rows = torch.topk(logits - lse, min(k, V), dim=-1)
    ids = order.to(hidden.device)[rows]
    in_range = (groups >= 0) & (groups < G)
    sizes = (offsets[1:] - offsets[:-1])[groups.clamp(0, G - 1)].masked_fill(~in_range, 0)
    ordered = groups.sort(dim=1).values
    valid = (in_range.all(dim=1) & (ordered[:, 1:] != ordered[:, :-1]).all(dim=1)
             & (sizes.sum(dim=1) >= k) & torch.isfinite(lse[:, 0]))
    if k > V:  # every row is invalid then; keep the [M, k] shape
        ids = torch.cat([ids, ids.new_zeros(ids.shape[0], k - V)], dim=1)
        values = torch.cat([values, values.new_zeros(values.shape[0], k - V)], dim=1)
    return (torch.where(valid[:, None], ids, -1),
            torch.where(valid[:, None], values, torch.full_like(values, float("nan"))))


# ---------------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------------
if triton is not None:

    # Packed candidate keys: a logit's fp32 bits mapped to an int32 of the same order in the high half,
    # 0x7FFFFFFF - row in the low half (ties: lower row first; the "row" is the re-laid row, or the
    # original token id with KernelConfig.ids_in_keys). One int64 max picks the largest logit and names
    # its row at once (one reduction instead of a value/index pair); a row's keys of finite logits are
    # distinct (masked columns may share one -inf key: a round then clears them together, harmlessly).
    NO_KEY = tl.constexpr(-9223372036854775807)  # below every key, -inf's included

    # programmatic dependent launch (KernelConfig.pdl): the merge launches while the partials kernel
    # runs and waits on the device (griddepcontrol, sm_90+) instead of the stream
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

        HAS_PDL = True
    except ImportError:  # pragma: no cover - older triton: the merge is launched the plain way
        HAS_PDL = False

        @triton.jit
        def gdc_launch_dependents():
            pass

        @triton.jit
        def gdc_wait():
            pass

    HAS_TOPK = hasattr(tl, "topk")  # bitonic top-k (triton >= 3.3); without it the merge uses rounds
    # the interpreter runs a bitonic network slowly (seconds a row for k=64's 4096 candidates), so on
    # CPU tensors the merge takes the rounds unless this is set (the tests set it for small cases)
    INTERPRETER_TOPK = False

    @triton.jit
    def _pack_key(val, row):
        bits = val.to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - row).to(tl.int64)

    @triton.jit
    def _key_value(key):
        ordered = (key >> 32).to(tl.int32)
        bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _key_row(key):
        return 0x7FFFFFFF - (key & 0x7FFFFFFF).to(tl.int32)

    @triton.jit
    def _write_tile_partials(
        acc, col_ok, tok, lo, part, chosen, part_key_ptr, part_max_ptr, part_sum_ptr, KT,
        BLOCK_V: tl.constexpr, IDS_IN_KEYS: tl.constexpr, KEPT_SLOTS: tl.constexpr,
    ):
        """Epilogue of one tile for R rows: acc [R, BLOCK_V] fp32 logits, col_ok [BLOCK_V], tok [BLOCK_V]
        int32 = the original token id of each column (IDS_IN_KEYS), lo = the tile's first re-laid row,
        part [R] = the (row, slot, tile) partial index, chosen [R]. Writes per chosen row the tile's (max,
        sum of exp) and its top-KT logits as packed int64 keys, one max a round (faster than a bitonic
        tl.topk of the tile), stored a round or, with 16-row blocks and KT <= KEPT_SLOTS, all at once.
        IDS_IN_KEYS (16-row blocks): the rounds run on packed (logit, token id) keys, one int64 max a
        round, and the tile max is read off the first round's key. Otherwise (64-row blocks) they run on
        the fp32 logits and int32 columns (a max, then the lowest column holding it), the key (logit,
        re-laid row) packed once a round: half the live values of int64 keys in the rounds, which was
        faster at M=64."""
        logits = tl.where(col_ok[None, :], acc, float("-inf"))
        n_rounds = tl.where(tl.max(chosen.to(tl.int32), axis=0) > 0, KT, 0)
        if IDS_IN_KEYS:
            key = _pack_key(logits, tok[None, :])
            best = tl.max(key, axis=1)
            tile_max = _key_value(best)
        else:
            tile_max = tl.max(logits, axis=1)
        shift = tl.where(tile_max == float("-inf"), 0.0, tile_max)
        tile_sum = tl.sum(tl.exp(logits - shift[:, None]), axis=1)
        tl.store(part_max_ptr + part, tile_max, mask=chosen)
        tl.store(part_sum_ptr + part, tile_sum, mask=chosen)
        if IDS_IN_KEYS:
            # KEPT_SLOTS > 0: the rounds' keys gather in registers and leave in one store; a store a
            # round moves each round's [R] keys into the store's layout through shared memory, a barrier
            # a round. Above 16 slots the buffer's registers cost more: a store a round.
            if KEPT_SLOTS > 0:
                slots = tl.arange(0, KEPT_SLOTS)
                kept = tl.where(slots[None, :] == 0, best[:, None], NO_KEY)
            else:
                tl.store(part_key_ptr + part * KT, best, mask=chosen)
            for r in range(1, n_rounds):
                key = tl.where(key == best[:, None], NO_KEY, key)
                best = tl.max(key, axis=1)
                if KEPT_SLOTS > 0:
                    kept = tl.where(slots[None, :] == r, best[:, None], kept)
                else:
                    tl.store(part_key_ptr + part * KT + r, best, mask=chosen)
            if KEPT_SLOTS > 0:
                tl.store(part_key_ptr + part[:, None] * KT + slots[None, :], kept,
                         mask=chosen[:, None] & (slots[None, :] < KT))
        else:
            cols = tl.arange(0, BLOCK_V)
            best = tile_max
            col = tl.min(tl.where(logits == best[:, None], cols[None, :], BLOCK_V), axis=1)
            tl.store(part_key_ptr + part * KT, _pack_key(best, lo + col), mask=chosen)
            for r in range(1, n_rounds):
                logits = tl.where(cols[None, :] == col[:, None], float("-inf"), logits)
                best = tl.max(logits, axis=1)
                col = tl.min(tl.where(logits == best[:, None], cols[None, :], BLOCK_V), axis=1)
                tl.store(part_key_ptr + part * KT + r, _pack_key(best, lo + col), mask=chosen)

    @triton.jit
    def _write_row_partials(logits, col_ok, tok, part, part_key_ptr, part_max_ptr, part_sum_ptr, KT):
        """Epilogue of one tile for one row (M == 1): logits [BLOCK_V] fp32, tok [BLOCK_V] int32 = the
        original token id of each column, part = the row's (slot, tile) partial index. The tile's top KT
        by rank instead of KT rounds: a column's slot is the number of columns that beat it (larger
        logit, or equal logit and smaller id), found in one pass of independent compares rather than
        KT dependent block-wide reductions (at one row a value a thread, every round of those crosses
        the warps through shared memory)."""
        logits = tl.where(col_ok, logits, float("-inf"))
        # padding columns get distinct negative ids so that every column has its own rank (the slots
        # past the tile's valid columns are then written, with NO_KEY, not left stale)
        tie = tl.where(col_ok, tok, -1 - tl.arange(0, logits.shape[0]))
        beats = (logits[None, :] > logits[:, None]) | ((logits[None, :] == logits[:, None]) & (tie[None, :] < tie[:, None]))
        rank = tl.sum(beats.to(tl.int32), axis=1)
        tile_max = tl.max(logits, axis=0)
        shift = tl.where(tile_max == float("-inf"), 0.0, tile_max)
        tl.store(part_max_ptr + part, tile_max)
        tl.store(part_sum_ptr + part, tl.sum(tl.exp(logits - shift), axis=0))
        key = tl.where(col_ok, _pack_key(logits, tok), NO_KEY)
        tl.store(part_key_ptr + part * KT + rank, key, mask=rank < KT)

    @triton.jit
    def _grouped_head_partials_kernel(
        hidden_ptr, weight_ptr, groups_ptr, offsets_ptr, order_ptr,
        part_key_ptr, part_max_ptr, part_sum_ptr,
        M, H, A, G, NT, NMB, KT,
        stride_hm, stride_wv, stride_gm,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
        A_POW2: tl.constexpr, G_POW2: tl.constexpr, BLOCK_P: tl.constexpr,
        GATHER: tl.constexpr, M_POW2: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr,
        PDL: tl.constexpr, ONE_ROW: tl.constexpr, ONE_BLOCK: tl.constexpr, IDS_IN_KEYS: tl.constexpr,
        KEPT_SLOTS: tl.constexpr, h_desc, w_desc, TMA: tl.constexpr,
    ):
        """Persistent: work item = (active group j, vocab tile t, row block mb), mb fastest so the
        programs sharing a weight tile run side by side and all but the first read it from L2.
        TMA: the hidden and weight tiles come through the descriptors h_desc [BLOCK_M, BLOCK_K] and
        w_desc [BLOCK_V, BLOCK_K] (rows and columns past the tensors read as zeros; a tile's rows past
        its group belong to the next group and are masked in the epilogue) instead of pointer loads."""
        # the union of the rows' groups, compacted: every program derives it from `groups` (M*A ints)
        # itself, so there is no host unique(), no extra launch, and no item for an unused group
        if PDL:
            gdc_launch_dependents()  # the merge may launch now; it waits for this grid on the device
        gids = tl.arange(0, G_POW2)
        # every group's [start, end) now, in parallel with the `groups` load below, so the first
        # weight load waits for one memory round trip (groups) instead of two (groups, offsets)
        g_start = tl.load(offsets_ptr + gids, mask=gids < G, other=0).to(tl.int32)
        g_end = tl.load(offsets_ptr + gids + 1, mask=gids < G, other=0).to(tl.int32)
        offs_k = tl.arange(0, BLOCK_K)
        local = tl.arange(0, BLOCK_V)
        slots = tl.arange(0, A_POW2)
        if ONE_ROW:
            # M == 1: the union is the row's own (distinct) groups, item = (slot, tile)
            n_items = A * NT
        else:
            present = tl.zeros((G_POW2,), tl.int32)
            offs_p = tl.arange(0, BLOCK_P)
            for p0 in range(0, M * A, BLOCK_P):
                pair = p0 + offs_p
                chosen_g = tl.load(groups_ptr + (pair // A) * stride_gm + pair % A, mask=pair < M * A, other=-1)
                present = tl.maximum(present, tl.max((chosen_g[None, :] == gids[:, None]).to(tl.int32), axis=1))
            present = tl.where(gids < G, present, 0)
            rank = tl.where(present > 0, tl.cumsum(present, axis=0) - 1, -1)  # j-th active group has rank j
            n_items = tl.sum(present, axis=0) * NT * NMB
        if ONE_BLOCK:
            # one row block: its rows' group lists are loaded once, not once an item, and every active
            # group has a chooser in it, so the weight loads need not wait for them
            block_groups = tl.load(
                groups_ptr + tl.arange(0, BLOCK_M)[:, None] * stride_gm + slots[None, :],
                mask=(tl.arange(0, BLOCK_M)[:, None] < M) & (slots[None, :] < A), other=-1,
            )
        for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
            mb = item % NMB
            tile = (item // NMB) % NT
            if ONE_ROW:
                g = tl.load(groups_ptr + item // NT).to(tl.int32)
                is_g = gids == g
            else:
                is_g = rank == item // (NMB * NT)
                g = tl.sum(tl.where(is_g, gids, 0), axis=0)

            if GATHER:
                # rows that chose g, compacted: block mb takes the mb-th BLOCK_M of them, so the dot
                # and the epilogue run on chosen rows only (random routing: ~M*A/G rows a group)
                m_all = tl.arange(0, M_POW2)
                groups_all = tl.load(
                    groups_ptr + m_all[:, None] * stride_gm + slots[None, :],
                    mask=(m_all[:, None] < M) & (slots[None, :] < A), other=-1,
                )
                hit_all = groups_all == g
                chosen_all = tl.max(hit_all.to(tl.int32), axis=1)
                # the first slot holding g: a repeated id (an invalid row) must not index past the row
                slot_all = tl.min(tl.where(hit_all, slots[None, :], A_POW2 - 1), axis=1)
                position = tl.where(chosen_all > 0, tl.cumsum(chosen_all, axis=0) - 1, -1)
                match = position[None, :] == (mb * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
                rows = tl.sum(tl.where(match, m_all[None, :], 0), axis=1)
                slot = tl.sum(tl.where(match, slot_all[None, :], 0), axis=1)
                chosen = tl.max(match.to(tl.int32), axis=1) > 0
                row_ok = chosen
            else:
                rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
                row_ok = rows < M
                if ONE_BLOCK:
                    chosen_groups = block_groups
                else:
                    chosen_groups = tl.load(
                        groups_ptr + rows[:, None] * stride_gm + slots[None, :],
                        mask=row_ok[:, None] & (slots[None, :] < A), other=-1,
                    )
                hit = chosen_groups == g
                chosen = tl.max(hit.to(tl.int32), axis=1) > 0  # [BLOCK_M]: row chose group g
                # where g sits in the row's list (its first slot: see slot_all)
                slot = tl.min(tl.where(hit, slots[None, :], A_POW2 - 1), axis=1)

            group_end = tl.sum(tl.where(is_g, g_end, 0), axis=0)
            lo = tl.sum(tl.where(is_g, g_start, 0), axis=0) + tile * BLOCK_V
            cols = lo + local
            col_ok = cols < group_end
            if IDS_IN_KEYS:
                tok = tl.load(order_ptr + cols, mask=col_ok, other=0).to(tl.int32)
            else:
                tok = cols  # unused: the epilogue packs lo + column itself
            # a row block with no chosen row, or a tile past the end of a smaller group, skips the
            # dot; the latter still writes (-inf, 0) partials because the merge reads all NT tiles
            if ONE_BLOCK:
                k_end = tl.where(lo < group_end, H, 0)
            else:
                any_chosen = tl.max(chosen.to(tl.int32), axis=0) > 0
                k_end = tl.where(any_chosen & (lo < group_end), H, 0)

            acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
            h_ptrs = hidden_ptr + rows[:, None] * stride_hm + offs_k[None, :]
            w_ptrs = weight_ptr + cols[:, None].to(tl.int64) * stride_wv + offs_k[None, :]
            for k0 in range(0, k_end, BLOCK_K):
                if TMA:
                    h = h_desc.load([mb * BLOCK_M, k0])
                    w = w_desc.load([lo, k0])
                elif EVEN_K:
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

            part = (rows * A + slot) * NT + tile  # [BLOCK_M] index of (row, slot, tile)
            if ONE_ROW:
                # M == 1: rows 1.. of the 16-row dot are padding; the epilogue runs on row 0 alone
                first = (tl.arange(0, BLOCK_M) == 0)
                if IDS_IN_KEYS:
                    _write_row_partials(tl.sum(tl.where(first[:, None], acc, 0.0), axis=0), col_ok, tok,
                                        tl.sum(tl.where(first, part, 0), axis=0),
                                        part_key_ptr, part_max_ptr, part_sum_ptr, KT)
                else:
                    _write_tile_partials(
                        tl.sum(tl.where(first[:, None], acc, 0.0), axis=0, keep_dims=True), col_ok, tok, lo,
                        tl.sum(tl.where(first, part, 0), axis=0, keep_dims=True),
                        tl.max(tl.where(first, chosen.to(tl.int32), 0), axis=0, keep_dims=True) > 0,
                        part_key_ptr, part_max_ptr, part_sum_ptr, KT, BLOCK_V, IDS_IN_KEYS, KEPT_SLOTS,
                    )
            else:
                _write_tile_partials(acc, col_ok, tok, lo, part, chosen, part_key_ptr, part_max_ptr, part_sum_ptr,
                                     KT, BLOCK_V, IDS_IN_KEYS, KEPT_SLOTS)

    @triton.jit
    def _top_keys(x, K, K_POW2: tl.constexpr, USE_TOPK: tl.constexpr):
        """The K_POW2 largest keys of the 1-D int64 vector x, descending (x at least K_POW2 long).
        Without tl.topk: K rounds of one max, the slots past K left NO_KEY (only K are read)."""
        if USE_TOPK:
            top = tl.topk(x, K_POW2)
        else:
            slots = tl.arange(0, K_POW2)
            top = tl.full((K_POW2,), NO_KEY, tl.int64)
            for r in range(0, K):
                best = tl.max(x, axis=0)
                top = tl.where(slots == r, best, top)
                x = tl.where(x == best, NO_KEY, x)
        return top

    @triton.jit
    def _lse_top_chunk(part_max_ptr, part_sum_ptr, row_base, p0, NP, run_max, run_sum, top_key, K,
                       K_POW2: tl.constexpr, CHUNK: tl.constexpr, ONLY: tl.constexpr, USE_TOPK: tl.constexpr):
        """One chunk of the merge's phase A: tile partials [p0, p0 + CHUNK) of a row (masked at NP) folded
        into the running (max, sum of exp) and the running top K_POW2 packed (tile max, tile) keys.
        ONLY: this is the row's one chunk (its top is the top; nothing to merge with)."""
        offs = p0 + tl.arange(0, CHUNK)
        ok = offs < NP
        pm = tl.load(part_max_ptr + row_base + offs, mask=ok, other=float("-inf"))
        ps = tl.load(part_sum_ptr + row_base + offs, mask=ok, other=0.0)
        new_max = tl.maximum(run_max, tl.max(pm, axis=0))
        new_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(ps * tl.exp(pm - new_max), axis=0)
        chunk_top = _top_keys(tl.where(ok, _pack_key(pm, offs), NO_KEY), K, K_POW2, USE_TOPK)
        if ONLY:
            new_top = chunk_top
        else:  # the running top and this chunk's, side by side
            new_top = _top_keys(tl.reshape(tl.join(top_key, chunk_top), (2 * K_POW2,)), K, K_POW2, USE_TOPK)
        return new_max, new_sum, new_top

    @triton.jit
    def _merge_topk_kernel(
        part_key_ptr, part_max_ptr, part_sum_ptr, order_ptr,
        ids_ptr, logprobs_ptr, groups_ptr, offsets_ptr,
        NP, NP_MAIN, KT, K, V, A, G, stride_gm,
        K_POW2: tl.constexpr, KT_POW2: tl.constexpr, BLOCK_P: tl.constexpr, TAIL_P: tl.constexpr,
        ONE_CHUNK: tl.constexpr, USE_TOPK: tl.constexpr, PDL: tl.constexpr,
        FOLD_ROWS: tl.constexpr, FOLD_COLS: tl.constexpr, IDS_IN_KEYS: tl.constexpr,
        CHECK_GROUPS: tl.constexpr, A_POW2: tl.constexpr,
    ):
        """One program per row (one warp where the vectors fit: every reduction is warp shuffles).
        Only the K tiles with the largest maxima can hold the row's top K (K tile maxima are
        themselves logits at or above the K-th largest), so phase A picks those tiles (their packed
        (max, tile) keys) while it sums the log-sum-exp, and phase B takes the top K of their K x KT
        candidate keys instead of all A*NT*KT of them."""
        if PDL:
            gdc_wait()  # every partial written and visible
        m = tl.program_id(0)
        slots = tl.arange(0, K_POW2)
        # phase A: online log-sum-exp over the row's NP tile partials (finite start: no inf - inf), in
        # chunks of BLOCK_P, then one TAIL_P chunk (300 tiles: 256 + 64, not one chunk of 512)
        run_max = tl.full((), -1.0e30, tl.float32)
        run_sum = tl.full((), 0.0, tl.float32)
        top_key = tl.full((K_POW2,), NO_KEY, tl.int64)
        for p0 in range(0, NP_MAIN, BLOCK_P):
            run_max, run_sum, top_key = _lse_top_chunk(part_max_ptr, part_sum_ptr, m * NP, p0, NP, run_max, run_sum,
                                                       top_key, K, K_POW2, BLOCK_P, ONE_CHUNK, USE_TOPK)
        if TAIL_P > 0:
            run_max, run_sum, top_key = _lse_top_chunk(part_max_ptr, part_sum_ptr, m * NP, NP_MAIN, NP, run_max,
                                                       run_sum, top_key, K, K_POW2, TAIL_P, ONE_CHUNK, USE_TOPK)
        lse = run_max + tl.log(run_sum)
        # the row's validity (module docstring): a finite lse, and (CHECK_GROUPS) A distinct group ids
        # in [0, G) whose sizes add up to K tokens at least. An invalid row's partials may be unwritten
        # (the partials kernel skips ids out of range and a repeat's second slot): all reads below stay
        # inside the buffers, and what they return is replaced by (-1, NaN).
        row_ok = (lse == lse) & (lse < float("inf")) & (lse > float("-inf"))
        if CHECK_GROUPS:
            a = tl.arange(0, A_POW2)
            g = tl.load(groups_ptr + m * stride_gm + a, mask=a < A, other=0).to(tl.int32)
            in_range = (g >= 0) & (g < G)
            used = (a < A) & in_range
            g_safe = tl.where(used, g, 0)
            sizes = tl.load(offsets_ptr + g_safe + 1, mask=used, other=0) - tl.load(offsets_ptr + g_safe, mask=used,
                                                                                     other=0)
            repeats = (g[:, None] == g[None, :]) & (a[:, None] < a[None, :]) & (a[None, :] < A)
            n_bad = tl.sum(((a < A) & ~in_range).to(tl.int32), axis=0) + tl.sum(tl.sum(repeats.to(tl.int32), axis=1),
                                                                                 axis=0)
            row_ok = row_ok & (n_bad == 0) & (tl.sum(sizes, axis=0) >= K)

        # phase B: a tile picked with max -inf (fewer than K non-empty tiles) is empty
        tile = _key_row(top_key)
        tile_ok = (slots < K) & (top_key != NO_KEY) & (_key_value(top_key) > float("-inf"))
        if FOLD_ROWS == 0:
            cols = tl.arange(0, KT_POW2)
            cand = (m * NP + tile[:, None]) * KT + cols[None, :]
            cand_key = tl.load(part_key_ptr + cand, mask=tile_ok[:, None] & (cols[None, :] < KT), other=NO_KEY)
            out_key = _top_keys(tl.reshape(cand_key, (K_POW2 * KT_POW2,)), K, K_POW2, USE_TOPK)
        else:
            # the tiles come in descending order of their maxima and each tile's keys descend, so the
            # j-th key of the i-th tile has i tile maxima and j keys of its own above it: only i + j < K
            # can be in the top K. That triangle (K(K+1)/2 keys, 55 for K=10) is folded into
            # [FOLD_ROWS, FOLD_COLS]: row r holds tile r's first K - r keys, then tile K-1-r's first
            # r + 1, so the top-k below sorts 128 keys for K=10 instead of 256. Exact in values; among
            # equal logits in different tiles either id may come out, as with phase A's choice.
            r = tl.arange(0, FOLD_ROWS)
            c = tl.arange(0, FOLD_COLS)
            is_lo = slots[None, :] == r[:, None]  # [FOLD_ROWS, K_POW2]: tile r of the ranking
            is_hi = slots[None, :] == (K - 1 - r)[:, None]  # tile K-1-r
            tile_lo = tl.sum(tl.where(is_lo, tile[None, :], 0), axis=1)
            tile_hi = tl.sum(tl.where(is_hi, tile[None, :], 0), axis=1)
            ok_lo = tl.max(tl.where(is_lo, tile_ok[None, :], 0), axis=1) > 0
            ok_hi = tl.max(tl.where(is_hi, tile_ok[None, :], 0), axis=1) > 0
            in_lo = c[None, :] < (K - r)[:, None]
            j = tl.where(in_lo, c[None, :], c[None, :] - (K - r)[:, None])
            ok = tl.where(in_lo, ok_lo[:, None] & (r <= K - 1 - r)[:, None], ok_hi[:, None] & (r < K - 1 - r)[:, None])
            ok = ok & (c[None, :] <= K) & (j < KT)
            cand = (m * NP + tl.where(in_lo, tile_lo[:, None], tile_hi[:, None])) * KT + j
            cand_key = tl.load(part_key_ptr + cand, mask=ok, other=NO_KEY)
            out_key = _top_keys(tl.reshape(cand_key, (FOLD_ROWS * FOLD_COLS,)), K, K_POW2, USE_TOPK)

        out_ok = slots < K
        # clamp: an invalid row's keys may be garbage; its ids are replaced below, the load must stay in bounds
        row_or_id = tl.minimum(tl.maximum(_key_row(out_key), 0), V - 1)
        if IDS_IN_KEYS:
            ids = row_or_id.to(tl.int64)
        else:
            ids = tl.load(order_ptr + row_or_id, mask=out_ok, other=0)
        tl.store(ids_ptr + m * K + slots, tl.where(row_ok, ids, -1), mask=out_ok)
        out_val = tl.where(out_key == NO_KEY, float("-inf"), _key_value(out_key))
        tl.store(logprobs_ptr + m * K + slots, tl.where(row_ok, out_val - lse, float("nan")), mask=out_ok)


# eager launches past a shape's first call skip Triton's per-call binding (_launch.py); the names are
# the parameters that change between calls, the plan's meta dicts fix the rest
if triton is not None:
    _launch_partials = Launcher(_grouped_head_partials_kernel, dynamic=(
        "hidden_ptr", "weight_ptr", "groups_ptr", "offsets_ptr", "order_ptr", "part_key_ptr", "part_max_ptr",
        "part_sum_ptr", "stride_hm", "stride_wv", "stride_gm", "h_desc", "w_desc", "TMA"))
    _launch_merge = Launcher(_merge_topk_kernel, dynamic=(
        "part_key_ptr", "part_max_ptr", "part_sum_ptr", "order_ptr", "ids_ptr", "logprobs_ptr", "groups_ptr",
        "offsets_ptr", "stride_gm"))


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int
    programs_per_sm: int = 2  # persistent grid: at most this many programs per multiprocessor
    gather: bool = True  # row blocks of chosen rows only (M <= GATHER_MAX_M) rather than rows in order
    # the merge by programmatic dependent launch where supported (CUDA sm_90+, a triton with gdc_wait;
    # CORAL_FAST_HEAD_PDL=0 switches it off): it launches while the partials kernel runs
    pdl: bool = True
    # the candidate keys carry original token ids (the partials kernel loads `order` for its tile): the
    # merge then ends without an `order` lookup, one dependent memory round trip less. Faster with
    # 16-row blocks, slower with 64-row blocks (more registers in the epilogue)
    ids_in_keys: bool = False
    # row blocks of rows in order load their tiles by TMA where the tensors allow it (16-byte aligned
    # rows): no address arithmetic in the K loop, fewer registers (193 -> 120 with 64-row blocks, sm_90)
    tma: bool = True


@functools.lru_cache(maxsize=256)
def default_config(M: int, H: int, k: int) -> KernelConfig:
    """Config by a small heuristic on M and H (no autotune: nothing to warm up before graph capture),
    picked from `coral-fast bench head --sweep` on the H100 and H200 (docs/head.md).

    Small M: one 16-row block, wide vocab tiles, original ids in the keys. Larger M: one 64-row block of
    rows in order (faster than gathering the chosen rows, at shared and random routing). Small H
    (Gemma's 640): a tile's stream is a few K steps, so three programs an SM overlap one tile's
    epilogue with another's stream; TMA tiles there (at large H, M <= 16, pointer loads were faster).
    """
    if M <= 16:
        return KernelConfig(16, 128, 128, num_warps=4, num_stages=3, programs_per_sm=2 if H >= 2048 else 3,
                            gather=False, ids_in_keys=True, tma=H < 2048)
    if H >= 2048:
        return KernelConfig(64, 64, 128, num_warps=4, num_stages=3, programs_per_sm=2, gather=False)
    return KernelConfig(64, 64, 128, num_warps=4, num_stages=2, programs_per_sm=3, gather=False)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _merge_chunks(n_tiles: int, k_pow2: int, merge_block_p: int = MERGE_BLOCK_P) -> tuple[int, int, int]:
    """The merge's phase-A chunking of a row's n_tiles partials: (BLOCK_P, NP_MAIN, TAIL_P): chunks of
    BLOCK_P over [0, NP_MAIN) (the last may be padded), then one chunk of TAIL_P (0: none). A bitonic
    top-k costs about its length, so 152 tiles go as 128 + 32 rather than one padded 256; a tail of
    more than a quarter chunk is cheaper padded into one chunk."""
    block = max(k_pow2, min(merge_block_p, 1 << (max(1, n_tiles).bit_length() - 1)))
    n_main, rem = divmod(n_tiles, block)
    if n_main == 0:
        return block, block, 0
    if rem == 0:
        return block, n_main * block, 0
    tail = max(k_pow2, _next_pow2(rem))
    if n_main == 1 and tail > block // 4 and _next_pow2(n_tiles) <= merge_block_p:
        return _next_pow2(n_tiles), _next_pow2(n_tiles), 0
    if tail >= block:
        return block, (n_main + 1) * block, 0
    return block, n_main * block, tail


def _fold_shape(k: int, k_pow2: int, kt_pow2: int) -> tuple[int, int]:
    """The merge's folded candidate triangle [rows, cols] (see _merge_topk_kernel), or (0, 0) where
    folding does not shrink the [k_pow2, kt_pow2] block: k <= 3 (tl.topk needs k_pow2 = 16 keys at
    least) and k a power of two of 16 or more (the fold is as large)."""
    rows, cols = _next_pow2((k + 1) // 2), _next_pow2(k + 1)
    if rows * cols >= k_pow2 * kt_pow2 or rows * cols < k_pow2:
        return 0, 0
    return rows, cols


def _kept_slots(kt: int) -> int:
    """Slots of the tile epilogue's register buffer of round keys: KT rounded up to a power of two, or
    0 (a store a round) above 16, where the buffer's registers would cost more than the stores."""
    slots = max(2, _next_pow2(kt))
    return slots if slots <= 16 else 0


def _tma_ok(cfg: KernelConfig, gather: bool, hidden: Tensor, weight: Tensor) -> bool:
    """Whether the partials kernel loads its tiles by TMA: asked for, row blocks of rows in order (TMA
    cannot gather rows), and tensors a descriptor can describe (unit inner stride, 16-byte aligned
    base and rows)."""
    if not (cfg.tma and not gather and TensorDescriptor is not None):
        return False
    for t in (hidden, weight):
        if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


def _weight_descriptor(weight: Tensor, block: list, cache: dict | None):
    """The weight's TMA descriptor, built once per (weight, block) when the caller keeps a `cache` (the
    head does: the weight never changes between calls, the descriptor's Python object costs host time)."""
    if cache is None:
        return TensorDescriptor.from_tensor(weight, block)
    key = tuple(block)
    desc = cache.get(key)
    if desc is None or desc.base is not weight:  # the module was moved or re-laid: rebuild
        desc = cache[key] = TensorDescriptor.from_tensor(weight, block)
    return desc


def _num_programs_cap(device: torch.device, per_sm: int) -> int:
    if device.type != "cuda":
        return 3  # interpreter: few programs, so the persistent loop runs several items each
    return cuda_properties(device).multi_processor_count * per_sm


@functools.lru_cache(maxsize=None)
def _pdl_supported(device: torch.device) -> bool:
    """CUDA (not ROCm, not the interpreter), sm_90+, a triton with gdc_wait / launch_pdl, not switched
    off by CORAL_FAST_HEAD_PDL=0 (read once)."""
    if not (HAS_PDL and device.type == "cuda" and torch.version.hip is None):
        return False
    if os.environ.get("CORAL_FAST_HEAD_PDL", "1") == "0":
        return False
    return cuda_properties(device).major >= 9


def _use_topk(device: torch.device) -> bool:
    """The merge's bitonic tl.topk: on CUDA where triton has it; in the interpreter only when a test
    sets INTERPRETER_TOPK (read per call, so that tests can switch it)."""
    return HAS_TOPK and (device.type == "cuda" or INTERPRETER_TOPK)


def _use_pdl(cfg: KernelConfig, device: torch.device) -> bool:
    """Programmatic dependent launch for the merge: asked for by the config and supported here."""
    return cfg.pdl and _pdl_supported(device)


@dataclass(frozen=True)
class _Plan:
    """Everything a call derives from its static shapes, computed once per shape (the host time of an
    eager call is the point: see docs/head.md)."""

    cfg: KernelConfig
    block_k: int
    n_tiles: int  # A * NT, the partials a row
    KT: int
    num_partials: int  # M * A * NT
    grid: tuple
    pdl: bool
    gather: bool
    partials_meta: dict  # the partials kernel's scalar and constexpr arguments past the pointers
    merge_meta: dict  # the merge kernel's


@functools.lru_cache(maxsize=1024)
def _merge_meta(n_tiles: int, KT: int, k: int, V: int, A: int, G: int, pdl: bool, ids_in_keys: bool,
                check_groups: bool, use_topk: bool, merge_block_p: int) -> dict:
    K_POW2, KT_POW2 = max(16, _next_pow2(k)), max(16, _next_pow2(KT))
    # tl.topk needs k <= the vector's length; one warp (shuffles only) while the largest vector is at
    # most 16 int64 keys a lane (4 warps were slower at M=1), else 4 warps
    block_p, np_main, tail_p = _merge_chunks(n_tiles, K_POW2, merge_block_p)
    fold_rows, fold_cols = _fold_shape(k, K_POW2, KT_POW2)
    merge_warps = 1 if max(block_p, tail_p, fold_rows * fold_cols if fold_rows else K_POW2 * KT_POW2) <= 512 else 4
    # the merge alone is launched as a programmatic dependent (the attribute sits on the dependent
    # launch): the partials kernel is launched plainly, so it never starts before its own producer
    return dict(
        NP=n_tiles, NP_MAIN=np_main, KT=KT, K=k, V=V, A=A, G=G,
        K_POW2=K_POW2, KT_POW2=KT_POW2, BLOCK_P=block_p, TAIL_P=tail_p,
        ONE_CHUNK=np_main == block_p and tail_p == 0,
        USE_TOPK=use_topk, PDL=pdl,
        FOLD_ROWS=fold_rows, FOLD_COLS=fold_cols, IDS_IN_KEYS=ids_in_keys,
        CHECK_GROUPS=check_groups, A_POW2=max(2, _next_pow2(A)),
        num_warps=merge_warps, **({"launch_pdl": True} if pdl else {}),
    )


@functools.lru_cache(maxsize=1024)
def _plan(M: int, H: int, V: int, A: int, G: int, k: int, max_group_size: int, device: torch.device,
          config: KernelConfig | None, use_topk: bool, merge_block_p: int) -> _Plan:
    cfg = config or default_config(M, H, k)
    block_k = min(cfg.block_k, max(16, _next_pow2(H)))
    NT = -(-max_group_size // cfg.block_v)
    NMB = -(-M // cfg.block_m)
    KT = min(k, cfg.block_v)
    pdl = _use_pdl(cfg, device)
    MA = M * A
    G_POW2 = max(16, _next_pow2(G))
    gather = cfg.gather and M <= GATHER_MAX_M
    # at most min(G, M*A) groups are active: known on the host, so the grid needs no sync
    max_items = min(G, MA) * NT * NMB
    grid = (min(max_items, _num_programs_cap(device, cfg.programs_per_sm)),)
    partials_meta = dict(
        M=M, H=H, A=A, G=G, NT=NT, NMB=NMB, KT=KT,
        BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_K=block_k,
        A_POW2=_next_pow2(A), G_POW2=G_POW2, BLOCK_P=min(max(16, _next_pow2(MA)), max(16, 8192 // G_POW2)),
        GATHER=gather, M_POW2=max(16, _next_pow2(M)),
        EVEN_K=(H % block_k == 0), DOT_FP32=dot_needs_fp32(device),
        PDL=pdl, ONE_ROW=(M == 1), ONE_BLOCK=(NMB == 1 and not gather), IDS_IN_KEYS=cfg.ids_in_keys,
        KEPT_SLOTS=_kept_slots(KT), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    merge_meta = _merge_meta(A * NT, KT, k, V, A, G, pdl, cfg.ids_in_keys, True, use_topk, merge_block_p)
    return _Plan(cfg, block_k, A * NT, KT, M * A * NT, grid, pdl, gather, partials_meta, merge_meta)


def grouped_head_topk_triton(
    hidden: Tensor, weight: Tensor, offsets: Tensor, order: Tensor, groups: Tensor, k: int,
    max_group_size: int, config: KernelConfig | None = None, out: tuple[Tensor, Tensor] | None = None,
    _merge: bool = True, desc_cache: dict | None = None, direct: bool = True,
) -> tuple[Tensor, Tensor]:
    """Launch the two kernels (`_merge=False`: the first only, for the benchmark's breakdown). Shapes and
    dtypes are assumed checked (GroupedLMHead.topk); bad values give invalid rows (module docstring).
    Eager CUDA calls skip Triton's per-call launcher work after a shape's first call (`_launch.py`);
    direct=False keeps Triton's launch (the custom op, captured calls always do).

    hidden: [M, H] (weight's dtype); weight: [V, H] re-laid, rows contiguous; offsets: [G+1] int64;
    order: [V] int64; groups: [M, A] int32/int64, contiguous rows; max_group_size: host int.
    out: optional (ids [M, k] int64, logprobs [M, k] fp32) to write into. desc_cache: a dict the caller
    keeps for the weight's TMA descriptors.
    """
    if triton is None:
        raise RuntimeError("impl='triton' needs the triton package")
    if k > MAX_K:
        raise ValueError(f"the Triton grouped head supports k <= {MAX_K}, got k={k}")
    M, H = hidden.shape
    A = groups.shape[1]
    device = hidden.device
    plan = _plan(M, H, weight.shape[0], A, offsets.numel() - 1, k, max_group_size, device, config,
                 _use_topk(device), MERGE_BLOCK_P)
    cfg = plan.cfg
    # workspace: packed int64 candidate keys; tile max and tile sum side by side
    NP = plan.num_partials
    part_key = torch.empty(NP * plan.KT, device=device, dtype=torch.int64)
    stats = torch.empty(2 * NP, device=device, dtype=torch.float32)
    part_sum = stats[NP:]
    if out is None:
        ids = torch.empty((M, k), device=device, dtype=torch.int64)
        logprobs = torch.empty((M, k), device=device, dtype=torch.float32)
    else:
        ids, logprobs = out
    h_desc = w_desc = None
    if _tma_ok(cfg, plan.gather, hidden, weight):
        h_desc = TensorDescriptor.from_tensor(hidden, [cfg.block_m, plan.block_k])
        w_desc = _weight_descriptor(weight, [cfg.block_v, plan.block_k], desc_cache)
    _launch_partials(plan.grid, plan.partials_meta, hidden, weight, groups, offsets, order, part_key, stats,
                     part_sum, hidden.stride(0), weight.stride(0), groups.stride(0), h_desc, w_desc,
                     h_desc is not None, device=device, direct=direct)
    if _merge:
        _launch_merge((M,), plan.merge_meta, part_key, stats, part_sum, order, ids, logprobs, groups, offsets,
                      groups.stride(0), device=device, direct=direct)
    return ids, logprobs


def merge_tile_partials(
    part_key: Tensor, part_max: Tensor, part_sum: Tensor, order: Tensor, ids: Tensor, logprobs: Tensor,
    n_tiles: int, KT: int, V: int, pdl: bool = False, ids_in_keys: bool = False,
    groups: Tensor | None = None, offsets: Tensor | None = None,
) -> None:
    """Launch the merge (the second kernel) on tile partials, one program per row (what the tests call
    on hand-made partials; grouped_head_topk_triton launches it from its plan).

    part_key: [M * n_tiles * KT] int64, each tile's top-KT packed keys in descending order; part_max,
    part_sum: [M * n_tiles] fp32, each tile's max and sum of exp(logit - max); order: [V] int64 (read
    only where the keys name re-laid rows, `ids_in_keys=False`). Writes ids [M, k] int64 and logprobs
    [M, k] fp32, k = ids.shape[1]. groups [M, A] and offsets [G+1]: the rows' groups, checked per row
    (invalid rows: module docstring); without them only the log-sum-exp is checked.
    """
    M, k = ids.shape
    for name, t in (("part_key", part_key), ("part_max", part_max), ("part_sum", part_sum), ("ids", ids),
                    ("logprobs", logprobs)):
        if not t.is_contiguous():  # the kernel indexes flat memory: a strided view would be misread
            raise ValueError(f"merge_tile_partials: {name} must be contiguous")
    check_groups = groups is not None
    meta = _merge_meta(n_tiles, KT, k, V, groups.shape[1] if check_groups else 1,
                       offsets.numel() - 1 if check_groups else 0, pdl, ids_in_keys, check_groups,
                       _use_topk(ids.device), MERGE_BLOCK_P)
    _merge_topk_kernel[(M,)](
        part_key, part_max, part_sum, order, ids, logprobs,
        groups if check_groups else ids, offsets if check_groups else ids,
        stride_gm=groups.stride(0) if check_groups else 0, **meta,
    )


# ---------------------------------------------------------------------------------------------------
# Op and dispatch
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("coral_fast::grouped_head_topk", mutates_args=())
def grouped_head_topk_op(hidden: Tensor, weight: Tensor, offsets: Tensor, order: Tensor, groups: Tensor, k: int,
                         max_group_size: int) -> tuple[Tensor, Tensor]:
    """The launches as one opaque op for torch.compile (Inductor fuses the code around it; nothing is
    read back, so a compiled caller can still be captured). Arguments as grouped_head_topk_triton."""
    return grouped_head_topk_triton(hidden, weight, offsets, order, groups.contiguous(), k, max_group_size,
                                    direct=False)


@grouped_head_topk_op.register_fake
def _(hidden, weight, offsets, order, groups, k, max_group_size):
    M = hidden.shape[0]
    return hidden.new_empty((M, k), dtype=torch.int64), hidden.new_empty((M, k), dtype=torch.float32)


def grouped_head_topk(
    hidden: Tensor, weight: Tensor, offsets: Tensor, order: Tensor, groups: Tensor, k: int,
    max_group_size: int, impl: str = "auto", config: KernelConfig | None = None,
    out: tuple[Tensor, Tensor] | None = None, desc_cache: dict | None = None, validate=None,
) -> tuple[Tensor, Tensor]:
    """Dispatch: impl "auto" (Triton on CUDA, reference elsewhere), "triton" or "reference".

    Eager CUDA calls replay a CUDA graph of the launches after a key's second call (`_replay.py`):
    hidden and groups are copied in, the weight, offsets and order are read in place. validate(replaying):
    the caller's checks, run here (in full unless a replay serves the call: `EagerGraphs.__call__`)."""
    triton = resolve_impl(impl, hidden.device) == "triton"
    if triton and not (torch.compiler.is_compiling() and config is None):
        def launch(streamed, resident, out):
            (hidden, groups), (weight, offsets, order) = streamed, resident
            return grouped_head_topk_triton(hidden, weight, offsets, order, groups, k, max_group_size, config,
                                            out, desc_cache=desc_cache)

        return eager_graphs("grouped_head_topk", launch, (hidden, groups), (weight, offsets, order),
                            (k, max_group_size, config), out, validate)
    if validate is not None:
        validate(False)
    if triton:  # under torch.compile: one opaque op
        ids, logprobs = grouped_head_topk_op(hidden, weight, offsets, order, groups, k, max_group_size)
    else:
        ids, logprobs = grouped_head_topk_reference(hidden, weight, offsets, order, groups, k)
    if out is None:
        return ids, logprobs
    out[0].copy_(ids)
    out[1].copy_(logprobs)
    return out
