"""CORAL losses against hand computations on tiny tensors (plain Python loops over the formulas)."""
import itertools
import math

import pytest
import torch

from coral_fast.training import losses as L


def _smooth_l1(d, beta=1.0):
    d = abs(d)
    return 0.5 * d * d / beta if d < beta else d - 0.5 * beta


def test_feature_loss_matches_hand_smooth_l1(seed):
    M, H = 5, 7
    hidden, target = torch.randn(M, H) * 2, torch.randn(M, H) * 2
    expected = sum(_smooth_l1(float(hidden[i, j] - target[i, j])) for i in range(M) for j in range(H)) / (M * H)
    assert L.feature_loss(hidden, target).item() == pytest.approx(expected, rel=1e-5)
    assert L.feature_loss(hidden[:0], target[:0]).item() == 0.0
    with pytest.raises(ValueError):
        L.feature_loss(hidden, target[:, :3])


def _log_softmax_row(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


@pytest.mark.parametrize("kind", ["kl", "ce", "hard"])
def test_token_loss_matches_hand_computation(seed, kind):
    M, V, K = 4, 11, 3
    logits = torch.randn(M, V) * 3
    topk_ids = torch.stack([torch.randperm(V)[:K] for _ in range(M)])
    topk_logprobs = torch.log_softmax(torch.randn(M, V), -1).gather(1, topk_ids)
    total = 0.0
    for i in range(M):
        log_q = _log_softmax_row(logits[i].tolist())
        lp = topk_logprobs[i].tolist()
        z = sum(math.exp(x) for x in lp)
        p = [math.exp(x) / z for x in lp]
        ids = topk_ids[i].tolist()
        if kind == "hard":
            total += -log_q[ids[0]]
        elif kind == "ce":
            total += -sum(p[k] * log_q[ids[k]] for k in range(K))
        else:
            total += sum(p[k] * (math.log(p[k]) - log_q[ids[k]]) for k in range(K))
    got = L.token_loss(logits, topk_ids, topk_logprobs, kind).item()
    assert got == pytest.approx(total / M, rel=1e-5, abs=1e-6)


def test_token_loss_is_zero_when_draft_equals_renormalized_target():
    topk_ids = torch.tensor([[2, 0, 4]])
    target = torch.tensor([[0.5, 0.3, 0.2]])
    logits = torch.full((1, 5), -1e4)
    logits[0, topk_ids[0]] = target[0].log()
    assert L.token_loss(logits, topk_ids, (target * 0.7).log(), "kl").item() == pytest.approx(0.0, abs=1e-6)


def test_token_loss_rejects_bad_input():
    logits = torch.randn(3, 5)
    with pytest.raises(ValueError):
        L.token_loss(logits, torch.tensor([[0, 7]] * 3), torch.zeros(3, 2))  # id out of range
    with pytest.raises(ValueError):
        L.token_loss(logits, torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2))  # rows differ
    with pytest.raises(ValueError):
        L.token_loss(logits, torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2), kind="mse")


def _csra_by_hand(features, tau):
    S, N, _ = features.shape
    z = [[(features[s, i] / features[s, i].norm()).tolist() for i in range(N)] for s in range(S)]
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))
    losses = []
    for a, b in itertools.permutations(range(S), 2):
        pair = 0.0
        for i in range(N):
            scores = [dot(z[a][i], z[b][j]) / tau for j in range(N)]
            pair += -(scores[i] - math.log(sum(math.exp(s) for s in scores)))
        losses.append(pair / N)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("steps,tau", [(2, 0.1), (3, 0.07), (4, 0.2)])
def test_csra_matches_hand_infonce(seed, steps, tau):
    features = torch.randn(steps, 5, 6)
    assert L.csra_loss(features, tau).item() == pytest.approx(_csra_by_hand(features, tau), rel=1e-4)


def test_csra_zero_gradient_when_steps_agree_and_negatives_far():
    # positions on orthogonal axes (cosine 0 to each other), identical across the 3 steps up to scale
    N, H, tau = 4, 6, 0.05
    base = torch.eye(H)[:N] * torch.tensor([1.0, 2.0, 0.5, 3.0])[:, None]
    features = torch.stack([base, base * 1.7, base * 0.3]).requires_grad_(True)
    loss = L.csra_loss(features, tau)
    loss.backward()
    assert loss.item() < 1e-6
    assert features.grad.abs().max().item() < 1e-6
    # the same positions misaligned across steps: a real loss and a real gradient
    shuffled = torch.stack([base, base[[1, 0, 3, 2]], base]).requires_grad_(True)
    loss = L.csra_loss(shuffled, tau)
    loss.backward()
    assert loss.item() > 1.0 and shuffled.grad.abs().max().item() > 1e-2


def test_csra_degenerate_and_bad_input():
    assert L.csra_loss(torch.randn(1, 4, 3)).item() == 0.0
    with pytest.raises(ValueError):
        L.csra_loss(torch.randn(4, 3))
    with pytest.raises(ValueError):
        L.csra_loss(torch.randn(2, 4, 3), temperature=0.0)


@pytest.mark.parametrize("target", ["mass", "argmax"])
def test_router_loss_matches_hand_computation(seed, target):
    M, V, K, G = 5, 13, 4, 3
    token_groups = torch.randint(0, G, (V,))
    token_groups[:G] = torch.arange(G)
    router_logits = torch.randn(M, G) * 2
    topk_ids = torch.stack([torch.randperm(V)[:K] for _ in range(M)])
    topk_logprobs = torch.log_softmax(torch.randn(M, V), -1).gather(1, topk_ids)
    total = 0.0
    for i in range(M):
        log_r = _log_softmax_row(router_logits[i].tolist())
        ids = topk_ids[i].tolist()
        if target == "argmax":
            total += -log_r[int(token_groups[ids[0]])]
        else:
            lp = topk_logprobs[i].tolist()
            z = sum(math.exp(x) for x in lp)
            mass = [0.0] * G
            for k in range(K):
                mass[int(token_groups[ids[k]])] += math.exp(lp[k]) / z
            total += -sum(mass[g] * log_r[g] for g in range(G))
    got = L.router_loss(router_logits, topk_ids, topk_logprobs, token_groups, target).item()
    assert got == pytest.approx(total / M, rel=1e-5)


def test_group_mass_and_hit_rate():
    token_groups = torch.tensor([0, 0, 1, 1, 2, 2])
    mass = L.group_mass(torch.tensor([[0, 3, 4]]), torch.tensor([[0.5, 0.25, 0.25]]).log(), token_groups, 3)
    assert torch.allclose(mass, torch.tensor([[0.5, 0.25, 0.25]]))
    router_logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [0.0, 5.0, 1.0]])
    next_token = torch.tensor([4, 5, 0])  # groups 2, 2, 0
    assert L.router_hit_rate(router_logits, next_token, token_groups, 1).item() == pytest.approx(1 / 3)
    assert L.router_hit_rate(router_logits, next_token, token_groups, 2).item() == pytest.approx(1 / 3)
    assert L.router_hit_rate(router_logits, next_token, token_groups, 3).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        L.router_loss(router_logits, torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 1), torch.tensor([0, 5]), "mass")
