"""DraftModel: the contract the trainer and the loop rely on."""
import json

import pytest
import torch
import torch.nn.functional as F

from coral_fast import DraftConfig, DraftModel
from coral_fast.draft import causal_attention
from test_models import tiny_gemma3, tiny_llama


def test_config_from_llama_and_gemma3_and_qwen2():
    from transformers import Qwen2Config

    llama = DraftConfig.from_target_config(tiny_llama().config)
    assert (llama.hidden_size, llama.num_attention_heads, llama.num_key_value_heads, llama.head_dim) == (48, 4, 2, 12)
    assert llama.hidden_act == "silu" and llama.target == "llama" and llama.vocab_size == 97
    gemma = DraftConfig.from_target_config(tiny_gemma3().config, num_groups=8)
    assert gemma.hidden_act == "gelu_pytorch_tanh" and gemma.head_dim == 16 and gemma.num_groups == 8
    assert gemma.rope_theta == 1_000_000.0  # the global layers' theta
    qwen = DraftConfig.from_target_config(Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                      intermediate_size=96, vocab_size=101, rope_theta=1e6))
    assert qwen.rope_theta == 1e6 and qwen.head_dim == 16
    assert DraftConfig.from_dict(json.loads(json.dumps(llama.to_dict()))) == llama
    with pytest.raises(ValueError, match="unknown DraftConfig fields"):
        DraftConfig.from_target_config(tiny_llama().config, num_groupz=3)
    with pytest.raises(ValueError, match="active_groups"):
        DraftConfig.from_target_config(tiny_llama().config, num_groups=4, active_groups=5)


@pytest.mark.parametrize("make_target", [tiny_llama, tiny_gemma3])
def test_forward_shapes_and_attn_fn_hook(make_target, seed):
    target = make_target()
    draft = DraftModel.random_init(target, num_groups=4, active_groups=2)
    B, T, H = 2, 7, target.config.hidden_size
    f = torch.randn(B, T, H)
    ids = torch.randint(0, target.config.vocab_size, (B, T))
    pos = torch.arange(3, 3 + T).expand(B, T)
    out = torch.full((B, T, H), float("nan"))
    out[:] = draft(f, ids, pos)
    assert torch.isfinite(out).all()
    seen = {}

    def attn(q, k, v):
        seen["shapes"] = (q.shape, k.shape, v.shape)
        return causal_attention(q, k, v, scale=draft.layer.scaling)

    torch.testing.assert_close(draft(f, ids, pos, attn_fn=attn), out)
    cfg = draft.config
    assert seen["shapes"] == ((B, cfg.num_attention_heads, T, cfg.head_dim), (B, cfg.num_key_value_heads, T, cfg.head_dim),
                              (B, cfg.num_key_value_heads, T, cfg.head_dim))
    # causal: the first position does not see later ones
    f2 = f.clone()
    f2[:, -1] += 1.0
    torch.testing.assert_close(draft(f2, ids, pos)[:, :-1], out[:, :-1])
    with pytest.raises(ValueError, match="features must be"):
        draft(f[..., :-1], ids, pos)
    with pytest.raises(ValueError, match="input_ids"):
        draft(f, ids[:, :-1], pos)


def test_rope_is_relative(seed):
    """Shifting all positions by a constant leaves causal attention, hence the output, unchanged."""
    target = tiny_llama()
    draft = DraftModel.random_init(target).double()
    f = torch.randn(1, 6, 48, dtype=torch.float64)
    ids = torch.randint(0, 97, (1, 6))
    pos = torch.arange(6)[None]
    torch.testing.assert_close(draft(f, ids, pos), draft(f, ids, pos + 37))
    assert not torch.allclose(draft(f, ids, pos), draft(f, ids, pos.flip(-1)))


def test_embed_and_head_are_the_targets(seed):
    target = tiny_gemma3()
    draft = DraftModel.random_init(target, num_groups=4, active_groups=4)
    ids = torch.randint(0, 89, (2, 5))
    # Gemma scales its embedding by sqrt(hidden): the draft must see the same vectors as the target
    torch.testing.assert_close(draft.embed(ids), target.get_input_embeddings()(ids))
    assert draft.embed(ids).abs().mean() > 1.5 * target.get_input_embeddings().weight[ids].abs().mean()
    h = torch.randn(3, 32)
    torch.testing.assert_close(draft.logits(h), target.lm_head(h))
    # all groups active: the routed top-k is the dense top-k of the full softmax
    ids_k, lp_k = draft.topk(h, 5)
    ref = torch.log_softmax(target.lm_head(h).float(), -1).topk(5)
    torch.testing.assert_close(lp_k, ref.values)
    assert torch.equal(ids_k, ref.indices)
    assert draft.router_logits(h).shape == (3, 4)


