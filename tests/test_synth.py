"""Prompt synthesis (deterministic, deduplicated, never the task suite) and batched generation (== HF
greedy per row). Tiny random models and a character tokenizer only (fast on a 2-core CPU)."""
import json
import random
import time

import pytest
import torch

from coral_fast.kernels._dispatch import interpreter_enabled
from coral_fast.training import synth as S
from coral_fast.training.batched import BatchedGenerator, loop_end
from test_models import tiny_gemma3, tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")

LETTERS = "abcdefghijklmnopqrstuvwxyz .?"


class CharChatTokenizer:
    """Characters as ids, a two-marker chat template: enough tokenizer for synthesis and `coral-fast data`.
    ids: 0 pad, 1 end of turn (eos), 2 user turn, 3 assistant turn, 4.. the characters of LETTERS."""

    chat_template = "chars"
    pad_token_id = 0
    eos_token_id = 1
    specials = {"\x01": 1, "\x02": 2, "\x03": 3}

    def __len__(self):
        return 4 + len(LETTERS)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        text = "".join(("\x02" if m["role"] == "user" else "\x03") + m["content"] + "\x01" for m in messages)
        text += "\x03" if add_generation_prompt else ""
        return self(text, add_special_tokens=False)["input_ids"] if tokenize else text

    def __call__(self, text, add_special_tokens=True):
        ids = [self.specials[c] if c in self.specials else 4 + LETTERS.index(c) for c in text.lower() if c in self.specials or c in LETTERS]
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=False):
        inverse = {v: k for k, v in self.specials.items()}
        return "".join(LETTERS[i - 4] if i >= 4 else ("" if skip_special_tokens else inverse.get(i, "")) for i in ids)


def char_target(seed=0):
    model = tiny_llama(vocab=len(CharChatTokenizer()), hidden=32, layers=1, seed=seed)
    model.generation_config.eos_token_id = 1
    model.config.eos_token_id = 1
    return model


