"""The Triton kernels as opaque torch ops, so that `torch.compile` can fuse everything around them.

The loop's two steps (StaticEngine.draft_step / verify_step) are ~30 small PyTorch ops per layer: with
CUDA graphs alone each one is still its own kernel. Compiling the steps lets Inductor fuse the
norms, rotary embeddings, activations and tree bookkeeping; our own Triton kernels stay as they are
behind these custom ops (Dynamo does not trace into their Python launch code): the kernels' own
dispatch functions call them when `torch.compiler.is_compiling()`. The ops take only
tensors and plain numbers and never read device values back, so the compiled steps can still be
captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["tree_attention_op", "grouped_head_topk_op"]


@torch.library.custom_op("coral_fast::tree_attention", mutates_args=())
def tree_attention_op(q: Tensor, k: Tensor, v: Tensor, mask_bits: Tensor, kv_len: Optional[Tensor], scale: float,
                      window: int, query_positions: Optional[Tensor]) -> Tensor:
    """q [B, Hq, T, D]; k, v [B, Hkv, S, D]; mask_bits [1 or B, T, W] int32; kv_len [B] int64 or None;
    window 0 = none. -> [B, Hq, T, D] (see kernels.tree_attention)."""
    from coral_fast.kernels.tree_attention import _tree_attention_triton

    return _tree_attention_triton(q, k, v, mask_bits, scale, kv_len, window or None,
                                  query_positions if window else None)


@tree_attention_op.register_fake
def _(q, k, v, mask_bits, kv_len, scale, window, query_positions):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("coral_fast::grouped_head_topk", mutates_args=())
def grouped_head_topk_op(hidden: Tensor, weight: Tensor, offsets: Tensor, order: Tensor, groups: Tensor, k: int,
                         max_group_size: int) -> tuple[Tensor, Tensor]:
    """hidden [M, H]; weight [V, H] re-laid by group; groups [M, A] -> (ids [M, k] int64, logprobs [M, k] fp32)."""
    from coral_fast.kernels.grouped_head_topk import grouped_head_topk_triton

    return grouped_head_topk_triton(hidden, weight, offsets, order, groups.contiguous(), k, max_group_size)


@grouped_head_topk_op.register_fake
def _(hidden, weight, offsets, order, groups, k, max_group_size):
    M = hidden.shape[0]
    return (hidden.new_empty((M, k), dtype=torch.int64), hidden.new_empty((M, k), dtype=torch.float32))
