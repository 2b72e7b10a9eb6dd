"""Prompt set and self-distillation shards: layout, greedy consistency, resumable generation."""
import json
from collections import Counter

import pytest
import torch

from coral_fast.training.data import DataSettings, build_shard, generate_dataset, load_shards, plan_shards
from coral_fast.training.prompts import PROMPTS_PATH, build_prompts, load_prompts


pytestmark = pytest.mark.usefixtures("one_thread")


def test_shipped_prompts_are_the_generator_output_and_varied():
    shipped = load_prompts()
    assert shipped == build_prompts()
    assert len(shipped) >= 500
    categories = Counter(r["category"] for r in shipped)
    for name in ("explanation", "code", "list", "math", "rewrite", "dialogue"):
        assert categories[name] >= 10, categories
    texts = [json.dumps(r["messages"]) for r in shipped]
    assert len(set(texts)) == len(texts), "duplicate prompts"
    n_eval = sum(r["split"] == "eval" for r in shipped)
    assert 0.05 * len(shipped) < n_eval < 0.2 * len(shipped)
    assert all(r["messages"][-1]["role"] == "user" for r in shipped)
    assert PROMPTS_PATH.exists()


def test_build_shard_layout_and_load_shards_concatenation(tmp_path):
    from safetensors.torch import save_file

    H, K = 4, 3
    seqs = [[5, 6, 7, 8, 9], [1, 2, 3], [4, 4, 4, 4]]
    prompt_lengths = [2, 1, 3]

    def fake(seq):
        n = len(seq)
        return torch.randn(n, H).bfloat16(), torch.randint(0, 10, (n, K), dtype=torch.int32), torch.randn(n, K)

    parts = [fake(s) for s in seqs]
    shard = build_shard(seqs, prompt_lengths, [False, True, False], *[[p[i] for p in parts] for i in range(3)])
    assert shard["offsets"].tolist() == [0, 5, 8, 12]
    # position t trains when token t+1 is an answer token: t = P-1 .. N-2
    assert shard["loss_mask"].tolist() == [0, 1, 1, 1, 0] + [1, 1, 0] + [0, 0, 1, 0]
    assert shard["is_eval"].tolist() == [0, 1, 0]
    save_file(shard, str(tmp_path / "shard_00000.safetensors"))
    save_file(build_shard(seqs[:1], [3], [False], *[[p[i] for p in parts[:1]] for i in range(3)]), str(tmp_path / "shard_00001.safetensors"))
    merged = load_shards(tmp_path)
    assert merged["offsets"].tolist() == [0, 5, 8, 12, 17]
    assert merged["input_ids"][12:].tolist() == seqs[0]
    assert merged["loss_mask"][12:].tolist() == [0, 0, 1, 1, 0]
    with pytest.raises(ValueError):
        build_shard(seqs[:1], [9], [False], *[[p[i] for p in parts[:1]] for i in range(3)])
    with pytest.raises(ValueError):
        load_shards(tmp_path / "nothing")


class FakeChatTokenizer:
    """Just enough tokenizer for `generate_dataset`: a chat template of character codes."""

    chat_template = "fake"
    pad_token_id = 0
    eos_token_id = 2

    def __init__(self, vocab):
        self.vocab = vocab

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        ids = [1]
        for m in messages:
            ids += [3 + (ord(c) % (self.vocab - 3)) for c in m["content"][:6]]
        return ids + [1]


def tiny_target(vocab=53):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = 2
    return model


