"""Accepting draft tokens from the target's verified logits.

The verify forward runs T + 1 tokens: row 0 is the root (the last accepted token, not yet in the
target's cache) and row i + 1 is tree node i. The target's distribution for a child of node i is read at
row i + 1 (at row 0 for the tree's depth-0 nodes, whose parent is -1).

`accept_greedy` / `accept_sampling` are what the engine runs (fixed shapes, no host read: capturable);
`verify_greedy` / `verify_sampling` state the same rules with host-side control flow and serve as the
tests' independent oracles.

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


def accept_greedy(logits: Tensor, tokens: Tensor, tree, max_depth: int):
    """The greedy rule on the device: fixed shapes, no host sync (what the engine captures).

    logits [T+1, V] (row 0: the root); tokens [T]; tree: DraftTree. Returns
    rows [A] int64 (A = max_depth + 1): verify rows to keep, root first, padded with 0;
    count [1] int64: valid rows (accepted nodes + 1); out_tokens [A]: accepted tokens then the bonus, 0-padded.
    """
    target = logits.argmax(dim=-1)
    matches = tokens == target[tree.parents + 1]
    accepted = ~(tree.mask & ~matches[None, :]).any(dim=1)
    score = torch.where(accepted, tree.depth, torch.full_like(tree.depth, -1))
    best_depth, best = score.max(dim=0, keepdim=True)
    path = tree.ancestor_paths(max_depth).index_select(0, best)[0]  # [max_depth] root-to-best ids, -1 padded
    path = torch.where(best_depth >= 0, path, torch.full_like(path, -1))
    rows, count = _accepted_rows(path)
    bonus = target.gather(0, rows.gather(0, count - 1))
    return rows, count, _accepted_tokens(path, count, bonus, tokens)


def _accepted_rows(path: Tensor):
    """path [D] accepted node ids root first, -1 padded -> (rows [D+1]: verify rows to keep, root first,
    0-padded; count [1]: valid rows)."""
    valid = path >= 0
    rows = torch.cat([torch.zeros_like(path[:1]), torch.where(valid, path + 1, torch.zeros_like(path))])
    return rows, valid.sum(dim=0, keepdim=True) + 1


def _accepted_tokens(path: Tensor, count: Tensor, bonus: Tensor, tokens: Tensor) -> Tensor:
    """The accepted nodes' tokens then the bonus [1], 0-padded to [D+1]."""
    idx = torch.arange(path.shape[0] + 1, device=path.device)
    path_tokens = torch.cat([torch.where(path >= 0, tokens[path.clamp(min=0)], torch.zeros_like(path)),
                             torch.zeros_like(path[:1])])
    return torch.where(idx == count - 1, bonus, torch.where(idx < count - 1, path_tokens, torch.zeros_like(idx)))


def sample_from(weights: Tensor, uniform: Tensor) -> Tensor:
    """Inverse-CDF draw from unnormalised weights [V] (float64) with uniform [1] in [0, 1) -> [1] int64."""
    cdf = weights.cumsum(0)
    return torch.searchsorted(cdf, uniform * cdf[-1:], right=True).clamp(max=weights.shape[0] - 1)


def accept_sampling(logits: Tensor, tokens: Tensor, parents: Tensor, max_depth: int, topk: int,
                           temperature: Tensor, uniforms: Tensor):
    """Tree rejection sampling on the device (fixed shapes, no host sync), exact for top-k drafts.

    logits [T+1, V]; tokens, parents [T]; temperature [1] (> 0); uniforms [max_depth + 1, topk + 1] in
    [0, 1) (drawn on the host from the caller's generator). Returns what accept_greedy returns.

    At each level the children of the current node (parents == node, in index order, at most `topk`) are
    tried in order: child j (token x_j) is accepted with probability p(x_j) / (1 - p(x_0) - ... - p(x_{j-1}))
    (the residual after rejecting the earlier ones, sibling tokens being distinct); the first success is the
    next node. When none is accepted, the bonus is drawn from p with the children's tokens removed.
    """
    T = tokens.shape[0]
    dev = logits.device
    node_ids = torch.arange(T, device=dev)
    k = min(topk, T)
    earlier = torch.ones(k, k, dtype=torch.bool, device=dev).tril(-1)  # earlier[j, i]: i < j
    current = torch.full((1,), -1, dtype=torch.int64, device=dev)
    done = torch.zeros(1, dtype=torch.bool, device=dev)
    path = torch.full((max_depth,), -1, dtype=torch.int64, device=dev)
    bonus = torch.zeros(1, dtype=torch.int64, device=dev)
    for level in range(max_depth + 1):
        p = torch.softmax(logits.index_select(0, current + 1)[0].double() / temperature.double(), dim=-1)
        is_child = parents == current
        order = torch.where(is_child, node_ids, node_ids + T).argsort()[:k]  # children first, in index order
        valid = is_child.index_select(0, order)
        x = tokens.index_select(0, order)
        repeated = ((x[:, None] == x[None, :]) & earlier & valid[None, :]).any(dim=1)  # p(x) already zeroed
        px = torch.where(valid & ~repeated, p.index_select(0, x), torch.zeros_like(p[:1]))
        residual = 1.0 - (px.cumsum(0) - px)  # mass left before trying child j
        take = valid & (uniforms[level, :k] * residual < px)
        first = torch.where(take, torch.arange(k, device=dev), torch.full_like(order, k)).min(dim=0, keepdim=True).values
        accepted = (first < k) & ~done
        child = order.gather(0, first.clamp(max=k - 1))
        if level < max_depth:
            path[level : level + 1] = torch.where(accepted, child, path[level : level + 1])
        rejected = valid & (torch.arange(k, device=dev) < first)  # every child tried before the success
        # the residual: rejected tokens removed (accumulate: padding entries may repeat a token)
        removed = torch.zeros_like(p).index_put((x,), rejected.double(), accumulate=True) > 0
        p = torch.where(removed, torch.zeros_like(p), p)
        stop = ~done & ~accepted
        bonus = torch.where(stop, sample_from(p, uniforms[level, k:k + 1].double()), bonus)
        done = done | stop
        current = torch.where(accepted, child, current)
    rows, count = _accepted_rows(path)
    return rows, count, _accepted_tokens(path, count, bonus, tokens)
