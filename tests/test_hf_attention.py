"""Issue 3's HF proof: a whole draft tree verified in one forward (registered attention "coral_tree",
explicit position ids, the loop's static KV cache) gives the logits of running each path token by token."""
import pytest
import torch

from coral_fast.hf_attention import TreeKVCache, tree_forward
from coral_fast.tree import DraftTree
from test_models import real_target, tiny_gemma3, tiny_llama  # noqa: F401 (fixture)


def causal_forward(model, cache, tokens, impl="sdpa", host_len=None):
    """The prompt as a chain at slots [0, T) -> (hidden [T, H], logits [T, V])."""
    T = tokens.shape[0]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    hidden, logits, _ = tree_forward(model, cache, tokens, mask, torch.arange(T), torch.zeros(1, dtype=torch.int64),
                                     impl, host_len=host_len)
    return hidden, logits


def random_tree(num_nodes, gen):
    parents = [-1]
    for i in range(1, num_nodes):
        parents.append(int(torch.randint(-1, i, (1,), generator=gen)))
    return DraftTree.from_parents(parents)


def path_logits_plain(model, prefix, tokens, tree):
    """The slow truth: for each node, the plain HF forward of prefix + its root-to-node path."""
    rows = []
    for i in range(tree.num_nodes):
        path = tree.mask[i].nonzero()[:, 0]
        seq = torch.cat([prefix, tokens[path]])
        rows.append(model(seq[None]).logits[0, -1])
    return torch.stack(rows)


@pytest.mark.parametrize("make_target", [tiny_llama, tiny_gemma3])
@pytest.mark.parametrize("prefix_len", [1, 9, 23])
def test_tree_logits_equal_path_by_path(make_target, prefix_len, seed, one_thread):
    model = make_target()
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, V, (prefix_len,), generator=gen)
    cache = TreeKVCache.for_model(model, 64)
    _, logits = causal_forward(model, cache, prefix)
    torch.testing.assert_close(logits, model(prefix[None]).logits[0], atol=1e-5, rtol=1e-5)
    tree = random_tree(13, gen)
    tokens = torch.randint(0, V, (13,), generator=gen)
    length = torch.tensor([prefix_len])
    ref = path_logits_plain(model, prefix, tokens, tree)
    for host_len in (None, prefix_len + 13):  # the whole buffer (captured runs) or the used part (eager)
        hidden, logits, _ = tree_forward(model, cache, tokens, tree.mask, tree.depth, length, host_len=host_len)
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.lm_head(hidden), logits)


def test_sliding_window_bites(seed, one_thread):
    """A Gemma 3 target whose window (5) is shorter than the prefix: the tree logits still match, and
    differ from a target without the window (so the test would catch a missing window)."""
    model = tiny_gemma3(window=5)
    wide = tiny_gemma3(window=512)
    wide.load_state_dict(model.state_dict())
    prefix = torch.randint(0, 89, (20,))
    tree = DraftTree.from_parents([-1, 0, 0, 1])
    tokens = torch.randint(0, 89, (4,))
    outs = []
    for m in (model, wide):
        cache = TreeKVCache.for_model(m, 64)
        causal_forward(m, cache, prefix)
        outs.append(tree_forward(m, cache, tokens, tree.mask, tree.depth, torch.tensor([20]))[1])
    torch.testing.assert_close(outs[0], path_logits_plain(model, prefix, tokens, tree), atol=1e-5, rtol=1e-5)
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_model_is_left_on_its_own_attention():
    model = tiny_llama()
    cache = TreeKVCache.for_model(model, 16)
    causal_forward(model, cache, torch.zeros(3, dtype=torch.int64))
    assert model.config._attn_implementation == "sdpa"
    model.generate(torch.zeros(1, 3, dtype=torch.int64), max_new_tokens=2, do_sample=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3-270m"])
def test_real_model_tree_logits(name):
    model, tok = real_target(name)
    prefix = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids[0]
    tree = DraftTree.from_parents([-1, -1, 0, 0, 1, 2, 2, 5])
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 5000, (8,), generator=gen)
    cache = TreeKVCache.for_model(model, 64)
    causal_forward(model, cache, prefix)
    _, logits, _ = tree_forward(model, cache, tokens, tree.mask, tree.depth, torch.tensor([len(prefix)]))
    ref = path_logits_plain(model, prefix, tokens, tree)
    torch.testing.assert_close(logits, ref, atol=2e-4, rtol=1e-4)
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
