"""Multi-step trainer: the HASS mask means what inference does, a tiny CPU run lowers its loss,
checkpoints resume. Tiny random Llama targets only (fast on a 2-core CPU)."""
import random

import pytest
import torch

from coral_fast.draft import DraftModel
from coral_fast.training.data import build_shard, target_outputs
from coral_fast.training.trainer import (
    SequenceData, TrainConfig, chain_acceptance, repeated_ngram_ends, compute_losses, hass_mask, load_checkpoint_state,
    token_groups_of, train, unrolled_forward,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_target(vocab=67, hidden=32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def tiny_data(target, n_seqs=30, prompt_len=5, new_tokens=24, seed=0):
    """Greedy continuations of random prompts, in the shard layout of `coral-fast data`."""
    gen = torch.Generator().manual_seed(seed)
    vocab = target.config.vocab_size
    prompts = torch.randint(0, vocab, (n_seqs, prompt_len), generator=gen)
    with torch.no_grad():
        out = target.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    seqs = out.tolist()
    hidden, ids, lps = target_outputs(target, seqs, 8, 16)
    shard = build_shard(seqs, [prompt_len] * n_seqs, [i % 6 == 0 for i in range(n_seqs)], hidden, ids, lps)
    shard["hidden"] = shard["hidden"].float()
    return shard


def tiny_draft(target, **overrides):
    torch.manual_seed(1)
    draft = DraftModel.random_init(target, num_groups=overrides.pop("num_groups", 8), active_groups=overrides.pop("active_groups", 2), **overrides)
    return draft.float()


def test_hass_mask_matches_rule():
    length = 7
    for step in range(4):
        mask = hass_mask(length, step)
        assert mask.shape == (length, (step + 1) * length)
        for t in range(length):
            for j in range(step + 1):
                for p in range(length):
                    want = p <= t - step if j == 0 else p == t - step + j
                    assert bool(mask[t, j * length + p]) == want, (step, t, j, p)


def test_unrolled_step0_is_the_causal_forward(seed):
    target = tiny_target(seed=seed % 1000)
    draft = tiny_draft(target)
    B, T, H = 2, 9, target.config.hidden_size
    features, tokens = torch.randn(B, T, H), torch.randint(0, target.config.vocab_size, (B, T))
    positions = torch.arange(T).expand(B, T)
    with torch.no_grad():
        out = unrolled_forward(draft, features, tokens, positions, 1)
        plain = draft(features, tokens, positions)
    torch.testing.assert_close(out[0], plain, rtol=1e-5, atol=1e-5)


def test_unrolled_steps_equal_inference_chains(seed):
    """Step s at position t == the draft run autoregressively on its own features from root t - s."""
    target = tiny_target(seed=seed % 1000)
    draft = tiny_draft(target)
    T, H, steps = 11, target.config.hidden_size, 4
    features, tokens = torch.randn(1, T, H), torch.randint(0, target.config.vocab_size, (1, T))
    positions = torch.arange(T)[None]
    with torch.no_grad():
        outs = unrolled_forward(draft, features, tokens, positions, steps)
        for root in range(T - steps + 1):
            # the inference chain: true features up to the root, then the draft's own outputs
            chain_features = features[:, : root + 1].clone()
            for depth in range(steps):
                n = root + 1 + depth
                h = draft(chain_features, tokens[:, :n], positions[:, :n])
                torch.testing.assert_close(outs[depth][0, root + depth], h[0, -1], rtol=1e-4, atol=1e-4)
                chain_features = torch.cat([chain_features, h[:, -1:]], dim=1)


def test_tiny_training_run_lowers_its_loss(seed, tmp_path):
    target = tiny_target()
    data = SequenceData(tiny_data(target))
    draft = tiny_draft(target)
    cfg = TrainConfig(iters=80, warmup=5, lr=3e-3, batch_tokens=384, eval_every=0, checkpoint_every=0, eval_unroll=3, seed=seed % 1000)
    token_groups = token_groups_of(draft)
    batch = next(data.batches(data.train, 10_000, shuffle=False, rng=random.Random(0)))
    with torch.no_grad():
        before, logs_before = compute_losses(draft, batch, cfg, token_groups)
    history = train(draft, data, cfg, out_dir=tmp_path, progress=False, eval_groups=[1, 2])
    with torch.no_grad():
        after, logs_after = compute_losses(draft, batch, cfg, token_groups)
    assert after.item() < 0.85 * before.item(), (logs_before, logs_after)
    for name in ("feature", "token", "router", "csra"):
        assert name in logs_after
    assert logs_after["feature"] < logs_before["feature"]
    assert logs_after["token"] < logs_before["token"]
    assert logs_after["acc0"] > logs_before["acc0"]
    final = history["final_eval"]
    assert 1.0 <= final["tau"] <= 1.0 + cfg.eval_unroll and final["bases"] > 0
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    reloaded = DraftModel.from_pretrained(tmp_path, target).float()
    for (name, p), q in zip(draft.state_dict().items(), reloaded.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)


def test_single_step_config_has_no_csra(seed):
    target = tiny_target()
    data = SequenceData(tiny_data(target, n_seqs=8))
    draft = tiny_draft(target)
    batch = next(data.batches(data.train, 10_000, shuffle=False, rng=random.Random(0)))
    _, logs = compute_losses(draft, batch, TrainConfig(unroll_steps=1), token_groups_of(draft))
    assert "csra" not in logs and "acc0" in logs and "acc1" not in logs


def test_repeated_ngram_ends_matches_a_list_oracle(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 9))]
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    ids = torch.randint(0, 3, (offsets[-1],))  # 3 ids: n-grams repeat often
    answer = torch.rand(offsets[-1]) < 0.8  # gaps, as a two-turn answer's second prompt leaves
    n = rng.randint(1, 4)
    got = repeated_ngram_ends(ids, offsets, answer, n)
    for s, e in zip(offsets[:-1], offsets[1:]):
        seen = set()
        for j in range(s, e):
            expected = False
            if j - s >= n - 1 and bool(answer[j - n + 1: j + 1].all()):
                gram = tuple(ids[j - n + 1: j + 1].tolist())
                expected, _ = gram in seen, seen.add(gram)
            assert bool(got[j]) == expected, (j, n)
    with pytest.raises(ValueError, match="n >= 1"):
        repeated_ngram_ends(ids, offsets, answer, 0)


