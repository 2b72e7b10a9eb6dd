"""Prompt lookup: the device op and the host twin (LoopWatch) equal their list oracle; with a lookup chain in the
tree the loop's greedy output is still generate's, the chain is accepted where the output repeats its context, a
loop in a plain stretch starts a round, and sampling keeps the target's distribution (the root then has topk + 1
children)."""
import random

import pytest
import torch

from coral_fast import SpeculativeGenerator
from coral_fast.generate import TreeConfig
from coral_fast import generate
from coral_fast.lookup import LoopWatch, prompt_lookup, reference_prompt_lookup
from test_generate import plain_greedy, random_weights_draft
from test_models import tiny_llama
from test_sampling import V, exact_joint
from test_tree import node_paths
from test_verify import chi_square_p


def test_lookup_matches_the_list_oracle(seed):
    rng = random.Random(seed)
    for _ in range(600):
        S = rng.randint(2, 53)
        n = rng.randint(0, S - 1)
        vocab = rng.choice([2, 3, 7])  # small vocabularies: many repeats, several n-gram sizes match
        ids = torch.tensor([rng.randrange(vocab) for _ in range(S)])
        length, low = rng.randint(1, 7), rng.randint(1, 3)
        high = rng.randint(low, 5)
        got, found = prompt_lookup(ids, torch.tensor([n]), length, high, low)
        assert got.shape == (length,) and got.dtype == torch.int64 and found.shape == (1,)
        want = reference_prompt_lookup(ids[: n + 1].tolist(), length, high, low)
        assert (got.tolist(), bool(found)) == want, (ids.tolist(), n)


def test_lookup_copies_the_latest_longest_match():
    ids = torch.tensor([5, 6, 7, 8, 1, 6, 7, 9, 2, 5, 6, 7, 0, 0])  # committed up to n = 11 (ids[12:] garbage)
    n = torch.tensor([11])
    # "5 6 7" ends the context and occurred at 0: the 3-gram wins over the later "6 7" at 5
    assert prompt_lookup(ids, n, 4)[0].tolist() == [8, 1, 6, 7]
    assert prompt_lookup(ids, n, 4, ngram_max=2)[0].tolist() == [9, 2, 5, 6]  # "6 7" latest at 5
    # the copy reaches ids[n] after 9 tokens: the context is a loop of period 9 from there, and the chain repeats it
    assert prompt_lookup(ids, n, 12)[0].tolist() == [8, 1, 6, 7, 9, 2, 5, 6, 7, 8, 1, 6]
    loop = torch.tensor([3, 1, 2, 3, 1, 2, 3])  # "2 3" recurs 3 back: period 3
    assert prompt_lookup(loop, torch.tensor([6]), 7)[0].tolist() == [1, 2, 3, 1, 2, 3, 1]
    chain, found = prompt_lookup(torch.tensor([1, 2, 3, 4]), torch.tensor([3]), 3)
    assert chain.tolist() == [4, 4, 4] and not found  # no repeat
    with pytest.raises(ValueError, match="ngram_min"):
        prompt_lookup(ids, n, 4, ngram_max=1, ngram_min=2)


def test_tree_config_checks_the_lookup():
    assert TreeConfig(6, 10, 60, lookup=6).levels == 6
    assert TreeConfig(6, 10, 60, lookup=10).levels == 10  # a chain deeper than the draft's tree
    for kwargs in (dict(lookup=17), dict(lookup=-1), dict(lookup=1.0)):
        with pytest.raises(ValueError, match="lookup must be an integer in \\[0, 16\\]"):
            TreeConfig(6, 10, 60, **kwargs)
    with pytest.raises(ValueError, match="total_tokens must be an integer in \\[4, 10\\] .* with lookup 3"):
        TreeConfig(3, 2, 3, lookup=3)
    with pytest.raises(ValueError, match="lookup_sampling"):
        TreeConfig(6, 10, 60, lookup=6, lookup_sampling=1)
    with pytest.raises(ValueError, match="lookup 3 needs at least 4 tree tokens, more than the 2 a tree holds for depth 1 and topk 2"):
        TreeConfig(1, 2, 2, lookup=3)


def test_the_policy_expects_the_chains_depth_only_where_the_chain_serves(one_thread):
    """A fully accepted round commits levels + 1 tokens with the chain, depth + 1 without it (sampling requests
    when lookup_sampling is off): the policy's "could a round ever pay" bound follows."""
    model = tiny_llama(vocab=V, hidden=32, seed=5)
    for lookup_sampling, sampled in ((True, 6), (False, 3)):
        gen = SpeculativeGenerator(model, None, TreeConfig(2, 2, 6, lookup=5, lookup_sampling=lookup_sampling),
                                   max_context=64)
        gen.warmup()
        assert gen._policy(sampling=False).max_tau == 6 and gen._policy(sampling=True).max_tau == sampled
    gen = SpeculativeGenerator(model, None, TreeConfig(2, 2, 6), max_context=64)
    gen.warmup()
    assert gen._policy(sampling=False).max_tau == gen._policy(sampling=True).max_tau == 3