# --- deduplication and the task suite ------------------------------------------------------------------
def test_dedup_index_finds_exact_and_near_duplicates_only():
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(400)]
    texts = [" ".join(rng.choices(vocabulary, k=rng.randint(25, 40))) for _ in range(60)]
    index = S.DedupIndex(0.7)
    for text in texts:
        assert not index.is_duplicate(text)  # independent word salads are distinct
        index.add(text)
    base = texts[7].split()
    assert index.is_duplicate("  " + texts[7].upper().replace(" ", "  ") + " !")  # normalization only
    near = base[:]
    near[len(near) // 2] = "changed"
    assert index.is_duplicate(" ".join(near))  # one word of ~30 changed: Jaccard of 3-grams ~0.8
    far = base[: len(base) // 3] + rng.choices(vocabulary, k=len(base))
    assert not index.is_duplicate(" ".join(far))


def test_task_suite_prompts_are_refused_and_templates_are_not():
    grams = S.suite_ngrams()
    rows = [json.loads(line) for path in sorted(S.TASKS_DIR.glob("*.jsonl")) for line in path.read_text().splitlines() if line.strip()]
    assert len(rows) >= 40 and grams
    for row in rows:
        turn = max(row["turns"], key=len)
        if len(S.words(turn)) >= 13:
            assert S.shares_ngram("Please help. " + turn + " Thanks.", grams), row["id"]
    filler = "the river town holds a fair every year with music and food for all visitors who come"
    for template in S.SUMMARY_ASKS + S.QA_ASKS + S.RAG_ASKS + S.TRANSLATE_ASKS:
        text = template.format(genre="report", n=3, doc=filler, p=filler, q="when is the fair", docs=filler, src="English", tgt="French", text=filler)
        assert not S.shares_ngram(text, grams), template


def test_text_filters_name_the_problem():
    s = S.SynthSettings()
    assert S.text_problem("How do volcanoes form under the ocean?", s) is None
    assert S.text_problem("<|im_start|>assistant How do volcanoes form?", s) == "template"
    assert S.text_problem("hi", s) == "short"
    assert S.text_problem("1234 5678 9999 #### 0000", s) == "letters"
    assert S.text_problem("yes " * 20, s) == "repeats"


# --- synthesis of a chunk --------------------------------------------------------------------------
def word_salad_generator(calls=None, fixed=None):
    """generate(requests, temperature, top_p, seed) -> deterministic texts from the seed and each request."""
    letters = random.Random(0)
    vocabulary = ["".join(letters.choices("abcdefghijklmnopqrstuvwxyz", k=letters.randint(2, 9))) for _ in range(3000)]

    def generate(requests, temperature, top_p, seed):
        if calls is not None:
            calls.append(len(requests))
        out = []
        for i, r in enumerate(requests):
            if fixed is not None and r.raw is not None:
                out.append(fixed)
                continue
            rng = random.Random(f"{seed}:{i}:{r.raw}:{r.messages}")
            n = min(r.max_new_tokens, 600 if r.max_new_tokens > 500 else 40)
            out.append(" ".join(rng.choices(vocabulary, k=n)) + ".")
        return out

    return generate


def _chunk(generate, seed, chunk=0, n=40, index=None, mix=None):
    settings = S.SynthSettings(mix=mix or dict(S.DEFAULT_MIX))
    index = index if index is not None else S.DedupIndex(settings.near_duplicate_jaccard)
    count = lambda messages: sum(len(m["content"].split()) for m in messages)
    return S.synthesize_chunk(generate, CharChatTokenizer(), chunk, n, seed, settings, index, S.suite_ngrams(), count)


def test_synthesis_is_deterministic_given_the_seed_and_covers_the_kinds():
    rows, dropped = _chunk(word_salad_generator(), seed=3, n=80)
    again, _ = _chunk(word_salad_generator(), seed=3, n=80)
    other, _ = _chunk(word_salad_generator(), seed=4, n=80)
    assert rows == again and rows != other
    kinds = {r["category"] for r in rows}
    assert kinds == set(S.DEFAULT_MIX), (kinds, dropped)
    assert all(r["messages"][-1]["role"] == "user" for r in rows)
    two_turn = next(r for r in rows if r["category"] == "two_turn")
    assert [m["role"] for m in two_turn["messages"]] == ["user", "assistant", "user"]
    rag = next(r for r in rows if r["category"] == "rag")
    assert "[1]" in rag["messages"][0]["content"] and "[3]" in rag["messages"][0]["content"]
    assert len({r["id"] for r in rows}) == len(rows)
    assert sum(r["split"] == "eval" for r in rows) == len(rows) // 50


def test_synthesis_drops_duplicates_and_task_suite_prompts():
    suite_turn = json.loads((S.TASKS_DIR / "qa.jsonl").read_text().splitlines()[0])["turns"][0]
    for fixed, reason in (("Tell me a fun fact about octopuses and their three hearts please", "duplicate"),
                          (suite_turn, "task-suite overlap")):
        rows, dropped = _chunk(word_salad_generator(fixed=fixed), seed=1, n=60, mix={"chat": 1.0})
        assert len(rows) == (1 if reason == "duplicate" else 0) and dropped[reason] == 60 - len(rows), dropped
    # and across chunks: the index carries the earlier prompts
    index = S.DedupIndex()
    first, _ = _chunk(word_salad_generator(), seed=1, n=30, index=index)
    second, dropped = _chunk(word_salad_generator(), seed=1, n=30, index=index)  # same chunk and seed: all repeats
    assert first and not second and dropped["duplicate"] == len(first)


def test_document_kind_for_a_base_model_continues_a_title():
    """A base model continues a title into a document opening (its text kept whole, paragraphs too); the
    prompt asks to continue it as the evaluation's continuation task does, and a base tokenizer sees
    the opening alone; a chat model is asked to write the opening."""
    from coral_fast.benchmarks.tasks import CONTINUE_ASK
    from coral_fast.training.data import prompt_token_ids

    class BaseCharTokenizer(CharChatTokenizer):
        chat_template = None

    requests = []

    def generate(reqs, temperature, top_p, seed):
        requests.extend(reqs)
        return [f"the harbour town of {chr(97 + i % 26)}{i} holds a fair every year.\n\nthe second paragraph goes on about boats {i}."
                for i in range(len(reqs))]

    settings = S.SynthSettings(mix={"document": 1.0})
    count = lambda messages: sum(len(m["content"].split()) for m in messages)
    tok = BaseCharTokenizer()
    rows, dropped = S.synthesize_chunk(generate, tok, 0, 12, 5, settings, S.DedupIndex(), S.suite_ngrams(), count)
    assert len(rows) == 12 and {r["category"] for r in rows} == {"document"}, dropped
    assert all(r.raw is not None and r.whole and r.raw.endswith("\n\n") for r in requests)
    (msg,) = rows[0]["messages"]
    assert msg["content"].startswith(CONTINUE_ASK + requests[0].raw) and "second paragraph" in msg["content"]
    assert prompt_token_ids(tok, rows[0]["messages"]) == tok(msg["content"][len(CONTINUE_ASK):])["input_ids"]
    requests.clear()
    rows, _ = S.synthesize_chunk(generate, CharChatTokenizer(), 0, 4, 5, settings, S.DedupIndex(), S.suite_ngrams(), count)
    assert all(r.raw is None and "first paragraphs" in r.messages[0]["content"] for r in requests)
    assert rows[0]["messages"][0]["content"].startswith(CONTINUE_ASK + "the harbour town")
    assert prompt_token_ids(CharChatTokenizer(), rows[0]["messages"])[0] == 2  # a chat model: its user turn

    # a base model given a chat template for its chat tasks (models.gemma3_chat_setup) is still a base model
    tok = CharChatTokenizer()
    tok.coral_added_template = True
    requests.clear()
    rows, _ = S.synthesize_chunk(generate, tok, 0, 4, 5, settings, S.DedupIndex(), S.suite_ngrams(), count)
    assert requests and all(r.raw is not None and r.whole for r in requests)
    (msg,) = rows[0]["messages"]
    assert prompt_token_ids(tok, rows[0]["messages"]) == tok(msg["content"][len(CONTINUE_ASK):])["input_ids"]
    assert prompt_token_ids(tok, [{"role": "user", "content": "hi"}]) == tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_magpie_prefix_is_the_user_turn_start():
    tok = CharChatTokenizer()
    assert S.user_turn_prefix(tok) == "\x02"
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert S.user_turn_prefix(tok, history) == "\x02hi\x01\x03hello\x01\x02"

    class Base:
        chat_template = None

    assert S.user_turn_prefix(Base(), history) == "User: hi\nAssistant: hello\nUser: "


# --- batched generation ----------------------------------------------------------------------------
def _hf_greedy(model, prompt, n, eos):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
    row = out[0, len(prompt):].tolist()
    return row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_batched_greedy_equals_hf_generate_per_row(seed, arch):
    """Rows of their own lengths in one static cache; Gemma 3's window (5 slots) bites in prefill and decode."""
    if arch == "llama":
        model = tiny_llama(vocab=89 + seed % 11, hidden=48, layers=2, seed=seed % 1000)
    else:
        model = tiny_gemma3(vocab=89 + seed % 11, window=5, seed=seed % 1000)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(n),), generator=gen).tolist() for n in torch.randint(1, 19, (7,), generator=gen)]
    n_new = 23
    # an eos that one row reaches early: its 5th greedy token
    eos = [_hf_greedy(model, prompts[2], 5, [-1])[4]]
    reference = [_hf_greedy(model, p, n_new, eos) for p in prompts]
    assert any(len(r) < n_new for r in reference)
    batched = BatchedGenerator(model, batch_size=9, max_len=64, mode="eager")
    started = time.perf_counter()
    answers = batched.generate(prompts, n_new, eos, pad_id=0, sync_every=4)
    seconds = time.perf_counter() - started
    print(f"batched eager CPU: {sum(map(len, answers)) / seconds:.0f} tok/s ({len(prompts)} rows)")
    for p, a, r in zip(prompts, answers, reference):
        assert a == r, (p, a, r)
    # more prompts than rows: stopped rows take the next prompts (a refill prefill of those rows only)
    few = BatchedGenerator(model, batch_size=3, max_len=64, mode="eager")
    for sync_every in (1, 3):
        assert few.generate(prompts, n_new, eos, pad_id=0, sync_every=sync_every) == reference
    assert few.generate(prompts[:1], n_new, eos, pad_id=0) == reference[:1]  # rows left empty: dummies
    # budgets: each prompt's own cap on new tokens, also for the prompts that take a freed row
    budgets = [int(b) for b in torch.randint(1, n_new + 1, (len(prompts),), generator=gen)]
    capped = few.generate(prompts, n_new, eos, pad_id=0, sync_every=2, budgets=budgets)
    assert capped == [r[:b] for r, b in zip(reference, budgets)]
    if arch == "gemma3" and interpreter_enabled():  # the decode through the Triton kernel (head dim 16)
        batched.impl = "triton"
        assert batched.generate(prompts, n_new, eos, pad_id=0) == reference
        batched.impl = "reference"
    # sampling: reproducible from the seed, other seeds differ
    s1 = batched.generate(prompts, 12, eos, 0, temperature=0.9, top_p=0.9, seed=5)
    assert s1 == batched.generate(prompts, 12, eos, 0, temperature=0.9, top_p=0.9, seed=5)
    assert s1 != batched.generate(prompts, 12, eos, 0, temperature=0.9, top_p=0.9, seed=6)


