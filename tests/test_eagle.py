"""EAGLE-format drafts in and out: folders built here with EAGLE's key names and config fields, checked
against a few-line re-implementation of EAGLE's draft math (eagle/model/cnets1.py, cnets.py)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from coral_fast import DraftModel, SpeculativeGenerator
from coral_fast.eagle import Eagle3Draft, eagle3_feature_layers
from coral_fast.generate import TreeConfig
from test_generate import plain_greedy
from test_models import tiny_gemma3, tiny_llama


# --- EAGLE's math, written out independently ------------------------------------------------------
def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, pos, theta):
    D = x.shape[-1]
    ang = pos[:, None, :, None].double() / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attention_block(sd, p, h, cfg, pos):
    """q/k/v from h [B, T, I], causal GQA attention, o_proj: [B, T, H]."""
    B, T, _ = h.shape
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    D = cfg["hidden_size"] // heads
    proj = lambda n, heads_: F.linear(h, sd[f"{p}self_attn.{n}_proj.weight"], sd.get(f"{p}self_attn.{n}_proj.bias")
                                      ).view(B, T, heads_, D).transpose(1, 2)
    q, k, v = rope(proj("q", heads), pos, cfg["rope_theta"]), rope(proj("k", kv), pos, cfg["rope_theta"]), proj("v", kv)
    k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D) + torch.full((T, T), float("-inf"), dtype=h.dtype).triu(1)
    return F.linear((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, heads * D), sd[f"{p}self_attn.o_proj.weight"])


def mlp_block(sd, p, x, eps):
    h = rms(x, sd[f"{p}post_attention_layernorm.weight"], eps)
    return x + F.linear(F.silu(F.linear(h, sd[f"{p}mlp.gate_proj.weight"])) * F.linear(h, sd[f"{p}mlp.up_proj.weight"]),
                        sd[f"{p}mlp.down_proj.weight"])


def eagle1_reference(sd, cfg, embedding, feats, ids, pos):
    """cnets1.Model.forward: fc(cat(emb, feature)), layer 0 without input norm; hidden [B, T, H]."""
    sd = {k: v.double() for k, v in sd.items()}
    bias = sd["fc.bias"] if cfg.get("bias", True) else None
    x = F.linear(torch.cat([embedding.double()[ids], feats.double()], -1), sd["fc.weight"], bias)
    x = x + attention_block(sd, "layers.0.", x, cfg, pos)
    return mlp_block(sd, "layers.0.", x, cfg["rms_norm_eps"])


def eagle3_reference(sd, cfg, embedding, feats, ids, pos):
    """cnets.Model.forward + topK_genrate's head: (hidden [B, T, H], target-vocab logprobs of the draft vocab)."""
    sd = {k: v.double() for k, v in sd.items()}
    eps = cfg["rms_norm_eps"]
    x = F.linear(feats.double(), sd["fc.weight"]) if feats.shape[-1] != cfg["hidden_size"] else feats.double()
    h = torch.cat([rms(embedding.double()[ids], sd["midlayer.input_layernorm.weight"], eps),
                   rms(x, sd["midlayer.hidden_norm.weight"], eps)], -1)
    x = x + attention_block(sd, "midlayer.", h, cfg, pos)
    out = mlp_block(sd, "midlayer.", x, eps)
    return out, F.log_softmax(F.linear(rms(out, sd["norm.weight"], eps), sd["lm_head.weight"]), -1)


