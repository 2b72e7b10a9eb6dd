"""`coral-fast bench e2e`: the task suite and Spec-Bench loader, bad input, the summaries, and a tiny CPU run of
the suite and of the scale part (tiny random Llama) that writes consistent JSON / CSV / markdown."""
import csv
import json
import math
import os
import random
from types import SimpleNamespace

import pytest
import torch

from coral_fast.benchmarks import e2e, report, scale
from coral_fast.benchmarks.tasks import SUITE_TASKS, load_spec_bench, load_suite


def test_bench_offers_every_engine_mode():
    from coral_fast import generate

    assert e2e.MODES == generate.MODES


def test_suite_has_every_task_with_enough_prompts():
    prompts = load_suite()
    assert [t for t in SUITE_TASKS if sum(p.task == t for p in prompts) < 8] == []
    assert len({p.id for p in prompts}) == len(prompts)
    quick = load_suite(per_task=2)
    assert len(quick) == 2 * len(SUITE_TASKS)
    for p in prompts:
        msgs = p.messages()
        assert msgs[-1]["role"] == "user" and len(msgs) == 2 * len(p.turns) - 1
    multi = [p for p in prompts if p.task == "multi_turn"]
    assert all(len(p.turns) == 2 and p.messages()[1]["role"] == "assistant" for p in multi)
    # long documents: at least ~500 tokens each (4 characters a token is generous for English)
    assert min(len(p.turns[0]) for p in prompts if p.task == "summarization") > 2500


def test_continuation_task_by_name_only():
    """Document openings for a base model: raw text without a chat template, a user turn asking to
    continue with one; never part of "all"."""
    assert all(p.task != "continuation" for p in load_suite())
    docs = load_suite("continuation")
    assert len(docs) >= 10 and len({p.id for p in docs}) == len(docs)
    for p in docs:
        assert p.text() == p.turns[0] and len(p.turns[0]) > 700
        (msg,) = p.messages()
        assert msg["role"] == "user" and msg["content"].endswith(p.turns[0]) and msg["content"] != p.turns[0]
    with pytest.raises(ValueError, match="unknown task 'continuations'.*continuation"):
        load_suite("continuations")


def test_encode_gives_a_base_model_the_document_itself():
    """A continuation prompt reaches a base model as its text (even one given a chat template for chat tasks,
    as models.gemma3_chat_setup does), a chat model as a user turn; other tasks use the template when there is one."""

    class Encoding(dict):  # as transformers' BatchEncoding: the ids by key and by attribute
        __getattr__ = dict.__getitem__

    class Tok:
        chat_template = "turns"

        def __call__(self, text):
            return Encoding(input_ids=[ord(c) for c in text])

        def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
            return [1] + [ord(c) for m in messages for c in m["content"]] + [2]

    doc = load_suite("continuation")[0]
    chat = load_suite("qa", per_task=1)[0]
    tok = Tok()
    assert e2e.encode(tok, doc, "cpu").tolist() == tok.apply_chat_template(doc.messages())
    tok.coral_added_template = True
    assert e2e.encode(tok, doc, "cpu").tolist() == [ord(c) for c in doc.turns[0]]
    assert e2e.encode(tok, chat, "cpu").tolist() == tok.apply_chat_template(chat.messages())
    tok.chat_template = None
    assert e2e.encode(tok, doc, "cpu").tolist() == [ord(c) for c in doc.turns[0]]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_spec_bench_groups_categories_and_takes_the_first_turn(tmp_path):
    rows = [dict(question_id=i, category=c, turns=[f"q{i} first", f"q{i} second"])
            for i, c in enumerate(["writing", "coding", "translation", "qa", "translation", "rag", "math_reasoning"])]
    prompts = load_spec_bench(_write(tmp_path / "question.jsonl", rows))
    assert [p.task for p in prompts] == ["mt_bench", "mt_bench", "translation", "translation", "qa", "rag",
                                         "math_reasoning"]
    assert all(p.turns == [f"q{p.id} first"] for p in prompts)
    assert [p.id for p in load_spec_bench(str(tmp_path / "question.jsonl"), per_task=1)] == ["0", "2", "3", "5", "6"]