def test_state_dict_excludes_target_and_roundtrips(tmp_path, seed):
    target = tiny_llama()
    draft = DraftModel.random_init(target, num_groups=4, active_groups=2)
    keys = set(draft.state_dict())
    assert "fc.weight" in keys and any(k.startswith("head.router") for k in keys)
    assert not any(k.startswith(("head.weight", "_embed_tokens", "embed")) for k in keys)
    trainable = {n for n, p in draft.named_parameters() if p.requires_grad}
    assert trainable == {n for n in keys if n in dict(draft.named_parameters())}
    assert all(p.data_ptr() != target.lm_head.weight.data_ptr() for p in draft.parameters())
    draft.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    loaded = DraftModel.from_pretrained(tmp_path, target)
    f, ids, pos = torch.randn(1, 5, 48), torch.randint(0, 97, (1, 5)), torch.arange(5)[None]
    torch.testing.assert_close(loaded(f, ids, pos), draft(f, ids, pos))
    h = draft(f, ids, pos)[0]
    assert torch.equal(loaded.topk(h, 4)[0], draft.topk(h, 4)[0])


@pytest.mark.parametrize("kind", ["frequency", "embedding"])
def test_stored_grouping_survives_save(tmp_path, kind):
    from coral_fast import VocabGrouping

    target = tiny_llama()
    if kind == "frequency":
        grouping = VocabGrouping.from_token_counts(torch.randint(0, 1000, (97,)), 4)
    else:
        grouping = VocabGrouping.from_embeddings(target.lm_head.weight, 4)
    assert not grouping.is_identity
    config = DraftConfig.from_target_config(target.config, num_groups=4, active_groups=1, grouping=kind)
    with pytest.raises(ValueError, match=f"grouping='{kind}' needs its VocabGrouping"):
        DraftModel(config, target.get_input_embeddings(), target.lm_head.weight)
    draft = DraftModel(config, target.get_input_embeddings(), target.lm_head.weight, grouping)
    draft.save_pretrained(tmp_path)
    loaded = DraftModel.from_pretrained(tmp_path, target)
    assert loaded.config.grouping == kind
    assert torch.equal(loaded.head.grouping.group_of, grouping.group_of)


def test_mismatched_draft_is_refused(tmp_path):
    small = tiny_llama()
    DraftModel.random_init(small).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="hidden size 48.*has 32"):
        DraftModel.from_pretrained(tmp_path / "a", tiny_gemma3())
    with pytest.raises(ValueError, match="vocabulary 97.*has 101"):
        DraftModel.from_pretrained(tmp_path / "a", tiny_llama(vocab=101))
    with pytest.raises(ValueError, match="no draft"):
        DraftModel.from_pretrained(tmp_path / "missing", small)
    config = DraftConfig.from_target_config(small.config)
    with pytest.raises(ValueError, match="lm_head_weight has shape"):
        DraftModel(config, small.get_input_embeddings(), torch.zeros(5, 48))


def test_dense_grouping_topk_is_full_vocabulary(seed):
    target = tiny_llama()
    draft = DraftModel.random_init(target, grouping="dense")
    h = torch.randn(4, 48)
    ids, lp = draft.topk(h, 6)
    ref = F.log_softmax(target.lm_head(h), -1).topk(6)
    assert torch.equal(ids, ref.indices)
    torch.testing.assert_close(lp, ref.values)


def test_broken_draft_folders_name_the_file(tmp_path):
    target = tiny_llama()
    DraftModel.random_init(target).save_pretrained(tmp_path / "d")
    weights = tmp_path / "d" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors is truncated or corrupt"):
        DraftModel.from_pretrained(tmp_path / "d", target)
    weights.unlink()
    with pytest.raises(ValueError, match=r"model.safetensors not found"):
        DraftModel.from_pretrained(tmp_path / "d", target)
    (tmp_path / "d" / "config.json").write_text('{"architecture": "coral_fast.DraftModel", ')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        DraftModel.from_pretrained(tmp_path / "d", target)
    (tmp_path / "d" / "config.json").write_text('{"architecture": "coral_fast.DraftModel", "hidden_size": 48}')
    with pytest.raises(ValueError, match=r"config.json: .*missing"):
        DraftModel.from_pretrained(tmp_path / "d", target)


def test_shipped_configs_build_todays_architecture():
    import importlib.resources

    for name in ("smollm2", "gemma3-270m"):
        raw = json.loads((importlib.resources.files("coral_fast") / "drafts" / name / "config.json").read_text())
        cfg = DraftConfig.from_dict(raw)
        assert (cfg.input_norm, cfg.fc_input_order, cfg.fc_bias, cfg.qkv_bias, cfg.rope_scaling) == (
            True, "feature_first", False, False, None)
