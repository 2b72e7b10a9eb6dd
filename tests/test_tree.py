"""DraftTree (mask, depth, paths, packed bits) and the EAGLE-2 dynamic tree builder."""
import numpy as np
import pytest
import torch

from coral_fast import DraftTree, build_dynamic_tree
from coral_fast.tree import pack_mask_bits


def random_parents(num_nodes):
    upper = torch.arange(num_nodes) + 1
    return (torch.rand(num_nodes) * upper).floor().to(torch.int64) - 1


def slow_ancestors(parents, i):
    chain = [i]
    while parents[chain[-1]] >= 0:
        chain.append(parents[chain[-1]])
    return chain[::-1]  # root first


@pytest.mark.parametrize("num_nodes", [1, 2, 7, 33, 64, 128])
def test_from_parents_matches_slow_walk(num_nodes, seed):
    parents = random_parents(num_nodes)
    if num_nodes == 64:
        parents = torch.arange(num_nodes) - 1  # a chain: the deepest tree
    tree = DraftTree.from_parents(parents)
    plist = parents.tolist()
    mask = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    for i in range(num_nodes):
        mask[i, slow_ancestors(plist, i)] = True
    assert torch.equal(tree.mask, mask)
    assert torch.equal(tree.depth, mask.sum(1) - 1)
    assert tree.depth.dtype == torch.int64 and tree.num_nodes == num_nodes
    leaves = [i for i in range(num_nodes) if i not in set(plist)]
    max_depth = max(len(slow_ancestors(plist, i)) for i in range(num_nodes)) - 1
    assert tree.max_depth == max_depth
    want = torch.full((len(leaves), max_depth + 1), -1, dtype=torch.int64)
    for row, leaf in enumerate(leaves):
        path = slow_ancestors(plist, leaf)
        want[row, : len(path)] = torch.tensor(path)
    assert torch.equal(tree.paths, want)
    assert torch.equal(tree.position_ids(100), 100 + tree.depth)