@pytest.mark.parametrize("bad, where", [
    ('{"question_id": 3, "category": "qa", "turns": ["x"]', ":2: not valid JSON"),
    ('{"question_id": 3, "turns": ["x"]}', ":2: missing 'category'"),
    ('{"question_id": 3, "category": "qa", "turns": []}', ":2: 'turns' must be a list"),
    ('[1, 2]', ":2: expected a JSON object"),
])
def test_spec_bench_malformed_names_the_line(tmp_path, bad, where, capsys):
    path = _write(tmp_path / "q.jsonl", [dict(question_id=1, category="qa", turns=["fine"]), bad])
    with pytest.raises(ValueError, match=where):
        load_spec_bench(path)
    assert e2e.main(["--prompt-file", path, "--device", "cpu", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert where in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--scale", "llama-9000"], "unknown --scale config 'llama-9000'"),
    (["--tasks", "poetry"], "unknown task 'poetry'"),
    (["--taus", "0.5"], "--taus must be numbers in [1, 64]"),
    (["--lookup", "17"], "tree lookup must be an integer in [0, 16], got 17"),
    (["--tree", "2,2,2", "--lookup", "2"], "tree total_tokens must be an integer in [3, 6] for depth 2 and topk 2 with "
                                           "lookup 2, got 2"),
    (["--suite", "none"], "nothing to run"),
    (["--prompt-file", "/nonexistent/q.jsonl"], "no such file"),
])
def test_bad_values_fail_in_one_line_before_any_model_loads(argv, message, capsys, tmp_path):
    assert e2e.main(argv + ["--device", "cpu", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv", [["--tree", "6,10"], ["--max-new-tokens", "0"], ["--temperature", "nan"],
                                  ["--mode", "fast"], ["--loop-streak", "-1"], ["--loop-streak", "two"],
                                  ["--ema-alpha", "0"], ["--ema-alpha", "nan"], ["--ema-alpha", "1.5"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        e2e.build_parser().parse_args(argv)
    assert exc.value.code == 2


def test_summaries_are_totals_and_speedup_is_their_ratio():
    rng = random.Random(7)
    rows = []
    for i in range(7):
        N = 16
        rows.append(dict(task="a" if i < 3 else "b", new_tokens=N, rounds=rng.randint(3, 9), accepted=rng.randint(9, 16),
                         plain_steps=rng.randint(0, 3), loop_probes=rng.randint(0, 2), loop_s=rng.uniform(0.1, 1), plain_s=rng.uniform(0.1, 1),
                         hf_s=rng.uniform(0.1, 1), loop_ttft_s=0.01, plain_ttft_s=0.02,
                         loop_vs_plain=N if i % 2 else rng.randint(0, N - 1), loop_vs_hf=N))
    a, b, overall = report.summarize(rows)
    assert (a["task"], b["task"], overall["task"]) == ("a", "b", "overall") and a["prompts"] == 3
    assert overall["loop_tok_s"] == pytest.approx(7 * 16 / sum(r["loop_s"] for r in rows))
    for s in (a, b, overall):
        assert s["speedup_plain"] == pytest.approx(s["loop_tok_s"] / s["plain_tok_s"])
        assert s["speedup_hf"] == pytest.approx(s["loop_tok_s"] / s["hf_tok_s"])
    assert overall["tau"] == pytest.approx(sum(r["accepted"] for r in rows) / sum(r["rounds"] for r in rows))
    assert overall["loop_vs_plain_seqs"] == pytest.approx(3 / 7)
    assert overall["loop_probes"] == sum(r["loop_probes"] for r in rows) == a["loop_probes"] + b["loop_probes"]
    assert report._probes(dict(loop_probes=0)) == "" and report._probes(dict(loop_probes=2)) == " (2 loop probes)"
    assert overall["loop_vs_hf_tokens"] == 1.0 and math.isnan(overall["hf_eager_vs_static_tokens"])


def test_trace_kernels_go_to_the_step_that_launched_them(tmp_path):
    """A chrome trace as torch.profiler writes it: kernels carry the correlation id of their launch (a graph
    launch for all of a graph's kernels), launches lie inside the `coral_step:` range of Engine.run."""
    ev = lambda name, cat, ts, dur, **args: dict(ph="X", name=name, cat=cat, ts=ts, dur=dur, tid=1, args=args)  # noqa: E731
    events = [ev("coral_step:draft", "user_annotation", 0, 100), ev("cudaGraphLaunch", "cuda_runtime", 10, 5, correlation=1),
              ev("coral_step:verify", "user_annotation", 200, 100), ev("cudaGraphLaunch", "cuda_runtime", 210, 5, correlation=2),
              ev("cudaLaunchKernel", "cuda_runtime", 400, 5, correlation=3),
              ev("_grouped_head_partials_kernel", "kernel", 20, 30, correlation=1),
              ev("nvjet_tst_128x64_64x4", "kernel", 50, 40, correlation=1),
              ev("sm90_xmma_gemm_bf16bf16", "kernel", 220, 300, correlation=2),
              ev("_tree_attention_split_kernel", "kernel", 520, 20, correlation=2),
              ev("void at::native::index_copy_kernel", "kernel", 540, 7, correlation=2),
              ev("void at::native::vectorized_elementwise_kernel", "kernel", 600, 3, correlation=3)]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(dict(traceEvents=events)))
    got = scale._parse_trace(str(path))
    assert [s for _, _, s in got] == ["draft", "draft", "verify", "verify", "verify", ""]
    labels = [scale._label("draft" if s == "draft" else "target" if s == "verify" else "other", scale.kernel_kind(n))
              for n, _, s in got]
    assert labels == ["draft: head (grouped top-k)", "draft: draft layer", "target layers (GEMMs)", "target: attention",
                      "accept/commit, KV writes", "accept/commit (other steps)"]


def test_draft_floor_counts_the_active_share_of_the_head_and_the_router():
    from coral_fast.draft import DraftModel
    from tests.test_models import tiny_llama

    model = tiny_llama(vocab=173, hidden=64)
    nbytes = lambda module: sum(p.numel() * p.element_size() for p in module.parameters())  # noqa: E731
    for grouping in ("contiguous", "dense"):
        draft = DraftModel.random_init(model, grouping=grouping)
        head = draft.lm_head_weight.numel() * 4
        share = 1.0 if grouping == "dense" else draft.config.active_groups / draft.config.num_groups
        assert share < 1 or grouping == "dense"
        want = nbytes(draft.fc) + nbytes(draft.layer) + int(head * share) + nbytes(draft.head.router)
        assert scale.draft_bytes_per_level(draft, dense=grouping == "dense") == want


# --- tiny CPU runs of the whole thing -----------------------------------------------------------------
needs_engine = pytest.mark.skipif(e2e.engine_api_missing() is not None, reason=str(e2e.engine_api_missing()))


class _CharTokenizer:
    """No chat template: plain text, one id a character (the first 24)."""
    chat_template = None

    def __init__(self, vocab):
        self.vocab = vocab

    def __call__(self, text):
        return SimpleNamespace(input_ids=[1 + ord(c) % (self.vocab - 1) for c in text[:24]])


def test_policy_flags_reach_the_policy_and_the_report(tmp_path):
    """--loop-streak N (0: no loop watch) and --ema-alpha A set the generator's policy and are recorded and
    reported; the defaults record the policy's own."""
    from coral_fast.draft import DraftModel
    from coral_fast.generate import LOOP_STREAK, ema_alpha_for
    from tests.test_models import tiny_llama

    model = tiny_llama(vocab=101, hidden=40, layers=2, seed=4)
    draft = DraftModel.random_init(model)
    prompts = load_suite(["qa"], per_task=1)
    for flag, streak, ema, label in ((["--loop-streak", "0"], 0, None, "adaptive, no loop watch, EMA weight "),
                                     ([], LOOP_STREAK, None, f"adaptive, loop watch {LOOP_STREAK}, EMA weight "),
                                     (["--ema-alpha", "0.55"], LOOP_STREAK, 0.55, "EMA weight 0.55")):
        args = e2e.build_parser().parse_args(["--device", "cpu", "--dtype", "float32", "--max-new-tokens", "4",
                                              "--tree", "3,3,8", "--out-dir", str(tmp_path)] + flag)
        part = e2e.run_suite(model, _CharTokenizer(101), draft, prompts, args, [].append, name="tiny")
        meta = part["meta"]
        if ema is None:  # the policy's own, by the costs warm-up measured
            ema = ema_alpha_for(meta["round_ms"], meta["plain_step_ms"])
            label += f"{ema:g}"
        assert (meta["loop_streak"], meta["ema_alpha"]) == (streak, ema)
        assert label + ")" in report.suite_markdown(dict(env=e2e.environment([]), parts=[part]))
    assert report._policy_label(dict(adaptive=True, loop_streak=4)) == "adaptive, loop watch 4"  # older results


@needs_engine
def test_tiny_suite_writes_consistent_results(tmp_path):
    from coral_fast.draft import DraftModel
    from tests.test_models import tiny_llama

    model = tiny_llama(vocab=101, hidden=40, layers=2, seed=3)
    torch.manual_seed(1)
    draft = DraftModel.random_init(model)
    prompts = load_suite(["qa", "math_reasoning"], per_task=1)
    args = e2e.build_parser().parse_args(["--device", "cpu", "--dtype", "float32", "--max-new-tokens", "8",
                                          "--tree", "3,3,8", "--sampling", "--no-adaptive", "--out-dir", str(tmp_path)])
    logs = []  # always speculative: the fallback's timing-dependent choices would leave tau undefined here
    part = e2e.run_suite(model, _CharTokenizer(101), draft, prompts, args, logs.append, name="tiny")
    suite = dict(env=e2e.environment(["--device", "cpu"]), parts=[part])
    paths = report.write_suite(suite, str(tmp_path))
    assert e2e.fp32_disagreements(part) == []  # fp32: loop == plain == HF static, token for token
    data = json.load(open(paths["json"]))
    tasks = data["parts"][0]["tasks"]
    assert [t["task"] for t in tasks] == ["qa", "math_reasoning", "overall"]
    for t in tasks:
        assert t["speedup_plain"] == pytest.approx(t["loop_tok_s"] / t["plain_tok_s"], rel=1e-4)
        assert t["loop_vs_plain_seqs"] == 1.0 and t["loop_vs_hf_seqs"] == 1.0 and t["hf_eager_vs_static_seqs"] == 1.0
        assert t["sample_loop_tok_s"] > 0 and t["sample_tau"] >= 1
    assert all(r["new_tokens"] == 8 for r in data["parts"][0]["rows"])
    with open(paths["csv"]) as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["level"] for r in csv_rows] == ["prompt", "prompt", "task", "task", "task"]
    overall = csv_rows[-1]
    assert float(overall["speedup_plain"]) == pytest.approx(float(overall["loop_tok_s"]) / float(overall["plain_tok_s"]),
                                                           rel=1e-4)
    md = open(paths["md"]).read()
    assert "**overall**" in md and f"**{tasks[-1]['speedup_plain']:.2f}x**" in md
    assert ("png" in paths) or "No plot: matplotlib is not installed" in md


@needs_engine
def test_stop_at_eos_ends_both_sides_at_the_answers_eos(tmp_path):
    """--stop-at-eos: loop and plain end at the target's EOS (here a token its greedy answer to the first prompt
    makes third), the rates are each side's own tokens over its seconds, and fp32 outputs still agree."""
    from coral_fast.draft import DraftModel
    from tests.test_generate import plain_greedy
    from tests.test_models import tiny_llama

    model = tiny_llama(vocab=101, hidden=40, layers=2, seed=4)
    torch.manual_seed(2)
    draft = DraftModel.random_init(model)
    prompts = load_suite(["qa", "translation"], per_task=1)
    tokenizer = _CharTokenizer(101)
    answer = plain_greedy(model, e2e.encode(tokenizer, prompts[0], "cpu"), 12)
    eos = answer[2]
    model.generation_config.eos_token_id = eos
    args = e2e.build_parser().parse_args(["--device", "cpu", "--dtype", "float32", "--max-new-tokens", "12", "--tree",
                                          "3,3,8", "--no-adaptive", "--stop-at-eos", "--out-dir", str(tmp_path)])
    part = e2e.run_suite(model, tokenizer, draft, prompts, args, [].append, name="tiny")
    first = part["rows"][0]
    assert first["loop_tokens"] == first["plain_tokens"] == answer.index(eos) + 1 <= 3
    assert all(r["loop_tokens"] == r["plain_tokens"] for r in part["rows"])
    assert e2e.fp32_disagreements(part) == []
    overall = part["tasks"][-1]
    assert overall["loop_tok_s"] == pytest.approx(sum(r["loop_tokens"] for r in part["rows"])
                                                  / sum(r["loop_s"] for r in part["rows"]))
    assert overall["loop_vs_plain_seqs"] == 1.0 and overall["loop_vs_hf_seqs"] == 1.0
    suite = dict(env=e2e.environment(["--stop-at-eos"]), parts=[part])
    assert "Answers end at their EOS (at most 12 tokens)" in report.suite_markdown(suite)


@needs_engine
def test_tiny_scale_writes_consistent_results(tmp_path):
    tiny = {"tiny-llama": ("LlamaConfig", dict(vocab_size=173, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                               tie_word_embeddings=False))}
    args = e2e.build_parser().parse_args(["--device", "cpu", "--suite", "none", "--scale-mode", "eager",
                                          "--scale-tokens", "6", "--tree", "3,3,8", "--profile", "tiny-llama",
                                          "--out-dir", str(tmp_path)])
    result = scale.run_scale(["tiny-llama"], args, e2e.environment([]), [3.0, 4.0], lambda m: None, configs=tiny)
    (row,) = result["rows"]
    assert row["R"] == pytest.approx(row["grouped_round_ms"] / row["plain_ms"])
    assert row["floor_ratio"] == pytest.approx((row["grouped_draft_floor_ms"] + row["verify_floor_ms"]) / row["plain_floor_ms"])
    assert row["dense_draft_floor_ms"] > 0 and row["grouped_draft_floor_ms"] > 0
    # weight bytes (bf16): every parameter but the untied input embedding (a lookup reads one row)
    assert row["weight_gb"] * 1e9 == pytest.approx(2 * (173 * 64 + 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 96 + 2 * 64) + 64))
    data = json.load(open(tmp_path / "e2e_scale.json"))
    assert data["rows"][0]["R"] == pytest.approx(row["R"], rel=1e-4)
    assert data["profiles"]["tiny-llama"]["rows"][-1]["part"] == "gaps (wall - kernel sum)"
    md = open(tmp_path / "e2e_scale.md").read()
    assert "tiny-llama" in md and f"{3.0 / row['R']:.2f}x" in md
    assert os.path.getsize(tmp_path / "e2e_scale.csv") > 0
    assert (tmp_path / "e2e_scale.png").exists() or "No plot: matplotlib is not installed" in md


def test_the_lookup_chain_defaults_to_the_generators_with_the_default_tree():
    from coral_fast.generate import DEFAULT_TREE

    parse = e2e.build_parser().parse_args
    assert e2e.lookup_of(parse([])) == DEFAULT_TREE.lookup == 16
    assert e2e.lookup_of(parse(["--tree", "3,3,8"])) == 0  # a small tree has no room for it
    assert e2e.lookup_of(parse(["--tree", "3,3,8", "--lookup", "2"])) == 2
    assert e2e.lookup_of(parse(["--lookup", "0"])) == 0