def _first_round_tree(gen, prompt, temperature):
    """The first round's tree (its nodes as root-to-node token paths), its last `lookup` nodes' paths, and what
    the list oracle says of the context at the root."""
    eng = gen.engine
    gen.warmup()
    eng.reset(prompt, temperature, torch.Generator().manual_seed(0))
    eng.prefill(prompt.shape[0])
    eng.catch_up()
    eng.run("draft")
    paths = node_paths(eng.tree_in.parents.tolist(), eng.tree_in.tokens[1:].tolist())
    oracle = reference_prompt_lookup(eng.hist.ids[: eng.n_host + 1].tolist(), max(eng.lookup, 1))
    return sorted(paths), paths[len(paths) - eng.lookup:], oracle


def test_the_chain_replaces_the_lowest_ranked_nodes_only_when_the_context_recurs(one_thread):
    """No recurring n-gram, or a sampling request with lookup_sampling=False: the draft's own tree of T nodes.
    A recurring one: the draft's best T - L and the copied chain from the root."""
    model = tiny_llama(vocab=V, hidden=32, seed=5)
    tree = dict(depth=3, topk=3, total_tokens=12)
    plain = SpeculativeGenerator(model, None, TreeConfig(**tree), adaptive=False, max_context=320)
    chained = SpeculativeGenerator(model, plain.draft, TreeConfig(**tree, lookup=4, lookup_sampling=False),
                                   adaptive=False, max_context=320)
    both = SpeculativeGenerator(model, plain.draft, TreeConfig(**tree, lookup=4), adaptive=False, max_context=320)
    fresh = torch.tensor([1, 2, 3, 4, 5, 6])  # distinct: no n-gram ending in the first new token recurs
    own = _first_round_tree(plain, fresh, 0.0)[0]
    got, _, (_, found) = _first_round_tree(chained, fresh, 0.0)
    assert got == own and not found
    every_pair = torch.tensor([[a, b] for a in range(V) for b in range(V)]).flatten()  # every 2-gram recurs
    sampled_own = _first_round_tree(plain, every_pair, 0.9)[0]  # the same draws: the same first token
    assert _first_round_tree(chained, every_pair, 0.9)[0] == sampled_own  # sampling: no chain
    own = _first_round_tree(plain, every_pair, 0.0)[0]
    got, tail, (copied, found) = _first_round_tree(chained, every_pair, 0.0)
    assert found and tail == [tuple(copied[: i + 1]) for i in range(4)] and got != own
    _, tail, (copied, found) = _first_round_tree(both, every_pair, 0.9)  # the first token was sampled
    assert found and tail == [tuple(copied[: i + 1]) for i in range(4)]


def test_greedy_identical_and_the_chain_is_accepted(seed, one_thread):
    """A random draft is almost never right; a tiny random target's greedy output falls into loops, which the
    chain copies: with it the rounds accept several tokens, and the output is generate's either way."""
    model = tiny_llama(seed=seed % 1000)
    vocab = model.config.vocab_size
    taus, longest = {}, {}
    for lookup in (0, 3, 7):  # 7: a chain deeper than the draft's tree (a round accepts up to 8 tokens)
        gen = SpeculativeGenerator(model, None, TreeConfig(4, 3, 12 + max(lookup - 3, 0), lookup=lookup),
                                   adaptive=False, max_context=160)
        for prompt_len, n in [(1, 40), (9, 60), (30, 25)]:
            prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(seed + prompt_len))
            out = gen.generate(prompt, n)
            assert out.token_ids == plain_greedy(model, prompt, n), (lookup, prompt_len)
            taus.setdefault(lookup, []).append(out.mean_accepted_length)
            longest[lookup] = max(longest.get(lookup, 0), *out.accepted_lengths)
    assert sum(taus[3]) > sum(taus[0]) + 0.3, taus  # 40 seeds: +0.81 to +4; a chain that never helps: <= 0
    assert longest[7] > 5 >= longest[3], longest  # only a chain past depth 4 accepts more than 5 tokens a round


def test_loop_watch_matches_the_list_oracle(seed):
    """The host twin proposes the oracle's first token after every prefix, whenever it is fed, and counts the
    run of hits since its context."""
    rng = random.Random(seed)

    def first(context, high, low):
        if not context:
            return None
        chain, found = reference_prompt_lookup(context, 1, high, low)
        return chain[0] if found else None

    for _ in range(300):
        vocab = rng.choice([2, 3, 7])
        low = rng.randint(1, 3)
        high = rng.randint(low, 5)
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 50))]
        split = rng.randint(0, len(ids))
        watch, answer, streak = LoopWatch(ids[:split], high, low), [], 0
        for i in range(split, len(ids)):
            if rng.random() < 0.5:  # fed now and then, as the loop feeds it
                assert watch.feed(answer) == streak
                assert watch.proposal() == first(ids[:i], high, low), (ids[:i], high, low)
            streak = streak + 1 if first(ids[:i], high, low) == ids[i] else 0
            answer.append(ids[i])
        assert watch.feed(answer) == streak
    with pytest.raises(ValueError, match="ngram_min"):
        LoopWatch([], 2, 3)