def _cut_at_loop(row, n, max_period):
    """The list rule of stop_loops: the answer ends at the first t whose last n tokens equal the n tokens p before them."""
    for t in range(1, len(row) + 1):
        if any(t >= n + p and row[t - n:t] == row[t - n - p:t - p] for p in range(1, max_period + 1)):
            return row[:t]
    return row


def test_batched_generation_stops_loops_like_the_list_rule(seed):
    model = tiny_llama(vocab=11 + seed % 7, hidden=32, layers=1, seed=seed % 1000)  # few ids: greedy loops soon
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, model.config.vocab_size) for _ in range(rng.randint(1, 9))] for _ in range(7)]
    n_new, n, max_period = 48, rng.randint(1, 3), rng.randint(4, 12)
    eos = [model.config.vocab_size + 1]  # never produced: only the loop rule and the budget stop rows
    expected = [_cut_at_loop(_hf_greedy(model, p, n_new, eos), n, max_period) for p in prompts]
    assert any(len(e) < n_new for e in expected)  # some row loops (every one of 60 seeds tried)
    gen = BatchedGenerator(model, batch_size=3, max_len=64, mode="eager")
    assert gen.generate(prompts, n_new, eos, 0, sync_every=3, stop_loops=n, loop_period=max_period) == expected
    loose = [_cut_at_loop(_hf_greedy(model, p, n_new, eos), 6, 1) for p in prompts]
    assert gen.generate(prompts, n_new, eos, 0, stop_loops=6, loop_period=1) == loose
    with pytest.raises(ValueError, match="stop_loops"):
        gen.generate(prompts, n_new, eos, 0, stop_loops=-1)


