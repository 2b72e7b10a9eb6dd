"""Speculative sampling keeps the target's distribution exactly: chi-square on a tiny model over seeds.

The first new token comes from the prefill (plain sampling); the second and third come out of tree
rejection sampling (accepted draft candidates or the bonus), so their joint distribution, given the
prompt, is what the test checks against the exact one computed from the target.
"""
import pytest
import torch

from coral_fast import SpeculativeGenerator
from coral_fast.generate import TreeConfig
from test_models import tiny_llama  # noqa: F401 (fixture)
from test_verify import chi_square_p

V = 12


def exact_joint(model, prompt, temperature):
    """p(t1, t2, t3 | prompt) [V, V, V] by enumerating all continuations (V^2 forwards in one batch)."""
    with torch.no_grad():
        p1 = torch.softmax(model(prompt[None]).logits[0, -1].double() / temperature, -1)
        seq2 = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], 1)
        p2 = torch.softmax(model(seq2).logits[:, -1].double() / temperature, -1)  # [t1, t2]
        t1, t2 = torch.meshgrid(torch.arange(V), torch.arange(V), indexing="ij")
        seq3 = torch.cat([prompt.expand(V * V, -1), t1.reshape(-1, 1), t2.reshape(-1, 1)], 1)
        p3 = torch.softmax(model(seq3).logits[:, -1].double() / temperature, -1).view(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


@pytest.mark.parametrize("mode", ["eager", "plain", pytest.param("graphs", marks=pytest.mark.cuda)])
def test_sampled_tokens_follow_the_target(mode, one_thread):
    """eager: the engine's device-side samplers (the prefill's first token, then tree rejection sampling)
    run eagerly (CPU). plain: one-token sampling steps. graphs: the same samplers captured in CUDA graphs
    on the GPU with the Triton kernels (head dim 16), what users run."""
    cuda = mode == "graphs"
    model = tiny_llama(vocab=V, hidden=64 if cuda else 32, seed=3)
    with torch.no_grad():  # a peakier target: acceptances happen often, and so do rejections
        model.lm_head.weight.mul_(8.0)
    temperature = 0.9
    prompt = torch.tensor([3, 7, 1])
    tree = TreeConfig(depth=2, topk=3, total_tokens=6)
    if cuda:
        model, prompt = model.cuda(), prompt.cuda()
    gen = SpeculativeGenerator(model, None, tree, mode="graphs" if cuda else "eager", adaptive=False, max_context=16)
    counts = torch.zeros(V, V)  # (t2, t3)
    rng = torch.Generator().manual_seed(0)
    accepted_draft_tokens = 0
    for _ in range(3000):
        out = gen.generate(prompt, 3, temperature=temperature, generator=rng, plain=mode == "plain")
        counts[out.token_ids[1], out.token_ids[2]] += 1
        accepted_draft_tokens += sum(out.accepted_lengths) - len(out.accepted_lengths)
    if cuda:
        model, prompt = model.cpu(), prompt.cpu()
    joint = exact_joint(model, prompt, temperature).sum(0)  # marginal of (t2, t3)
    if mode != "plain":
        assert accepted_draft_tokens > 300  # the rejection sampler's accept branch was exercised
    p = chi_square_p(counts.flatten(), joint.flatten())
    assert p > 1e-3, p
    # power check: the same counts against the greedy-tempered (T=0.5) distribution are rejected
    wrong = exact_joint(model, prompt, 0.5).sum(0)
    assert chi_square_p(counts.flatten(), wrong.flatten()) < 1e-6
