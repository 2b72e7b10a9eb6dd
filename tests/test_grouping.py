import pytest
import torch

from coral_fast import VocabGrouping


def _check_layout(g: VocabGrouping):
    V, G = g.vocab_size, g.num_groups
    assert g.group_of.shape == (V,) and g.group_of.dtype == torch.int64
    assert g.offsets.shape == (G + 1,) and int(g.offsets[0]) == 0 and int(g.offsets[-1]) == V
    assert bool((g.group_sizes > 0).all())
    assert torch.equal(torch.sort(g.order).values, torch.arange(V))  # a permutation
    for grp in range(G):
        ids = g.relaid_ids(grp)
        assert bool((g.group_of[ids] == grp).all())


@pytest.mark.parametrize("V,G", [(1, 1), (10, 4), (1001, 7), (128256, 32), (4097, 64)])
def test_contiguous_matches_issue_formula(V, G):
    g = VocabGrouping.contiguous(V, G)
    size = -(-V // G)
    assert torch.equal(g.group_of, torch.arange(V) // size)
    assert g.is_identity and torch.equal(g.order, torch.arange(V))
    assert g.max_group_size == size
    _check_layout(g)


def test_contiguous_rejects_empty_group():
    with pytest.raises(ValueError, match="empty"):
        VocabGrouping.contiguous(10, 6)  # ceil(10/6)=2: group 5 would start at 10


def test_from_token_counts_balances_size_and_mass(seed):
    V, G = 5003, 16
    counts = (1e6 / torch.arange(1, V + 1).double()).floor()  # Zipf-like token frequencies
    counts = counts[torch.randperm(V)]
    g = VocabGrouping.from_token_counts(counts, G)
    _check_layout(g)
    assert int(g.group_sizes.max() - g.group_sizes.min()) <= 1
    mass = torch.zeros(G, dtype=torch.float64).index_add_(0, g.group_of, counts.double())
    # snake dealing: every group is within the largest single count of every other
    assert float(mass.max() - mass.min()) <= float(counts.max()) + 1e-6
    assert not g.is_identity


def test_from_embeddings_equal_sizes_and_similar_rows(seed):
    V, H, G = 601, 24, 6
    centers = torch.randn(G, H) * 4
    weight = centers[torch.arange(V) % G] + 0.1 * torch.randn(V, H)
    g = VocabGrouping.from_embeddings(weight, G, iters=6)
    _check_layout(g)
    assert int(g.group_sizes.max() - g.group_sizes.min()) <= 1
    # tokens drawn from one cluster land (almost all) in one group
    agree = sum(int(torch.bincount(g.group_of[torch.arange(c, V, G)], minlength=G).max()) for c in range(G))
    assert agree >= 0.9 * V


@pytest.mark.parametrize("V,G", [(10, 6), (64, 64), (1000, 7)])
def test_from_embeddings_never_leaves_a_group_empty(V, G, seed):
    g = VocabGrouping.from_embeddings(torch.randn(V, 8), G, iters=3)
    _check_layout(g)
    assert int(g.group_sizes.max() - g.group_sizes.min()) <= 1


def test_state_dict_round_trip(seed):
    counts = torch.rand(777)
    g = VocabGrouping.from_token_counts(counts, 9)
    state = g.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    h = VocabGrouping.from_state_dict(state)
    assert torch.equal(h.group_of, g.group_of) and torch.equal(h.order, g.order)
    assert torch.equal(h.offsets, g.offsets) and h.num_groups == g.num_groups


@pytest.mark.parametrize(
    "group_of,G,match",
    [
        (torch.tensor([0, 1, 3]), 3, "lie in"),
        (torch.tensor([0, -1, 1]), 2, "lie in"),
        (torch.tensor([0, 0, 2]), 3, "empty"),
        (torch.tensor([0.0, 1.0]), 2, "integer"),
        (torch.tensor([], dtype=torch.int64), 1, "non-empty"),
    ],
)
def test_bad_groupings_raise(group_of, G, match):
    with pytest.raises(ValueError, match=match):
        VocabGrouping(group_of, G)
