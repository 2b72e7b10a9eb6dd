"""The loop end to end: greedy output identical to model.generate(do_sample=False)."""
import json

import pytest
import torch

from coral_fast import DraftModel, SpeculativeGenerator
from coral_fast.generate import TreeConfig
from coral_fast.tree import DraftTree
from test_models import real_target, tiny_gemma3, tiny_llama  # noqa: F401 (fixture)


def plain_greedy(model, prompt, n, eos=None):
    kwargs = dict(max_new_tokens=n, do_sample=False,
                  attention_mask=torch.ones(1, len(prompt), dtype=torch.int64, device=prompt.device))
    if eos is None:
        kwargs["min_new_tokens"] = n
    else:
        kwargs["eos_token_id"] = eos
    return model.generate(prompt[None], **kwargs)[0, len(prompt):].tolist()


def install_oracle(gen: SpeculativeGenerator, truth: list, vocab: int, rng: torch.Generator, depth=5):
    """Replace the draft's tree by one that holds the true continuation up to a random depth, with a wrong
    sibling at every level and wrong tokens below the break: long, varied acceptances."""

    def draft_tree(dcache, last_hidden):
        n = dcache.length  # the root (last accepted token) sits at position n
        cut = int(torch.randint(0, depth + 1, (1,), generator=rng))
        parents, tokens, prev = [], [], -1
        for d in range(depth):
            true = truth[n + 1 + d] if n + 1 + d < len(truth) else int(torch.randint(0, vocab, (1,), generator=rng))
            token = true if d < cut else (true + 1) % vocab
            parents += [prev, prev]
            tokens += [token, (token + 2) % vocab]
            prev = len(tokens) - 2
        return DraftTree.from_parents(parents), torch.tensor(tokens)

    gen._draft_tree = draft_tree


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("make_target", [tiny_llama, tiny_gemma3])
def test_random_draft_greedy_identical(make_target, static, seed, one_thread):
    model = make_target()
    V = model.config.vocab_size
    gen = SpeculativeGenerator(model, None, TreeConfig(depth=3, topk=3, total_tokens=8), static=static)
    for prompt_len, n in [(1, 9), (7, 30), (16, 3)]:
        prompt = torch.randint(0, V, (prompt_len,))
        out = gen.generate(prompt, n)
        assert out.token_ids == plain_greedy(model, prompt, n)
        assert out.rounds == len(out.accepted_lengths) and sum(out.accepted_lengths) + 1 >= n


@pytest.mark.parametrize("make_target", [tiny_llama, tiny_gemma3])
def test_static_prefill_in_chunks(make_target, monkeypatch, seed, one_thread):
    """Prompts longer than the captured prefill chunk go through it several times (last chunk padded)."""
    import coral_fast.generate as generate_module

    monkeypatch.setattr(generate_module, "PREFILL_CHUNK", 4)
    model = make_target()
    V = model.config.vocab_size
    gen = SpeculativeGenerator(model, None, TreeConfig(depth=3, topk=3, total_tokens=8), static=True)
    for prompt_len, n in [(11, 12), (4, 6), (8, 5), (1, 4)]:
        prompt = torch.randint(0, V, (prompt_len,))
        out = gen.generate(prompt, n)
        assert gen.engine.C == 4
        assert out.token_ids == plain_greedy(model, prompt, n), prompt_len


