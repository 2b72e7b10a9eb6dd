"""CORAL training losses, each on flat masked rows (M positions).

- `feature_loss`: SmoothL1 between the draft's hidden states and the target's next features.
- `token_loss`: KL (or cross-entropy) from the target's top-K distribution (renormalized over the K
  stored ids) to the draft's full-vocabulary distribution.
- `csra_loss`: Cross-Step Representation Alignment, InfoNCE over the draft's features of the same
  positions at different unrolled steps (positives) against the other positions (negatives).
- `router_loss`: cross-entropy of the router's group scores toward the groups that hold the target's
  next-token probability mass (or toward the group of its top-1 token).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_rows(name: str, x: Tensor, rows: int) -> None:
    if x.shape[0] != rows:
        raise ValueError(f"{name} has {x.shape[0]} rows, expected {rows}")


def feature_loss(hidden: Tensor, target: Tensor, beta: float = 1.0) -> Tensor:
    """hidden, target: [M, H] -> scalar SmoothL1 averaged over rows and dims (0 when M == 0)."""
    if hidden.shape != target.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and target {tuple(target.shape)} differ")
    if hidden.numel() == 0:
        return hidden.sum() * 0.0
    return F.smooth_l1_loss(hidden.float(), target.float(), beta=beta)


def target_topk_probs(topk_logprobs: Tensor) -> Tensor:
    """[M, K] log-probs of the target's top-K (full softmax) -> [M, K] probabilities renormalized over K."""
    return torch.softmax(topk_logprobs.float(), dim=-1)


def token_loss(logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, kind: str = "kl") -> Tensor:
    """Distillation of the draft's token distribution toward the target's.

    logits: [M, V] the draft's dense logits; topk_ids: [M, K] int; topk_logprobs: [M, K] the target's
    log-probs of those ids. p = softmax(topk_logprobs) over the K ids, log q = log_softmax(logits).
    kind="kl": sum_k p_k (log p_k - log q_k); kind="ce": -sum_k p_k log q_k (same gradient);
    kind="hard": -log q(topk_ids[:, 0]) (the target's greedy token only). Mean over the M rows.
    """
    if kind not in ("kl", "ce", "hard"):
        raise ValueError(f"token loss kind must be 'kl', 'ce' or 'hard', got {kind!r}")
    if topk_ids.shape != topk_logprobs.shape or topk_ids.dim() != 2:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} must both be [M, K]")
    _check_rows("topk_ids", topk_ids, logits.shape[0])
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    if int(topk_ids.max()) >= logits.shape[-1] or int(topk_ids.min()) < 0:
        raise ValueError(f"topk_ids out of range for a vocabulary of {logits.shape[-1]}")
    log_q = torch.log_softmax(logits.float(), dim=-1).gather(-1, topk_ids.long())
    if kind == "hard":
        return -log_q[:, 0].mean()
    p = target_topk_probs(topk_logprobs)
    if kind == "ce":
        return -(p * log_q).sum(-1).mean()
    return (p * (torch.log(p.clamp_min(1e-30)) - log_q)).sum(-1).mean()


def csra_loss(features: Tensor, temperature: float = 0.1) -> Tensor:
    """Cross-Step Representation Alignment (InfoNCE across unrolled steps).

    features: [S, N, H], the draft's output features of the same N positions at S unrolled steps.
    z = features / ||features||; for every ordered pair of steps (a, b), a != b, the anchor z[a, i]
    scores all of step b's features with cosine / temperature, and the positive is z[b, i] (same
    position): loss_ab = mean_i CE(z[a] @ z[b].T / temperature, i). Returns the mean over the
    S (S - 1) pairs (0 for S < 2 or N < 1). Zero gradient (to within exp(-2/temperature)) once the
    steps agree and other positions are far apart.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be [S, N, H], got {tuple(features.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    steps, n, _ = features.shape
    if steps < 2 or n == 0:
        return features.sum() * 0.0
    z = F.normalize(features.float(), dim=-1)
    labels = torch.arange(n, device=features.device)
    losses = [F.cross_entropy(z[a] @ z[b].T / temperature, labels) for a, b in itertools.permutations(range(steps), 2)]
    return torch.stack(losses).mean()


def group_mass(topk_ids: Tensor, topk_logprobs: Tensor, token_groups: Tensor, num_groups: int) -> Tensor:
    """[M, K] target top-K -> [M, G]: the renormalized top-K probability mass in each group."""
    groups = token_groups[topk_ids.long()]
    mass = torch.zeros(topk_ids.shape[0], num_groups, device=topk_ids.device, dtype=torch.float32)
    return mass.scatter_add_(1, groups, target_topk_probs(topk_logprobs))


def router_loss(router_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, token_groups: Tensor, target: str = "mass") -> Tensor:
    """The router learns to put the target's next token in its top groups.

    router_logits: [M, G]; topk_ids / topk_logprobs: [M, K] the target's top-K; token_groups: [V] int,
    the group of every vocabulary id. target="mass": soft cross-entropy toward the target's top-K
    mass per group; target="argmax": cross-entropy toward the group of the target's top-1 token.
    """
    if target not in ("mass", "argmax"):
        raise ValueError(f"router target must be 'mass' or 'argmax', got {target!r}")
    _check_rows("topk_ids", topk_ids, router_logits.shape[0])
    if router_logits.shape[0] == 0:
        return router_logits.sum() * 0.0
    num_groups = router_logits.shape[-1]
    if int(token_groups.max()) >= num_groups or int(token_groups.min()) < 0:
        raise ValueError(f"token_groups holds groups outside 0..{num_groups - 1}")
    log_r = torch.log_softmax(router_logits.float(), dim=-1)
    if target == "argmax":
        return F.nll_loss(log_r, token_groups[topk_ids[:, 0].long()].long())
    return -(group_mass(topk_ids, topk_logprobs, token_groups, num_groups) * log_r).sum(-1).mean()


@torch.no_grad()
def router_hit_rate(router_logits: Tensor, next_token: Tensor, token_groups: Tensor, active_groups: int) -> Tensor:
    """Fraction of rows whose `next_token` [M] lies in one of the router's top-`active_groups` groups."""
    if router_logits.shape[0] == 0:
        return router_logits.new_zeros(())
    top = router_logits.topk(active_groups, dim=-1).indices
    return (top == token_groups[next_token.long()][:, None]).any(-1).float().mean()