def test_plain_stretches_probe_when_the_chain_would_copy(seed, one_thread):
    """Decoding plainly after poor rounds (a random draft; costs where a full round could pay), a request with
    the chain runs a round as soon as the chain's first token has been right LOOP_STREAK times in a row: a tiny
    random target's greedy output falls into loops, which the chain then commits. Without the watch the
    request stays plain until its next timed probe (policy option loop_streak=0). The output is generate's either
    way."""
    model = tiny_llama(seed=seed % 1000)
    prompt = torch.randint(0, model.config.vocab_size, (9,), generator=torch.Generator().manual_seed(seed))
    want = plain_greedy(model, prompt, 150)
    outs = {}
    for streak in (generate.LOOP_STREAK, 0):
        gen = SpeculativeGenerator(model, random_weights_draft(model, seed), TreeConfig(4, 3, 16, lookup=7),
                                   max_context=256)
        gen.policy_options = dict(loop_streak=streak)
        gen.warmup()
        gen.round_time_s, gen.plain_step_time_s, gen.refine_costs = 1.5, 1.0, False
        policy = gen._policy(sampling=False)
        policy.ema_tau, policy.interval = 1.0, policy.max_interval  # a poor request before: plain, rare probes
        outs[streak] = gen.generate(prompt, 150)
        assert outs[streak].token_ids == want
    watched, blind = outs[generate.LOOP_STREAK], outs[0]
    assert watched.loop_probes >= 1 and blind.loop_probes == 0, (watched.stats(), watched.accepted_lengths, blind.stats())
    assert watched.plain_steps < blind.plain_steps - 20, (watched.stats(), blind.stats())


@pytest.mark.parametrize("depth, total_tokens", [(2, 8), (1, 3)])
def test_sampling_with_the_chain_follows_the_target(depth, total_tokens, one_thread):
    """As test_sampling's check, with a lookup chain of 2 beside a depth-2 tree, or below a depth-1 tree (the
    chain's second token is judged alone); the root has 4 children. The prompt repeats "3 7", so after "7" the
    chain proposes "1 3" (an exact copy, often accepted)."""
    model = tiny_llama(vocab=V, hidden=32, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    temperature = 0.9
    prompt = torch.tensor([3, 7, 1, 3, 7])
    tree = TreeConfig(depth=depth, topk=3, total_tokens=total_tokens, lookup=2)
    assert tree.lookup_sampling  # the default: the chain serves sampling requests too
    gen = SpeculativeGenerator(model, None, tree, adaptive=False, max_context=16)
    assert gen.engine.children == 4 and gen.engine.sampling.uniforms.shape == (3, 5)
    counts = torch.zeros(V, V)
    rng = torch.Generator().manual_seed(0)
    longest = 0
    for _ in range(3000):
        out = gen.generate(prompt, 4, temperature=temperature, generator=rng)  # room for a round of 3
        counts[out.token_ids[1], out.token_ids[2]] += 1
        longest = max(longest, *out.accepted_lengths)
    assert longest == 3  # two tokens and the bonus: below a depth-1 tree only the chain reaches that
    joint = exact_joint(model, prompt, temperature).sum(0)
    assert chi_square_p(counts.flatten(), joint.flatten()) > 1e-3
    wrong = exact_joint(model, prompt, 0.5).sum(0)
    assert chi_square_p(counts.flatten(), wrong.flatten()) < 1e-6


@pytest.mark.interpreter
def test_compiled_engine_with_the_chain(monkeypatch, seed, one_thread):
    """The chain's op traces into the compiled draft step (aot_eager on the CPU, as test_generate's compile
    tests) and the output stays generate's; no step compiles again after warm-up."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    model = tiny_llama(hidden=64)
    vocab = model.config.vocab_size
    gen = SpeculativeGenerator(model, None, TreeConfig(depth=3, topk=3, total_tokens=9, lookup=2), mode="compile",
                               impl="triton", head_impl="triton", max_context=48, chunk=8, adaptive=False)
    gen.warmup()
    captured, compiled = gen.captures, gen.compiles
    for prompt_len, n in [(7, 20), (19, 9)]:
        prompt = torch.randint(0, vocab, (prompt_len,))
        assert gen.generate(prompt, n).token_ids == plain_greedy(model, prompt, n), prompt_len
    assert (gen.captures, gen.compiles) == (captured, compiled)
    torch._dynamo.reset()
