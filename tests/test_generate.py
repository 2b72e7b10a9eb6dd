"""The loop end to end: greedy output identical to model.generate(do_sample=False), in speculative
rounds, plain steps and any mix of them; chunked prefill; bad requests; the real models."""
import math

import pytest
import torch

from coral_fast import DraftModel, SpeculativeGenerator
from coral_fast.engine import SCOUT_ROWS
from coral_fast.generate import SpeculationPolicy, TreeConfig
from coral_fast.tree import DraftTree
from test_models import real_target, tiny_gemma3, tiny_llama  # noqa: F401 (fixture)

SMALL = TreeConfig(depth=3, topk=3, total_tokens=8)


def plain_greedy(model, prompt, n, eos=None):
    kwargs = dict(max_new_tokens=n, do_sample=False,
                  attention_mask=torch.ones(1, len(prompt), dtype=torch.int64, device=prompt.device))
    if eos is None:
        kwargs["min_new_tokens"] = n
    else:
        kwargs["eos_token_id"] = eos
    return model.generate(prompt[None], **kwargs)[0, len(prompt):].tolist()


def install_oracle(gen: SpeculativeGenerator, truth: list, vocab: int, rng: torch.Generator, depth=5):
    """Replace the engine's tree builder by one whose tree holds the true continuation up to a random depth,
    with a wrong sibling at every level and wrong tokens below the break, padded to the engine's size
    with wrong children of the root: long, varied acceptances. Eager engines only (reads the host n)."""
    engine = gen.engine
    assert depth <= engine.depth and 2 * depth <= engine.T

    cuts = engine.oracle_cuts = []  # per call (warm-up calls too): how deep the truth goes

    def oracle_tree(eng, last, n_device, width):
        n = eng.n_host  # the root (last accepted token) sits at position n
        cut = int(torch.randint(0, depth + 1, (1,), generator=rng))
        cuts.append(cut)
        parents, tokens, prev = [], [], -1
        for d in range(depth):
            true = truth[n + 1 + d] if n + 1 + d < len(truth) else int(torch.randint(0, vocab, (1,), generator=rng))
            token = true if d < cut else (true + 1) % vocab
            parents += [prev, prev]
            tokens += [token, (token + 2) % vocab]
            prev = len(tokens) - 2
        extra = eng.T - len(parents)
        parents += [-1] * extra
        tokens += [(tokens[0] + 3 + i) % vocab for i in range(extra)]
        return DraftTree.from_parents(parents), torch.tensor(tokens)

    engine.tree_builder = oracle_tree


def assert_oracle_acceptances(gen: SpeculativeGenerator, out) -> None:
    """Each round but the last accepted exactly the oracle's true prefix plus the bonus token: the rows past
    the root saw the right tree. Exact, whatever the draws were. The last round is not judged: its tree runs
    past the known continuation, where the oracle's "wrong" tokens are random and match the target's next
    token one time in V."""
    cuts = gen.engine.oracle_cuts[-out.rounds:]
    want = [c + 1 for c in cuts]
    assert out.accepted_lengths[:-1] == want[:-1], (out.accepted_lengths, want)
    assert max(want) >= 3, want  # some round went past the root's children (a draw this short is ~1e-5)


@pytest.mark.parametrize("make_target", [tiny_llama, tiny_gemma3])
def test_random_draft_greedy_identical(make_target, seed, one_thread):
    """Speculative rounds only (adaptive off), speculative rounds with fallback, plain steps only."""
    model = make_target()
    V = model.config.vocab_size
    always = SpeculativeGenerator(model, None, SMALL, adaptive=False, max_context=128)
    adaptive = SpeculativeGenerator(model, always.draft, SMALL, max_context=128)
    for prompt_len, n in [(1, 9), (7, 30), (16, 3)]:
        prompt = torch.randint(0, V, (prompt_len,))
        ref = plain_greedy(model, prompt, n)
        out = always.generate(prompt, n)
        assert out.token_ids == ref
        assert out.rounds == len(out.accepted_lengths) and sum(out.accepted_lengths) + 1 >= n
        assert out.plain_steps == 0
        assert adaptive.generate(prompt, n).token_ids == ref
        plain = always.generate(prompt, n, plain=True)
        assert plain.token_ids == ref and plain.rounds == 0 and plain.plain_steps == n - 1
        assert plain.mean_accepted_length == 1.0


def test_no_draft_is_plain_decoding(seed, one_thread):
    model = tiny_gemma3()
    gen = SpeculativeGenerator(model, speculative=False, max_context=64)
    assert gen.draft is None and not hasattr(gen.engine, "dk")
    prompt = torch.randint(0, 89, (9,))
    out = gen.generate(prompt, 20)
    assert out.token_ids == plain_greedy(model, prompt, 20)
    assert out.rounds == 0 and out.plain_steps == 19 and out.mean_accepted_length == 1.0