# --- folders in EAGLE's format ---------------------------------------------------------------------
def eagle1_folder(path, target, fc_bias=True, qkv_bias=False, weights="safetensors", write_bias_key=True,
                  embedding=False, dtype=torch.float32):
    c = target.config
    H, I, heads, kv = c.hidden_size, 72, c.num_attention_heads, c.num_key_value_heads
    D = H // heads
    g = lambda *s: torch.randn(*s) * 0.1
    sd = {"fc.weight": g(H, 2 * H), "layers.0.self_attn.q_proj.weight": g(heads * D, H),
          "layers.0.self_attn.k_proj.weight": g(kv * D, H), "layers.0.self_attn.v_proj.weight": g(kv * D, H),
          "layers.0.self_attn.o_proj.weight": g(H, heads * D), "layers.0.mlp.gate_proj.weight": g(I, H),
          "layers.0.mlp.up_proj.weight": g(I, H), "layers.0.mlp.down_proj.weight": g(H, I),
          "layers.0.post_attention_layernorm.weight": 1 + g(H)}
    if fc_bias:
        sd["fc.bias"] = g(H)
    if qkv_bias:
        sd.update({f"layers.0.self_attn.{p}_proj.bias": g(n) for p, n in (("q", heads * D), ("k", kv * D), ("v", kv * D))})
    if embedding:
        sd["embed_tokens.weight"] = target.get_input_embeddings().weight.clone()
    sd = {k: v.to(dtype) for k, v in sd.items()}
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": H, "intermediate_size": I,
           "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": heads,
           "num_key_value_heads": kv, "num_hidden_layers": 1, "pad_token_id": 0, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "torch_dtype": "float16", "vocab_size": c.vocab_size, "rope_theta": 500000.0}
    if write_bias_key:
        cfg["bias"] = fc_bias
    if qkv_bias:
        cfg["qkv_bias"] = True
    write(path, cfg, sd, weights)
    return cfg, sd


def write(path, cfg, sd, weights="safetensors"):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    if weights == "bin":
        torch.save(sd, path / "pytorch_model.bin")
    else:
        save_file(sd, str(path / "model.safetensors"))


def inputs(target, T=9, start=4):
    H, V = target.config.hidden_size, target.config.vocab_size
    return torch.randn(1, T, H), torch.randint(0, V, (1, T)), torch.arange(start, start + T)[None]


@pytest.mark.parametrize("fc_bias,qkv_bias,weights,bias_key", [
    (True, False, "bin", True), (False, False, "safetensors", True), (True, True, "safetensors", False),
    (False, True, "bin", True)])
def test_eagle1_folder_loads_exactly(tmp_path, seed, fc_bias, qkv_bias, weights, bias_key):
    target = tiny_llama()
    cfg, sd = eagle1_folder(tmp_path, target, fc_bias, qkv_bias, weights, write_bias_key=bias_key, embedding=True)
    draft = DraftModel.from_pretrained(tmp_path, target)
    assert (draft.config.input_norm, draft.config.fc_input_order) == (False, "embedding_first")
    assert (draft.config.fc_bias, draft.config.qkv_bias, draft.config.grouping) == (fc_bias, qkv_bias, "dense")
    assert draft.feature_layers is None and draft.feature_size == 48
    f, ids, pos = inputs(target)
    ref = eagle1_reference(sd, cfg, target.get_input_embeddings().weight, f, ids, pos)
    out = draft(f, ids, pos)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    # the target's head ranks the draft's hidden state, as EAGLE's topK_genrate does
    top_ids, top_lp = draft.topk(out[0], 5)
    expect = F.log_softmax(target.lm_head(out[0]).float(), -1).topk(5)
    assert torch.equal(top_ids, expect.indices)
    torch.testing.assert_close(top_lp, expect.values)


def test_eagle1_without_bias_key_defaults_to_a_bias(tmp_path, seed):
    target = tiny_llama()
    cfg, sd = eagle1_folder(tmp_path, target, fc_bias=True, write_bias_key=False)
    draft = DraftModel.from_pretrained(tmp_path, target)
    assert draft.config.fc_bias
    f, ids, pos = inputs(target)
    torch.testing.assert_close(draft(f, ids, pos).double(), eagle1_reference(sd, cfg, target.get_input_embeddings().weight, f, ids, pos),
                               rtol=1e-4, atol=1e-4)


