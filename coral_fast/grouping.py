"""How the vocabulary is split into groups for the grouped LM head.

A grouping maps every token id to one of G groups and fixes a layout in which each group's rows
of the LM-head weight are contiguous:

    order   [V] int64   re-laid row -> original token id (identity for `contiguous`)
    offsets [G+1] int64 group g owns re-laid rows [offsets[g], offsets[g+1])
    group_of [V] int64  original token id -> group

Every group is non-empty, so the kernel never meets an empty active group.
"""
from __future__ import annotations

import torch
from torch import Tensor


class VocabGrouping:
    """A partition of the vocabulary [0, V) into G non-empty groups (see module docstring)."""

    def __init__(self, group_of: Tensor, num_groups: int):
        group_of = torch.as_tensor(group_of)
        if group_of.dim() != 1 or group_of.numel() == 0:
            raise ValueError(f"group_of must be a non-empty 1-D tensor, got shape {tuple(group_of.shape)}")
        if group_of.dtype.is_floating_point or group_of.dtype == torch.bool:
            raise ValueError(f"group_of must hold integer group ids, got {group_of.dtype}")
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        group_of = group_of.to(device="cpu", dtype=torch.int64).contiguous()
        lo, hi = int(group_of.min()), int(group_of.max())
        if lo < 0 or hi >= num_groups:
            raise ValueError(f"group ids must lie in [0, {num_groups}), found [{lo}, {hi}]")
        sizes = torch.bincount(group_of, minlength=num_groups)
        if bool((sizes == 0).any()):
            empty = torch.nonzero(sizes == 0).flatten()[:8].tolist()
            raise ValueError(f"every group needs at least one token; empty groups: {empty}")
        self.group_of = group_of
        self.num_groups = int(num_groups)
        self.vocab_size = int(group_of.numel())
        # stable sort: inside a group, rows keep increasing token ids (locality, reproducibility)
        self.order = torch.sort(group_of, stable=True).indices
        self.offsets = torch.zeros(num_groups + 1, dtype=torch.int64)
        self.offsets[1:] = torch.cumsum(sizes, 0)
        self.is_identity = bool(torch.equal(self.order, torch.arange(self.vocab_size)))

    # --- constructors ------------------------------------------------------------------------------
    @classmethod
    def contiguous(cls, vocab_size: int, num_groups: int) -> "VocabGrouping":
        """Group i = ids [i*ceil(V/G), (i+1)*ceil(V/G)) within [0, V); the weight needs no re-layout."""
        if vocab_size < 1 or num_groups < 1:
            raise ValueError(f"need vocab_size >= 1 and num_groups >= 1, got {vocab_size}, {num_groups}")
        size = -(-vocab_size // num_groups)
        if (num_groups - 1) * size >= vocab_size:
            raise ValueError(
                f"contiguous grouping of V={vocab_size} into G={num_groups} groups of ceil(V/G)={size} "
                f"leaves the last group empty; choose fewer groups"
            )
        return cls(torch.arange(vocab_size) // size, num_groups)

    @classmethod
    def from_token_counts(cls, counts: Tensor, num_groups: int) -> "VocabGrouping":
        """Groups of equal size (+-1) and balanced frequency mass.

        Tokens sorted by count (descending) are dealt to groups in snake order (0..G-1, G-1..0, ...),
        so each group gets one token from every band of G similarly frequent tokens.
        counts: [V] (any numeric dtype).
        """
        counts = torch.as_tensor(counts).flatten().to("cpu", torch.float64)
        V = counts.numel()
        if V < num_groups or num_groups < 1:
            raise ValueError(f"need 1 <= num_groups <= V, got G={num_groups}, V={V}")
        if bool((counts < 0).any()) or not bool(torch.isfinite(counts).all()):
            raise ValueError("token counts must be finite and >= 0")
        by_count = torch.sort(-counts, stable=True).indices
        rank = torch.arange(V)
        band, pos = rank // num_groups, rank % num_groups
        snake = torch.where(band % 2 == 0, pos, num_groups - 1 - pos)
        group_of = torch.empty(V, dtype=torch.int64)
        group_of[by_count] = snake
        return cls(group_of, num_groups)

    @classmethod
    def from_embeddings(cls, weight: Tensor, num_groups: int, iters: int = 8, seed: int = 0) -> "VocabGrouping":
        """Balanced spherical k-means over the LM-head rows: G groups of equal size (+-1).

        Each iteration assigns tokens to centroids greedily by decreasing cosine similarity under a
        capacity of floor or ceil(V/G) per group (so groups stay regular for the kernel), then
        re-centres.
        weight: [V, H]. Runs on weight's device; O(iters * V * G * H).
        """
        V = weight.shape[0]
        if not 1 <= num_groups <= V:
            raise ValueError(f"need 1 <= num_groups <= V, got G={num_groups}, V={V}")
        x = torch.nn.functional.normalize(weight.detach().float(), dim=1)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        centroids = x[torch.randperm(V, generator=gen)[:num_groups].to(x.device)]
        # sizes differ by at most one and sum to V, so no group can end up empty
        capacity = torch.full((num_groups,), V // num_groups, dtype=torch.int64, device=x.device)
        capacity[: V % num_groups] += 1
        group_of = None
        for _ in range(max(1, iters)):
            sim = x @ centroids.T  # [V, G]
            group_of = _capacity_assign(sim, capacity)
            sums = torch.zeros_like(centroids).index_add_(0, group_of, x)
            centroids = torch.nn.functional.normalize(sums, dim=1)
        return cls(group_of.cpu(), num_groups)

    @classmethod
    def from_state_dict(cls, state: dict) -> "VocabGrouping":
        """Inverse of `state_dict()` (tensors only, safetensors-friendly)."""
        return cls(state["group_of"], int(torch.as_tensor(state["num_groups"]).item()))

    def state_dict(self) -> dict:
        return {"group_of": self.group_of.clone(), "num_groups": torch.tensor(self.num_groups, dtype=torch.int64)}

    # --- layout ------------------------------------------------------------------------------------
    @property
    def group_sizes(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def max_group_size(self) -> int:
        return int(self.group_sizes.max())

    def relaid_ids(self, group: int) -> Tensor:
        """Original token ids of group `group`, in re-laid order."""
        return self.order[self.offsets[group] : self.offsets[group + 1]]

    def __repr__(self) -> str:
        kind = "contiguous" if self.is_identity else "re-laid"
        return f"VocabGrouping(V={self.vocab_size}, G={self.num_groups}, {kind}, max_group={self.max_group_size})"


def _capacity_assign(sim: Tensor, capacity: Tensor) -> Tensor:
    """Greedy assignment of rows to columns by decreasing score, at most capacity[g] rows in column g.

    sim: [V, G]; capacity: [G] summing to V. Rows whose best column is full fall back to their next
    best, in rounds.
    """
    V, G = sim.shape
    assigned = torch.full((V,), -1, dtype=torch.int64, device=sim.device)
    load = torch.zeros(G, dtype=torch.int64, device=sim.device)
    sim = sim.clone()
    while bool((assigned < 0).any()):
        todo = torch.nonzero(assigned < 0).flatten()
        best_score, best = sim[todo].max(dim=1)
        # serve the most confident rows first inside each column
        ranked = torch.argsort(-best_score)
        todo, best = todo[ranked], best[ranked]
        col_order = torch.argsort(best, stable=True)
        todo, best = todo[col_order], best[col_order]
        counts = torch.bincount(best, minlength=G)
        start = torch.cumsum(counts, 0) - counts
        rank_in_col = torch.arange(todo.numel(), device=sim.device) - start[best]
        ok = rank_in_col < (capacity - load)[best]
        assigned[todo[ok]] = best[ok]
        load += torch.bincount(best[ok], minlength=G)
        sim[:, load >= capacity] = float("-inf")
    return assigned