@pytest.mark.parametrize("make_target", [tiny_llama, tiny_gemma3])
def test_prefill_in_chunks(make_target, seed, one_thread):
    """Prompts longer than the prefill chunk go through it many times (last chunk padded); the draft
    catches up in chunks too. Gemma's window (5) is shorter than the prompts."""
    model = make_target()
    V = model.config.vocab_size
    gen = SpeculativeGenerator(model, None, SMALL, adaptive=False, max_context=96, chunk=4)
    for prompt_len, n in [(37, 12), (4, 6), (8, 5), (1, 4), (90, 6)]:
        prompt = torch.randint(0, V, (prompt_len,))
        out = gen.generate(prompt, n)
        assert gen.engine.C == 4
        assert out.token_ids == plain_greedy(model, prompt, n), prompt_len


@pytest.mark.parametrize("make_target", [tiny_llama, tiny_gemma3])
def test_long_acceptances_stay_exact(make_target, seed, one_thread):
    """With an oracle tree most rounds accept several tokens; the output must not change."""
    model = make_target()
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (5,))
    ref = plain_greedy(model, prompt, 60)
    gen = SpeculativeGenerator(model, None, TreeConfig(6, 4, 24), adaptive=False, max_context=128)
    install_oracle(gen, prompt.tolist() + ref, V, torch.Generator().manual_seed(seed))
    out = gen.generate(prompt, 60)
    assert out.token_ids == ref
    assert_oracle_acceptances(gen, out)


def test_adaptive_falls_back_with_a_useless_draft(seed, one_thread):
    """A random draft (std 1) accepts almost nothing: the engine switches to plain steps after a round or
    two, probes now and then, and the output is still the target's."""
    model = tiny_llama(hidden=64)
    draft = random_weights_draft(model, seed)
    gen = SpeculativeGenerator(model, draft, TreeConfig(4, 4, 16), max_context=256)
    prompt = torch.randint(0, 97, (11,))
    out = gen.generate(prompt, 120)
    assert out.token_ids == plain_greedy(model, prompt, 120)
    assert gen.round_time_s > gen.plain_step_time_s > 0
    assert out.plain_steps > 90 and out.rounds <= 12, (out.plain_steps, out.rounds)
    # costs where rounds could pay (a CPU round is too dear to try at all): the first request opens with a
    # round and probes; the next one starts from the poor acceptance seen, and rounds less
    gen.round_time_s, gen.plain_step_time_s, gen.refine_costs = 1.5, 1.0, False
    first, again = gen.generate(prompt, 120), gen.generate(prompt, 120)
    assert first.token_ids == again.token_ids == out.token_ids
    assert first.accepted_lengths[0] <= 2 and again.rounds < first.rounds, (again.rounds, first.rounds)


def test_policy_probes_and_backs_off():
    dear = SpeculationPolicy(round_s=4.0, plain_s=1.0, max_tau=5)
    assert dear.interval == 96  # dear rounds: rarer probes (32 plain steps per extra step a probe costs)
    assert not dear.speculate()  # and 5 tokens a round would gain 1.25x < 2x: start plainly
    for _ in range(95):
        dear.after_plain()
    assert not dear.speculate()
    dear.after_plain()
    assert dear.speculate()
    assert not SpeculationPolicy(round_s=3.0, plain_s=1.0, max_tau=5).speculate()  # 1.67x at best: plainly
    assert SpeculationPolicy(round_s=2.0, plain_s=1.0, max_tau=5).speculate()  # 2.5x possible: try a round
    hopeless = SpeculationPolicy(round_s=6.0, plain_s=1.0, max_tau=5)  # 5 tokens for 6 steps: never pays
    for _ in range(1000):
        assert not hopeless.speculate()
        hopeless.after_plain()
    policy = SpeculationPolicy(round_s=2.0, plain_s=1.0)
    assert policy.speculate()  # nothing seen yet: try
    policy.after_round(1)
    assert not policy.speculate()
    for _ in range(31):
        policy.after_plain()
    assert not policy.speculate()
    policy.after_plain()
    assert policy.speculate()  # the probe after 32 plain tokens
    policy.after_round(1)
    assert policy.interval == 64 and not policy.speculate()
    for tau in (6, 6, 6, 6, 6):  # acceptance recovers: speculation pays again (2.0 * 1.05 < ema)
        policy.after_round(tau)
    assert policy.speculate() and policy.interval == 32
    misses = 0
    while policy.speculate():  # a poor stretch while speculating: the EMA falls below 2.1, back to plain ...
        policy.after_round(1)
        misses += 1
    a = policy.alpha  # ... after the misses that take 6 below 2.1 at this weight, not after one or two
    assert misses == math.ceil(math.log((2.1 - 1) / 5) / math.log(1 - a)) and misses >= 3 and policy.ema_tau < 2.1
    for _ in range(policy.interval):  # the first interval: the turn was not a failed probe
        policy.after_plain()
    assert policy.speculate()
    policy.after_round(3)  # ... and one good probe is enough to switch speculation back on (3 > 2.1)
    assert policy.speculate() and policy.ema_tau == 3 and policy.interval == 32
    policy.after_round(1)  # while speculating a round joins the EMA: (1 - a) * 3 + a * 1 still pays
    assert policy.speculate() and abs(policy.ema_tau - ((1 - a) * 3 + a)) < 1e-9