def test_generate_dataset_is_greedy_consistent_and_resumable(tmp_path):
    model = tiny_target()
    tokenizer = FakeChatTokenizer(53)
    prompts = [r for r in build_prompts()[:7]]
    settings = DataSettings(max_new_tokens=12, batch_size=3, forward_batch_size=2, samples=2, topk=4)
    n_train = sum(r["split"] == "train" for r in prompts)
    plan = plan_shards(prompts, settings)
    assert [len(s["rows"]) for s in plan if s["round"] == 0] == [3, 3, 1]
    assert sum(len(s["rows"]) for s in plan if s["round"] == 1) == n_train
    assert all(s["sample"] == (s["round"] > 0) for s in plan)
    stats = generate_dataset(model, tokenizer, prompts, tmp_path, settings, progress=False)
    assert stats["skipped"] == 0 and stats["answer_tokens"] > 0
    paths = sorted(tmp_path.glob("shard_*.safetensors"))
    assert len(paths) == stats["shards"]
    data = load_shards(tmp_path)
    # round 0 is greedy: in the answer the stored top-1 at t is the token at t+1
    first = load_shards_single(paths[0])
    mask = first["loss_mask"].bool()
    nxt = torch.cat([first["input_ids"][1:], first["input_ids"][:1]])
    assert mask.any() and torch.equal(first["topk_ids"][:, 0][mask], nxt[mask])
    assert torch.all(first["topk_logprobs"][:, :-1] >= first["topk_logprobs"][:, 1:])
    assert data["hidden"].dtype == torch.bfloat16 and data["hidden"].shape[-1] == 32
    # resume: only the missing shard is written again, identical for the greedy round
    before = paths[1].read_bytes()
    paths[1].unlink()
    stats = generate_dataset(model, tokenizer, prompts, tmp_path, settings, progress=False)
    assert stats["skipped"] == len(paths) - 1
    assert paths[1].read_bytes() == before
    # other settings into the same folder are refused
    with pytest.raises(ValueError):
        generate_dataset(model, tokenizer, prompts, tmp_path, DataSettings(max_new_tokens=5, batch_size=3), progress=False)


def load_shards_single(path):
    from safetensors.torch import load_file

    return load_file(str(path))


# --- coral-fast data: settings recorded, bad input refused before the model loads ----------------
def _data_main(monkeypatch, tmp_path, argv):
    """`coral-fast data` on the tiny target; -> (exit code, stderr lines, model loads)."""
    from coral_fast.training import data as data_module

    loads = []

    def fake_load(name, dtype, device):
        loads.append(dtype)
        return tiny_target().to(dtype), FakeChatTokenizer(53)

    monkeypatch.setattr(data_module, "load_target", fake_load)
    monkeypatch.setattr(data_module, "check_model_arg", lambda name: None)
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps(r) + "\n" for r in build_prompts()[:4]))
    base = ["--model", "tiny", "--out", str(tmp_path / "out"), "--prompts", str(prompts), "--batch-size", "4",
            "--max-new-tokens", "6", "--topk", "4", "--device", "cpu", "--no-progress"]
    try:
        code = data_module.main(base + argv)
    except SystemExit as exit:
        code = exit.code
    return code, loads


def test_data_rerun_with_other_settings_is_refused_in_one_line(monkeypatch, tmp_path, capsys):
    code, loads = _data_main(monkeypatch, tmp_path, ["--dtype", "float32"])
    assert code == 0 and loads == [torch.float32]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["dtype"] == "float32" and meta["settings"]["max_new_tokens"] == 6 and meta["prompts_sha256"]
    capsys.readouterr()
    for argv, named in ((["--dtype", "bfloat16"], "dtype='float32' (now 'bfloat16')"),
                        (["--dtype", "float32", "--max-new-tokens", "7"], "max_new_tokens=6 (now 7)"),
                        (["--dtype", "float32", "--seed", "3"], "seed=0 (now 3)"),
                        (["--dtype", "float32", "--temperature", "0.5"], "temperature=0.8 (now 0.5)")):
        code, loads = _data_main(monkeypatch, tmp_path, argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and not loads, argv  # refused before the model loads
        assert len(err) == 1 and err[0].startswith("coral-fast data: error: ") and named in err[0], err
    # the same settings continue the folder
    assert _data_main(monkeypatch, tmp_path, ["--dtype", "float32"])[0] == 0


@pytest.mark.parametrize("argv, named", [
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number in (0, inf)"),
    (["--temperature", "0"], "argument --temperature: must be a finite number in (0, inf)"),
    (["--batch-size", "-3"], "argument --batch-size: must be an integer >= 1"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice"),
    (["--prompts", "/nonexistent/prompts.jsonl"], "prompts file /nonexistent/prompts.jsonl not found"),
])
def test_data_bad_arguments_exit_2_in_one_line(monkeypatch, tmp_path, capsys, argv, named):
    code, loads = _data_main(monkeypatch, tmp_path, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not loads and len(err) == 1 and named in err[0], err