def test_loop_end_is_the_list_rule(seed):
    rng = random.Random(seed)
    for _ in range(20):
        vocab, length = rng.randint(2, 6), rng.randint(0, 70)
        row = [rng.randrange(vocab) for _ in range(length)]
        n, max_period = rng.randint(1, 8), rng.randint(1, 12)
        assert loop_end(torch.tensor(row, dtype=torch.long), n, max_period) == len(_cut_at_loop(row, n, max_period)), \
            (row, n, max_period)


def test_batched_generation_refuses_bad_requests():
    model = tiny_llama(vocab=31, hidden=16, layers=1)
    gen = BatchedGenerator(model, batch_size=2, max_len=16, mode="eager")
    for budgets in ([3], [3, 0], [3, 5], [3, 2.0]):
        with pytest.raises(ValueError, match="budgets"):
            gen.generate([[1, 2], [3]], 4, [5], 0, budgets=budgets)
    with pytest.raises(ValueError, match="no prompts"):
        gen.generate([], 4, [1], 0)
    with pytest.raises(ValueError, match="exceeds the cache length 16"):
        gen.generate([[3] * 10], 7, [1], 0)
    with pytest.raises(ValueError, match="empty prompt"):
        gen.generate([[]], 4, [1], 0)
    with pytest.raises(ValueError, match="mode must be"):
        BatchedGenerator(model, 2, 16, mode="fast")
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        BatchedGenerator(model, 2, 16, mode="graphs")


