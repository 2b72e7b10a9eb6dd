"""Tree attention: T draft-tree queries against a KV cache of L prefix tokens plus the T tree tokens.

    out = tree_attention(q, k, v, tree_mask)
    q:    [B, Hq, T, D]          the tree tokens' queries (Hq a multiple of Hkv: GQA)
    k, v: [B, Hkv, L + T, D]     L prefix keys (all visible), then the T tree keys
          (or static cache buffers [B, Hkv, S_max, D] with `kv_len`, see below)
    tree_mask: [T, T] or [B, T, T] bool (mask[i, j]: j is i or an ancestor of i), or a DraftTree
    out:  [B, Hq, T, D]

Design (flash-decoding with a tree mask):
- grid (B * Hkv, splits of the key sequence, blocks of query rows). A program loads the queries of
  all Hq/Hkv heads of its GQA group for all T tree tokens as one [BLOCK_M, D] tile, so each K/V
  block is read once for the whole group (rows = head-major (head, token) pairs).
- Long prefixes are split across programs; each writes a partial (out, log-sum-exp) and a second
  small kernel merges them. With one split the first kernel writes the output directly.
- The prefix runs unmasked (no per-element work besides the sliding window); the tree mask, packed
  as 32-bit words per row, is applied only to the last T keys.
- Graph friendly: the grid depends on static shapes only (S_max with `kv_len`), programs past the
  valid length exit early, and check=False skips every validation that reads values back.

The PyTorch reference (`tree_attention_reference`) lives beside the kernel and defines the semantics;
`pack_mask_bits` (the kernel's mask layout) lives here too; `repeat_kv` (GQA for PyTorch code, torch only) in `_gqa.py`.
Op: `coral_fast::tree_attention` (torch.library.custom_op below) is what `torch.compile` sees of the
launches. Measured: bench/results/attention_h100.md.
"""
from __future__ import annotations

import functools
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from coral_fast.kernels._dispatch import cuda_properties, dot_needs_fp32, resolve_impl
from coral_fast.kernels._gqa import repeat_kv
from coral_fast.kernels._launch import Launcher
from coral_fast.kernels._replay import eager_graphs