def test_ours_to_eagle_to_ours_is_identical(tmp_path, seed):
    target = tiny_llama()
    draft = DraftModel.random_init(target, input_norm=False, num_groups=4, active_groups=2)
    with torch.no_grad():
        draft.layer.post_attention_layernorm.weight.add_(torch.randn(48) * 0.1)
    notes = draft.save_pretrained(tmp_path / "e", format="eagle")
    assert any("router" in n for n in notes)  # the grouped head does not travel
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle"] and cfg["num_hidden_layers"] == 1 and cfg["bias"] is False
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "e" / "model.safetensors"))
    assert not sd["fc.bias"].any() and "layers.0.input_layernorm.weight" not in sd
    assert not any(k.startswith(("head", "grouping", "layer.")) for k in sd)
    back = DraftModel.from_pretrained(tmp_path / "e", target)
    f, ids, pos = inputs(target)
    expected = draft(f, ids, pos)
    # the same products, summed in another order (fc's halves swapped): equal to fp32 rounding
    torch.testing.assert_close(back(f, ids, pos), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eagle1_reference(sd, cfg, target.get_input_embeddings().weight, f, ids, pos),
                               expected.double(), rtol=1e-4, atol=1e-4)
    # and back to our own format, then to EAGLE again: the same bytes
    back.save_pretrained(tmp_path / "c")
    again = DraftModel.from_pretrained(tmp_path / "c", target)
    assert torch.equal(again(f, ids, pos), back(f, ids, pos))
    again.save_pretrained(tmp_path / "e2", format="eagle", weights="bin")
    sd2 = torch.load(tmp_path / "e2" / "pytorch_model.bin")
    assert sd2.keys() == sd.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_export_refuses_what_eagle_cannot_say(tmp_path):
    with pytest.raises(ValueError, match="input norm"):
        DraftModel.random_init(tiny_llama()).save_pretrained(tmp_path, format="eagle")
    with pytest.raises(ValueError, match="head_dim 16 x 4 heads != hidden size 32"):
        DraftModel.random_init(tiny_gemma3(), input_norm=False).save_pretrained(tmp_path, format="eagle")
    with pytest.raises(ValueError, match="format must be"):
        DraftModel.random_init(tiny_llama()).save_pretrained(tmp_path, format="medusa")


def test_wrong_folders_are_refused(tmp_path):
    target = tiny_llama()
    eagle1_folder(tmp_path / "ok", target)
    with pytest.raises(ValueError, match="hidden size 48.*has 32"):
        DraftModel.from_pretrained(tmp_path / "ok", tiny_gemma3())
    with pytest.raises(ValueError, match="vocabulary 97.*has 101"):
        DraftModel.from_pretrained(tmp_path / "ok", tiny_llama(vocab=101))
    cfg, sd = eagle1_folder(tmp_path / "emb", target, embedding=True)
    with pytest.raises(ValueError, match="embed_tokens.weight differs"):
        DraftModel.from_pretrained(tmp_path / "emb", tiny_llama(seed=1))
    cases = {
        "shape": lambda c, s: s.__setitem__("layers.0.mlp.up_proj.weight", torch.zeros(5, 48)),
        "missing": lambda c, s: s.pop("layers.0.self_attn.k_proj.weight"),
        "layers": lambda c, s: c.__setitem__("num_hidden_layers", 2),
        "act": lambda c, s: c.__setitem__("hidden_act", "relu"),
        "extra": lambda c, s: s.__setitem__("layers.1.mlp.up_proj.weight", torch.zeros(1)),
        "bias": lambda c, s: c.__setitem__("bias", False),
    }
    messages = {"shape": "up_proj.weight has shape", "missing": "k_proj.weight missing", "layers": "num_hidden_layers is 2",
                "act": "hidden_act 'relu'", "extra": "unexpected tensors", "bias": "fc.bias is non-zero"}
    for name, corrupt in cases.items():
        c, s = dict(cfg), dict(sd)
        corrupt(c, s)
        write(tmp_path / name, c, s)
        with pytest.raises(ValueError, match=messages[name]):
            DraftModel.from_pretrained(tmp_path / name, target)
    write(tmp_path / "noweights", cfg, {})
    (tmp_path / "noweights" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="neither pytorch_model.bin nor model.safetensors"):
        DraftModel.from_pretrained(tmp_path / "noweights", target)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"hidden_size": 48}))
    with pytest.raises(ValueError, match="neither a coral-fast draft config"):
        DraftModel.from_pretrained(tmp_path / "other", target)