# --- the whole synthesis through a model -------------------------------------------------------------
def test_synthesis_through_a_tiny_model_is_deterministic_and_resumes(tmp_path):
    from coral_fast.training.data import DataSettings, generate_dataset, load_shards, shard_files

    model, tok = char_target(), CharChatTokenizer()
    settings = DataSettings(max_new_tokens=10, batch_size=12, gen_rows=8, samples=2, synth=24, max_prompt_tokens=900)
    synth_settings = S.SynthSettings(user_turn_tokens=12, answer_tokens=10, paragraph_tokens=24, document_tokens=40, min_document_tokens=20,
                                     min_letter_ratio=0.3, max_repeat_ratio=0.9, min_words=1)
    a = generate_dataset(model, tok, None, tmp_path / "a", settings, progress=False, synth_settings=synth_settings)
    b = generate_dataset(model, tok, None, tmp_path / "b", settings, progress=False, synth_settings=synth_settings)
    assert a["prompts_synthesized"] > 0 and a["written"] == 4, a
    for name in ("prompts/chunk_00000.jsonl", "prompts/chunk_00001.jsonl", "shard_00001_01.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    data = load_shards(tmp_path / "a")
    assert set(data["tasks"]) <= set(S.KINDS) and data["input_ids"].max() < len(tok)
    # resume: a lost shard (and a lost chunk file with it) come back the same
    shard = tmp_path / "a" / "shard_00001_00.safetensors"
    chunk = tmp_path / "a" / "prompts" / "chunk_00001.jsonl"
    before = shard.read_bytes(), chunk.read_bytes()
    shard.unlink()
    chunk.unlink()
    again = generate_dataset(model, tok, None, tmp_path / "a", settings, progress=False, synth_settings=synth_settings)
    assert again["written"] == 1 and again["skipped"] == 3
    assert (shard.read_bytes(), chunk.read_bytes()) == before
    assert len(shard_files(tmp_path / "a")) == 4


def test_text_generator_gives_a_document_title_its_bos_and_a_magpie_prefix_none():
    """A base model continues a title only after its BOS (Gemma 3 without one writes noise); a Magpie prefix is
    template text that carries its own, so it gets none added."""

    class BosTokenizer(CharChatTokenizer):
        def __call__(self, text, add_special_tokens=True):
            ids = super().__call__(text)["input_ids"]
            return {"input_ids": ([3] if add_special_tokens else []) + ids}

    seen = []

    def generate_ids(prompts, n_new, temperature, top_p, seed):
        seen.extend(prompts)
        return [[10, 11, 1] for _ in prompts]

    tok = BosTokenizer()
    gen = S.model_text_generator(generate_ids, tok, eos=[1])
    texts = gen([S.Request(8, raw="harbour\n\n", whole=True), S.Request(8, raw="\x02")], 0.0, 1.0, 0)
    assert seen == [[3] + tok("harbour\n\n", add_special_tokens=False)["input_ids"], [2]]
    assert texts == [tok.decode([10, 11])] * 2
