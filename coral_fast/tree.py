"""Draft trees: `DraftTree` (mask, depths, paths of a token tree) and the EAGLE-2 dynamic tree builder.

A draft tree of T nodes is given by its parent array: `parents[i] < i` (parents precede children),
or -1 for a node whose parent is the last accepted token (the tree's root, which is not a node).

Everything here is built with tensor ops on the parents' device: no Python loop over nodes and
no host synchronisation on the hot path (`build_dynamic_tree` can be captured in a CUDA graph).
Only `DraftTree.paths` and `DraftTree.max_depth`, whose sizes depend on the data, read back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from coral_fast.kernels.tree_attention import MAX_TREE_TOKENS, pack_mask_bits

__all__ = ["DraftTree", "CandidateTable", "build_dynamic_tree", "pack_mask_bits", "ancestor_mask"]

MAX_TREE_NODES = MAX_TREE_TOKENS  # the tree-attention kernel packs a mask row in at most four 32-bit words


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """[T] parents -> [T, T] bool, True iff j is i or an ancestor of i.

    Transitive closure by repeated squaring of (I | parent edges): ceil(log2 T) small matmuls, a fixed
    number of ops whatever the tree's depth (no host sync).
    """
    num_nodes = parents.shape[0]
    idx = torch.arange(num_nodes, device=parents.device)
    reach = torch.zeros(num_nodes, num_nodes, dtype=torch.float32, device=parents.device)
    reach.diagonal().fill_(1.0)  # not reach[idx, idx] = 1.0: a CPU scalar copy breaks CUDA-graph capture
    has_parent = parents >= 0
    reach[idx, parents.clamp(min=0)] += has_parent.to(torch.float32)
    reach = (reach > 0).to(torch.float32)
    for _ in range(max(1, math.ceil(math.log2(max(num_nodes, 2))))):
        reach = ((reach @ reach) > 0).to(torch.float32)
    return reach > 0


class DraftTree:
    """A token tree of T nodes for one verification step.

    Attributes (tensors on the parents' device):
        parents:   [T] int64, parents[i] < i or -1 (child of the last accepted token)
        mask:      [T, T] bool, mask[i, j] iff j is i or an ancestor of i
        depth:     [T] int64, 0 for nodes with parent -1; position id of node i = prefix_len + depth[i]
        mask_bits: [T, ceil(T/32)] int32, `mask` packed as bits (what the tree-attention kernel reads)
        num_nodes: T (int)
    Read back from the device on first use (sizes depend on the data):
        max_depth: int
        paths:     [num_leaves, max_depth + 1] int64 root-to-leaf node indices padded with -1
    """

    def __init__(self, parents: torch.Tensor, mask: torch.Tensor, depth: torch.Tensor):
        self.parents = parents
        self.mask = mask
        self.depth = depth
        self.num_nodes = int(parents.shape[0])
        self._mask_bits = None
        self._batched_mask_bits = None
        self._paths = None
        self._max_depth = None

    @classmethod
    def from_parents(cls, parents: Union[torch.Tensor, Sequence[int]], device=None, validate: bool = True) -> "DraftTree":
        """Build from a parent array. `validate=False` skips the checks that read values back (CUDA graphs)."""
        if not isinstance(parents, torch.Tensor):
            parents = torch.tensor(list(parents), dtype=torch.int64)
        if device is not None:
            parents = parents.to(device)
        if parents.dim() != 1:
            raise ValueError(f"parents must be 1-D [T], got shape {tuple(parents.shape)}")
        if parents.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"parents must be an integer tensor, got {parents.dtype}")
        num_nodes = parents.shape[0]
        if not 1 <= num_nodes <= MAX_TREE_NODES:
            raise ValueError(f"a draft tree has 1 to {MAX_TREE_NODES} nodes, got {num_nodes}")
        parents = parents.to(torch.int64)
        if validate:
            idx = torch.arange(num_nodes, device=parents.device)
            bad = (parents < -1) | (parents >= idx)
            if bool(bad.any()):
                first = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"parents[i] must be -1 or an earlier node (< i); parents[{first}] = {int(parents[first])}"
                )
        mask = ancestor_mask(parents)
        depth = mask.sum(dim=1) - 1
        return cls(parents, mask, depth)

    @property
    def mask_bits(self) -> torch.Tensor:
        if self._mask_bits is None:
            self._mask_bits = pack_mask_bits(self.mask)
        return self._mask_bits

    @property
    def batched_mask_bits(self) -> torch.Tensor:
        """[1, T, W] int32: `mask_bits` as the kernel takes it, kept (an eager `tree_attention` call per
        layer would otherwise make the view on every call)."""
        if self._batched_mask_bits is None:
            self._batched_mask_bits = self.mask_bits.unsqueeze(0)
        return self._batched_mask_bits

    def position_ids(self, prefix_len: Union[int, torch.Tensor]) -> torch.Tensor:
        """[T] (or [B, T] for a [B] tensor of prefix lengths): prefix_len + depth."""
        if isinstance(prefix_len, torch.Tensor) and prefix_len.dim() == 1:
            return prefix_len.to(torch.int64)[:, None] + self.depth[None, :]
        return self.depth + prefix_len

    def ancestor_paths(self, max_len: Optional[int] = None) -> torch.Tensor:
        """[T, max_len] int64: row i lists the root-to-i path (depth 0 first), padded with -1. Fixed shape.

        max_len defaults to T (always enough); pass the builder's depth to keep it small.
        """
        num_nodes = self.num_nodes
        max_len = num_nodes if max_len is None else max_len
        key = torch.where(self.mask, self.depth[None, :], torch.full_like(self.depth, num_nodes + 1)[None, :])
        sorted_key, order = torch.sort(key, dim=1, stable=True)
        order = torch.where(sorted_key <= num_nodes, order, torch.full_like(order, -1))
        if max_len <= num_nodes:
            return order[:, :max_len]
        pad = torch.full((num_nodes, max_len - num_nodes), -1, dtype=order.dtype, device=order.device)
        return torch.cat([order, pad], dim=1)

    @property
    def is_leaf(self) -> torch.Tensor:
        """[T] bool: nodes that are nobody's parent."""
        has_child = torch.zeros(self.num_nodes + 1, dtype=torch.bool, device=self.parents.device)
        has_child[(self.parents + 1)] = True  # slot 0 collects the -1 parents
        return ~has_child[1:]

    @property
    def max_depth(self) -> int:
        if self._max_depth is None:
            self._max_depth = int(self.depth.max())
        return self._max_depth

    @property
    def paths(self) -> torch.Tensor:
        """[num_leaves, max_depth + 1] int64 retrieve indices: each root-to-leaf path, padded with -1."""
        if self._paths is None:
            leaves = self.is_leaf.nonzero()[:, 0]
            self._paths = self.ancestor_paths(self.max_depth + 1)[leaves]
        return self._paths

    def to(self, device) -> "DraftTree":
        return DraftTree(self.parents.to(device), self.mask.to(device), self.depth.to(device))

    def __repr__(self) -> str:
        return f"DraftTree(num_nodes={self.num_nodes}, device={self.parents.device})"


@dataclass
class CandidateTable:
    """The EAGLE-2 builder's node table, fixed size N = K0 + (depth - 1) * topk * topk.

    Entries [0, size) are filled; level 0 holds the K0 root candidates, level l >= 1 holds topk*topk
    children at [K0 + (l-1)*topk^2, K0 + l*topk^2), child c of frontier node f at offset f*topk + c.
    """

    tokens: torch.Tensor  # [N] int64 token ids
    parents: torch.Tensor  # [N] int64 index into the table, -1 for level-0 candidates
    depth: torch.Tensor  # [N] int64, 0 for level-0 candidates
    scores: torch.Tensor  # [N] float32 cumulative log-probs
    size: int  # entries filled so far (a Python int: static per level)


ExpandFn = Callable[[int, torch.Tensor, CandidateTable], "tuple[torch.Tensor, torch.Tensor]"]


def build_dynamic_tree(
    root_ids: torch.Tensor,
    root_logprobs: torch.Tensor,
    expand: ExpandFn,
    depth: int = 6,
    topk: int = 10,
    total_tokens: int = 60,
    tail: int = 0,
):
    """EAGLE-2 dynamic draft tree (Li et al. 2024): beam-expand by cumulative log-prob, then re-rank.

    root_ids:      [K0] int64 the draft's top-K0 tokens after the last accepted token (depth 0)
    root_logprobs: [K0] float their log-probs
    expand(level, frontier [topk] int64 table indices, table) -> (child_ids [topk, topk],
        child_logprobs [topk, topk]): the draft's top-k continuations of each frontier node.
        Called depth - 1 times (levels 1 .. depth-1).

    Level 0 is the K0 root candidates; the frontier of each level is its `topk` best nodes by cumulative
    log-prob; each frontier node gets topk children (cumulative = parent + child log-prob). At the end
    the `total_tokens` best of all N = K0 + (depth-1)*topk^2 candidates are kept.

    Ancestor closure is guaranteed, not left to float ties: nodes are ranked by the minimum cumulative
    score along their path (equal to their own score when log-probs are <= 0), ties broken by table
    order, in which parents come before their children. So a parent always outranks its children.

    Returns (tree: DraftTree over the kept nodes in table order, parents first; tokens [T] int64;
    scores [T] float32 cumulative log-probs). Fixed shapes, no host syncs. With `tail` > 0 the last `tail`
    nodes are the lowest-ranked ones (each part in table order): the first T - tail are a tree by themselves,
    the best T - tail, so a caller can swap the tail for other nodes (the engine's lookup chain).
    """
    if root_ids.dim() != 1 or root_logprobs.shape != root_ids.shape:
        raise ValueError(
            f"root_ids and root_logprobs must both be [K0], got {tuple(root_ids.shape)} and {tuple(root_logprobs.shape)}"
        )
    num_roots = root_ids.shape[0]
    if depth < 1 or topk < 1:
        raise ValueError(f"depth and topk must be >= 1, got depth={depth}, topk={topk}")
    if depth > 1 and num_roots < topk:
        raise ValueError(f"need at least topk={topk} root candidates to expand, got K0={num_roots}")
    table_size = num_roots + (depth - 1) * topk * topk
    if not 0 <= tail < total_tokens:
        raise ValueError(f"tail must be in [0, total_tokens={total_tokens}), got {tail}")
    if not 1 <= total_tokens <= min(table_size, MAX_TREE_NODES):
        raise ValueError(
            f"total_tokens must be in [1, min(N={table_size}, {MAX_TREE_NODES})], got {total_tokens} "
            f"(N = K0 + (depth-1)*topk^2)"
        )
    device = root_ids.device
    table = CandidateTable(
        tokens=torch.zeros(table_size, dtype=torch.int64, device=device),
        parents=torch.full((table_size,), -1, dtype=torch.int64, device=device),
        depth=torch.zeros(table_size, dtype=torch.int64, device=device),
        scores=torch.full((table_size,), float("-inf"), dtype=torch.float32, device=device),
        size=num_roots,
    )
    # ranking key: min cumulative score along the path (monotone along every path)
    path_min = torch.full((table_size,), float("-inf"), dtype=torch.float32, device=device)
    table.tokens[:num_roots] = root_ids.to(torch.int64)
    table.scores[:num_roots] = root_logprobs.to(torch.float32)
    path_min[:num_roots] = root_logprobs.to(torch.float32)

    level_start, level_size = 0, num_roots
    for level in range(1, depth):
        # stable sort: among equal scores the earlier table entry wins, as in the final ranking
        level_scores = table.scores[level_start : level_start + level_size]
        frontier = torch.sort(level_scores, descending=True, stable=True).indices[:topk] + level_start
        child_ids, child_logprobs = expand(level, frontier, table)
        if tuple(child_ids.shape) != (topk, topk) or tuple(child_logprobs.shape) != (topk, topk):
            raise ValueError(
                f"expand must return child_ids and child_logprobs of shape [{topk}, {topk}], got "
                f"{tuple(child_ids.shape)} and {tuple(child_logprobs.shape)}"
            )
        start = table.size
        stop = start + topk * topk
        parent_scores = table.scores[frontier]
        table.tokens[start:stop] = child_ids.reshape(-1).to(torch.int64)
        table.parents[start:stop] = frontier.repeat_interleave(topk)
        table.depth[start:stop] = level
        cumulative = (parent_scores[:, None] + child_logprobs.to(torch.float32)).reshape(-1)
        table.scores[start:stop] = cumulative
        path_min[start:stop] = torch.minimum(path_min[frontier].repeat_interleave(topk), cumulative)
        table.size = stop
        level_start, level_size = start, topk * topk

    ranked = torch.sort(path_min, descending=True, stable=True).indices[:total_tokens]
    head = total_tokens - tail
    # each part in table order: parents first. A parent outranks its children, so the best `head` hold all
    # their ancestors, and a tail node's parent sits in the head or before it in the tail.
    kept = torch.cat([torch.sort(ranked[:head]).values, torch.sort(ranked[head:]).values])
    new_index = torch.full((table_size,), -1, dtype=torch.int64, device=device)
    new_index[kept] = torch.arange(total_tokens, device=device)
    old_parents = table.parents[kept]
    parents = torch.where(old_parents >= 0, new_index[old_parents.clamp(min=0)], old_parents)
    tree = DraftTree.from_parents(parents, validate=False)
    return tree, table.tokens[kept], table.scores[kept]