def test_static_prefill_chunks_fill_both_caches_like_one_pass(monkeypatch, seed, one_thread):
    """The draft's acceptance depends on what prefill leaves in its cache (greedy output would not show
    it): chunked prefill == one eager pass over the prompt, in both caches and the pending row."""
    import coral_fast.generate as generate_module
    from coral_fast.generate import DraftKVCache
    from coral_fast.hf_attention import TreeKVCache, causal_forward

    model = tiny_llama()
    V, P = model.config.vocab_size, 11
    prompt = torch.randint(0, V, (P,))
    monkeypatch.setattr(generate_module, "PREFILL_CHUNK", 4)
    gen = SpeculativeGenerator(model, None, TreeConfig(depth=3, topk=3, total_tokens=8), static=True)
    engine = gen._engine_for(prompt, P + 8)
    first = engine.prefill(prompt)
    # one eager pass
    tcache = TreeKVCache.for_model(model, 64)
    hidden, logits = causal_forward(model, tcache, prompt, "sdpa")
    dcfg = gen.draft.config
    dcache = DraftKVCache(dcfg.num_key_value_heads, dcfg.head_dim, 64, torch.float32, "cpu")
    gen._draft_extend(dcache, hidden[: P - 1], prompt[1:])
    assert first == int(logits[-1].argmax())
    assert int(engine.n) == P and int(engine.d_start) == P - 1 and int(engine.d_count) == 1
    torch.testing.assert_close(engine.tcache.k[..., :P, :], tcache.k[..., :P, :], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(engine.tcache.v[..., :P, :], tcache.v[..., :P, :], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(engine.dcache.k[:, :, : P - 1], dcache.k[:, :, : P - 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(engine.dcache.v[:, :, : P - 1], dcache.v[:, :, : P - 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(engine.d_feats[0], hidden[P - 1], atol=1e-5, rtol=1e-5)
    assert int(engine.d_tokens[0]) == first == int(engine.root)


@pytest.mark.interpreter
def test_compiled_static_engine_greedy_identical(seed, one_thread):
    """torch.compile'd draft/verify steps with both Triton kernels behind their custom ops (run by the
    interpreter here) and fused projections give exactly `generate`'s tokens. Head dim 16: the
    tree-attention kernel's path."""
    model = tiny_llama(hidden=64)
    V = model.config.vocab_size
    gen = SpeculativeGenerator(model, None, TreeConfig(depth=3, topk=3, total_tokens=8), static=True, compile=True,
                               impl="triton", head_impl="triton", fuse=True)
    for prompt_len, n in [(7, 20), (1, 6)]:
        prompt = torch.randint(0, V, (prompt_len,))
        assert gen.generate(prompt, n).token_ids == plain_greedy(model, prompt, n), prompt_len
    assert gen.engine._verify_fn is not gen.engine._verify_body  # the compiled one ran


def install_static_oracle(gen: SpeculativeGenerator, truth: list, vocab: int, rng: torch.Generator, depth=5):
    """The oracle for StaticEngine: after the real draft step, overwrite the verify inputs with an oracle
    tree padded to the engine's fixed size (extra wrong children of the root)."""
    probe = {}
    oracle = SpeculativeGenerator.__new__(SpeculativeGenerator)
    install_oracle(oracle, truth, vocab, rng, depth)

    def patch(engine):
        original = engine.draft_step

        def draft_step():
            original()
            n = int(engine.n)
            tree, tokens = oracle._draft_tree(type("C", (), {"length": n})(), None)
            parents, toks = tree.parents.tolist(), tokens.tolist()
            extra = engine.T - len(parents)
            assert extra >= 0
            parents += [-1] * extra
            toks += [(toks[0] + 3 + i) % vocab for i in range(extra)]
            full = DraftTree.from_parents(parents)
            engine.v_tokens[1:] = torch.tensor(toks)
            engine.v_mask[1:, 1:] = full.mask
            engine.v_depth[1:] = full.depth + 1
            engine.t_parents.copy_(full.parents)

        engine.draft_step = draft_step
        probe["engine"] = engine

    original_engine_for = gen._engine_for

    def engine_for(ids, needed, sampling=False):
        engine = original_engine_for(ids, needed, sampling)
        if probe.get("engine") is not engine:
            patch(engine)
        return engine

    gen._engine_for = engine_for


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("make_target", [tiny_llama, tiny_gemma3])
def test_long_acceptances_stay_exact(make_target, static, seed, one_thread):
    """With an oracle tree most rounds accept several tokens; the output must not change."""
    model = make_target()
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (5,))
    ref = plain_greedy(model, prompt, 60)
    gen = SpeculativeGenerator(model, None, static=static)
    if static:
        install_static_oracle(gen, prompt.tolist() + ref, V, torch.Generator().manual_seed(seed))
    else:
        install_oracle(gen, prompt.tolist() + ref, V, torch.Generator().manual_seed(seed))
    out = gen.generate(prompt, 60)
    assert out.token_ids == ref
    assert out.mean_accepted_length > 2.0 and max(out.accepted_lengths) >= 4  # up to 6 (depth 5 + bonus)


@pytest.mark.interpreter
@pytest.mark.parametrize("make_target", [lambda: tiny_llama(hidden=64), lambda: tiny_gemma3(window=5)])
def test_static_engine_with_the_triton_tree_kernel(make_target, seed, one_thread):
    """The GPU configuration (StaticEngine + the Triton tree-attention kernel over the static cache with a
    device kv_len) run through the interpreter, with long acceptances: the rows past the root must see
    the right mask bits, and a window shorter than the prompt must cut the prefill's own keys."""
    model = make_target()
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (12,))
    ref = plain_greedy(model, prompt, 30)
    gen = SpeculativeGenerator(model, None, TreeConfig(depth=5, topk=4, total_tokens=40), static=True, impl="triton")
    install_static_oracle(gen, prompt.tolist() + ref, V, torch.Generator().manual_seed(seed))
    out = gen.generate(prompt, 30)
    assert out.token_ids == ref
    assert out.mean_accepted_length > 2


def test_eos_stops_like_generate(seed, one_thread):
    model = tiny_llama()
    prompt = torch.randint(0, 97, (4,))
    ref = plain_greedy(model, prompt, 40)
    eos = ref[17]
    gen = SpeculativeGenerator(model, None, eos_token_id=eos)
    install_oracle(gen, prompt.tolist() + ref, 97, torch.Generator().manual_seed(seed))
    out = gen.generate(prompt, 40)
    assert out.token_ids == plain_greedy(model, prompt, 40, eos=eos)
    assert out.token_ids[-1] == eos and len(out.token_ids) == ref.index(eos) + 1


def test_streaming_callback_sees_every_token(one_thread):
    model = tiny_llama()
    prompt = torch.randint(0, 97, (3,))
    seen = []
    out = SpeculativeGenerator(model).generate(prompt, 12, callback=seen.extend)
    assert seen == out.token_ids and len(seen) == 12
    stats = out.stats()
    assert stats["new_tokens"] == 12 and stats["draft_s"] > 0 and stats["verify_s"] > 0


def test_errors():
    model = tiny_llama()
    gen = SpeculativeGenerator(model)
    with pytest.raises(ValueError, match="empty"):
        gen.generate(torch.zeros(0, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="batch size 1"):
        gen.generate(torch.zeros(2, 3, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="out of range"):
        gen.generate(torch.tensor([5, 97]), 4)
    with pytest.raises(ValueError, match="vocabulary 97.*has 101"):
        SpeculativeGenerator(tiny_llama(vocab=101), DraftModel.random_init(model))
    with pytest.raises(ValueError, match="total_tokens"):
        TreeConfig(depth=2, topk=2, total_tokens=7)


# --- the real models (fp32, CPU) ----------------------------------------------------------------
def random_weights_draft(model, seed):
    """A 'random' draft: weights far from a trained one (std 1), unlike random_init's small std."""
    torch.manual_seed(seed)
    draft = DraftModel.random_init(model)
    draft.reset_parameters(std=1.0)
    return draft


@pytest.mark.slow
@pytest.mark.parametrize("name,cases", [
    ("smollm2", [("The capital of France is", 24), ("def fibonacci(n):", 40), ("Once upon a time", 7)]),
    ("gemma3-270m", [("The capital of France is", 16), ("def add(a, b):", 10)]),
])
def test_real_model_greedy_identical(name, cases, one_thread):
    model, tok = real_target(name)
    tree = TreeConfig(depth=3, topk=3, total_tokens=8)
    drafts = {"untrained": DraftModel.random_init(model), "random": random_weights_draft(model, 1)}
    for label, draft in drafts.items():
        gen = SpeculativeGenerator(model, draft, tree)
        for prompt, n in cases:
            ids = tok(prompt, return_tensors="pt").input_ids[0]
            ref = model.generate(ids[None], max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
            out = gen.generate(ids, n)
            assert out.token_ids == ref, (label, prompt)


@pytest.mark.slow
def test_real_model_oracle_acceptances(one_thread):
    model, tok = real_target("smollm2")
    ids = tok("List three colours:", return_tensors="pt").input_ids[0]
    ref = model.generate(ids[None], max_new_tokens=30, do_sample=False)[0, len(ids):].tolist()
    gen = SpeculativeGenerator(model, None)
    install_oracle(gen, ids.tolist() + ref, model.config.vocab_size, torch.Generator().manual_seed(0))
    out = gen.generate(ids, 30)
    assert out.token_ids == ref and out.mean_accepted_length > 2


@pytest.mark.slow
def test_cli_json(monkeypatch, capsys, one_thread):
    from coral_fast import generate_cli, models

    monkeypatch.setattr(models, "load_target", lambda name, dtype, device: real_target(name))
    rc = generate_cli.main(["--model", "smollm2", "--prompt", "The capital of France is", "--max-new-tokens", "6",
                            "--json", "--compare"])
    assert rc == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out.strip().splitlines()[-1])
    model, tok = real_target("smollm2")
    assert payload["prompt_ids"] == tok("The capital of France is").input_ids
    assert payload["token_ids"] == payload["plain_token_ids"] and payload["identical_to_plain"] is True
    assert "Paris" in payload["text"] and payload["text"] in captured.out
    assert payload["mean_accepted_length"] >= 1 and payload["tokens_per_s"] > 0
    assert "untrained random draft" in captured.err or "draft:" in captured.err


def test_cli_errors(capsys):
    from coral_fast import generate_cli

    assert generate_cli.main(["--model", "smollm2", "--prompt", "   "]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert generate_cli.main(["--model", "nonexistent-model", "--prompt", "hi"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert generate_cli.main(["--model", "smollm2", "--prompt", "hi", "--draft", "/nonexistent/draft"]) == 2
    assert "no draft at" in capsys.readouterr().err
    assert generate_cli.main(["--model", "smollm2", "--prompt", "hi", "--compile"]) == 2
    assert "--compile needs --device cuda" in capsys.readouterr().err


# --- GPU: the captured loop ---------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("make_target", [tiny_llama, tiny_gemma3])
def test_cuda_graphs_greedy_identical(make_target):
    """The captured loop with the fp32 reference attention (no TF32 in it) is exactly `generate`; the
    Triton kernel's fp32 dots may round differently, so its check is the argmax margin below."""
    model = (make_target(hidden=64) if make_target is tiny_llama else make_target()).cuda()
    V = model.config.vocab_size
    gen = SpeculativeGenerator(model, None, TreeConfig(depth=4, topk=4, total_tokens=16), impl="reference")
    assert gen.static and gen.cuda_graphs
    for P, n in [(5, 40), (17, 64), (1, 9)]:
        prompt = torch.randint(0, V, (P,), device="cuda")
        out = gen.generate(prompt, n)
        assert out.token_ids == plain_greedy(model, prompt, n), (P, n)
    assert gen.engine.graphs is not None


@pytest.mark.cuda
def test_cuda_graphs_sampling_matches_the_eager_engine():
    """Sampling through the captured graphs draws the same tokens as the same engine run eagerly with the
    same draft and generator (the uniforms come from the host; fp32 reference attention). One draft for
    both: `DraftModel.random_init` draws from the global RNG, so two generators built with draft=None
    hold different drafts, hence different trees and different (equally valid) samples."""
    model = tiny_llama(hidden=64).cuda()
    draft = DraftModel.random_init(model)
    tree = TreeConfig(depth=4, topk=4, total_tokens=16)
    prompt = torch.randint(0, model.config.vocab_size, (9,), device="cuda")
    outs = []
    for graphs in (True, False):
        gen = SpeculativeGenerator(model, draft, tree, impl="reference", cuda_graphs=graphs)
        outs.append(gen.generate(prompt, 40, temperature=0.8, generator=torch.Generator().manual_seed(5)).token_ids)
        assert (gen.engine.graphs is not None) == graphs and gen.engine.sampling
    assert outs[0] == outs[1] and len(outs[0]) == 40


def test_static_sampling_reproducible_for_a_seed():
    """Same draft and seed: the same tokens, whatever ran on the engine before (CPU twin of the test above)."""
    model = tiny_llama(hidden=64)
    draft = DraftModel.random_init(model)
    tree = TreeConfig(depth=4, topk=4, total_tokens=16)
    prompt = torch.randint(0, model.config.vocab_size, (9,))
    outs = []
    for warm in (False, True):
        gen = SpeculativeGenerator(model, draft, tree, impl="reference", static=True)
        if warm:  # state left over from other rounds must not leak into the next generation
            gen.generate(prompt.flip(0), 12, temperature=0.8, generator=torch.Generator().manual_seed(0))
            gen.engine.draft_step()
            gen.engine.verify_step()
        outs.append(gen.generate(prompt, 30, temperature=0.8, generator=torch.Generator().manual_seed(5)).token_ids)
    assert outs[0] == outs[1] and len(outs[0]) == 30


@pytest.mark.cuda
def test_cuda_bf16_accepted_tokens_are_verified_argmax():
    """bf16: every emitted token is the argmax of the target's verified logits for its prefix (checked
    by one plain forward of the whole output, whose rows see exactly those prefixes)."""
    model = tiny_llama(hidden=64).cuda().to(torch.bfloat16)
    gen = SpeculativeGenerator(model, None, TreeConfig(depth=4, topk=4, total_tokens=16))
    prompt = torch.randint(0, 97, (9,), device="cuda")
    out = gen.generate(prompt, 48)
    seq = torch.cat([prompt, torch.tensor(out.token_ids, device="cuda")])
    logits = model(seq[None]).logits[0, len(prompt) - 1 : -1].float()
    chosen = logits.gather(1, torch.tensor(out.token_ids, device="cuda")[:, None])[:, 0]
    # equal to the row max up to bf16 rounding differences between the tree and the plain forward
    assert (logits.max(-1).values - chosen).max() < 0.05


@pytest.mark.slow
def test_cli_refuses_a_draft_of_another_target(monkeypatch, capsys, tmp_path):
    from coral_fast import generate_cli, models

    monkeypatch.setattr(models, "load_target", lambda name, dtype, device: real_target(name))
    DraftModel.random_init(tiny_llama()).save_pretrained(tmp_path)
    assert generate_cli.main(["--model", "smollm2", "--prompt", "hi", "--draft", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "hidden size 48" in err and "has 576" in err