__all__ = ["tree_attention", "tree_attention_reference", "pack_mask_bits", "pack_tree_mask", "repeat_kv",
           "TreeAttentionConfig", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
MAX_TREE_TOKENS = 128
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# helpers and reference
# ----------------------------------------------------------------------------------------------
def pack_mask_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean mask along its last dim into 32-bit words: [..., T] bool -> [..., ceil(T/32)] int32.

    Bit c % 32 of word c // 32 holds mask[..., c] (the layout the kernel reads). Tensor ops only (no
    host sync).
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    num_cols = mask.shape[-1]
    num_words = max(1, -(-num_cols // 32))
    padded = torch.zeros(*mask.shape[:-1], num_words * 32, dtype=torch.int64, device=mask.device)
    padded[..., :num_cols] = mask.to(torch.int64)
    weights = torch.bitwise_left_shift(
        torch.ones(32, dtype=torch.int64, device=mask.device), torch.arange(32, device=mask.device)
    )
    words = (padded.view(*mask.shape[:-1], num_words, 32) * weights).sum(-1)
    # two's-complement wrap of bit 31 into int32
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def pack_tree_mask(tree_mask: torch.Tensor) -> torch.Tensor:
    """[T, T] or [B, T, T] bool -> [1 or B, T, ceil(T/32)] int32 bit words (bit c%32 of word c//32)."""
    bits = pack_mask_bits(tree_mask)
    return bits if bits.dim() == 3 else bits.unsqueeze(0)


def _visibility(tree_mask, batch, num_queries, num_slots, kv_len, window, query_positions, device):
    """[B, T, S] bool: which key slots each tree query sees (the semantics of the kernel)."""
    if kv_len is None:
        n_keys = torch.full((batch,), num_slots, dtype=torch.int64, device=device)
    elif isinstance(kv_len, int):
        n_keys = torch.full((batch,), kv_len, dtype=torch.int64, device=device)
    else:
        n_keys = kv_len.to(device=device, dtype=torch.int64)
    prefix_len = n_keys - num_queries  # [B]
    slots = torch.arange(num_slots, device=device)
    mask_b = tree_mask if tree_mask.dim() == 3 else tree_mask.unsqueeze(0)
    mask_b = mask_b.expand(batch, num_queries, num_queries)
    tree_col = (slots[None, :] - prefix_len[:, None]).clamp(0, num_queries - 1)  # [B, S]
    in_tree = mask_b.gather(2, tree_col[:, None, :].expand(batch, num_queries, num_slots))
    is_prefix = slots[None, :] < prefix_len[:, None]  # [B, S]
    is_valid = slots[None, :] < n_keys[:, None]
    prefix_visible = is_prefix[:, None, :]
    if window is not None:
        pos = query_positions if query_positions.dim() == 2 else query_positions.unsqueeze(0)
        pos = pos.to(device=device, dtype=torch.int64).expand(batch, num_queries)
        prefix_visible = prefix_visible & (slots[None, None, :] > (pos[:, :, None] - window))
    tree_visible = (~is_prefix & is_valid)[:, None, :] & in_tree
    return prefix_visible | tree_visible


def tree_attention_reference(q, k, v, tree_mask, scale=None, kv_len=None, window=None, query_positions=None):
    """PyTorch reference, computed in float32: same arguments and result as `tree_attention`."""
    if not isinstance(tree_mask, torch.Tensor):
        tree_mask = tree_mask.mask
    batch, num_q_heads, num_queries, head_dim = q.shape
    num_kv_heads, num_slots = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    group = num_q_heads // num_kv_heads
    visible = _visibility(tree_mask.to(q.device), batch, num_queries, num_slots, kv_len, window, query_positions, q.device)
    kf = repeat_kv(k.float(), group)
    vf = repeat_kv(v.float(), group)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vf).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------
class TreeAttentionConfig:
    """Launch parameters; `for_shape` picks them from static shapes only (no autotuning, graph safe)."""

    def __init__(self, block_m, block_n, num_warps, num_stages, num_splits):
        self.block_m, self.block_n = block_m, block_n
        self.num_warps, self.num_stages, self.num_splits = num_warps, num_stages, num_splits

    def __repr__(self):
        return (
            f"TreeAttentionConfig(block_m={self.block_m}, block_n={self.block_n}, num_warps={self.num_warps}, "
            f"num_stages={self.num_stages}, num_splits={self.num_splits})"
        )

    @staticmethod
    def for_shape(batch, num_kv_heads, rows, num_slots, head_dim, device, dynamic_len=False, block_m=None,
                  block_n=None, num_warps=None, num_stages=None, num_splits=None, min_split_keys=None):
        """dynamic_len: the key count is a device tensor (`kv_len`) and `num_slots` the static buffer it
        lies in, so the grid covers the whole buffer and the programs past the length exit at once."""
        programs_64 = batch * num_kv_heads * triton.cdiv(rows, 64)
        if (block_m is None and num_warps is None and rows >= 128 and head_dim <= 128
                and programs_64 >= _num_sms(device) and num_slots >= 4096):
            # the batch alone fills the GPU (no splits): the work is matmul-bound, and 128-row tiles
            # with 8 warps were faster at B=8, T=64, L=8192
            block_m, num_warps = 128, 8
        short = dynamic_len and programs_64 * 4 <= _num_sms(device)
        if short and block_m is None and num_warps is None:
            # a draft tree over a loop's static cache (batch 1, few KV heads): few programs, so 16-row
            # tiles to have more of them, and two stages (faster at the SmolLM2 and Gemma 3 shapes)
            block_m, block_n, num_stages = 16, block_n or 64, num_stages or 2
        if block_m is None:
            block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
        if block_n is None:
            block_n = 32 if head_dim >= 256 else 64
        if num_warps is None:
            num_warps = 8 if head_dim >= 256 and block_m >= 64 else 4
        if num_stages is None:
            num_stages = 2 if head_dim >= 256 else 3
        if num_splits is None:
            # one wave: splits only until every SM has a program (more splits than that cost a second
            # wave and a bigger merge)
            programs = batch * num_kv_heads * triton.cdiv(rows, block_m)
            if dynamic_len:
                # the length is unknown here and often far below the buffer (a loop's static cache):
                # short splits (about 8K key elements: 128 keys at D=64, one block at D=256) so that a
                # short prefix is spread over programs too, and up to four waves of the buffer's
                # splits, since those past the length return at once
                min_keys = min_split_keys or max(block_n, triton.cdiv(8192 // head_dim, block_n) * block_n)
                waves = 4
            else:
                min_keys = min_split_keys or 4 * block_n
                waves = 1
            max_splits = max(1, triton.cdiv(num_slots, min_keys))
            num_splits = max(1, min(max_splits, waves * _num_sms(device) // programs))
        split_keys = triton.cdiv(triton.cdiv(num_slots, num_splits), block_n) * block_n
        num_splits = triton.cdiv(num_slots, split_keys)
        cfg = TreeAttentionConfig(block_m, block_n, num_warps, num_stages, num_splits)
        cfg.split_keys = split_keys
        return cfg


# the rule depends on static shapes only: decide once per shape (saves host time on eager calls)
_config_for_shape = functools.lru_cache(maxsize=1024)(TreeAttentionConfig.for_shape)

_LAST_KERNEL = None


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    return cuda_properties(device).multi_processor_count


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attend_block(
    acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, offs_n, qk_scale,
    key_end, prefix_len, bits_row_ptrs, pos, window,
    MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One [BLOCK_N] key block of the online softmax for a [BLOCK_M, D] query tile.

    MASKED=False: a full block of prefix keys (only the sliding window can hide keys).
    MASKED=True: the ragged end of the split: bounds, prefix/tree boundary and the packed tree mask.
    """
    keys = start_n + offs_n  # [BLOCK_N]
    if MASKED:
        key_ok = keys < key_end
        k = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if DOT_FP32:
        k = k.to(tl.float32)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale
    if HAS_WINDOW:
        # prefix slot index == token position: key j visible iff j > pos - window (tree keys exempt)
        visible = (keys[None, :] > (pos[:, None] - window)) | (keys[None, :] >= prefix_len)
        s = tl.where(visible, s, float("-inf"))
    if MASKED:
        tree_col = keys - prefix_len  # [BLOCK_N]; < 0 for prefix keys
        in_tree = tree_col >= 0
        col = tl.where(in_tree, tree_col, 0)
        words = tl.load(bits_row_ptrs[:, None] + (col >> 5)[None, :], mask=in_tree[None, :] & (keys < key_end)[None, :], other=0)
        bit = (words >> (col & 31)[None, :]) & 1
        visible = ((tree_col < 0)[None, :] | (bit != 0)) & (keys < key_end)[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # rows that have seen no visible key yet keep m = -inf: shift by 0 so exp2 gives 0, not NaN
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_FP32:
        pv = p
        v = v.to(tl.float32)
    else:
        pv = p.to(v.dtype)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(pv, v)
    return acc, m_new, l_i


@triton.jit
def _tree_attention_split_kernel(
    q_ptr, k_ptr, v_ptr, bits_ptr, kv_len_ptr, pos_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_bits_b, stride_bits_t,
    stride_pos_b,
    stride_ob, stride_oh, stride_ot,
    num_kv_heads, num_queries, num_keys_static, split_keys, num_splits, qk_scale, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KV_LEN: tl.constexpr, HAS_WINDOW: tl.constexpr, DIRECT: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    # the row blocks of one (sequence, kv head, split) are launched next to each other so that they
    # run together and read each K/V block from L2 after the first one fetched it from HBM
    pid_m = tl.program_id(0)
    pid_split = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads
    if HAS_KV_LEN:
        num_keys = tl.load(kv_len_ptr + b).to(tl.int32)
    else:
        num_keys = num_keys_static
    lo = pid_split * split_keys
    if lo >= num_keys:  # static grid over S_max: splits past this sequence's length do nothing
        return
    hi = tl.minimum(lo + split_keys, num_keys)
    prefix_len = num_keys - num_queries

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * num_queries
    head = kv_head * GROUP + rows // num_queries
    token = rows % num_queries
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = q_ptr + b * stride_qb + head[:, None] * stride_qh + token[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    bits_row_ptrs = bits_ptr + b * stride_bits_b + token * stride_bits_t
    if HAS_WINDOW:
        pos = tl.load(pos_ptr + b * stride_pos_b + token, mask=row_ok, other=0).to(tl.int32)
        # skip whole blocks that no row of this tile can see
        first_visible = tl.min(tl.where(row_ok, pos, 2147483647), 0) - window + 1
        lo_window = (tl.maximum(first_visible, 0) // BLOCK_N) * BLOCK_N
        start = tl.maximum(lo, tl.minimum(lo_window, (prefix_len // BLOCK_N) * BLOCK_N))
    else:
        pos = token  # unused
        start = lo

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh + offs_d[None, :]
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh + offs_d[None, :]

    # full blocks of prefix keys: no bounds and no tree mask
    full_end = tl.minimum(hi, prefix_len)
    full_end = tl.where(full_end > start, start + ((full_end - start) // BLOCK_N) * BLOCK_N, start)
    for start_n in range(start, full_end, BLOCK_N):
        k_ptrs = k_base + (start_n + offs_n)[:, None] * stride_ks
        v_ptrs = v_base + (start_n + offs_n)[:, None] * stride_vs
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, offs_n, qk_scale, hi, prefix_len, bits_row_ptrs, pos,
            window, False, HAS_WINDOW, DOT_FP32, IEEE, BLOCK_N,
        )
    # the rest of the split: the ragged prefix end and the tree block
    for start_n in range(full_end, hi, BLOCK_N):
        k_ptrs = k_base + (start_n + offs_n)[:, None] * stride_ks
        v_ptrs = v_base + (start_n + offs_n)[:, None] * stride_vs
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, offs_n, qk_scale, hi, prefix_len, bits_row_ptrs, pos,
            window, True, HAS_WINDOW, DOT_FP32, IEEE, BLOCK_N,
        )

    if DIRECT:
        out = acc / l_i[:, None]
        o_ptrs = out_ptr + b * stride_ob + head[:, None] * stride_oh + token[:, None] * stride_ot + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        # partials: [B, Hq, splits, T, D] fp32 (normalised) and [B, Hq, splits, T] log2-sum-exp2
        has_mass = l_i > 0
        out = acc / tl.where(has_mass, l_i, 1.0)[:, None]
        lse = tl.where(has_mass, m_i + tl.log2(tl.where(has_mass, l_i, 1.0)), float("-inf"))
        row_part = ((b * (num_kv_heads * GROUP) + head) * num_splits + pid_split) * num_queries + token
        tl.store(part_out_ptr + row_part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
        tl.store(part_lse_ptr + row_part, lse, mask=row_ok)


@triton.jit
def _tree_attention_merge_kernel(
    part_out_ptr, part_lse_ptr, kv_len_ptr, out_ptr,
    stride_ob, stride_oh, stride_ot,
    num_q_heads, num_queries, num_keys_static, split_keys, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, SPLITS_POW2: tl.constexpr, HAS_KV_LEN: tl.constexpr,
):
    """One program per (batch, q head, block of tree tokens): merge the splits' partials by their lse.

    All splits of a token are loaded at once ([BLOCK_T, SPLITS_POW2, D]): independent loads in flight
    instead of a chain of one load per split.
    """
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_q_heads
    head = pid_bh % num_q_heads
    if HAS_KV_LEN:
        num_keys = tl.load(kv_len_ptr + b).to(tl.int32)
    else:
        num_keys = num_keys_static
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    splits = tl.arange(0, SPLITS_POW2)
    offs_d = tl.arange(0, HEAD_DIM)
    token_ok = tokens < num_queries
    active = (splits < num_splits) & (splits * split_keys < num_keys)  # the rest wrote nothing
    valid = token_ok[:, None] & active[None, :]  # [BLOCK_T, SPLITS_POW2]
    row_part = (pid_bh * num_splits + splits[None, :]) * num_queries + tokens[:, None]
    lse = tl.load(part_lse_ptr + row_part, mask=valid, other=float("-inf"))
    lse_max = tl.max(lse, 1)
    shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weight = tl.where(valid, tl.exp2(lse - shift[:, None]), 0.0)
    parts = tl.load(
        part_out_ptr + row_part[:, :, None] * HEAD_DIM + offs_d[None, None, :], mask=valid[:, :, None], other=0.0
    )
    weight_sum = tl.sum(weight, 1)
    out = tl.sum(parts * weight[:, :, None], 1) / tl.where(weight_sum > 0, weight_sum, 1.0)[:, None]
    o_ptrs = out_ptr + b * stride_ob + head * stride_oh + tokens[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=token_ok[:, None])


# eager launches past a shape's first call skip Triton's per-call binding (_launch.py): every
# non-constexpr parameter is passed per call, the cached meta dicts below fix the constexprs
_SPLIT_DYNAMIC = (
    "q_ptr", "k_ptr", "v_ptr", "bits_ptr", "kv_len_ptr", "pos_ptr", "out_ptr", "part_out_ptr", "part_lse_ptr",
    "stride_qb", "stride_qh", "stride_qt", "stride_kb", "stride_kh", "stride_ks", "stride_vb", "stride_vh",
    "stride_vs", "stride_bits_b", "stride_bits_t", "stride_pos_b", "stride_ob", "stride_oh", "stride_ot",
    "num_kv_heads", "num_queries", "num_keys_static", "split_keys", "num_splits", "qk_scale", "window",
)
_MERGE_DYNAMIC = (
    "part_out_ptr", "part_lse_ptr", "kv_len_ptr", "out_ptr", "stride_ob", "stride_oh", "stride_ot",
    "num_q_heads", "num_queries", "num_keys_static", "split_keys", "num_splits",
)
_launch_split = Launcher(_tree_attention_split_kernel, _SPLIT_DYNAMIC)
_launch_merge = Launcher(_tree_attention_merge_kernel, _MERGE_DYNAMIC)


@functools.lru_cache(maxsize=1024)
def _split_meta(group, head_dim, block_m, block_n, has_kv_len, has_window, direct, dot_fp32, ieee, num_warps,
                num_stages) -> dict:
    return dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, HAS_KV_LEN=has_kv_len,
                HAS_WINDOW=has_window, DIRECT=direct, DOT_FP32=dot_fp32, IEEE=ieee, num_warps=num_warps,
                num_stages=num_stages)


@functools.lru_cache(maxsize=1024)
def _merge_meta(head_dim, block_t, splits_pow2, has_kv_len) -> dict:
    return dict(HEAD_DIM=head_dim, BLOCK_T=block_t, SPLITS_POW2=splits_pow2, HAS_KV_LEN=has_kv_len, num_warps=4)


def _tree_attention_triton(q, k, v, mask_bits, scale, kv_len, window, query_positions, out=None, direct=True,
                           **config):
    """Launch the split kernel (and the merge where the keys are split). Arguments checked by
    tree_attention. Eager CUDA calls skip Triton's per-call launcher work after a shape's first call
    (`_launch.py`); direct=False keeps Triton's launch (the custom op; captured calls always do)."""
    batch, num_q_heads, num_queries, head_dim = q.shape
    num_kv_heads, num_slots = k.shape[1], k.shape[2]
    group = num_q_heads // num_kv_heads
    rows = group * num_queries
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    device = q.device
    has_kv_len = isinstance(kv_len, torch.Tensor)
    cfg = _config_for_shape(batch, num_kv_heads, rows, num_slots, head_dim, device, has_kv_len, **config)
    num_keys_static = num_slots if kv_len is None else (kv_len if isinstance(kv_len, int) else num_slots)
    kv_len_arg = kv_len if has_kv_len else mask_bits  # any pointer; unused when HAS_KV_LEN is off
    has_window = window is not None
    if has_window:
        pos = query_positions if query_positions.dim() == 2 else query_positions.unsqueeze(0)
        stride_pos_b = pos.stride(0) if pos.shape[0] > 1 else 0
        pos = pos if pos.stride(-1) == 1 else pos.contiguous()
    else:
        pos, stride_pos_b = mask_bits, 0
    stride_bits_b = mask_bits.stride(0) if mask_bits.shape[0] > 1 else 0
    dot_fp32 = dot_needs_fp32(device)
    ieee = q.dtype == torch.float32 and not dot_fp32
    split_direct = cfg.num_splits == 1
    if split_direct:
        part_out = part_lse = out  # unused
    else:
        part_out = torch.empty(batch, num_q_heads, cfg.num_splits, num_queries, head_dim, dtype=torch.float32, device=device)
        part_lse = torch.empty(batch, num_q_heads, cfg.num_splits, num_queries, dtype=torch.float32, device=device)
    grid = (triton.cdiv(rows, cfg.block_m), cfg.num_splits, batch * num_kv_heads)
    meta = _split_meta(group, head_dim, cfg.block_m, cfg.block_n, has_kv_len, has_window, split_direct, dot_fp32,
                       ieee, cfg.num_warps, cfg.num_stages)
    q_strides, k_strides, v_strides, o_strides = q.stride(), k.stride(), v.stride(), out.stride()
    global _LAST_KERNEL  # the benchmark reads its register/spill counts
    _LAST_KERNEL = _launch_split(
        grid, meta, q, k, v, mask_bits, kv_len_arg, pos, out, part_out, part_lse,
        q_strides[0], q_strides[1], q_strides[2], k_strides[0], k_strides[1], k_strides[2],
        v_strides[0], v_strides[1], v_strides[2], stride_bits_b, mask_bits.stride(1), stride_pos_b,
        o_strides[0], o_strides[1], o_strides[2],
        num_kv_heads, num_queries, num_keys_static, cfg.split_keys, cfg.num_splits,
        scale * _LOG2E, window if has_window else 0, device=device, direct=direct,
    )
    if not split_direct:
        splits_pow2 = triton.next_power_of_2(cfg.num_splits)
        # about 8K fp32 partial values per program
        block_t = max(1, min(triton.next_power_of_2(num_queries), 8192 // (splits_pow2 * head_dim)))
        _launch_merge(
            (triton.cdiv(num_queries, block_t), batch * num_q_heads), _merge_meta(head_dim, block_t, splits_pow2, has_kv_len),
            part_out, part_lse, kv_len_arg, out, o_strides[0], o_strides[1], o_strides[2],
            num_q_heads, num_queries, num_keys_static, cfg.split_keys, cfg.num_splits, device=device, direct=direct,
        )
    return out


# ----------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _validate(q, k, v, tree_mask, mask_bits, kv_len, window, query_positions, check):
    """Shapes, dtypes and devices of a call (no device read-back unless `check` with a kv_len tensor).
    Written for the eager host path: each tensor attribute is read once (an eager call's budget is a few
    microseconds of Python, docs/attention.md)."""
    try:
        batch, num_q_heads, num_queries, head_dim = q.shape
        kv_shape, v_shape = k.shape, v.shape
        dtype, device = q.dtype, q.device
    except (AttributeError, ValueError):
        raise ValueError(f"q must be a 4-D tensor, got {getattr(q, 'shape', type(q))}") from None
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got {getattr(t, 'shape', type(t))}")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q must be float16, bfloat16 or float32, got {dtype}")
    if k.dtype is not dtype or v.dtype is not dtype:
        raise ValueError(f"q, k, v must share a dtype, got {dtype}, {k.dtype}, {v.dtype}")
    if k.device != device or v.device != device:
        raise ValueError(f"q, k, v must be on one device, got {device}, {k.device}, {v.device}")
    if kv_shape != v_shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(kv_shape)} and {tuple(v_shape)}")
    kv_batch, num_kv_heads, num_slots, kv_dim = kv_shape
    if kv_batch != batch or kv_dim != head_dim:
        raise ValueError(f"k/v {tuple(kv_shape)} must be [B={batch}, Hkv, S, D={head_dim}] to match q {tuple(q.shape)}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"Hq={num_q_heads} must be a multiple of Hkv={num_kv_heads}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D={head_dim} not supported (one of {SUPPORTED_HEAD_DIMS})")
    if not 1 <= num_queries <= MAX_TREE_TOKENS:
        raise ValueError(f"T={num_queries} tree tokens: must be 1 to {MAX_TREE_TOKENS}")
    if num_slots < num_queries:
        raise ValueError(f"k/v hold S={num_slots} slots, fewer than the T={num_queries} tree tokens")
    if mask_bits is not None:
        # a DraftTree (or alike): its bits are what the kernel reads, its bool mask is not looked at
        if mask_bits.device != device:
            raise ValueError(f"the tree's mask bits are on {mask_bits.device}, q on {device}")
        if mask_bits.shape != (1, num_queries, (num_queries + 31) // 32) or mask_bits.dtype is not torch.int32:
            raise ValueError(f"the tree has {mask_bits.shape[-2]} nodes (mask bits {tuple(mask_bits.shape)} "
                             f"{mask_bits.dtype}), q has T={num_queries} tree tokens")
    else:
        if tree_mask.dtype is not torch.bool:
            raise ValueError(f"tree_mask must be bool, got {tree_mask.dtype}")
        if tree_mask.device != device:
            raise ValueError(f"tree_mask is on {tree_mask.device}, q on {device}")
        mask_shape = tree_mask.shape
        if mask_shape[-2:] != (num_queries, num_queries) or len(mask_shape) not in (2, 3) or (
            len(mask_shape) == 3 and mask_shape[0] not in (1, batch)
        ):
            raise ValueError(f"tree_mask must be [T, T] or [B, T, T] with T={num_queries}, B={batch}; got {tuple(mask_shape)}")
    if kv_len is not None:
        if isinstance(kv_len, torch.Tensor):
            if kv_len.shape != (batch,) or kv_len.dtype not in _INDEX_DTYPES:
                raise ValueError(f"kv_len must be an int32/int64 tensor [B={batch}], got {kv_len.dtype} {tuple(kv_len.shape)}")
            if kv_len.device != device:
                raise ValueError(f"kv_len is on {kv_len.device}, q on {device}")
        elif isinstance(kv_len, int):
            if not num_queries <= kv_len <= num_slots:
                raise ValueError(f"kv_len={kv_len} must be in [T={num_queries}, S={num_slots}]")
        else:
            raise ValueError(f"kv_len must be None, an int or a [B] tensor, got {type(kv_len)}")
    if window is not None:
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        if query_positions is None:
            raise ValueError("query_positions ([T] or [B, T] prefix_len + depth) is required with window")
    if query_positions is not None:
        if query_positions.shape not in ((num_queries,), (batch, num_queries)):
            raise ValueError(f"query_positions must be [T={num_queries}] or [B={batch}, T], got {tuple(query_positions.shape)}")
        if query_positions.device != device or query_positions.dtype not in _INDEX_DTYPES:
            raise ValueError(f"query_positions must be an int tensor on {device}")
    if check and isinstance(kv_len, torch.Tensor):
        _check_kv_len_values(kv_len, num_queries, num_slots)


def _check_kv_len_values(kv_len: torch.Tensor, num_queries: int, num_slots: int) -> None:
    # a read-back: kv_len is the static-cache path's argument, which runs with check=False
    if bool(((kv_len < num_queries) | (kv_len > num_slots)).any()):
        raise ValueError(f"kv_len values must be in [T={num_queries}, S={num_slots}], got {kv_len.tolist()}")


def mask_problem(tree_mask: torch.Tensor) -> Optional[str]:
    """What makes a bool mask [T, T] or [B, T, T] no tree mask, or None: every node sees itself, only
    earlier nodes, and every ancestor of a node it sees (mask[i, j] and mask[j, l] => mask[i, l]). One
    device read-back."""
    num_queries = tree_mask.shape[-1]
    m = tree_mask.to(torch.float32)
    flags = torch.stack([
        ~tree_mask.diagonal(dim1=-2, dim2=-1).all(),
        torch.triu(tree_mask, 1).any(),
        ((m @ m > 0) & ~tree_mask).any(),
    ]).tolist()
    if flags[0] or flags[1]:
        return (f"tree_mask [{num_queries}, {num_queries}] must be lower-triangular with a True diagonal (each "
                "node sees itself and its ancestors, which precede it)")
    if flags[2]:
        return ("tree_mask is not ancestor-closed: some node sees a node j but not all of j's ancestors "
                "(mask[i, j] and mask[j, l] must give mask[i, l])")
    return None


class _CheckedMasks:
    """The last few bool masks that passed `mask_problem`, with their packed bits. The hit test is the
    tensor itself (held here, so its memory is not reused) and its version counter (bumped by every
    in-place write), so an eager caller that passes the same mask to every layer pays for the check
    and the packing once."""

    def __init__(self, size: int = 4):
        self.size, self.entries = size, []

    def bits(self, mask: torch.Tensor, check: bool) -> torch.Tensor:
        try:
            version = mask._version
        except (AttributeError, RuntimeError):  # inference-mode tensors have no version counter
            version = None
        for entry in self.entries:
            if entry[0] is mask and entry[1] == version and version is not None and (entry[2] or not check):
                return entry[3]
        if check:
            problem = mask_problem(mask)
            if problem:
                raise ValueError(problem)
        bits = pack_tree_mask(mask)
        if version is not None:
            self.entries = [(mask, version, check, bits)] + [e for e in self.entries if e[0] is not mask][: self.size - 1]
        return bits


_checked_masks = _CheckedMasks()


@torch.library.custom_op("coral_fast::tree_attention", mutates_args=())
def tree_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_bits: torch.Tensor,
                      kv_len: Optional[torch.Tensor], scale: float, window: int,
                      query_positions: Optional[torch.Tensor]) -> torch.Tensor:
    """The launches as one opaque op for torch.compile (Inductor fuses the code around it; nothing is
    read back, so a compiled caller can still be captured). q [B, Hq, T, D]; k, v [B, Hkv, S, D];
    mask_bits [1 or B, T, W] int32; kv_len [B] or None; window 0 = none. -> [B, Hq, T, D]."""
    return _tree_attention_triton(q, k, v, mask_bits, scale, kv_len, window or None,
                                  query_positions if window else None, direct=False)


@tree_attention_op.register_fake
def _(q, k, v, mask_bits, kv_len, scale, window, query_positions):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask,
    impl: str = "auto",
    scale: Optional[float] = None,
    kv_len: Union[None, int, torch.Tensor] = None,
    window: Optional[int] = None,
    query_positions: Optional[torch.Tensor] = None,
    check: bool = True,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of T draft-tree queries over L prefix keys (all visible) and the T tree keys (tree mask).

    q: [B, Hq, T, D]; k, v: [B, Hkv, S, D] with Hq % Hkv == 0, D in {16, ..., 256}, fp16/bf16/fp32.
    tree_mask: [T, T] or [B, T, T] bool (True: j is i or an ancestor of i), or a DraftTree (its packed
        bits are reused; any object with `.mask` and `.mask_bits` [T, W] is taken the same way, its
        mask trusted). T from 1 to 128.
    kv_len: None -> S == L + T. Else an int or int32/int64 [B] tensor: only the first kv_len[b] slots
        are valid and the tree tokens are slots [kv_len[b] - T, kv_len[b]) (static cache buffers; the
        launch depends on S only, so it can be captured in a CUDA graph).
    window: sliding window (Gemma 3 local layers): prefix slot j is visible to query i only if
        j > query_positions[i] - window. Tree keys follow the tree mask only.
    query_positions: [T] or [B, T] int (prefix_len + depth); required with window.
    check: True checks a bool tensor mask's values: a tree mask (`mask_problem`: True diagonal, lower
        triangle, ancestor-closed), so that the result is attention over each node's root path. One
        device read-back the first time a mask is seen; the same tensor again (unchanged) is not
        re-checked or re-packed. A DraftTree is not checked (its mask is ancestor-closed by
        construction). A kv_len tensor's range is checked with a read-back. check=False reads nothing
        back (CUDA-graph capture); the kernel then computes what any mask says (a general mask is
        well defined: each query attends to the keys its row allows).
    out: optional [B, Hq, T, D] tensor to write into (any strides with a unit last stride).
    Returns out [B, Hq, T, D] in q's dtype. Eager CUDA calls replay a CUDA graph of the launches from a
    key's second call on (`_replay.py`, docs/attention.md; CORAL_FAST_EAGER_GRAPHS=0 switches it off).
    """
    mask_bits = None
    if not isinstance(tree_mask, torch.Tensor):
        mask_bits = getattr(tree_mask, "batched_mask_bits", None)  # a DraftTree keeps its [1, T, W] view
        if mask_bits is None:
            if not hasattr(tree_mask, "mask_bits"):
                raise ValueError(f"tree_mask must be a bool tensor or a DraftTree, got {type(tree_mask)}")
            mask_bits = tree_mask.mask_bits.unsqueeze(0)
        tree_mask = tree_mask.mask
    compiling = torch.compiler.is_compiling()
    if (mask_bits is not None and not compiling and isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
            and isinstance(v, torch.Tensor) and (query_positions is None or isinstance(query_positions, torch.Tensor))
            and resolve_impl(impl, q.device) == "triton"):
        # an eager call with a DraftTree: the checks run once per replay key (`_launch_eager`)
        def validate(replaying: bool) -> None:
            if not replaying:
                _validate(q, k, v, tree_mask, mask_bits, kv_len, window, query_positions, check)
            elif check and isinstance(kv_len, torch.Tensor):  # the key fixed every shape, dtype and config
                _check_kv_len_values(kv_len, q.shape[2], k.shape[2])
            _check_out(out, q)

        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        return _launch_eager(q, k, v, mask_bits, scale, kv_len, window, query_positions, out, validate)
    _validate(q, k, v, tree_mask, mask_bits, kv_len, window, query_positions, check)
    _check_out(out, q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if resolve_impl(impl, q.device) == "reference":
        if check and mask_bits is None and not compiling:
            problem = mask_problem(tree_mask)
            if problem:
                raise ValueError(problem)
        result = tree_attention_reference(q, k, v, tree_mask, scale, kv_len, window, query_positions)
        if out is not None:
            out.copy_(result)
            return out
        return result
    if mask_bits is None:
        mask_bits = pack_tree_mask(tree_mask) if compiling else _checked_masks.bits(tree_mask, check)
    if compiling and not isinstance(kv_len, int):
        # under torch.compile the launch is an opaque custom op (Inductor fuses around it)
        result = tree_attention_op(q, k, v, mask_bits, kv_len, scale, window or 0, query_positions)
        return result if out is None else out.copy_(result)
    return _launch_eager(q, k, v, mask_bits, scale, kv_len, window, query_positions, out)


def _check_out(out, q) -> None:
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device} with a unit last stride")


def _launch_eager(q, k, v, mask_bits, scale, kv_len, window, query_positions, out, validate=None):
    """The Triton launches of an eager call. Eager CUDA calls replay a CUDA graph of them after a key's
    second call (`_replay.py`): q, the mask bits, a kv_len tensor and the positions are copied in, K and V
    read in place. An int kv_len is part of the key (a tensor takes another launch configuration, so it
    could not stand in for it with identical results): a loop passing a growing int launches directly;
    pass a [B] tensor to replay. validate: see `EagerGraphs.__call__`."""
    kv_len_tensor = kv_len if isinstance(kv_len, torch.Tensor) else None
    kv_len_int = kv_len if isinstance(kv_len, int) else None

    def launch(streamed, resident, out):
        (q, mask_bits, kv_len_tensor, query_positions), (k, v) = streamed, resident
        kv = kv_len_tensor if kv_len_tensor is not None else kv_len_int
        return (_tree_attention_triton(q, k, v, mask_bits, scale, kv, window, query_positions,
                                       out=None if out is None else out[0]),)

    positions = query_positions if window is not None else None  # read only with a window
    return eager_graphs("tree_attention", launch, (q, mask_bits, kv_len_tensor, positions), (k, v),
                        (scale, kv_len_int, window), None if out is None else (out,), validate)[0]