# --- EAGLE-3 ---------------------------------------------------------------------------------------
def eagle3_folder(path, target, draft_vocab=None, aux_ids=None):
    c = target.config
    H, I, heads, kv, V = c.hidden_size, 64, c.num_attention_heads, c.num_key_value_heads, c.vocab_size
    D, Vd = H // heads, draft_vocab or V
    g = lambda *s: torch.randn(*s) * 0.1
    sd = {"fc.weight": g(H, 3 * H), "midlayer.self_attn.q_proj.weight": g(heads * D, 2 * H),
          "midlayer.self_attn.k_proj.weight": g(kv * D, 2 * H), "midlayer.self_attn.v_proj.weight": g(kv * D, 2 * H),
          "midlayer.self_attn.o_proj.weight": g(H, heads * D), "midlayer.mlp.gate_proj.weight": g(I, H),
          "midlayer.mlp.up_proj.weight": g(I, H), "midlayer.mlp.down_proj.weight": g(H, I),
          "midlayer.input_layernorm.weight": 1 + g(H), "midlayer.hidden_norm.weight": 1 + g(H),
          "midlayer.post_attention_layernorm.weight": 1 + g(H), "norm.weight": 1 + g(H), "lm_head.weight": g(Vd, H) * 10}
    if Vd < V:
        keep = torch.randperm(V)[:Vd].sort().values  # the hot ids, ascending as EAGLE-3 builds them
        sd["d2t"] = keep - torch.arange(Vd)
        t2d = torch.zeros(V, dtype=torch.bool)
        t2d[keep] = True
        sd["t2d"] = t2d
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": H, "intermediate_size": I,
           "model_type": "llama", "num_attention_heads": heads, "num_key_value_heads": kv, "num_hidden_layers": 1,
           "rms_norm_eps": 1e-5, "vocab_size": V, "draft_vocab_size": Vd, "rope_theta": 10000.0}
    if aux_ids:
        cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": aux_ids}
    write(path, cfg, sd)
    return cfg, sd


def test_eagle3_feature_layers():
    assert eagle3_feature_layers(32) == (2, 16, 29)  # inputs of layers 2, L/2, L-3 (EAGLE's modeling_llama_kv)
    assert eagle3_feature_layers(7) == (2, 3, 4)
    assert eagle3_feature_layers(32, [1, 15, 28]) == (2, 16, 29)  # layer outputs -> the next layer's input
    with pytest.raises(ValueError, match="three distinct"):
        eagle3_feature_layers(6)


def test_eagle3_folder_loads_exactly(tmp_path, seed):
    target = tiny_llama(layers=8)
    cfg, sd = eagle3_folder(tmp_path, target, draft_vocab=31)
    draft = DraftModel.from_pretrained(tmp_path, target)
    assert isinstance(draft, Eagle3Draft) and draft.feature_layers == (2, 4, 5) and draft.feature_size == 144
    ids = torch.randint(0, 97, (1, 10))
    hs = target(ids, output_hidden_states=True).hidden_states
    feats = draft.target_features(hs, hs[-1][0])
    torch.testing.assert_close(feats, torch.cat([hs[2][0], hs[4][0], hs[5][0]], -1))
    pos = torch.arange(10)[None] + 3
    out = draft(feats[None], ids, pos)
    ref, ref_lp = eagle3_reference(sd, cfg, target.get_input_embeddings().weight, feats[None], ids, pos)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    # a deeper step reads the draft's own output (H wide, before norm), with no fc
    out2 = draft(out, ids, pos)
    torch.testing.assert_close(out2.double(), eagle3_reference(sd, cfg, target.get_input_embeddings().weight, out, ids, pos)[0],
                               rtol=1e-4, atol=1e-4)
    top_ids, top_lp = draft.topk(out[0], 6)
    expect = ref_lp[0].topk(6)
    assert torch.equal(top_ids, expect.indices + sd["d2t"][expect.indices])  # target ids
    assert bool(sd["t2d"][top_ids].all())
    torch.testing.assert_close(top_lp.double(), expect.values, rtol=1e-4, atol=1e-4)
    # round trip through EAGLE-3's format
    draft.save_pretrained(tmp_path / "again")
    back = DraftModel.from_pretrained(tmp_path / "again", target)
    assert torch.equal(back(feats[None], ids, pos), out)
    with pytest.raises(ValueError, match="needs d2t"):
        cfg2, sd2 = dict(cfg), dict(sd)
        sd2.pop("d2t")
        write(tmp_path / "nod2t", cfg2, sd2)
        DraftModel.from_pretrained(tmp_path / "nod2t", target)


