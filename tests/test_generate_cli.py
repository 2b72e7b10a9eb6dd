"""`coral-fast generate`: every bad value exits 2 with one line before the model loads; --no-draft,
--mode, --max-context; the real model's JSON output (slow)."""
import json

import pytest

from coral_fast import DraftModel, generate_cli, models
from test_models import real_target, tiny_llama  # noqa: F401 (fixture)


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load a model fails the test: the checks must come first."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_target", load)


BASE = ["--model", "smollm2", "--prompt", "hi"]


@pytest.mark.parametrize("extra,message", [
    (["--temperature", "nan"], "--temperature: must be 0 (greedy) or a finite number >= 1e-06, got 'nan'"),
    (["--temperature", "inf"], "--temperature: must be 0"),
    (["--temperature", "-1"], "--temperature: must be 0"),
    (["--temperature", "1e-310"], "--temperature: must be 0"),
    (["--temperature", "x"], "--temperature: must be 0"),
    (["--tree-depth", "0"], "--tree-depth must be an integer in [1, 16], got 0"),
    (["--tree-depth", "-1"], "--tree-depth must be an integer in [1, 16], got -1"),
    (["--tree-topk", "0"], "--tree-topk must be an integer in [1, 32], got 0"),
    (["--tree-tokens", "0"], "--tree-tokens must be an integer in [1, 52] for --tree-depth 4 and --tree-topk 4"),
    (["--tree-tokens", "1000"], "--tree-tokens must be an integer in [1, 52]"),
    (["--lookup", "17"], "--lookup must be an integer in [0, 16], got 17"),
    (["--lookup", "3", "--tree-tokens", "3"], "--tree-tokens must be an integer in [4, 52] for --tree-depth 4 and "
                                              "--tree-topk 4 with --lookup 3, got 3"),
    (["--lookup", "3", "--tree-depth", "1", "--tree-topk", "2"], "--lookup 3 needs at least 4 tree tokens, more than the 2 "
                                                                 "a tree holds for --tree-depth 1 and --tree-topk 2"),
    (["--max-new-tokens", "0"], "--max-new-tokens: must be an integer >= 1, got '0'"),
    (["--max-new-tokens", "2.5"], "--max-new-tokens: must be an integer >= 1, got '2.5'"),
    (["--max-new-tokens", "10000000"], "--max-new-tokens 10000000 leaves no room for the prompt in --max-context 4096"),
    (["--max-new-tokens", "64", "--max-context", "64"], "must be < 64"),
    (["--max-context", "1"], "--max-context: must be an integer >= 2"),
    (["--mode", "graphs"], "--mode graphs needs --device cuda"),
    (["--mode", "fast"], "--mode: invalid choice"),
    (["--draft", "/nonexistent/draft"], "draft folder '/nonexistent/draft' does not exist"),
])
def test_bad_values_exit_2_in_one_line_before_loading(no_model_load, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        generate_cli.main(BASE + extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err


def test_bad_draft_folders_and_model(no_model_load, capsys, tmp_path):
    DraftModel.random_init(tiny_llama()).save_pretrained(tmp_path / "good")
    weights = (tmp_path / "good" / "model.safetensors").read_bytes()
    folder = tmp_path / "draft"
    folder.mkdir()

    def error_line():
        with pytest.raises(SystemExit) as exit_info:
            generate_cli.main(BASE + ["--draft", str(folder)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        return err

    assert "has no config.json" in error_line()
    (folder / "config.json").write_text("{}")
    assert "has no model.safetensors" in error_line()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert "is truncated" in error_line()
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    assert "model.safetensors" in error_line()
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in error_line()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        generate_cli.main(["--model", str(empty), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert "is empty" in err and "sentencepiece" not in err
    with pytest.raises(SystemExit):
        generate_cli.main(["--model", "smollm2", "--prompt", "   "])
    assert "the prompt is empty" in capsys.readouterr().err


class _Tok:
    """A stand-in tokenizer for the tiny target: characters -> ids."""

    def __call__(self, text):
        return type("E", (), {"input_ids": [ord(c) % 97 for c in text]})()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + i % 26) for i in ids)


@pytest.mark.parametrize("extra", [[], ["--no-draft"], ["--temperature", "0.7"]])
def test_json_fields_with_and_without_draft(monkeypatch, capsys, extra, one_thread):
    model = tiny_llama()
    monkeypatch.setattr(models, "load_target", lambda name, dtype, device: (model, _Tok()))
    monkeypatch.setattr(generate_cli, "shipped_draft", lambda name: None)  # a random draft
    rc = generate_cli.main(BASE + ["--prompt", "hello there", "--max-new-tokens", "12", "--json", "--compare",
                                   "--max-context", "64"] + extra)
    assert rc == 0
    out = capsys.readouterr()
    payload = json.loads(out.out.strip().splitlines()[-1])
    assert len(payload["token_ids"]) == 12 and payload["tokens_per_s"] > 0
    assert payload["engine_plain_tokens_per_s"] > 0 and payload["plain_tokens_per_s"] > 0 and payload["loop_tokens_per_s"] > 0
    assert payload["scouted"] >= 0
    if "--no-draft" in extra:
        assert payload["draft"] == "none" and payload["mean_accepted_length"] == 1.0 and payload["rounds"] == 0
        assert "the loop ran no round and no probe" in out.err  # the ratio is called noise only when the steps were the same
    if "--temperature" not in extra:
        assert payload["identical_to_plain"] is True
    assert "engine plain mode" in out.err


def test_prompt_past_max_context_is_one_line(monkeypatch, capsys, one_thread):
    model = tiny_llama()
    monkeypatch.setattr(models, "load_target", lambda name, dtype, device: (model, _Tok()))
    monkeypatch.setattr(generate_cli, "shipped_draft", lambda name: None)
    rc = generate_cli.main(BASE + ["--prompt", "x" * 60, "--max-new-tokens", "8", "--max-context", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and "prompt (60 tokens) + max_new_tokens (8) = 68 exceeds max_context 64" in err


@pytest.mark.slow
@pytest.mark.smollm2
def test_cli_json_real_model(monkeypatch, capsys, one_thread):
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


@pytest.mark.slow
@pytest.mark.smollm2
def test_cli_refuses_a_draft_of_another_target(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(models, "load_target", lambda name, dtype, device: real_target(name))
    DraftModel.random_init(tiny_llama()).save_pretrained(tmp_path)
    assert generate_cli.main(["--model", "smollm2", "--prompt", "hi", "--draft", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "hidden size 48" in err and "has 576" in err
