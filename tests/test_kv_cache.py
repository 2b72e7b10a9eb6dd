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
        gen.round_time_s, gen.plain_step_time_s = 2.0, 1.0  # probes after 16, 32, ... plain steps
        gen.refine_costs, gen.policy_options = False, dict(margin=10.0)  # and no round ever pays
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
        torch.testing.assert_close(eng.tcache.k[layer, 0, :, :n], plain.past_key_values.layers[layer].keys[0],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(eng.tcache.v[layer, 0, :, :n], plain.past_key_values.layers[layer].values[0],
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