def test_policy_ema_weight_follows_the_round_cost():
    """Cheap rounds (under CHEAP_ROUND plain steps): the EMA remembers longer; dear ones: it follows faster; an
    explicit weight stays."""
    from coral_fast.generate import CHEAP_ROUND, EMA_ALPHA_CHEAP, EMA_ALPHA_DEAR

    assert EMA_ALPHA_CHEAP < EMA_ALPHA_DEAR
    assert SpeculationPolicy(round_s=1.85e-3, plain_s=1e-3).alpha == EMA_ALPHA_CHEAP
    assert SpeculationPolicy(round_s=(CHEAP_ROUND + 0.01) * 1e-3, plain_s=1e-3).alpha == EMA_ALPHA_DEAR
    assert SpeculationPolicy(round_s=float("nan"), plain_s=1e-3).alpha == EMA_ALPHA_DEAR
    assert SpeculationPolicy(round_s=4.4, plain_s=1.0, alpha=0.5).alpha == 0.5
    cheap, dear = SpeculationPolicy(round_s=2.0, plain_s=1.0), SpeculationPolicy(round_s=4.0, plain_s=1.0)
    for policy in (cheap, dear):
        policy.after_round(9)
        policy.after_round(1)  # one miss: the cheap policy's estimate moves less
    assert cheap.ema_tau == pytest.approx(9 - 8 * EMA_ALPHA_CHEAP) and dear.ema_tau == pytest.approx(9 - 8 * EMA_ALPHA_DEAR)


def test_policy_rounds_out_of_schedule():
    """A round the loop watch starts from plain decoding (scheduled=False) switches speculation on when it pays
    and, when it does not, leaves the probe schedule and the estimate as they were."""
    policy = SpeculationPolicy(round_s=2.0, plain_s=1.0, max_tau=8)
    policy.after_round(1)
    policy.after_round(1)  # plain now, the next probe 64 plain steps away
    for _ in range(10):
        policy.after_plain()
    state = (policy.ema_tau, policy.interval, policy.since_probe)
    assert not policy.speculate() and state == (1.0, 64, 10)
    policy.after_round(2, scheduled=False)  # 2 < 2.1 tokens a round: it did not pay
    assert (policy.ema_tau, policy.interval, policy.since_probe) == state and not policy.speculate()
    policy.after_round(5, scheduled=False)  # it paid: speculate on, as after a good probe
    assert policy.speculate() and (policy.ema_tau, policy.interval, policy.since_probe) == (5.0, 32, 0)
    policy.after_round(1, scheduled=False)  # while speculating it is an ordinary round: (1 - a) * 5 + a * 1
    assert abs(policy.ema_tau - ((1 - policy.alpha) * 5 + policy.alpha)) < 1e-9
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="loop_streak"):
            SpeculationPolicy(round_s=2.0, plain_s=1.0, loop_streak=bad)


def test_policy_carries_acceptance_across_requests():
    policy = SpeculationPolicy(round_s=2.0, plain_s=1.0, max_tau=5)
    policy.new_request()
    assert policy.speculate()  # nothing seen: the first request opens with a round
    policy.after_round(1)
    for _ in range(32):
        policy.after_plain()
    policy.after_round(1)  # a failed probe: the next one after 64 plain tokens
    for _ in range(10):
        policy.after_plain()
    policy.new_request()  # no round at the start of the next request (acceptance was poor) ...
    assert not policy.speculate() and policy.since_probe == 64 - 32
    for _ in range(31):
        policy.after_plain()
    assert not policy.speculate()
    policy.after_plain()
    assert policy.speculate()  # ... but a probe within first_interval (32) tokens of it


def engine_after_prefill(make_target, seed, tree: TreeConfig, prompt_len: int, chunk: int = 8):
    """(draft, engine) of a warm eager generator with a random-init draft, a random prompt prefilled."""
    model = make_target()
    torch.manual_seed(seed)
    draft = DraftModel.random_init(model)
    gen = SpeculativeGenerator(model, draft, tree, max_context=128, chunk=chunk)
    gen.warmup()
    gen.engine.reset(torch.randint(0, model.config.vocab_size, (prompt_len,)), 0.0, None)
    gen.engine.prefill(prompt_len)
    return draft, gen.engine