def test_skip_repeats_masks_training_answers_only():
    target = tiny_target()
    shard = tiny_data(target, n_seqs=12)
    for start in shard["offsets"][:-1].tolist():  # every answer (tokens 5..28) repeats a 6-gram of its own
        shard["input_ids"][start + 18: start + 24] = shard["input_ids"][start + 8: start + 14].clone()
    plain, skipping = SequenceData(dict(shard)), SequenceData(dict(shard), skip_repeats=4)
    removed = plain.loss_mask & ~skipping.loss_mask
    assert not (skipping.loss_mask & ~plain.loss_mask).any()
    for s, e in plain.eval:
        assert not removed[s:e].any()
    assert all(removed[s:e].any() for s, e in plain.train)


def test_chain_acceptance_matches_slow_count(seed):
    target = tiny_target()
    data = SequenceData(tiny_data(target, n_seqs=12))
    draft = tiny_draft(target)
    depth, early_tokens = 3, random.randint(2, 7)  # the answers are longer: the early tau judges fewer bases
    result = chain_acceptance(draft, data, data.train, depth, 10_000, early_tokens=early_tokens)
    accepted, bases = 0, 0
    accepted_early, bases_early = 0, 0
    with torch.no_grad():
        for batch in data.batches(data.train, 10_000, shuffle=False, rng=random.Random(0)):
            outs = unrolled_forward(draft, batch["features"], batch["tokens"], batch["positions"], depth)
            argmax = [draft.logits(h).argmax(-1) for h in outs]
            top1, mask = batch["topk_ids"][..., 0], batch["mask"]
            B, length = mask.shape
            for b in range(B):
                answer_index = 0
                for t in range(length):
                    if not mask[b, t]:
                        continue
                    bases += 1
                    answer_index += 1
                    n = 0
                    for d in range(depth):
                        p = t + d
                        if p >= length or not mask[b, p] or argmax[d][b, p] != top1[b, p]:
                            break
                        n += 1
                    accepted += n
                    if answer_index <= early_tokens:
                        accepted_early, bases_early = accepted_early + n, bases_early + 1
    assert result["bases"] == bases and bases_early < bases
    assert result["tau"] == pytest.approx(1 + accepted / bases)
    assert result["tau_early"] == pytest.approx(1 + accepted_early / bases_early)


def test_checkpoint_resume_restores_optimizer_and_continues(tmp_path):
    target = tiny_target()
    data = SequenceData(tiny_data(target, n_seqs=12))
    draft = tiny_draft(target)
    cfg = TrainConfig(iters=6, warmup=2, batch_tokens=256, eval_every=0, checkpoint_every=3)
    train(draft, data, cfg, out_dir=tmp_path, progress=False)
    state = __import__("json").loads((tmp_path / "last" / "trainer_state.json").read_text())
    assert state["iteration"] == 6
    resumed = DraftModel.from_pretrained(tmp_path / "last", target).float()
    optimizer = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad])
    assert load_checkpoint_state(tmp_path / "last", resumed, optimizer) == 6
    assert len(optimizer.state) == sum(1 for p in resumed.parameters() if p.requires_grad)
    history = train(resumed, data, TrainConfig(iters=9, warmup=2, batch_tokens=256, eval_every=0, checkpoint_every=0), out_dir=tmp_path, resume=True, progress=False)
    assert history["iterations"] == 9


