"""Acceptance rules against slow Python walks and exact distributions."""
import pytest
import torch

from coral_fast.tree import DraftTree
from coral_fast.verify import verify_greedy, verify_sampling


def random_tree(num_nodes, gen):
    parents = [-1] + [int(torch.randint(-1, i, (1,), generator=gen)) for i in range(1, num_nodes)]
    return DraftTree.from_parents(parents)


def greedy_walk(logits, tokens, parents):
    """EAGLE's rule written as a walk: follow the child equal to the target's argmax."""
    path, node = [], -1
    while True:
        want = int(logits[node + 1].argmax())
        children = [i for i, p in enumerate(parents) if p == node and int(tokens[i]) == want]
        if not children:
            return path, want
        node = children[0]
        path.append(node)


def test_greedy_matches_walk(seed):
    gen = torch.Generator().manual_seed(seed)
    longest = 0
    for trial in range(300):
        T = int(torch.randint(1, 25, (1,), generator=gen))
        V = int(torch.randint(2, 6, (1,), generator=gen))  # small V: many matches, long paths
        tree = random_tree(T, gen)
        # distinct tokens among siblings, as the draft's top-k gives
        tokens = torch.empty(T, dtype=torch.int64)
        for parent in set(tree.parents.tolist()):
            kids = (tree.parents == parent).nonzero()[:, 0]
            tokens[kids] = torch.randperm(max(V, len(kids)), generator=gen)[: len(kids)]
        logits = torch.randn(T + 1, max(V, T), generator=gen)
        # bias most rows toward one of their children: deep acceptances become common
        for node in range(-1, T):
            kids = (tree.parents == node).nonzero()[:, 0]
            if len(kids) and float(torch.rand((), generator=gen)) < 0.8:
                pick = kids[int(torch.randint(0, len(kids), (1,), generator=gen))]
                logits[node + 1, tokens[pick]] += 10.0
        path, bonus = verify_greedy(logits, tokens, tree.parents, tree.mask, tree.depth)
        ref_path, ref_bonus = greedy_walk(logits, tokens, tree.parents.tolist())
        assert path.tolist() == ref_path and bonus == ref_bonus, trial
        longest = max(longest, len(ref_path))
    assert longest >= 3  # the test reached deep acceptances


def test_greedy_empty_tree_and_shape_error():
    logits = torch.randn(1, 7)
    path, bonus = verify_greedy(logits, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                                torch.zeros(0, 0, dtype=torch.bool), torch.zeros(0, dtype=torch.int64))
    assert path.numel() == 0 and bonus == int(logits[0].argmax())
    tree = DraftTree.from_parents([-1, 0])
    with pytest.raises(ValueError, match="T \\+ 1"):
        verify_greedy(torch.randn(2, 7), torch.zeros(2, dtype=torch.int64), tree.parents, tree.mask, tree.depth)


def chi_square_p(observed, expected_probs):
    """p-value of Pearson's chi-square (cells with expectation < 5 merged into one)."""
    n = observed.sum()
    expected = expected_probs * n
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]]).double()
    exp = torch.cat([expected[big], expected[~big].sum()[None]]).double()
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampling_first_two_tokens_have_the_target_distribution(temperature):
    """Tree: two root candidates (0, 1), node 0 has children (2, 3). The first emitted token must follow
    p0 = softmax(logits[0] / T); given it was candidate 0's token, the second follows node 0's row."""
    V = 6
    gen = torch.Generator().manual_seed(1234)
    logits = torch.randn(5, V, generator=gen) * 1.5
    tree = DraftTree.from_parents([-1, -1, 0, 0])
    tokens = torch.tensor([2, 4, 1, 5])
    first = torch.zeros(V)
    second = torch.zeros(V)
    for _ in range(20000):
        path, bonus = verify_sampling(logits, tokens, tree.parents, temperature, gen)
        emitted = tokens[path].tolist() + [bonus]
        first[emitted[0]] += 1
        if emitted[0] == 2:  # candidate 0 accepted: the next token comes from row 1
            second[emitted[1]] += 1
    p0 = torch.softmax(logits[0].double() / temperature, -1)
    p1 = torch.softmax(logits[1].double() / temperature, -1)
    assert chi_square_p(first, p0) > 1e-3
    assert chi_square_p(second, p1) > 1e-3
    # and a wrong reference would be rejected (the test can fail)
    assert chi_square_p(first, torch.softmax(logits[1].double() / temperature, -1)) < 1e-6


def test_sampling_rejects_bad_temperature():
    tree = DraftTree.from_parents([-1])
    with pytest.raises(ValueError, match="temperature"):
        verify_sampling(torch.randn(2, 4), torch.tensor([1]), tree.parents, 0.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_static_sampler_first_two_tokens_have_the_target_distribution(temperature):
    """The device-side sampler of the fixed-shape engine (accept_sampling), on a tree whose
    candidates are the target's own top tokens (a good draft: acceptances and rejections both frequent,
    so a wrong residual shows). Children listed out of order with a non-child between them."""
    from coral_fast.verify import accept_sampling

    V, N = 7, 6000
    gen = torch.Generator().manual_seed(99)
    logits = torch.randn(6, V, generator=gen) * 2.0
    parents = torch.tensor([-1, 0, -1, 0, -1])  # root: nodes 0, 2, 4; node 0: nodes 1, 3
    top0 = logits[0].topk(3).indices
    top1 = logits[1].topk(2).indices
    tokens = torch.tensor([int(top0[0]), int(top1[0]), int(top0[1]), int(top1[1]), int(top0[2])])
    temp = torch.tensor([temperature], dtype=torch.float64)
    first, second = torch.zeros(V), torch.zeros(V)
    for _ in range(N):
        uniforms = torch.rand(3, 4, generator=gen, dtype=torch.float64)
        rows, count, out = accept_sampling(logits, tokens, parents, 2, 3, temp, uniforms)
        emitted = out[: int(count)].tolist()
        path = (rows[1 : int(count)] - 1).tolist()  # accepted nodes, each the child of the one before
        assert [int(parents[n]) for n in path] == ([-1] + path)[: len(path)]
        assert emitted[:-1] == tokens[path].tolist()
        first[emitted[0]] += 1
        if emitted[0] == int(tokens[0]):  # node 0 accepted: the next token follows row 1
            second[emitted[1]] += 1
    p0 = torch.softmax(logits[0].double() / temperature, -1)
    p1 = torch.softmax(logits[1].double() / temperature, -1)
    assert chi_square_p(first, p0) > 1e-3
    assert chi_square_p(second, p1) > 1e-3
    assert second.sum() > N / 10
    assert chi_square_p(first, p1) < 1e-6


def test_device_greedy_rule_equals_the_oracle(seed):
    """accept_greedy (what the engine runs: fixed shapes, no host read) == verify_greedy on random trees."""
    from coral_fast.verify import accept_greedy

    gen = torch.Generator().manual_seed(seed)
    for trial in range(100):
        T = int(torch.randint(1, 20, (1,), generator=gen))
        V = int(torch.randint(2, 5, (1,), generator=gen))
        tree = random_tree(T, gen)
        tokens = torch.randint(0, V, (T,), generator=gen)
        logits = torch.randn(T + 1, V, generator=gen)
        path, bonus = verify_greedy(logits, tokens, tree.parents, tree.mask, tree.depth)
        rows, count, out = accept_greedy(logits, tokens, tree, T)
        a = int(count)
        assert (rows[1:a] - 1).tolist() == path.tolist(), trial
        assert out[:a].tolist() == tokens[path].tolist() + [bonus], trial