def test_eagle3_full_vocabulary_and_aux_ids(tmp_path, seed):
    target = tiny_llama(layers=8)
    eagle3_folder(tmp_path, target, aux_ids=[0, 3, 6])
    draft = DraftModel.from_pretrained(tmp_path, target)
    assert draft.feature_layers == (1, 4, 7) and torch.equal(draft.d2t, torch.zeros(97, dtype=torch.int64))
    with pytest.raises(ValueError, match="hidden size 48.*target of 32"):
        DraftModel.from_pretrained(tmp_path, tiny_gemma3())


# --- the loop with an imported draft ---------------------------------------------------------------
def test_loop_with_imported_eagle1_draft_is_greedy_exact(tmp_path, seed, one_thread):
    target = tiny_llama()
    eagle1_folder(tmp_path, target, fc_bias=True, qkv_bias=True)
    draft = DraftModel.from_pretrained(tmp_path, target)
    gen = SpeculativeGenerator(target, draft, TreeConfig(depth=3, topk=3, total_tokens=8))
    for prompt_len, n in [(1, 9), (7, 20)]:
        prompt = torch.randint(0, 97, (prompt_len,))
        assert gen.generate(prompt, n).token_ids == plain_greedy(target, prompt, n)


def test_loop_with_imported_eagle3_draft_is_greedy_exact(tmp_path, seed, one_thread):
    target = tiny_llama(layers=8)
    eagle3_folder(tmp_path, target, draft_vocab=31)
    draft = DraftModel.from_pretrained(tmp_path, target)
    gen = SpeculativeGenerator(target, draft, TreeConfig(depth=3, topk=3, total_tokens=8))
    prompt = torch.randint(0, 97, (7,))
    assert gen.generate(prompt, 20).token_ids == plain_greedy(target, prompt, 20)