@pytest.mark.parametrize("make_target", [tiny_llama, tiny_gemma3])
def test_draft_tree_states_equal_the_draft_run_along_each_path(make_target, seed, one_thread, monkeypatch):
    """Every expanded tree node's draft state (what its children are drafted from) equals the draft run
    causally over the prefix and then along that node's root path: the tree's slots, positions and
    attention masks in the draft's cache are right (the output's exactness cannot show a wrong mask: it
    only lowers acceptance)."""
    import coral_fast.engine as engine_module

    draft, eng = engine_after_prefill(make_target, seed, TreeConfig(4, 3, 12), 13)
    eng.catch_up()
    states, levels = [], []  # the hidden rows each draft.topk call ranks; (level, frontier, tokens, parents)
    topk = draft.topk
    monkeypatch.setattr(draft, "topk", lambda hidden, k, **kw: states.append(hidden.clone()) or topk(hidden, k, **kw))
    build = engine_module.build_dynamic_tree

    def recording_build(root_ids, root_logprobs, expand, **kw):
        def recorded(level, frontier, table):
            levels.append((level, frontier.clone(), table.tokens.clone(), table.parents.clone()))
            return expand(level, frontier, table)
        return build(root_ids, root_logprobs, recorded, **kw)

    monkeypatch.setattr(engine_module, "build_dynamic_tree", recording_build)
    n = eng.n_host
    eng.run("draft")
    last = states[0]  # [1, H]: the root's state, predicting position n
    state_of = {}
    for (level, frontier, tokens, parents), hidden in zip(levels, states[1:]):
        for row, node in enumerate(frontier.tolist()):
            state_of[node] = hidden[row]
            path = [node]
            while parents[path[-1]] >= 0:
                path.append(int(parents[path[-1]]))
            path.reverse()  # depth 0 first; len(path) == level
            feats = torch.cat([eng.hist.feats[:n], last] + [state_of[a][None] for a in path[:-1]])
            ids = torch.cat([eng.hist.ids[1 : n + 1], tokens[path]])
            with torch.no_grad():
                want = draft(feats[None], ids[None], torch.arange(n + level)[None])[0, -1]
            torch.testing.assert_close(hidden[row], want, rtol=1e-4, atol=1e-4)
    assert [lv for lv, *_ in levels] == [1, 2, 3]


def test_policy_scout_ends_hopeless_probes():
    policy = SpeculationPolicy(round_s=2.0, plain_s=1.0, max_tau=5)  # a round must commit 2.1 tokens
    policy.after_round(1)
    interval = policy.interval
    assert not policy.scout_fails(0, 15)  # too few guesses judged: the probe runs its round
    assert policy.interval == interval
    # hit rate 0.4: a chain commits 1 + .4 + .16 + .064 + .0256 = 1.65 >= 0.75 * 2.1 = 1.575: run the round
    assert not policy.scout_fails(8, 20)
    # 0.35: 1.53 < 1.575: the probe ends here, as a failed one (the next waits twice as long)
    assert policy.scout_fails(7, 20) and policy.interval == 2 * interval and policy.since_probe == 0
    assert not SpeculationPolicy(round_s=2.0, plain_s=1.0).scout_fails(0, 100)  # no depth known: no verdict


@pytest.mark.parametrize("make_target", [tiny_llama, tiny_gemma3])
def test_scout_counts_the_drafts_first_guesses(make_target, seed, one_thread, monkeypatch):
    """A probe's catch-up judges the draft's top-1 guess at the last SCOUT_ROWS rows it extends (rows that
    predict answer tokens, not prompt tokens) against the token the target chose there. The head is
    replaced by one that knows, for each of those teacher-forced draft states (the training-style forward
    over the whole sequence), the token two positions on, and guesses wrong elsewhere: every judged guess
    is then right if and only if the rows and offsets line up. A chunk of 24 rows and a stretch of ~40:
    the short chunk must come first for the last one to hold SCOUT_ROWS rows."""
    P, steps, C = 10, 30, 24
    draft, eng = engine_after_prefill(make_target, seed, TreeConfig(3, 3, 8), P, chunk=C)
    timer = type("NoTimer", (), {"mark": lambda self, name: None})()
    for _ in range(steps):
        eng.plain(timer)
    n = eng.n_host
    with torch.no_grad():  # the draft state at every t < n - 1, teacher-forced, and the token it should guess
        states = draft(eng.hist.feats[None, : n - 1], eng.hist.ids[None, 1:n], torch.arange(n - 1)[None])[0]
    answers = eng.hist.ids[2 : n + 1].clone()
    answers[: n - 1 - SCOUT_ROWS] = -2  # states before the last SCOUT_ROWS: known to guess wrong

    def knowing_head(hidden, k, impl="auto", check=True):
        near = torch.cdist(hidden.float(), states.float()).min(dim=1)
        guess = torch.where(near.values < 1e-3, answers[near.indices], torch.full_like(near.indices, -1))
        return guess[:, None], torch.zeros(hidden.shape[0], 1)

    monkeypatch.setattr(draft, "topk", knowing_head)
    eng.catch_up(scout=True)
    hits, rows = eng.take_scout()
    # caught up on t < d_len = n - 1 (more than C rows); judged: the last SCOUT_ROWS, all predicting answer tokens
    assert eng.d_len_host == n - 1 and n - 1 > C and n - 1 - SCOUT_ROWS >= P
    assert (hits, rows) == (SCOUT_ROWS, SCOUT_ROWS)
    assert eng.take_scout() == (0, 0)  # taken: zeroed


