"""Prompt set and self-distillation shards: layout, greedy consistency, resumable generation."""
import json
from collections import Counter

import pytest
import torch

from coral_fast.training.data import DataSettings, build_shard, build_token_shard, generate_dataset, load_shards, shard_files
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


def test_token_shards_round_trip_in_the_smallest_id_type(tmp_path):
    from safetensors.torch import save_file

    rng = __import__("random").Random(0)
    for vocab, dtype in ((50_000, torch.uint16), (65_536, torch.uint16), (262_144, torch.int32)):
        folder = tmp_path / str(vocab)
        folder.mkdir()
        seqs, plens, tasks = [], [], []
        for shard in range(3):
            rows = [[rng.randrange(vocab) for _ in range(rng.randint(2, 40))] for _ in range(rng.randint(1, 6))]
            p = [rng.randint(1, len(r) - 1) for r in rows]
            t = [rng.choice(["chat", "qa", "code"]) for _ in rows]
            tensors, meta = build_token_shard(rows, p, t, [i % 3 == 0 for i in range(len(rows))], [shard > 0] * len(rows), vocab)
            assert tensors["input_ids"].dtype == dtype
            save_file(tensors, str(folder / f"shard_{shard:05d}_00.safetensors"), metadata={"coral_data": __import__("json").dumps(meta)})
            seqs += rows
            plens += p
            tasks += t
        data = load_shards(folder)
        offsets = data["offsets"].tolist()
        assert [data["input_ids"][a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == seqs
        assert data["prompt_lengths"].tolist() == plens
        assert [data["tasks"][i] for i in data["task_ids"].tolist()] == tasks
        # the loss trains position t when token t+1 is an answer token
        for (a, b), p in zip(zip(offsets[:-1], offsets[1:]), plens):
            assert data["loss_mask"][a:b].tolist() == [0] * (p - 1) + [1] * (b - a - p) + [0]
    with pytest.raises(ValueError, match="no answer token"):
        build_token_shard([[1, 2]], [2], ["chat"], [False], [False], 10)
    with pytest.raises(ValueError, match="token ids outside 0..9"):
        build_token_shard([[1, 12]], [1], ["chat"], [False], [False], 10)


def test_a_folder_of_mixed_formats_is_refused(tmp_path):
    from safetensors.torch import save_file

    seqs = [[5, 6, 7, 8, 9]]
    parts = [torch.randn(5, 4).bfloat16()], [torch.zeros(5, 3, dtype=torch.int32)], [torch.randn(5, 3)]
    save_file(build_shard(seqs, [2], [False], *parts), str(tmp_path / "shard_00000.safetensors"))
    assert "hidden" in load_shards(tmp_path)  # the older format still loads
    tensors, meta = build_token_shard(seqs, [2], ["chat"], [False], [False], 10)
    save_file(tensors, str(tmp_path / "shard_00001_00.safetensors"))
    with pytest.raises(ValueError, match="mixes token-only shards and shards with stored features"):
        load_shards(tmp_path)


def _hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    row = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=0)[0, len(prompt):].tolist()
    return row[: row.index(2) + 1] if 2 in row else row


def test_generate_dataset_is_greedy_consistent_and_resumable(tmp_path):
    from coral_fast.training.data import prompt_token_ids

    model = tiny_target()
    tokenizer = FakeChatTokenizer(53)
    prompts = [r for r in build_prompts()[:7]]
    settings = DataSettings(max_new_tokens=12, batch_size=3, gen_rows=2, samples=2)
    n_train = sum(r["split"] == "train" for r in prompts)
    stats = generate_dataset(model, tokenizer, prompts, tmp_path, settings, progress=False)
    assert stats["written"] == stats["shards"] == 6 and stats["answer_tokens"] > 0
    paths = shard_files(tmp_path)
    assert [p.name for p in paths] == [f"shard_{c:05d}_{r:02d}.safetensors" for c in range(3) for r in range(2)]
    data = load_shards(tmp_path)
    assert len(data["offsets"]) - 1 == len(prompts) + n_train and data["sampled"].sum() == n_train
    assert sorted(set(data["tasks"])) == sorted({r["category"] for r in prompts})
    # round 0 is greedy: each answer equals HF generate of its prompt alone
    greedy = [i for i in range(len(data["offsets"]) - 1) if not data["sampled"][i]]
    for i, row in zip(greedy, prompts):
        a, b, p = int(data["offsets"][i]), int(data["offsets"][i + 1]), int(data["prompt_lengths"][i])
        ids = prompt_token_ids(tokenizer, row["messages"])
        assert data["input_ids"][a:a + p].tolist() == ids
        assert data["input_ids"][a + p:b].tolist() == _hf_greedy(model, ids, 12)
        assert bool(data["is_eval"][i]) == (row["split"] == "eval")
    # resume: only the missing shard is written again, identical (greedy and sampled rounds)
    for lost in (paths[2], paths[3]):
        before = lost.read_bytes()
        lost.unlink()
        stats = generate_dataset(model, tokenizer, prompts, tmp_path, settings, progress=False)
        assert stats["skipped"] == len(paths) - 1 and stats["written"] == 1
        assert lost.read_bytes() == before
    # a deadline in the past starts nothing
    (paths[5]).unlink()
    stats = generate_dataset(model, tokenizer, prompts, tmp_path, settings, progress=False, deadline=0.0)
    assert stats["written"] == 0 and stats["stopped_at"] == "chunk 2"
    # other settings into the same folder are refused
    with pytest.raises(ValueError):
        generate_dataset(model, tokenizer, prompts, tmp_path, DataSettings(max_new_tokens=5, batch_size=3), progress=False)
    # stop_loops=1: a greedy answer ends at its first token seen earlier in it (a 1-token loop of period <= 128)
    looped = tmp_path / "looped"
    generate_dataset(model, tokenizer, prompts, looped, DataSettings(max_new_tokens=12, batch_size=3, gen_rows=2, stop_loops=1), progress=False)
    data, cut = load_shards(looped), 0
    for i, row in zip(range(len(data["offsets"]) - 1), prompts):
        a, b, p = int(data["offsets"][i]), int(data["offsets"][i + 1]), int(data["prompt_lengths"][i])
        full = _hf_greedy(model, data["input_ids"][a:a + p].tolist(), 12)
        end = next((t + 1 for t in range(len(full)) if full[t] in full[:t]), len(full))
        assert data["input_ids"][a + p:b].tolist() == full[:end]
        cut += end < len(full)
    assert cut  # the tiny target repeats a token within 12 (the rule was exercised)


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
            "--max-new-tokens", "6", "--device", "cpu", "--no-progress"]
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
                        (["--dtype", "float32", "--temperature", "0.5"], "temperature=0.8 (now 0.5)"),
                        (["--dtype", "float32", "--stop-loops", "32"], "stop_loops=0 (now 32)")):
        code, loads = _data_main(monkeypatch, tmp_path, argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and not loads, argv  # refused before the model loads
        assert len(err) == 1 and err[0].startswith("coral-fast data: error: ") and named in err[0], err
    # the same settings continue the folder, also one made before a setting existed (it had the default)
    assert _data_main(monkeypatch, tmp_path, ["--dtype", "float32"])[0] == 0
    del meta["settings"]["stop_loops"]
    (tmp_path / "out" / "meta.json").write_text(json.dumps(meta))
    assert _data_main(monkeypatch, tmp_path, ["--dtype", "float32"])[0] == 0


@pytest.mark.parametrize("argv, named", [
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number in (0, inf)"),
    (["--temperature", "0"], "argument --temperature: must be a finite number in (0, inf)"),
    (["--batch-size", "-3"], "argument --batch-size: must be an integer >= 1"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice"),
    (["--prompts", "/nonexistent/prompts.jsonl"], "prompts file /nonexistent/prompts.jsonl not found"),
    (["--synth", "10"], "--synth makes its own prompts: leave out --prompts and --limit"),
    (["--synth-mix", "chat=1,poetry=2"], "argument --synth-mix: must be KIND=WEIGHT,... with KIND among chat,"),
    (["--synth-mix", "chat=0"], "argument --synth-mix: at least one kind needs a weight > 0"),
    (["--top-p", "1.5"], "argument --top-p: must be a finite number in [0, 1]"),
    (["--time-budget-s", "-1"], "argument --time-budget-s: must be a finite number in [0, inf)"),
])
def test_data_bad_arguments_exit_2_in_one_line(monkeypatch, tmp_path, capsys, argv, named):
    code, loads = _data_main(monkeypatch, tmp_path, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not loads and len(err) == 1 and named in err[0], err