# --- coral-fast export -----------------------------------------------------------------------------
def test_export_command(tmp_path, capsys, seed):
    from coral_fast.cli import main

    target = tiny_llama()
    draft = DraftModel.random_init(target, input_norm=False, num_groups=4, active_groups=2)
    draft.save_pretrained(tmp_path / "ours")
    assert main(["export", "--format", "eagle", str(tmp_path / "ours"), str(tmp_path / "e")]) == 0
    assert "router and contiguous grouping dropped" in capsys.readouterr().err
    back = DraftModel.from_pretrained(tmp_path / "e", target)
    f, ids, pos = inputs(target)
    torch.testing.assert_close(back(f, ids, pos), draft(f, ids, pos), rtol=1e-6, atol=1e-6)
    DraftModel.random_init(target).save_pretrained(tmp_path / "normed")
    for argv, message in [([str(tmp_path / "normed"), str(tmp_path / "x")], "input norm"),
                          ([str(tmp_path / "e"), str(tmp_path / "x")], "already an EAGLE draft"),
                          ([str(tmp_path / "none"), str(tmp_path / "x")], "is not a folder"),
                          ([str(tmp_path / "ours"), str(tmp_path / "x"), "--with-embedding"], "needs --model")]:
        with pytest.raises(SystemExit) as exit_:
            main(["export", "--format", "eagle", *argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_trainer_eagle_arch_exports(tmp_path, seed):
    """`coral-fast train --draft-arch eagle` builds a draft that export can write as an EAGLE folder, and
    the folder loads back with the same outputs; the default architecture is refused by export."""
    from coral_fast.training.cli import build_draft

    model = tiny_llama()
    draft = build_draft(model, "tiny", "dense", 4, 2, None, "cpu", arch="eagle", seed=3)
    assert draft.config.input_norm is False and draft.config.fc_input_order == "embedding_first"
    draft.save_pretrained(tmp_path / "eagle", format="eagle")
    back = DraftModel.from_pretrained(str(tmp_path / "eagle"), model)
    feats, ids = torch.randn(1, 5, model.config.hidden_size), torch.randint(0, model.config.vocab_size, (1, 5))
    pos = torch.arange(5)[None]
    torch.testing.assert_close(back(feats, ids, pos), draft(feats, ids, pos), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        build_draft(model, "tiny", "dense", 4, 2, None, "cpu", seed=3).save_pretrained(tmp_path / "x", format="eagle")


def test_loop_with_fused_feature_draft_is_greedy_exact_and_not_exported(tmp_path, seed, one_thread):
    """A coral draft with EAGLE-3-style inputs (three target layers fused by `fuse`): the loop asks the
    target for those states and stays greedy-exact; the folder round-trips; EAGLE-1's format refuses it."""
    target = tiny_llama(layers=8)
    draft = DraftModel.random_init(target, feature_layers=[7, 2, 4], num_groups=4, active_groups=2)
    assert draft.feature_layers == (2, 4, 7) and draft.feature_size == 3 * target.config.hidden_size
    draft.save_pretrained(tmp_path / "fused")
    back = DraftModel.from_pretrained(tmp_path / "fused", target)
    H = target.config.hidden_size
    feats, ids, pos = torch.randn(1, 5, 3 * H), torch.randint(0, 97, (1, 5)), torch.arange(5)[None]
    assert back.feature_layers == (2, 4, 7) and torch.equal(back(feats, ids, pos), draft(feats, ids, pos))
    assert not torch.equal(draft(feats, ids, pos), draft(feats * 2, ids, pos))  # the fused features are read
    with pytest.raises(ValueError, match=rf"features must be \[B, T, {3 * H}\] \(target\) or \[B, T, {H}\] \(draft\)"):
        draft(torch.randn(1, 5, 2 * H), ids, pos)
    gen = SpeculativeGenerator(target, draft, TreeConfig(depth=3, topk=3, total_tokens=8))
    for prompt_len, n in [(1, 9), (7, 20)]:
        prompt = torch.randint(0, 97, (prompt_len,))
        assert gen.generate(prompt, n).token_ids == plain_greedy(target, prompt, n)
    with pytest.raises(ValueError, match=r"fuses the target's hidden states \[2, 4, 7\]"):
        DraftModel.random_init(target, input_norm=False, feature_layers=(2, 4, 7)).save_pretrained(tmp_path / "e", format="eagle")
    with pytest.raises(ValueError, match="the target .* has 8 layers"):
        DraftModel.random_init(target, feature_layers=(2, 9))
    for bad in ([3], [2, 2], [-1, 3], "2,3"):
        with pytest.raises(ValueError, match="feature_layers must be"):
            DraftModel.random_init(target, feature_layers=bad)


def test_loop_features_equal_the_training_features_of_a_fused_draft(seed, one_thread):
    """The loop feeds a fused-feature draft the same target states that training computes (a mismatch
    would keep the output exact and only lose acceptance): the engine's feature history of the committed
    tokens equals `data.target_features`'s inputs over the same ids."""
    from coral_fast.training.data import target_features

    target = tiny_llama(layers=8)
    draft = DraftModel.random_init(target, feature_layers=(2, 4, 7), num_groups=4, active_groups=2)
    gen = SpeculativeGenerator(target, draft, TreeConfig(depth=3, topk=3, total_tokens=8))
    prompt = torch.randint(0, 97, (11,))
    out = gen.generate(prompt, 12).token_ids
    ids = torch.cat([prompt, torch.tensor(out)])[None]
    _, _, _, inputs = target_features(target, ids, torch.ones_like(ids), 4, feature_layers=(2, 4, 7))
    n = ids.shape[1] - 1  # features of every committed position but the last token's (not yet verified)
    torch.testing.assert_close(gen.engine.hist.feats[:n], inputs[0, :n], rtol=1e-4, atol=1e-4)