def random_draft_where_rounds_could_pay(seed):
    """(model, warm generator) of a tiny Llama with a random draft, its costs set so that a round of full
    acceptance would pay (round 1.5 plain steps) and kept there: the policy then probes."""
    model = tiny_llama(hidden=64)
    gen = SpeculativeGenerator(model, random_weights_draft(model, seed), TreeConfig(4, 4, 16), max_context=256)
    gen.warmup()
    gen.round_time_s, gen.plain_step_time_s, gen.refine_costs = 1.5, 1.0, False
    return model, gen


def test_adaptive_scout_skips_rounds_of_a_useless_draft(seed, one_thread):
    """With costs where a round could pay, a random draft's probes end at the first look (no round); the
    output is the target's, and fewer rounds run than with the look switched off."""
    model, gen = random_draft_where_rounds_could_pay(seed)
    prompt = torch.randint(0, 97, (11,))
    runs = {}
    for fraction in (0.0, 0.75):
        gen.policy_options = dict(scout_fraction=fraction)
        runs[fraction] = [gen.generate(prompt, 120) for _ in range(2)]
    want = plain_greedy(model, prompt, 120)
    assert all(out.token_ids == want for outs in runs.values() for out in outs)
    looked, blind = sum(o.rounds for o in runs[0.75]), sum(o.rounds for o in runs[0.0])
    assert sum(o.scouted for o in runs[0.75]) >= 2 and looked < blind, (looked, blind)
    assert sum(o.scouted for o in runs[0.0]) == 0


def test_greedy_probe_waits_for_answer_tokens_to_judge(seed, one_thread):
    """A probe due at the start of a request (carried over from a poor one) waits until the answer holds
    SCOUT_ROWS tokens for its first look; with the look switched off it runs its round at once, blind.
    A plain-mode request in between changes nothing of the policy."""
    model, gen = random_draft_where_rounds_could_pay(seed)
    prompt = torch.randint(0, 97, (11,))
    want = plain_greedy(model, prompt, SCOUT_ROWS)
    for fraction, probes_at_once in ((0.75, False), (0.0, True)):
        gen.policy_options = dict(scout_fraction=fraction)
        gen.generate(prompt, 40)  # a random draft: the estimate is poor afterwards
        policy = gen._policy(sampling=False)
        assert not policy.pays()
        policy.since_probe = policy.interval  # a probe is due
        state = (policy.since_probe, policy.interval, policy.ema_tau)
        assert gen.generate(prompt, 30, plain=True).token_ids[:SCOUT_ROWS] == want
        assert (policy.since_probe, policy.interval, policy.ema_tau) == state  # plain mode leaves the policy be
        out = gen.generate(prompt, SCOUT_ROWS)
        assert out.token_ids == want
        assert (out.rounds + out.scouted > 0) == probes_at_once, (fraction, out.rounds, out.scouted)


@pytest.mark.parametrize("make_target", [tiny_llama, tiny_gemma3])
def test_plain_steps_then_rounds_keep_the_draft_in_step(make_target, seed, one_thread):
    """Switching modes mid-request: plain steps, then the draft catches up in chunks and rounds resume
    (forced by the policy's costs); the oracle draft is still accepted afterwards."""
    model = make_target()
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (6,))
    ref = plain_greedy(model, prompt, 70)
    gen = SpeculativeGenerator(model, None, TreeConfig(6, 4, 24), max_context=128, chunk=4)
    install_oracle(gen, prompt.tolist() + ref, V, torch.Generator().manual_seed(seed))
    gen.warmup()
    gen.round_time_s, gen.plain_step_time_s = 1.5, 1.0  # probes after 16, 32, ... plain steps
    # no round pays (an accepted length <= 6 gives <= 4 tokens a plain step's time, under 1 + margin),
    # while a full one (7 tokens: 4.7) could, so the policy keeps probing
    gen.refine_costs, gen.policy_options = False, dict(margin=3.2, scout_fraction=0.0)  # (a random draft: no first look)
    out = gen.generate(prompt, 70)
    assert out.token_ids == ref
    assert out.plain_steps > 40 and out.rounds >= 2


def test_eos_stops_like_generate(seed, one_thread):
    model = tiny_llama()
    prompt = torch.randint(0, 97, (4,))
    ref = plain_greedy(model, prompt, 40)
    eos = ref[17]
    gen = SpeculativeGenerator(model, None, TreeConfig(6, 4, 24), eos_token_id=eos, adaptive=False, max_context=64)
    install_oracle(gen, prompt.tolist() + ref, 97, torch.Generator().manual_seed(seed))
    out = gen.generate(prompt, 40)
    assert out.token_ids == plain_greedy(model, prompt, 40, eos=eos)
    assert out.token_ids[-1] == eos and len(out.token_ids) == ref.index(eos) + 1
    assert len(gen.generate(prompt, 40, ignore_eos=True).token_ids) == 40
    assert gen.generate(prompt, 40, plain=True).token_ids == out.token_ids


