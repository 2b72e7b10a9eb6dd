"""After many accept/reject rounds the loop's caches equal those of the accepted sequence run plainly."""
import pytest
import torch

from coral_fast import SpeculativeGenerator
from coral_fast.draft import causal_attention
from test_generate import install_oracle, install_static_oracle, plain_greedy
from test_models import tiny_gemma3, tiny_llama  # noqa: F401 (fixture)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("make_target", [tiny_llama, lambda: tiny_gemma3(window=512)])
def test_caches_equal_plain_run(make_target, static, seed, one_thread):
    model = make_target()
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (6,))
    ref = plain_greedy(model, prompt, 50)
    gen = SpeculativeGenerator(model, None, static=static)
    oracle = install_static_oracle if static else install_oracle
    oracle(gen, prompt.tolist() + ref, V, torch.Generator().manual_seed(seed))
    out = gen.generate(prompt, 50)
    assert out.token_ids == ref
    rounds_with_rejection = sum(1 for a in out.accepted_lengths if a < 6)
    assert out.rounds >= 10 and rounds_with_rejection >= 3 and max(out.accepted_lengths) > 2
    tcache, dcache = gen.last_caches
    # committed: the prompt and every emitted token but the last (the next round's root); the last round
    # may have accepted tokens past max_new_tokens, which are committed but not emitted
    seq = torch.cat([prompt, torch.tensor(out.token_ids[:-1])])
    n = len(seq)
    committed = int(gen.engine.n) if static else tcache.length
    assert n <= committed <= n + 5
    plain = model(seq[None], use_cache=True, output_hidden_states=True)
    for layer in range(model.config.num_hidden_layers):
        torch.testing.assert_close(tcache.k[layer, 0, :, :n], plain.past_key_values.layers[layer].keys[0],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tcache.v[layer, 0, :, :n], plain.past_key_values.layers[layer].values[0],
                                   atol=1e-5, rtol=1e-5)
    # the draft's cache: its layer run causally over (target feature f_t, next token x_{t+1})
    draft = gen.draft
    features = plain.hidden_states[-1]
    next_tokens = torch.cat([seq[1:], torch.tensor(out.token_ids[-1:])])[None]
    seen = {}

    def attn(q, k, v):
        seen["k"], seen["v"] = k, v
        return causal_attention(q, k, v, scale=draft.layer.scaling)

    draft(features, next_tokens, torch.arange(n)[None], attn_fn=attn)
    # the draft skips the last round's extension (generation was over): it holds all earlier rounds
    m = int(gen.engine.d_start) if static else dcache.length
    assert n - 6 <= m < n
    torch.testing.assert_close(dcache.k[0, :, :m], seen["k"][0, :, :m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dcache.v[0, :, :m], seen["v"][0, :, :m], atol=1e-5, rtol=1e-5)