def test_sequence_data_rejects_nothing_silently():
    target = tiny_target()
    shard = tiny_data(target, n_seqs=6)
    data = SequenceData(shard)
    assert len(data.train) + len(data.eval) == 6
    batch = data.collate(data.train[:2])
    # inputs at t: feature f_t and token x_{t+1}; targets f_{t+1} and the distribution at t+1
    s, e = data.train[0]
    torch.testing.assert_close(batch["features"][0, : e - s - 1], data.hidden[s:e - 1])
    assert torch.equal(batch["tokens"][0, : e - s - 1], data.input_ids[s + 1:e])
    assert torch.equal(batch["mask"][0, : e - s - 1], data.loss_mask[s + 1:e])


@pytest.mark.slow
def test_shipped_smollm2_draft_predicts_its_target():
    """The one real-model test: the shipped draft loads for SmolLM2 and predicts the target's greedy tokens."""
    from pathlib import Path

    from coral_fast.training.data import prompt_token_ids
    from coral_fast.training.prompts import load_prompts

    models = pytest.importorskip("coral_fast.models")
    try:
        target, tokenizer = models.load_target("smollm2", dtype=torch.float32, device="cpu")
    except Exception as error:  # the GGUF package is an optional install
        pytest.skip(f"SmolLM2 not available: {error}")
    folder = Path(__import__("coral_fast").__file__).parent / "drafts" / "smollm2"
    draft = DraftModel.from_pretrained(folder, target).float()
    assert draft.config.hidden_size == 576 and draft.config.vocab_size == 49152
    prompt = prompt_token_ids(tokenizer, load_prompts(split="eval")[0]["messages"])
    with torch.no_grad():
        out = target.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0].tolist()
    hidden, ids, lps = target_outputs(target, [out], 4, 1)
    data = SequenceData(build_shard([out], [len(prompt)], [False], hidden, ids, lps))
    batch = data.collate(data.train)
    with torch.no_grad():
        steps = unrolled_forward(draft, batch["features"].float(), batch["tokens"], batch["positions"], 3)
        mask, top1 = batch["mask"], batch["topk_ids"][..., 0]
        step_acc = [float((draft.logits(h).argmax(-1) == top1)[mask].float().mean()) for h in steps]
    # an untrained draft scores ~0; the shipped one matches the target's next token most of the time
    assert step_acc[0] > 0.4 and step_acc[2] > 0.3, step_acc


def test_chunked_token_loss_equals_the_plain_one(seed):
    """Large vocabularies: the row-chunked, recomputed token loss gives the same value, accuracy and
    gradients as the one-shot loss."""
    from coral_fast.training.trainer import token_loss_and_accuracy

    target = tiny_target(vocab=67)
    draft = tiny_draft(target)
    h = torch.randn(23, 32, requires_grad=True)
    ids = torch.randint(0, 67, (23, 4))
    lps = torch.randn(23, 4).log_softmax(-1)
    results = []
    for max_logits in (10**9, 5 * 67):  # one shot; chunks of 5 rows
        h.grad = None
        loss, acc = token_loss_and_accuracy(draft, h, ids, lps, "kl", max_logits=max_logits)
        loss.backward()
        results.append((loss.detach(), acc, h.grad.clone()))
    (l1, a1, g1), (l2, a2, g2) = results
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(g1, g2)