def test_streaming_callback_and_stats(one_thread):
    model = tiny_llama()
    prompt = torch.randint(0, 97, (3,))
    seen = []
    gen = SpeculativeGenerator(model, adaptive=False, max_context=64)
    out = gen.generate(prompt, 12, callback=seen.extend)
    assert seen == out.token_ids and len(seen) == 12
    stats = out.stats()
    assert stats["new_tokens"] == 12 and stats["draft_s"] > 0 and stats["verify_s"] > 0
    assert out.warmup_time_s > 0 and gen.generate(prompt, 3).warmup_time_s == 0.0
    assert 0 < out.prefill_time_s < out.total_time_s and stats["plain_steps"] == 0


def test_bad_requests_are_refused_and_leave_the_engine_usable(seed, one_thread):
    model = tiny_llama()
    gen = SpeculativeGenerator(model, None, SMALL, max_context=40)
    prompt = torch.randint(0, 97, (7,))
    ref = plain_greedy(model, prompt, 10)
    assert gen.generate(prompt, 10).token_ids == ref
    bad = [
        (dict(input_ids=torch.zeros(0, dtype=torch.int64)), "empty"),
        (dict(input_ids=torch.zeros(2, 3, dtype=torch.int64)), "batch size 1"),
        (dict(input_ids=torch.zeros(1, 1, 3, dtype=torch.int64)), "shape \\(1, 1, 3\\)"),
        (dict(input_ids=torch.tensor(5)), "shape \\(\\)"),
        (dict(input_ids=torch.tensor([5, 97])), "out of range"),
        (dict(input_ids=torch.tensor([5, -1])), "out of range"),
        (dict(input_ids=[504.7, 3.0]), "integer token ids"),
        (dict(input_ids=torch.tensor([True, False])), "integer token ids"),
        (dict(input_ids=torch.zeros(35, dtype=torch.int64), max_new_tokens=6), "exceeds max_context 40"),
        (dict(max_new_tokens=34), "exceeds max_context 40"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(max_new_tokens=True), "max_new_tokens"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=1e-310), "temperature"),
    ]
    for kwargs, message in bad:
        kwargs = {"input_ids": prompt, "max_new_tokens": 10, **kwargs}
        with pytest.raises(ValueError, match=message):
            gen.generate(**kwargs)
    assert gen.generate(prompt.tolist(), 10).token_ids == ref  # a list works, and nothing was left half-done
    assert gen.generate(prompt[None], 33).token_ids == plain_greedy(model, prompt, 33)  # exactly at the limit

    def failing(tokens):
        raise RuntimeError("the caller's callback failed")

    with pytest.raises(RuntimeError, match="callback"):
        gen.generate(prompt, 10, callback=failing)
    assert gen.generate(prompt, 10).token_ids == ref


def test_constructor_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="vocabulary 97.*has 101"):
        SpeculativeGenerator(tiny_llama(vocab=101), DraftModel.random_init(model))
    with pytest.raises(ValueError, match="total_tokens"):
        TreeConfig(depth=2, topk=2, total_tokens=7)
    for kwargs in (dict(depth=0), dict(topk=0), dict(depth=-1), dict(total_tokens=0), dict(total_tokens=1000),
                   dict(depth=2.0)):
        with pytest.raises(ValueError, match="must be an integer in \\[1, "):
            TreeConfig(**kwargs)
    with pytest.raises(ValueError, match="mode must be one of"):
        SpeculativeGenerator(model, mode="fast")
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        SpeculativeGenerator(model, mode="graphs")
    with pytest.raises(ValueError, match="max_context must be an integer in \\[1, 2048\\]"):
        SpeculativeGenerator(model, max_context=10**6)
    for chunk in (0, 129, 4.0):
        with pytest.raises(ValueError, match="chunk .* must be an integer in \\[1, 128\\]"):
            SpeculativeGenerator(model, chunk=chunk)


@pytest.mark.interpreter
@pytest.mark.parametrize("make_target", [lambda: tiny_llama(hidden=64), lambda: tiny_gemma3(window=5)])
def test_engine_with_the_triton_tree_kernel(make_target, seed, one_thread):
    """The GPU's attention path (the Triton tree-attention kernel over the static cache with a device
    kv_len) through the interpreter, with long acceptances: the rows past the root must see the right
    mask bits, and a window shorter than the prompt must cut the prefill's own keys."""
    model = make_target()
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (12,))
    ref = plain_greedy(model, prompt, 30)
    gen = SpeculativeGenerator(model, None, TreeConfig(depth=5, topk=4, total_tokens=40), impl="triton",
                               adaptive=False, max_context=64)
    install_oracle(gen, prompt.tolist() + ref, V, torch.Generator().manual_seed(seed))
    out = gen.generate(prompt, 30)
    assert out.token_ids == ref
    assert_oracle_acceptances(gen, out)
    assert gen.generate(prompt, 30, plain=True).token_ids == ref


