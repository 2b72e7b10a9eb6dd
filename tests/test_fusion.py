"""Fused projections (coral_fast.fusion): same results as the separate products, fewer products."""
import pytest
import torch
import torch.nn.functional as F

from coral_fast import DraftModel, SpeculativeGenerator
from coral_fast.fusion import fuse_projections, unfuse_projections
from coral_fast.generate import TreeConfig
from test_generate import plain_greedy
from test_models import tiny_gemma3, tiny_llama


def tiny_qwen2(vocab=83, hidden=48, seed=0):
    """Qwen2: biases on q/k/v (the fused bias must carry them)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for layer in model.model.layers:  # random biases: zeros would hide a dropped one
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.bias.normal_()
    return model


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3, tiny_qwen2])
def test_fused_model_same_logits(make):
    model = make()
    ids = torch.randint(0, model.config.vocab_size, (1, 13))
    ref = model(ids).logits
    assert fuse_projections(model) == 2 * len(model.model.layers)  # attention and MLP of every layer
    assert fuse_projections(model) == 0  # idempotent
    torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-5)
    layer = model.model.layers[0]
    # the modules' weights are views of the fused tensor: no copy, state_dict unchanged
    fused = layer.self_attn.q_proj._coral_fused
    assert layer.self_attn.k_proj.weight.data_ptr() == fused.weight[fused.sizes[0]:].data_ptr()
    assert unfuse_projections(model) == 5 * len(model.model.layers)
    torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_other_input_or_order_falls_back_to_own_product():
    model = tiny_qwen2()
    fuse_projections(model)
    attn = model.model.layers[0].self_attn
    x, y = torch.randn(3, 5, 48), torch.randn(3, 5, 48)
    q = attn.q_proj(x)
    torch.testing.assert_close(q, F.linear(x, attn.q_proj.weight, attn.q_proj.bias))
    # k on another tensor than q saw: its own product, not q's stash
    torch.testing.assert_close(attn.k_proj(y), F.linear(y, attn.k_proj.weight, attn.k_proj.bias))
    torch.testing.assert_close(attn.v_proj(x), F.linear(x, attn.v_proj.weight, attn.v_proj.bias))
    # v first, with nothing stashed
    torch.testing.assert_close(attn.v_proj(y), F.linear(y, attn.v_proj.weight, attn.v_proj.bias))


def test_fused_under_compile_has_fewer_products():
    model = tiny_llama(hidden=64)
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    ref = model(ids).logits
    fuse_projections(model)
    counts = []

    def backend(gm, inputs):
        counts.append(sum(node.target is torch._C._nn.linear for node in gm.graph.nodes))
        return gm

    torch._dynamo.reset()
    out = torch.compile(lambda x: model(x).logits, backend=backend)(ids)
    torch._dynamo.reset()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert counts == [4 * 2 + 1]  # qkv, o, gate_up, down per layer + the LM head (7 * 2 + 1 unfused)


def test_fused_draft_and_loop_identical_to_generate():
    model = tiny_llama(hidden=64)
    draft = DraftModel.random_init(model)
    feats, ids = torch.randn(1, 6, 64), torch.randint(0, 97, (1, 6))
    pos = torch.arange(6)[None]
    ref = draft(feats, ids, pos)
    assert fuse_projections(draft) == 2
    torch.testing.assert_close(draft(feats, ids, pos), ref, atol=1e-5, rtol=1e-5)
    gen = SpeculativeGenerator(model, draft, TreeConfig(depth=3, topk=3, total_tokens=8), fuse=True, adaptive=False,
                              max_context=64)
    assert hasattr(model.model.layers[1].mlp.up_proj, "_coral_fused")
    prompt = torch.randint(0, 97, (7,))
    assert gen.generate(prompt, 16).token_ids == plain_greedy(model, prompt, 16)


def test_moved_or_cast_model_refuses():
    """module.to() replaces each weight apart (the views are lost): the fused tensors follow on the next call."""
    model = tiny_qwen2()
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    ref = model.double()(ids).logits
    model.float()
    fuse_projections(model)
    out = model.double()(ids).logits  # would raise a dtype mismatch with stale fp32 fused weights
    torch.testing.assert_close(out, ref)
    fused = model.model.layers[1].self_attn.q_proj._coral_fused
    assert fused.weight.dtype == torch.float64
    assert model.model.layers[1].self_attn.v_proj.weight.data_ptr() == fused.weight[-fused.sizes[-1]:].data_ptr()