def test_shipped_gemma3_draft_is_small_and_headless():
    """The shipped Gemma 3 270M draft: Gemma's shapes, fp16, and no copy of the 262144 x 640 LM head
    (the target's tied embedding serves as the head); `coral-fast generate --model gemma3-270m` uses it."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    from coral_fast.generate_cli import shipped_draft

    folder = Path(__import__("coral_fast").__file__).parent / "drafts" / "gemma3-270m"
    assert shipped_draft("gemma3-270m") == str(folder)
    config = json.loads((folder / "config.json").read_text())
    assert (config["hidden_size"], config["vocab_size"], config["target"]) == (640, 262144, "gemma3-270m")
    assert (folder / "model.safetensors").stat().st_size < 16 * 2**20
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            assert 640 * 262144 > (shape[0] if shape else 1) * (shape[1] if len(shape) > 1 else 1), name
            if name.startswith(("fc.", "layer.", "head.")):
                assert f.get_slice(name).get_dtype() == "F16", name


# --- exact, atomic resume --------------------------------------------------------------------------
def _resume_setup():
    target = tiny_target()
    data = SequenceData(tiny_data(target, n_seqs=14, new_tokens=17))
    # 4 batches an epoch: 10 iterations cross two epoch boundaries and stop mid-epoch; noise and
    # the CSRA subsample draw from the global generator and the loop's own one
    cfg = dict(iters=10, warmup=2, lr=3e-3, batch_tokens=96, eval_every=5, eval_unroll=2, checkpoint_every=3,
               feature_noise=0.1, csra_max_positions=8, seed=5)
    return target, data, cfg


def _weights(draft):
    return {k: v.clone() for k, v in draft.state_dict().items()}


def _assert_same_weights(a, b):
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _train_until_second_checkpoint(target, data, cfg, out_dir, monkeypatch):
    """Train a fresh draft into `out_dir`, killed right after its second checkpoint became `last`."""
    from coral_fast.training import trainer

    done = []

    def stop_after_second(what):
        done.append(what)
        if done.count("rename to last") == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_written", stop_after_second)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_draft(target), data, TrainConfig(**cfg), out_dir=out_dir, progress=False)
    monkeypatch.setattr(trainer, "_written", lambda what: None)


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, monkeypatch):
    import json

    target, data, cfg = _resume_setup()
    assert len(data.batch_plan(data.train, cfg["batch_tokens"])) < cfg["iters"] // 2
    draft = tiny_draft(target)
    full = train(draft, data, TrainConfig(**cfg), out_dir=tmp_path / "full", progress=False)
    reference = _weights(draft)
    # the run stops right after its iteration-6 checkpoint (mid-epoch, past an eval)
    _train_until_second_checkpoint(target, data, cfg, tmp_path / "cut", monkeypatch)
    assert json.loads((tmp_path / "cut" / "last" / "trainer_state.json").read_text())["iteration"] == 6
    torch.manual_seed(1234)  # a new process: other global random state
    random.seed(99)
    resumed = tiny_draft(target)
    torch.nn.init.normal_(resumed.fc.weight)  # whatever the draft holds is replaced by the checkpoint
    history = train(resumed, data, TrainConfig(**cfg), out_dir=tmp_path / "cut", resume=True, progress=False)
    _assert_same_weights(reference, _weights(resumed))
    untimed = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    assert history["iterations"] == 10 and history["eval"] == full["eval"] and untimed(history["train"]) == untimed(full["train"])
    logged = [json.loads(line)["iteration"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert logged == [5, 10, 10]  # eval 5, then the train record and eval of 10: nothing replayed twice


def test_a_kill_at_any_point_of_a_checkpoint_write_resumes_exactly(tmp_path, monkeypatch):
    from coral_fast.training import trainer

    target, data, cfg = _resume_setup()
    draft = tiny_draft(target)
    calls = []
    monkeypatch.setattr(trainer, "_written", lambda what: calls.append(what))
    train(draft, data, TrainConfig(**cfg), out_dir=tmp_path / "full", progress=False)
    reference = _weights(draft)
    points = calls[: calls.index("rename to last") + 1]  # the first checkpoint's write (iteration 3)
    assert points[-1] == "rename to last" and "rename to prev" not in points  # the first has no previous one
    second = calls[len(points):]
    per_write = second.index("rename to last") + 1  # the hook calls of one write that replaces a checkpoint
    for kill_at in range(per_write):
        seen = []

        def killer(what, kill_at=kill_at, seen=seen):
            seen.append(what)
            if len(seen) == len(points) + 1 + kill_at:  # inside the iteration-6 write
                raise KeyboardInterrupt(what)

        monkeypatch.setattr(trainer, "_written", killer)
        out = tmp_path / f"kill{kill_at}"
        with pytest.raises(KeyboardInterrupt):
            train(tiny_draft(target), data, TrainConfig(**cfg), out_dir=out, progress=False)
        monkeypatch.setattr(trainer, "_written", lambda what: None)
        reports = []
        resumed = tiny_draft(target)
        train(resumed, data, TrainConfig(**cfg), out_dir=out, resume=True, progress=False, report=reports.append)
        _assert_same_weights(reference, _weights(resumed))
        assert not reports, reports  # the fallbacks above are the normal path, not a broken checkpoint


def _two_checkpoints(tmp_path):
    target, data, cfg = _resume_setup()
    train(tiny_draft(target), data, TrainConfig(**{**cfg, "iters": 6}), out_dir=tmp_path, progress=False)
    return target, data, cfg


def test_resume_refuses_a_mixed_checkpoint_and_falls_back(tmp_path):
    import shutil

    target, data, cfg = _two_checkpoints(tmp_path)
    last, prev = tmp_path / "last", tmp_path / "last.prev"
    shutil.copy(prev / "trainer_state.safetensors", last / "trainer_state.safetensors")  # step 3 moments in step 6
    with pytest.raises(ValueError, match="trainer_state.safetensors is not the file written with iteration 6"):
        __import__("coral_fast.training.trainer", fromlist=["x"]).verify_checkpoint(last)
    reports = []
    history = train(tiny_draft(target), data, TrainConfig(**cfg), out_dir=tmp_path, resume=True, progress=False, report=reports.append)
    assert history["iterations"] == 10
    assert len(reports) == 1 and "resuming from" in reports[0] and "last.prev (iteration 3)" in reports[0]


def test_resume_refuses_a_truncated_checkpoint_in_one_line(tmp_path):
    import shutil

    target, data, cfg = _two_checkpoints(tmp_path)
    shutil.rmtree(tmp_path / "last.prev")
    state = tmp_path / "last" / "trainer_state.safetensors"
    state.write_bytes(state.read_bytes()[:-100])
    with pytest.raises(ValueError) as error:
        train(tiny_draft(target), data, TrainConfig(**cfg), out_dir=tmp_path, resume=True, progress=False)
    message = str(error.value)
    assert "\n" not in message and "truncated" in message and "no earlier complete checkpoint" in message
    (tmp_path / "last" / "trainer_state.json").write_text('{"iteration": 6')
    with pytest.raises(ValueError, match="is not valid JSON"):
        train(tiny_draft(target), data, TrainConfig(**cfg), out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="no checkpoint in"):
        train(tiny_draft(target), data, TrainConfig(**cfg), out_dir=tmp_path / "empty", resume=True, progress=False)


# --- coral-fast train: reproducible seeds, bad input refused before the model loads --------------
def _train_main(monkeypatch, tmp_path, argv, out="out"):
    """`coral-fast train` on the tiny target and a one-shard data folder; -> (exit code, model loads)."""
    from safetensors.torch import save_file

    from coral_fast import models
    from coral_fast.training import cli

    loads = []

    def fake_load(name, dtype, device):
        loads.append(name)
        target = tiny_target()
        torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))  # as a real load in a new process
        return target, None

    monkeypatch.setattr(models, "load_target", fake_load)
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir()
        save_file({k: v.contiguous() for k, v in tiny_data(tiny_target(), n_seqs=10, new_tokens=12).items()}, str(data / "shard_00000.safetensors"))
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    base = ["--model", str(model), "--data", str(data), "--out", str(tmp_path / out), "--device", "cpu", "--no-progress",
            "--num-groups", "8", "--active-groups", "2", "--eval-groups", "2", "--iters", "3", "--warmup", "1",
            "--batch-tokens", "128", "--eval-every", "0", "--checkpoint-every", "0", "--eval-max-seqs", "2"]
    try:
        code = cli.main(base + argv)
    except SystemExit as exit:
        code = exit.code
    return code, loads


def test_train_seed_makes_two_runs_identical(monkeypatch, tmp_path, capsys):
    from safetensors.torch import load_file

    for out in ("a", "b"):
        assert _train_main(monkeypatch, tmp_path, ["--seed", "7"], out=out)[0] == 0
    a, b = (load_file(str(tmp_path / out / "last" / "model.safetensors")) for out in ("a", "b"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _train_main(monkeypatch, tmp_path, ["--seed", "8"], out="c")[0] == 0
    c = load_file(str(tmp_path / "c" / "last" / "model.safetensors"))
    assert not torch.equal(a["fc.weight"], c["fc.weight"])


@pytest.mark.parametrize("argv, named", [
    (["--iters", "0"], "argument --iters: must be an integer >= 1, got '0'"),
    (["--lr", "nan"], "argument --lr: must be a finite number in (0, inf)"),
    (["--w-csra", "-1"], "argument --w-csra: must be a finite number in [0, inf)"),
    (["--min-lr-ratio", "1.5"], "argument --min-lr-ratio: must be a finite number in [0, 1]"),
    (["--betas", "0.9", "1.0"], "argument --betas: must be a finite number in [0, 1)"),
    (["--detach-unroll", "maybe"], "argument --detach-unroll: must be true or false"),
    (["--token-loss", "mse"], "argument --token-loss: invalid choice"),
    (["--num-groups", "0"], "argument --num-groups: must be an integer >= 1"),
    (["--active-groups", "9"], "--active-groups (9) must be <= --num-groups (8)"),
    (["--resume"], "--resume: no checkpoint in"),
    (["--init-from", "/nonexistent/draft"], "draft folder '/nonexistent/draft' does not exist"),
    (["--max-train-tokens", "0"], "argument --max-train-tokens: must be an integer >= 1"),
    (["--feature-layers", "3"], "argument --feature-layers: expected last, eagle3 or at least two distinct"),
    (["--feature-layers", "1,2", "--resume"], "leave out --feature-layers with --resume or --init-from"),
])
def test_train_bad_arguments_exit_2_in_one_line_before_the_model_loads(monkeypatch, tmp_path, capsys, argv, named):
    code, loads = _train_main(monkeypatch, tmp_path, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not loads and len(err) == 1 and err[0].startswith("coral-fast train: error: ") and named in err[0], err


def test_train_bad_folders_exit_2_in_one_line_before_the_model_loads(monkeypatch, tmp_path, capsys):
    _train_main(monkeypatch, tmp_path, ["--iters", "0"])  # builds the folders
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    draft = tmp_path / "draft"
    draft.mkdir()
    (draft / "config.json").write_text('{"hidden_size": 32,')
    (draft / "model.safetensors").write_bytes((tmp_path / "data" / "shard_00000.safetensors").read_bytes()[:-7])
    for argv, named in (
        (["--data", str(tmp_path / "empty")], "holds no shard_*.safetensors"),
        (["--model", str(tmp_path / "empty")], f"model folder {tmp_path / 'empty'} is empty"),
        (["--init-from", str(draft)], "config.json is not valid JSON"),
    ):
        code, loads = _train_main(monkeypatch, tmp_path, argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and not loads and len(err) == 1 and named in err[0], (argv, err)
    (draft / "config.json").write_text('{"hidden_size": 32}')
    code, loads = _train_main(monkeypatch, tmp_path, ["--init-from", str(draft)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not loads and len(err) == 1 and "model.safetensors is truncated" in err[0], err


def test_a_draft_keeps_its_grouping_and_says_so(monkeypatch, tmp_path, capsys):
    from coral_fast import DraftModel

    DraftModel.random_init(tiny_target(), num_groups=8, active_groups=2).save_pretrained(tmp_path / "draft")
    argv = ["--init-from", str(tmp_path / "draft"), "--iters", "1"]
    code, loads = _train_main(monkeypatch, tmp_path, [*argv, "--grouping", "embedding"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not loads and len(err) == 1, err
    assert "--grouping embedding: the draft in" in err[0] and "has contiguous groups" in err[0] and "--retrofit-router" in err[0]
    for same in ([], ["--grouping", "contiguous"]):
        assert _train_main(monkeypatch, tmp_path, argv + same)[0] == 0
        assert DraftModel.from_pretrained(tmp_path / "out", tiny_target()).config.grouping == "contiguous"


def test_train_resume_from_the_command_line_is_exact(monkeypatch, tmp_path, capsys):
    from safetensors.torch import load_file

    from coral_fast.training import trainer

    steps = ["--iters", "5", "--checkpoint-every", "2", "--seed", "3"]
    assert _train_main(monkeypatch, tmp_path, steps, out="full")[0] == 0
    seen = []

    def kill_in_second_write(what):
        seen.append(what)
        if seen.count("rename to last") == 1 and what == "rename to prev":
            raise KeyboardInterrupt  # between the renames of the iteration-4 checkpoint: no `last`

    monkeypatch.setattr(trainer, "_written", kill_in_second_write)
    with pytest.raises(KeyboardInterrupt):
        _train_main(monkeypatch, tmp_path, steps, out="cut")
    monkeypatch.setattr(trainer, "_written", lambda what: None)
    assert not (tmp_path / "cut" / "last").exists()
    assert _train_main(monkeypatch, tmp_path, steps + ["--resume"], out="cut")[0] == 0
    a, b = (load_file(str(tmp_path / out / "last" / "model.safetensors")) for out in ("full", "cut"))
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- token-only shards: features recomputed online by the target -------------------------------------
def token_data(target, n_seqs=30, prompt_len=5, new_tokens=24, seed=0):
    """The sequences of `tiny_data` in the token-only layout of `coral-fast data` (as load_shards gives it)."""
    import json

    from safetensors.torch import save_file

    from coral_fast.training.data import build_token_shard, load_shards

    gen = torch.Generator().manual_seed(seed)
    vocab = target.config.vocab_size
    prompts = torch.randint(0, vocab, (n_seqs, prompt_len), generator=gen)
    with torch.no_grad():
        seqs = target.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0).tolist()
    tensors, meta = build_token_shard(seqs, [prompt_len] * n_seqs, ["chat"] * n_seqs, [i % 6 == 0 for i in range(n_seqs)], [False] * n_seqs, vocab)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        save_file(tensors, f"{folder}/shard_00000_00.safetensors", metadata={"coral_data": json.dumps(meta)})
        return load_shards(folder)


def test_online_batches_equal_the_stored_ones(seed):
    target = tiny_target(seed=seed % 1000)
    stored = SequenceData(tiny_data(target, n_seqs=9, new_tokens=13, seed=seed % 1000))
    online = SequenceData(token_data(target, n_seqs=9, new_tokens=13, seed=seed % 1000), target=target, topk=8)
    assert online.train == stored.train and online.eval == stored.eval
    assert torch.equal(online.loss_mask, stored.loss_mask)
    for a, b in zip(online.batches(online.train, 200, False, random.Random(0)), stored.batches(stored.train, 200, False, random.Random(0))):
        for key in ("tokens", "mask", "positions", "topk_ids"):
            assert torch.equal(a[key], b[key]), key
        mask = a["mask"]
        # stored features are bf16: compare at bf16 resolution, exactly where the ranks are certain
        torch.testing.assert_close(a["features"][mask].bfloat16().float(), b["features"][mask], rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(a["topk_logprobs"][mask], b["topk_logprobs"][mask], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="token-only shards need the target"):
        SequenceData(token_data(target, n_seqs=3))
    with pytest.raises(ValueError, match="data of another model"):
        SequenceData(token_data(tiny_target(vocab=97), n_seqs=3, seed=1), target=tiny_target(vocab=11))


def test_training_from_token_only_shards_lowers_its_loss(seed, tmp_path):
    target = tiny_target()
    data = SequenceData(token_data(target), target=target, topk=8)
    draft = tiny_draft(target)
    cfg = TrainConfig(iters=60, warmup=5, lr=3e-3, batch_tokens=384, eval_every=0, checkpoint_every=0, eval_unroll=3, seed=seed % 1000)
    token_groups = token_groups_of(draft)
    batch = data.collate(data.train[:8])
    with torch.no_grad():
        before, logs_before = compute_losses(draft, batch, cfg, token_groups)
    history = train(draft, data, cfg, out_dir=tmp_path, progress=False, eval_groups=[2])
    with torch.no_grad():
        after, logs_after = compute_losses(draft, batch, cfg, token_groups)
    assert after.item() < 0.85 * before.item(), (logs_before, logs_after)
    assert logs_after["token"] < logs_before["token"] and logs_after["acc0"] > logs_before["acc0"]
    assert history["final_eval"]["bases"] > 0 and "tau_a2" in history["final_eval"]


def test_resume_from_token_only_shards_is_bit_identical(tmp_path, monkeypatch):
    target = tiny_target()
    data = SequenceData(token_data(target, n_seqs=14, new_tokens=17), target=target, topk=8)
    cfg = dict(iters=8, warmup=2, lr=3e-3, batch_tokens=96, eval_every=4, eval_unroll=2, checkpoint_every=3,
               feature_noise=0.1, csra_max_positions=8, seed=5)
    draft = tiny_draft(target)
    train(draft, data, TrainConfig(**cfg), out_dir=tmp_path / "full", progress=False)
    reference = _weights(draft)
    _train_until_second_checkpoint(target, data, cfg, tmp_path / "cut", monkeypatch)
    torch.manual_seed(4321)
    resumed = tiny_draft(target)
    train(resumed, data, TrainConfig(**cfg), out_dir=tmp_path / "cut", resume=True, progress=False)
    _assert_same_weights(reference, _weights(resumed))


def test_train_command_on_token_only_data(monkeypatch, tmp_path):
    import json

    from safetensors.torch import save_file

    from coral_fast.training.data import build_token_shard

    data = tmp_path / "data"
    data.mkdir()
    target = tiny_target()
    seqs = target.generate(torch.randint(0, 67, (10, 4), generator=torch.Generator().manual_seed(0)), max_new_tokens=12, do_sample=False, pad_token_id=0).tolist()
    tensors, meta = build_token_shard(seqs, [4] * 10, ["chat"] * 10, [i % 5 == 0 for i in range(10)], [False] * 10, 67)
    save_file(tensors, str(data / "shard_00000_00.safetensors"), metadata={"coral_data": json.dumps(meta)})
    code, loads = _train_main(monkeypatch, tmp_path, ["--seed", "2"])
    assert code == 0 and loads and (tmp_path / "out" / "model.safetensors").exists()


def test_fused_feature_draft_trains_on_online_states(seed, tmp_path):
    """--feature-layers: the batches carry the target's chosen hidden states concatenated (checked against
    HF's output_hidden_states), the unrolled steps fuse them at step 0 and feed back their own outputs,
    and training lowers the loss; stored-feature shards refuse such a draft."""
    from coral_fast.training.cli import build_draft, feature_layers_arg

    target = tiny_target(seed=seed % 1000)
    data = SequenceData(token_data(target, n_seqs=30, seed=seed % 1000), target=target, topk=8)
    draft = build_draft(target, "tiny", "contiguous", 8, 2, data, "cpu", seed=seed % 1000,
                        feature_layers=feature_layers_arg("0,2,1"))
    assert draft.config.feature_layers == (0, 1, 2) and data.feature_layers == (0, 1, 2)
    spans = data.train[:3]
    batch = data.collate(spans)
    H = target.config.hidden_size
    assert batch["features"].shape[-1] == 3 * H and batch["target_features"].shape[-1] == H
    s, e = spans[0]
    with torch.no_grad():
        states = target.model(input_ids=data.input_ids[s:e][None], output_hidden_states=True).hidden_states
    want = torch.cat([states[0], states[1], states[2]], dim=-1)[0, :-1]
    torch.testing.assert_close(batch["features"][0, : e - s - 1], want, rtol=1e-5, atol=1e-5)
    outputs = unrolled_forward(draft, batch["features"], batch["tokens"], batch["positions"], 3)
    assert [o.shape[-1] for o in outputs] == [H] * 3 and all(torch.isfinite(o).all() for o in outputs)
    cfg = TrainConfig(iters=60, warmup=5, lr=3e-3, batch_tokens=384, eval_every=0, checkpoint_every=0, eval_unroll=3,
                      seed=seed % 1000)
    fuse_before = draft.fuse.weight.detach().clone()
    with torch.no_grad():
        before, _ = compute_losses(draft, batch, cfg, token_groups_of(draft))
    train(draft, data, cfg, out_dir=tmp_path, progress=False, eval_groups=[2])
    with torch.no_grad():
        after, _ = compute_losses(draft, batch, cfg, token_groups_of(draft))
    assert after.item() < 0.95 * before.item()  # (slower than the last-state draft on this random toy)
    assert (draft.fuse.weight - fuse_before).abs().max() > 1e-3  # the fuse layer is trained
    stored = SequenceData(tiny_data(target, n_seqs=6))
    with pytest.raises(ValueError, match="stored features hold the last hidden state only"):
        stored.set_feature_layers((0, 1, 2))
    for bad in ("1", "1,1", "a,b", "-1,2"):
        with pytest.raises(Exception):
            feature_layers_arg(bad)


def test_limit_train_keeps_the_first_sequences_up_to_a_token_count(seed):
    target = tiny_target(seed=seed % 1000)
    data = SequenceData(token_data(target, n_seqs=12, seed=seed % 1000), target=target, topk=8)
    full, evals = list(data.train), list(data.eval)
    per_seq = [data.answer_tokens([sp]) for sp in full]
    budget = per_seq[0] + per_seq[1] + per_seq[2] // 2  # room for two sequences and half a third
    assert data.limit_train(budget) == per_seq[0] + per_seq[1] and data.train == full[:2] and data.eval == evals
    assert data.limit_train(1) == per_seq[0] and data.train == full[:1]  # at least one sequence
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        data.limit_train(0)


def test_sequences_longer_than_max_seq_len_keep_their_end():
    """A long prompt (a document to summarize) must not push its answer out of the training window."""
    from coral_fast.training.trainer import SequenceData

    lengths, H, K = [11, 4, 7], 6, 3
    offsets = torch.tensor([0, 11, 15, 22])
    n = int(offsets[-1])
    loss_mask = torch.zeros(n, dtype=torch.bool)
    loss_mask[8:10] = True  # the first sequence's answer: its last three tokens (mask marks predictors)
    loss_mask[13:14] = True
    loss_mask[19:21] = True
    shards = dict(offsets=offsets, input_ids=torch.arange(n), loss_mask=loss_mask, is_eval=torch.zeros(3, dtype=torch.bool),
                  hidden=torch.randn(n, H), topk_ids=torch.zeros(n, K, dtype=torch.long), topk_logprobs=torch.zeros(n, K))
    data = SequenceData(shards, max_seq_len=5)
    assert data.train == [(6, 11), (11, 15), (17, 22)]
    batch = data.collate([data.train[0]])
    assert batch["tokens"][0].tolist() == [7, 8, 9, 10] and batch["mask"][0].tolist() == [False, True, True, False]
    assert sum(lengths) == n