@pytest.mark.interpreter
def test_compiled_engine_greedy_identical(monkeypatch, seed, one_thread):
    """torch.compile'd steps with both Triton kernels behind their custom ops (run by the interpreter here)
    and fused projections give exactly `generate`'s tokens; every step is compiled once at warm-up and
    never again for other prompt lengths, plain steps included. Head dim 16: the kernel's path.
    Dynamo + AOT tracing only (backend aot_eager): Inductor's C++ build of five steps takes minutes on
    two cores; the GPU run compiles with Inductor (test_cuda_greedy_identical)."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    model = tiny_llama(hidden=64)
    V = model.config.vocab_size
    gen = SpeculativeGenerator(model, None, TreeConfig(depth=3, topk=3, total_tokens=8), mode="compile",
                               impl="triton", head_impl="triton", fuse=True, max_context=48, chunk=8)
    gen.warmup()
    captured, compiled = gen.captures, gen.compiles
    assert captured == 6 and compiled >= 6  # prefill, extend, extend_scout, draft, verify, plain
    for prompt_len, n in [(7, 20), (1, 6), (19, 9)]:
        prompt = torch.randint(0, V, (prompt_len,))
        assert gen.generate(prompt, n).token_ids == plain_greedy(model, prompt, n), prompt_len
    assert gen.generate(prompt, 9, plain=True).token_ids == plain_greedy(model, prompt, 9)
    assert (gen.captures, gen.compiles) == (captured, compiled)
    torch._dynamo.reset()


def test_compile_draft_mode_compiles_the_draft_steps_only(monkeypatch, seed, one_thread):
    """mode "compile-draft": the draft's steps (draft, extend, extend_scout) compiled, the target's as in
    graphs; greedy output is generate's (aot_eager backend on the CPU, as above)."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    model = tiny_llama(hidden=64)
    V = model.config.vocab_size
    gen = SpeculativeGenerator(model, None, TreeConfig(depth=3, topk=3, total_tokens=8), mode="compile-draft",
                               max_context=48, chunk=8)
    gen.warmup()
    assert gen.captures == 6 and 3 <= gen.compiles < 6, (gen.captures, gen.compiles)  # three of six compiled
    for prompt_len, n in [(7, 20), (19, 9)]:
        prompt = torch.randint(0, V, (prompt_len,))
        assert gen.generate(prompt, n).token_ids == plain_greedy(model, prompt, n), prompt_len
    torch._dynamo.reset()


# --- the real models (fp32, CPU) ----------------------------------------------------------------
def random_weights_draft(model, seed):
    """A 'random' draft: weights far from a trained one (std 1), unlike random_init's small std."""
    torch.manual_seed(seed)
    draft = DraftModel.random_init(model)
    draft.reset_parameters(std=1.0)
    return draft