def test_mask_bits_roundtrip(seed):
    for cols in (1, 31, 32, 33, 64, 100, 128):
        mask = torch.rand(5, cols) < 0.5
        bits = pack_mask_bits(mask)
        assert bits.dtype == torch.int32 and bits.shape == (5, -(-cols // 32))
        col = torch.arange(cols)
        unpacked = ((bits[:, col // 32].to(torch.int64) >> (col % 32)) & 1).bool()
        assert torch.equal(unpacked, mask)
    tree = DraftTree.from_parents(random_parents(70))
    assert torch.equal(tree.mask_bits, pack_mask_bits(tree.mask))


def test_from_parents_rejects_bad_parents():
    with pytest.raises(ValueError, match="earlier node"):
        DraftTree.from_parents([-1, 1])  # a node cannot be its own parent
    with pytest.raises(ValueError, match="earlier node"):
        DraftTree.from_parents([-1, 2, 0])
    with pytest.raises(ValueError, match="earlier node"):
        DraftTree.from_parents([-2])
    with pytest.raises(ValueError, match="1-D"):
        DraftTree.from_parents(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="1 to 128"):
        DraftTree.from_parents(torch.arange(129) - 1)


# ---------------------------------------------------------------------------------------- EAGLE-2
def slow_eagle2(root_ids, root_logprobs, next_logprobs, depth, topk, total_tokens):
    """The EAGLE-2 rule written out with Python lists (float32 sums, like the builder)."""
    nodes = [dict(token=int(t), parent=-1, depth=0, score=np.float32(s)) for t, s in zip(root_ids.tolist(), root_logprobs.tolist())]
    level_nodes = list(range(len(nodes)))
    for level in range(1, depth):
        frontier = sorted(level_nodes, key=lambda i: (-nodes[i]["score"], i))[:topk]
        level_nodes = []
        for f in frontier:
            row = next_logprobs[nodes[f]["token"]].tolist()
            best = sorted(range(len(row)), key=lambda t: (-row[t], t))[:topk]
            for t in best:
                nodes.append(dict(token=t, parent=f, depth=level, score=np.float32(nodes[f]["score"]) + np.float32(row[t])))
                level_nodes.append(len(nodes) - 1)

    def path_min(i):
        score = nodes[i]["score"]
        while nodes[i]["parent"] >= 0:
            i = nodes[i]["parent"]
            score = min(score, nodes[i]["score"])
        return score

    kept = sorted(sorted(range(len(nodes)), key=lambda i: (-path_min(i), i))[:total_tokens])
    new_index = {old: new for new, old in enumerate(kept)}
    parents = [new_index[nodes[i]["parent"]] if nodes[i]["parent"] >= 0 else -1 for i in kept]
    return parents, [nodes[i]["token"] for i in kept], [float(nodes[i]["score"]) for i in kept]


def markov_expand(next_logprobs, topk, calls):
    """A synthetic draft: the next-token log-probs depend on the current token only."""

    def expand(level, frontier, table):
        calls.append((level, frontier.clone(), table.size))
        assert frontier.shape == (topk,)
        assert (frontier < table.size).all() and (table.depth[frontier] == level - 1).all()
        values, ids = torch.topk(next_logprobs[table.tokens[frontier]], topk, dim=-1)
        return ids, values

    return expand


@pytest.mark.parametrize("depth,topk,total_tokens,vocab", [(6, 10, 60, 50), (4, 3, 20, 7), (1, 4, 3, 9), (3, 5, 40, 11)])
def test_dynamic_tree_matches_slow_rule(depth, topk, total_tokens, vocab, seed):
    next_logprobs = torch.log_softmax(torch.randn(vocab, vocab) * 2, dim=-1)
    root = torch.log_softmax(torch.randn(vocab) * 2, dim=-1)
    root_logprobs, root_ids = torch.topk(root, topk)
    calls = []
    tree, tokens, scores = build_dynamic_tree(
        root_ids, root_logprobs, markov_expand(next_logprobs, topk, calls), depth=depth, topk=topk, total_tokens=total_tokens
    )
    assert len(calls) == depth - 1
    want_parents, want_tokens, want_scores = slow_eagle2(root_ids, root_logprobs, next_logprobs, depth, topk, total_tokens)
    assert tree.parents.tolist() == want_parents
    assert tokens.tolist() == want_tokens
    assert scores.tolist() == pytest.approx(want_scores, abs=0)
    assert tree.num_nodes == total_tokens and tree.max_depth <= depth - 1
    # the tree's own invariants: parents first, depth = parent's depth + 1
    parents = tree.parents
    assert (parents < torch.arange(total_tokens)).all()
    has_parent = parents >= 0
    assert torch.equal(tree.depth[has_parent], tree.depth[parents[has_parent]] + 1)


def node_paths(parents: list[int], tokens: list[int]) -> list[tuple[int, ...]]:
    """Each node's root-to-node token path, in node order (compare trees as sets, whatever their order)."""
    paths = []
    for i in range(len(tokens)):
        path, j = [], i
        while j >= 0:
            path.append(tokens[j])
            j = parents[j]
        paths.append(tuple(reversed(path)))
    return paths


@pytest.mark.parametrize("depth,topk,total_tokens,tail", [(6, 10, 60, 10), (4, 3, 20, 7), (1, 4, 3, 2), (3, 5, 40, 1)])
def test_dynamic_tree_tail_is_the_lowest_ranked(depth, topk, total_tokens, tail, seed):
    """With a tail the same nodes are kept; the first T - tail are the tree of the best T - tail, parents first."""
    vocab = 11 + seed % 13  # >= topk
    next_logprobs = torch.log_softmax(torch.randn(vocab, vocab) * 2, dim=-1)
    root_logprobs, root_ids = torch.topk(torch.log_softmax(torch.randn(vocab) * 2, dim=-1), topk)
    build = lambda T, t: build_dynamic_tree(root_ids, root_logprobs, markov_expand(next_logprobs, topk, []), depth=depth,
                                            topk=topk, total_tokens=T, tail=t)
    full, full_tokens, _ = build(total_tokens, 0)
    tree, tokens, scores = build(total_tokens, tail)
    assert (tree.parents < torch.arange(total_tokens)).all()  # parents first, every one kept
    kept = sorted(node_paths(tree.parents.tolist(), tokens.tolist()))
    assert kept == sorted(node_paths(full.parents.tolist(), full_tokens.tolist()))
    head = total_tokens - tail
    best, best_tokens, _ = build(head, 0)
    assert tree.parents[:head].tolist() == best.parents.tolist() and tokens[:head].tolist() == best_tokens.tolist()
    assert scores[head:].max() <= scores[:head].min()
    with pytest.raises(ValueError, match="tail"):
        build(total_tokens, total_tokens)


@pytest.mark.parametrize("kind", ["ties", "positive"])
def test_dynamic_tree_is_ancestor_closed_without_float_luck(kind, seed):
    """All-equal scores (log-prob 0 everywhere) and rising scores (unnormalised, > 0): a kept node's
    ancestors are still kept."""
    vocab, topk, depth, total_tokens = 12, 4, 5, 30
    if kind == "ties":
        next_logprobs = torch.zeros(vocab, vocab)
    else:
        next_logprobs = torch.rand(vocab, vocab) + 0.5  # children score higher than their parents
    root_ids = torch.randperm(vocab)[:topk]
    root_logprobs = torch.zeros(topk) if kind == "ties" else torch.rand(topk)
    tree, tokens, scores = build_dynamic_tree(
        root_ids, root_logprobs, markov_expand(next_logprobs, topk, []), depth=depth, topk=topk, total_tokens=total_tokens
    )
    assert (tree.parents < torch.arange(total_tokens)).all()  # every parent kept, and before its child
    want_parents, want_tokens, _ = slow_eagle2(root_ids, root_logprobs, next_logprobs, depth, topk, total_tokens)
    if kind == "positive":  # rising scores: the ranking falls back to the path minimum
        assert tree.parents.tolist() == want_parents


def test_dynamic_tree_feeds_tree_attention(seed):
    vocab, topk = 20, 4
    next_logprobs = torch.log_softmax(torch.randn(vocab, vocab), dim=-1)
    root_logprobs, root_ids = torch.topk(torch.log_softmax(torch.randn(vocab), -1), topk)
    tree, tokens, scores = build_dynamic_tree(root_ids, root_logprobs, markov_expand(next_logprobs, topk, []), depth=3, topk=topk, total_tokens=12)
    from coral_fast import tree_attention

    q = torch.randn(1, 2, 12, 64)
    k = torch.randn(1, 1, 30, 64)
    out = tree_attention(q, k, k.clone(), tree)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_dynamic_tree_bad_arguments():
    ids, lps = torch.arange(4), torch.zeros(4)
    expand = markov_expand(torch.zeros(8, 8), 4, [])
    with pytest.raises(ValueError, match="total_tokens"):
        build_dynamic_tree(ids, lps, expand, depth=2, topk=4, total_tokens=21)
    with pytest.raises(ValueError, match="root candidates"):
        build_dynamic_tree(ids[:3], lps[:3], expand, depth=2, topk=4, total_tokens=5)
    with pytest.raises(ValueError, match=r"\[K0\]"):
        build_dynamic_tree(ids, lps[:3], expand, depth=2, topk=4, total_tokens=5)
    with pytest.raises(ValueError, match="shape"):
        build_dynamic_tree(ids, lps, lambda level, frontier, table: (torch.zeros(4, 3, dtype=torch.int64), torch.zeros(4, 3)), depth=2, topk=4, total_tokens=5)
