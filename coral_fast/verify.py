"""Accepting draft tokens from the target's verified logits.

The verify forward runs T + 1 tokens: row 0 is the root (the last accepted token, not yet in the
target's cache) and row i + 1 is tree node i. The target's distribution for a child of node i is read at
row i + 1 (at row 0 for the tree's depth-0 nodes, whose parent is -1).

- Greedy (EAGLE `evaluate_posterior`): a node is accepted when it and all its ancestors equal the
  target's argmax at their parents; the deepest accepted node gives the path; the bonus token is the
  argmax at its row. No Python loop over nodes; one host read for the result.
- Sampling (temperature > 0), exact for deterministic (top-k) drafts: at each step try the children in
  order; accept child token x with probability p(x) under the current residual p; on rejection set
  p(x) = 0 and renormalise; when no child is accepted, sample the bonus token from the residual. The
  output then has exactly the target's distribution (proof: this is sequential sampling of p; see
  tests/test_sampling.py for the chi-square check).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _parent_rows(parents: Tensor) -> Tensor:
    return parents + 1  # -1 (the root) -> row 0


def verify_greedy(logits: Tensor, tokens: Tensor, parents: Tensor, mask: Tensor, depth: Tensor):
    """logits [T+1, V]; tokens, parents, depth [T]; mask [T, T] ancestor-or-self.

    Returns (path [a] int64 node indices root to leaf, bonus token id int).
    """
    if logits.shape[0] != tokens.shape[0] + 1:
        raise ValueError(f"logits must have T + 1 = {tokens.shape[0] + 1} rows, got {logits.shape[0]}")
    target = logits.argmax(dim=-1)  # [T+1]
    if tokens.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=logits.device), int(target[0])
    matches = tokens == target[_parent_rows(parents)]  # [T]
    accepted = ~(mask & ~matches[None, :]).any(dim=1)  # every ancestor-or-self matches
    # deepest accepted node (ties: the first); score -1 if none
    score = torch.where(accepted, depth, torch.full_like(depth, -1))
    best_depth, best = score.max(dim=0)
    best_depth, best = int(best_depth), int(best)  # the one host sync of a round
    if best_depth < 0:
        return torch.zeros(0, dtype=torch.int64, device=logits.device), int(target[0])
    path = mask[best].nonzero()[:, 0]  # ancestors are earlier nodes: ascending = root to leaf
    return path, int(target[best + 1])


def verify_sampling(logits: Tensor, tokens: Tensor, parents: Tensor, temperature: float,
                    generator: torch.Generator | None = None):
    """Tree rejection sampling against deterministic draft candidates (see the module docstring).

    logits [T+1, V]; tokens, parents [T]. Returns (path [a] int64 node indices, bonus token id int).
    Runs on the host (a few small loops over depth); fp64 probabilities.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")

    def probs(row: int) -> Tensor:  # only the visited rows (V can be 262144)
        return torch.softmax(logits[row].double().cpu() / temperature, dim=-1)

    tokens_l = tokens.tolist()
    parents_l = parents.tolist()
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(parents_l):
        children.setdefault(parent, []).append(node)
    path: list[int] = []
    node = -1
    while True:
        p = probs(node + 1)
        accepted = None
        for child in children.get(node, []):
            x = tokens_l[child]
            if float(torch.rand((), generator=generator, dtype=torch.float64)) < float(p[x]):
                accepted = child
                break
            p[x] = 0.0
            total = float(p.sum())
            if total <= 0:  # only if p was a point mass on x (then x is accepted): float guard
                p = probs(node + 1)
                break
            p /= total
        if accepted is None:
            bonus = int(torch.multinomial(p, 1, generator=generator))
            return torch.tensor(path, dtype=torch.int64, device=logits.device), bonus
        path.append(accepted)
        node = accepted