def long_prompt(tok, n):
    text = ("The history of the river valley begins with small farming villages. Over centuries, trade routes "
            "brought merchants, scholars and new crops; towns grew into cities with markets and libraries. ")
    ids = tok(text * (n // 30 + 2)).input_ids[:n]
    return torch.tensor(ids)


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.parametrize("name,cases", [
    ("smollm2", [("The capital of France is", 24), ("def fibonacci(n):", 40), ("Once upon a time", 7)]),
    ("gemma3-270m", [("The capital of France is", 16), ("def add(a, b):", 10)]),
])
def test_real_model_greedy_identical(name, cases, one_thread):
    model, tok = real_target(name)
    tree = TreeConfig(depth=3, topk=3, total_tokens=8)
    drafts = {"untrained": DraftModel.random_init(model), "random": random_weights_draft(model, 1)}
    for label, draft in drafts.items():
        gen = SpeculativeGenerator(model, draft, tree, adaptive=False, max_context=512)
        for prompt, n in cases:
            ids = tok(prompt, return_tensors="pt").input_ids[0]
            ref = model.generate(ids[None], max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
            assert gen.generate(ids, n).token_ids == ref, (label, prompt)
            assert gen.generate(ids, n, plain=True).token_ids == ref, (label, prompt)


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.parametrize("name,prompt_len", [("smollm2", 1550), ("gemma3-270m", 1530)])
def test_real_model_long_prompt(name, prompt_len, one_thread):
    """1,500+ tokens: 25 prefill chunks; Gemma 3's 512-token sliding window bites in prefill and rounds."""
    model, tok = real_target(name)
    ids = long_prompt(tok, prompt_len)
    ref = model.generate(ids[None], max_new_tokens=12, do_sample=False,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.int64))[0, len(ids):].tolist()
    gen = SpeculativeGenerator(model, None, TreeConfig(3, 3, 8), adaptive=False, max_context=2048)
    assert gen.generate(ids, 12).token_ids == ref
    assert gen.generate(ids, 12, plain=True).token_ids == ref


@pytest.mark.slow
@pytest.mark.smollm2
def test_real_model_oracle_acceptances(one_thread):
    model, tok = real_target("smollm2")
    ids = tok("List three colours:", return_tensors="pt").input_ids[0]
    ref = model.generate(ids[None], max_new_tokens=30, do_sample=False)[0, len(ids):].tolist()
    gen = SpeculativeGenerator(model, None, TreeConfig(6, 4, 24), adaptive=False, max_context=128)
    install_oracle(gen, ids.tolist() + ref, model.config.vocab_size, torch.Generator().manual_seed(0))
    out = gen.generate(ids, 30)
    assert out.token_ids == ref
    assert_oracle_acceptances(gen, out)


# --- GPU: the captured and compiled engines -------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["graphs", "compile", "compile-draft"])
@pytest.mark.parametrize("make_target", [tiny_llama, tiny_gemma3])
def test_cuda_greedy_identical(make_target, mode):
    """The captured loop with the fp32 reference attention (no TF32 in it) is exactly `generate`, in rounds
    and plain steps; no capture or compilation after warm-up for any prompt length up to max_context."""
    torch._dynamo.reset()
    model = (make_target(hidden=64) if make_target is tiny_llama else make_target()).cuda()
    V = model.config.vocab_size
    gen = SpeculativeGenerator(model, None, TreeConfig(depth=4, topk=4, total_tokens=16), impl="reference",
                               mode=mode, adaptive=False, max_context=1024)
    gen.warmup()
    captured, compiled = gen.captures, gen.compiles
    for P, n in [(5, 40), (17, 64), (1, 9), (700, 20)]:
        prompt = torch.randint(0, V, (P,), device="cuda")
        ref = plain_greedy(model, prompt, n)
        assert gen.generate(prompt, n).token_ids == ref, (P, n)
        assert gen.generate(prompt, n, plain=True).token_ids == ref, (P, n)
    assert (gen.captures, gen.compiles) == (captured, compiled)
    torch._dynamo.reset()


@pytest.mark.cuda
def test_cuda_no_recapture_for_a_long_prompt():
    """A warm engine serves a 100-token and then a 3,000-token prompt without a new capture, adaptively."""
    model = tiny_llama(hidden=64).cuda()
    model.config.max_position_embeddings = 4096  # RoPE without scaling: any length; the config says 2048
    gen = SpeculativeGenerator(model, None, TreeConfig(6, 10, 60), max_context=4096)
    gen.warmup()
    captured = gen.captures
    for P in (100, 3000):
        prompt = torch.randint(0, 97, (P,), device="cuda")
        out = gen.generate(prompt, 64)
        assert out.token_ids == plain_greedy(model, prompt, 64) and out.warmup_time_s == 0.0
    assert gen.captures == captured


@pytest.mark.cuda
def test_cuda_graphs_sampling_matches_the_eager_engine():
    """Sampling through the captured graphs draws the same tokens as the same engine run eagerly with the
    same draft and generator (the uniforms come from the host; fp32 reference attention)."""
    model = tiny_llama(hidden=64).cuda()
    draft = DraftModel.random_init(model)
    tree = TreeConfig(depth=4, topk=4, total_tokens=16)
    prompt = torch.randint(0, model.config.vocab_size, (9,), device="cuda")
    outs = []
    for mode in ("graphs", "eager"):
        gen = SpeculativeGenerator(model, draft, tree, impl="reference", mode=mode, adaptive=False, max_context=128)
        outs.append(gen.generate(prompt, 40, temperature=0.8, generator=torch.Generator().manual_seed(5)).token_ids)
    assert outs[0] == outs[1] and len(outs[0]) == 40


def test_sampling_reproducible_for_a_seed(one_thread):
    """Same draft and seed: the same tokens, whatever ran on the engine before. (Adaptive off: the fallback's
    choices follow host-timed costs on the CPU, so on a busy machine a request could run other steps.)"""
    model = tiny_llama(hidden=64)
    draft = DraftModel.random_init(model)
    prompt = torch.randint(0, model.config.vocab_size, (9,))
    gen = SpeculativeGenerator(model, draft, TreeConfig(4, 4, 16), impl="reference", max_context=128, adaptive=False)
    first = gen.generate(prompt, 30, temperature=0.8, generator=torch.Generator().manual_seed(5)).token_ids
    gen.generate(prompt.flip(0), 12, temperature=0.8, generator=torch.Generator().manual_seed(0))
    gen.generate(prompt.flip(0), 12)
    again = gen.generate(prompt, 30, temperature=0.8, generator=torch.Generator().manual_seed(5)).token_ids
    assert first == again and len(first) == 30


@pytest.mark.cuda
def test_cuda_bf16_accepted_tokens_are_verified_argmax():
    """bf16: every emitted token is the argmax of the target's verified logits for its prefix (checked
    by one plain forward of the whole output, whose rows see exactly those prefixes)."""
    model = tiny_llama(hidden=64).cuda().to(torch.bfloat16)
    gen = SpeculativeGenerator(model, None, TreeConfig(depth=4, topk=4, total_tokens=16), adaptive=False,
                               max_context=256)
    prompt = torch.randint(0, 97, (9,), device="cuda")
    out = gen.generate(prompt, 48)
    seq = torch.cat([prompt, torch.tensor(out.token_ids, device="cuda")])
    logits = model(seq[None]).logits[0, len(prompt) - 1 : -1].float()
    chosen = logits.gather(1, torch.tensor(out.token_ids, device="cuda")[:, None])[:, 0]
    # equal to the row max up to bf16 rounding differences between the tree and the plain forward
    assert (logits.max(-1).values - chosen).max() < 0.05
