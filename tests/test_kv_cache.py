"""After many accept/reject rounds (and plain steps between them) the engine's caches and recorded
history equal those of the accepted sequence run plainly."""
import pytest
import torch

from coral_fast import SpeculativeGenerator
from coral_fast.draft import causal_attention
from coral_fast.generate import TreeConfig
from test_generate import install_oracle, plain_greedy
from test_models import tiny_gemma3, tiny_llama  # noqa: F401 (fixture)


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("make_target", [tiny_llama, lambda: tiny_gemma3(window=512)])
def test_caches_equal_plain_run(make_target, mixed, seed, one_thread):
    """mixed: the policy is made to fall back to plain steps and probe now and then, so the draft's cache
    is filled by chunked catch-up as well as by rounds."""
    model = make_target()
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (6,))
    ref = plain_greedy(model, prompt, 60)
    gen = SpeculativeGenerator(model, None, TreeConfig(6, 4, 24), adaptive=mixed, max_context=96, chunk=4)
    install_oracle(gen, prompt.tolist() + ref, V, torch.Generator().manual_seed(seed))
    gen.warmup()
    if mixed:
        gen.round_time_s, gen.plain_step_time_s = 1.5, 1.0  # probes after 16, 32, ... plain steps
        # no round pays (an accepted length <= 6 gives <= 4 tokens a plain step's time, under 1 + margin),
        # while a full one (7 tokens: 4.7) could, so the policy keeps probing
        gen.refine_costs, gen.policy_options = False, dict(margin=3.2, scout_fraction=0.0)  # (random draft: no first look)
    out = gen.generate(prompt, 60)
    assert out.token_ids == ref
    if mixed:
        assert out.plain_steps > 20 and out.rounds >= 2
    else:
        rounds_with_rejection = sum(1 for a in out.accepted_lengths if a < 6)
        assert out.rounds >= 10 and rounds_with_rejection >= 3 and max(out.accepted_lengths) > 2
    eng = gen.engine
    # committed: the prompt and every emitted token but the last (the next round's root); the last round
    # may have accepted tokens past max_new_tokens, which are committed but not emitted
    seq = torch.cat([prompt, torch.tensor(out.token_ids[:-1])])
    n = len(seq)
    committed = int(eng.pos.n)
    assert committed == eng.n_host and n <= committed <= n + 6
    assert eng.hist.ids[: n + 1].tolist() == prompt.tolist() + out.token_ids
    plain = model(seq[None], use_cache=True, output_hidden_states=True)
    features = plain.hidden_states[-1]
    torch.testing.assert_close(eng.hist.feats[:n], features[0], atol=1e-5, rtol=1e-5)
    for layer in range(model.config.num_hidden_layers):
        torch.testing.assert_close(eng.tcache.k[layer][0, :, :n], plain.past_key_values.layers[layer].keys[0],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(eng.tcache.v[layer][0, :, :n], plain.past_key_values.layers[layer].values[0],
                                   atol=1e-5, rtol=1e-5)
    # the draft's cache: its layer run causally over (target feature f_t, next token x_{t+1})
    draft = gen.draft
    next_tokens = torch.cat([seq[1:], torch.tensor(out.token_ids[-1:])])[None]
    seen = {}

    def attn(q, k, v):
        seen["k"], seen["v"] = k, v
        return causal_attention(q, k, v, scale=draft.layer.scaling)

    draft(features, next_tokens, torch.arange(n)[None], attn_fn=attn)
    m = int(eng.pos.d_len)
    assert m == eng.d_len_host and n - 60 <= m < n
    torch.testing.assert_close(eng.dk[0, :, :m], seen["k"][0, :, :m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eng.dv[0, :, :m], seen["v"][0, :, :m], atol=1e-5, rtol=1e-5)


# --- compiled steps touch only the rows they write ------------------------------------------------
def _loop_extents_and_buffer_sizes(code: str) -> tuple[set, set]:
    """Every loop bound of Inductor's C++ kernels and the element count of every buffer it allocates."""
    import math
    import re

    loops = {int(m) for m in re.findall(r"x\d+<static_cast<int64_t>\((\d+)L\)", code)}
    sizes = {math.prod(int(d) for d in shape.split(",") if d.strip())
             for shape in re.findall(r"empty_strided_cpu\(\(([^)]*)\)", code)}
    return loops, sizes


@pytest.mark.interpreter
@pytest.mark.parametrize("step", ["verify", "draft"])
def test_compiled_step_touches_only_its_rows(step, seed, one_thread):
    """A compiled verify (target forward writing its rows, commit moving the accepted ones, history writes)
    and a compiled draft step (draft cache writes, GQA attention) with a cache of ~6k slots: Inductor's
    code has no loop and no buffer as large as one head of a cache ([S, D]): an in-place write into a
    view of a larger buffer is functionalized into a copy of the whole buffer and a copy back, every
    step; repeating the draft's keys for GQA copies its whole cache. (The draft attends densely over
    its slots: its masks, [rows, slots], stay smaller.) The compiled step leaves caches and history
    as the eager one."""
    from torch._inductor.utils import run_and_get_code

    from coral_fast.draft import DraftModel
    from coral_fast.engine import Engine
    from coral_fast.hf_attention import ATTN_NAME, attention_implementation

    torch._dynamo.reset()
    model = tiny_llama(hidden=64)  # head dim 16: the Triton tree kernel (interpreted), 4 q / 2 kv heads
    draft = DraftModel.random_init(model).eval()
    tree = TreeConfig(depth=3, topk=3, total_tokens=8)

    def buffers(eng):  # every layer's K and V, the features, the draft's K and V
        return [*eng.tcache.k, *eng.tcache.v, eng.hist.feats, eng.dk, eng.dv]

    engines = [Engine(model, draft, tree, 6007, mode, "triton", "reference", None, 8)
               for mode in ("eager", "compile")]
    n = int(torch.randint(20, 60, (1,)))
    state = [torch.randn_like(t) for t in buffers(engines[0])]
    ids = torch.randint(0, model.config.vocab_size, engines[0].hist.ids.shape)
    tokens = torch.randint(0, model.config.vocab_size, (engines[0].R,))
    for eng in engines:
        for dst, src in zip(buffers(eng), state):
            dst.copy_(src)
        eng.hist.ids.copy_(ids)
        eng.tree_in.tokens.copy_(tokens)
        eng.pos.n.fill_(n)
        eng.pos.d_len.fill_(n - 2)
        eng.n_host, eng.d_len_host = n, n - 2
    eager, compiled = engines
    with torch.no_grad(), attention_implementation(model, ATTN_NAME):
        eager._body(step, False)()
        _, code = run_and_get_code(torch.compile(compiled._body(step, False), dynamic=False))
    loops, sizes = _loop_extents_and_buffer_sizes("\n".join(code))
    head = min(compiled.S * compiled.tcache.k[0].shape[-1], compiled.d_slots * compiled.dk.shape[-1])
    assert loops and max(loops) < head, f"a kernel loops over {max(loops)} elements (one cache head: {head})"
    assert max(sizes) < head, f"a buffer of {max(sizes)} elements (one cache head: {head})"
    assert int(compiled.pos.n) == int(eager.pos.n) and int(compiled.pos.d_len) == int(eager.pos.d_len)
    for got, want in zip(buffers(compiled), buffers(eager)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(compiled.hist.ids, eager.hist.ids)
    assert torch.equal(compiled.tree_in.tokens, eager.tree_in.tokens)
    torch._dynamo.reset()
