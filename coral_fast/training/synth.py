"""Prompts made by the target itself: Magpie chat prompts plus task templates over model-written text.

No data set is downloaded: this code and a seed are the prompt set. `synthesize_chunk(c)` makes the
c-th chunk of prompts, deterministically from (seed, c) on a given machine, in three generation stages:

    1. Magpie user turns (the model gets only its chat template's user-turn prefix and writes the
       user message, stopping at its end of turn), and the material of the task templates: English or
       foreign paragraphs (translation), long documents of 500-3,000 tokens (summaries), passages
       (extractive QA, retrieval-augmented answers over several passages), math word problems, code tasks
    2. questions over the passages; the assistant's answer of a two-turn conversation's first turn
    3. the second user turn of a two-turn conversation (Magpie again, after the first exchange)

Kind "document" (not in the default mix; a base model's data, `--synth-mix document=1`): the model
writes the opening of a document (a base model continues a title), and the prompt asks to continue it
(`CONTINUE_ASK` + opening, as the evaluation's continuation task; a base model gets the opening alone,
data.prompt_token_ids).

Each prompt is filtered (length, mostly-letters text, no repeated-token loops, no chat-template
tokens, under `max_prompt_tokens`), deduplicated (normalized-text hash, then MinHash LSH over word
3-gram shingles with a Jaccard check) against every earlier prompt, and dropped when it shares a word
13-gram with a prompt of the evaluation task suite (coral_fast/data/tasks/: evaluation only).

Rows: {"id": "c00012-0034", "category": kind, "split": "train"|"eval", "messages": [...]} (every 50th
kept prompt of a chunk is held out).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from coral_fast.benchmarks.tasks import CONTINUE_ASK
from coral_fast.models import is_base_model
from coral_fast.training.prompts import ALL_TOPICS, CODE_LANGS, CODE_TASKS, EVERYDAY, _math_problem

TASKS_DIR = Path(__file__).resolve().parent.parent / "data" / "tasks"
KINDS = ("chat", "two_turn", "translation", "summarization", "qa", "rag", "math", "code", "document")
DEFAULT_MIX = {"chat": 0.25, "two_turn": 0.1, "translation": 0.12, "summarization": 0.12, "qa": 0.1, "rag": 0.1, "math": 0.11, "code": 0.1}
LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese"]
TEMPLATE_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<start_of_turn>", "<end_of_turn>", "<eos>", "<bos>",
                    "<s>", "</s>", "[INST]", "[/INST]", "<|user|>", "<|assistant|>", "<|system|>")
PREAMBLE = re.compile(r"^(?:sure|certainly|of course|here(?:'s| is| are)|below is)[^\n]{0,160}:[ \t]*\n", re.IGNORECASE)
GENRES = ["news article", "encyclopedia entry", "blog post", "report", "short story", "essay", "guide", "product review", "history"]
SUMMARY_ASKS = [
    "Summarize the following {genre} in {n} sentences.\n\n{doc}",
    "Write a short summary of this text:\n\n{doc}",
    "{doc}\n\nSummarize the text above in one paragraph.",
    "Read the following {genre} and list its main points.\n\n{doc}",
    "Give a brief summary of the key ideas in this {genre}:\n\n{doc}",
]
QA_ASKS = [
    "Answer the question using only the passage.\n\nPassage: {p}\n\nQuestion: {q}",
    "{p}\n\nBased on the text above, {q}",
    "Read this passage:\n\n{p}\n\nNow answer with words from the passage: {q}",
]
RAG_ASKS = [
    "Use the documents below to answer the question, and say which document you used.\n\n{docs}\n\nQuestion: {q}",
    "{docs}\n\nAnswer this question from the documents above: {q}",
    "Here are some search results.\n\n{docs}\n\nUsing them, answer: {q}",
]
TRANSLATE_ASKS = [
    "Translate the following text from {src} to {tgt}:\n\n{text}",
    "Translate into {tgt}:\n\n{text}",
    "How would you say this in {tgt}?\n\n{text}",
]


@dataclass
class SynthSettings:
    """Everything that changes the synthesized prompts (recorded in the data folder's meta.json)."""
    mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    temperature: float = 1.0
    top_p: float = 0.95
    max_prompt_tokens: int = 3584
    user_turn_tokens: int = 160      # Magpie user messages
    answer_tokens: int = 384         # the first answer of a two-turn conversation
    paragraph_tokens: int = 320      # translation texts, passages, problems, code tasks
    document_tokens: int = 3000      # long documents, at most
    opening_tokens: int = 128        # a document's opening to continue (a 270M base model loops in longer ones)
    min_document_tokens: int = 400
    min_words: int = 3
    min_letter_ratio: float = 0.6    # letters among non-space characters
    max_repeat_ratio: float = 0.5    # the most frequent word's share of all words, at most
    near_duplicate_jaccard: float = 0.7
    eval_every: int = 50

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# --- normalization, filters, deduplication -----------------------------------------------------------
def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def words(text: str) -> list[str]:
    return normalize(text).split()


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def shingles(text: str, n: int = 3) -> set[int]:
    w = words(text)
    if len(w) < n:
        return {_hash64(" ".join(w))} if w else set()
    return {_hash64(" ".join(w[i:i + n])) for i in range(len(w) - n + 1)}


MASK64 = (1 << 64) - 1
_PERMS = [(_hash64(f"a{i}") | 1, _hash64(f"b{i}")) for i in range(64)]


def minhash(shingle_set: set[int]) -> tuple[int, ...]:
    """64 min-hashes (a x + b mod 2^64 over 64-bit shingle hashes): P(equal) ~ Jaccard per entry."""
    if not shingle_set:
        return tuple([MASK64] * len(_PERMS))
    return tuple(min(((a * s + b) & MASK64) for s in shingle_set) for a, b in _PERMS)


class DedupIndex:
    """Exact (normalized-text hash) and near-duplicate (MinHash LSH: 16 bands of 4, then the true
    Jaccard of the shingle sets >= threshold) detection over every prompt added so far."""

    def __init__(self, threshold: float = 0.7, bands: int = 16):
        self.threshold, self.bands = threshold, bands
        self.exact: set[int] = set()
        self.buckets: dict[tuple, list[int]] = {}
        self.sets: list[set[int]] = []

    def _keys(self, signature):
        width = len(signature) // self.bands
        return [(b, signature[b * width:(b + 1) * width]) for b in range(self.bands)]

    def is_duplicate(self, text: str) -> bool:
        if _hash64(normalize(text)) in self.exact:
            return True
        s = shingles(text)
        candidates = {i for key in self._keys(minhash(s)) for i in self.buckets.get(key, ())}
        return any(len(s & self.sets[i]) / max(1, len(s | self.sets[i])) >= self.threshold for i in candidates)

    def add(self, text: str) -> None:
        self.exact.add(_hash64(normalize(text)))
        s = shingles(text)
        self.sets.append(s)
        for key in self._keys(minhash(s)):
            self.buckets.setdefault(key, []).append(len(self.sets) - 1)


def suite_ngrams(n: int = 13, tasks_dir: Path = TASKS_DIR) -> set[int]:
    """Hashes of every word n-gram of the evaluation task suite's prompts (its turns)."""
    grams: set[int] = set()
    for path in sorted(Path(tasks_dir).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                for turn in json.loads(line).get("turns", []):
                    w = words(turn)
                    grams.update(_hash64(" ".join(w[i:i + n])) for i in range(len(w) - n + 1))
    return grams


def shares_ngram(text: str, grams: set[int], n: int = 13) -> bool:
    w = words(text)
    return any(_hash64(" ".join(w[i:i + n])) in grams for i in range(len(w) - n + 1))


def text_problem(text: str, settings: SynthSettings, markers=TEMPLATE_MARKERS) -> str | None:
    """Why a generated text is unusable, or None: too short, not mostly letters, a repetition loop,
    or chat-template tokens in it."""
    if any(m in text for m in markers):
        return "template"
    w = words(text)
    if len(w) < settings.min_words:
        return "short"
    chars = [c for c in text if not c.isspace()]
    if sum(c.isalpha() for c in chars) < settings.min_letter_ratio * len(chars):
        return "letters"
    if len(w) >= 8 and max(w.count(x) for x in set(w)) > settings.max_repeat_ratio * len(w):
        return "repeats"
    return None


# --- the model as a text generator ---------------------------------------------------------------------
@dataclass
class Request:
    """One generation: `messages` through the chat template, or `raw` text as is (Magpie prefixes; a base
    model's text is cut at its turn's end unless `whole`)."""
    max_new_tokens: int
    messages: list | None = None
    raw: str | None = None
    whole: bool = False


def user_turn_prefix(tokenizer, history: list[dict] | None = None) -> str | None:
    """The chat template's text up to where the next user message starts (after `history`); None for a
    tokenizer without a chat template (a base model: plain "User: " transcripts)."""
    marker = "\x00MAGPIE\x00"
    messages = (history or []) + [{"role": "user", "content": marker}]
    if not getattr(tokenizer, "chat_template", None):
        return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in history or []) + "User: "
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    return text[: text.index(marker)]


# --- one chunk ---------------------------------------------------------------------------------------
def _pick_kinds(rng: random.Random, n: int, mix: dict) -> list[str]:
    kinds = [k for k in KINDS if mix.get(k, 0) > 0]
    unknown = set(mix) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"synthesis mix: kinds must be among {', '.join(KINDS)} with some weight > 0, got {mix}")
    return rng.choices(kinds, weights=[mix[k] for k in kinds], k=n)


def synthesize_chunk(generate, tokenizer, chunk: int, n: int, seed: int, settings: SynthSettings,
                     index: DedupIndex, suite: set[int], count_tokens) -> tuple[list[dict], dict]:
    """Up to `n` new prompts (rows, see the module docstring) and counts of what was dropped and why.

    generate(requests: list[Request], temperature, top_p, seed) -> list[str] (the texts, eos removed);
    count_tokens(messages) -> the prompt's length in tokens. `index` is updated with the kept prompts."""
    rng = random.Random(f"synth:{seed}:{chunk}")
    kinds = _pick_kinds(rng, n, settings.mix)
    s = settings
    items = []  # one dict per planned prompt; stages fill it in
    for kind in kinds:
        topic = rng.choice(ALL_TOPICS)
        item = {"kind": kind, "topic": topic}
        if kind == "chat":
            item["req"] = Request(s.user_turn_tokens, raw=user_turn_prefix(tokenizer))
        elif kind == "two_turn":
            item["req"] = Request(s.user_turn_tokens, raw=user_turn_prefix(tokenizer))
        elif kind == "translation":
            lang = rng.choice(LANGUAGES)
            to_english = rng.random() < 0.4
            item.update(src=lang if to_english else "English", tgt="English" if to_english else lang)
            length = rng.choice(["two sentences", "three sentences", "a short paragraph", "a paragraph"])
            written_in = f" in {lang}" if to_english else ""
            item["req"] = Request(s.paragraph_tokens, messages=[{"role": "user", "content": f"Write {length} about {topic}{written_in}. Only write the text."}])
        elif kind == "summarization":
            genre, n_words = rng.choice(GENRES), rng.choice([400, 700, 1000, 1500, 2000])
            item.update(genre=genre)
            item["req"] = Request(min(s.document_tokens, 2 * n_words), messages=[{"role": "user", "content": f"Write a detailed {genre} of about {n_words} words about {topic}. Use several paragraphs with concrete names, numbers and examples."}])
        elif kind == "qa":
            item["req"] = Request(s.paragraph_tokens, messages=[{"role": "user", "content": f"Write a factual paragraph about {topic} that mentions specific names, places, dates and numbers."}])
        elif kind == "rag":
            count = rng.randint(3, 5)
            others = rng.sample(ALL_TOPICS, count - 1)
            item["topics"] = [topic] + others
            rng.shuffle(item["topics"])
            item["reqs"] = [Request(s.paragraph_tokens // 2 + 64, messages=[{"role": "user", "content": f"Write a short informative paragraph about {t}, as it would appear on a website."}]) for t in item["topics"]]
        elif kind == "math":
            if rng.random() < 0.3:
                item["prompt"] = _math_problem(rng) + rng.choice(["", " Show your work.", " Solve it step by step."])
            else:
                grade = rng.choice(["primary school", "middle school", "high school", "first-year university"])
                item["req"] = Request(s.paragraph_tokens, messages=[{"role": "user", "content": f"Write a math word problem for a {grade} student about {rng.choice(EVERYDAY + ALL_TOPICS)}. Only write the problem, not the solution."}])
        elif kind == "document":  # the opening of a document, which the answer continues (base models)
            genre = rng.choice(GENRES)
            if not is_base_model(tokenizer):
                item["req"] = Request(s.opening_tokens, messages=[{"role": "user", "content": f"Write the first paragraphs of a {genre} about {topic}. Only write the text."}])
            else:
                item["title"] = f"{topic[:1].upper()}{topic[1:]}\n\n"
                item["req"] = Request(s.opening_tokens, raw=item["title"], whole=True)
        elif kind == "code":
            lang = rng.choice(CODE_LANGS)
            if rng.random() < 0.3:
                item["prompt"] = f"Write a {lang} function that {rng.choice(CODE_TASKS)}. Explain how it works."
            else:
                item["req"] = Request(s.paragraph_tokens, messages=[{"role": "user", "content": f"Describe a small programming exercise in {lang} related to {topic}. Only write the task, in one or two sentences, as a request."}])
        items.append(item)

    dropped: dict[str, int] = {}

    def drop(item, why):
        item["dead"] = why
        dropped[why] = dropped.get(why, 0) + 1

    def run_stage(stage: int, pairs: list[tuple[dict, str, Request]]):
        """pairs: (item, key, request): the generated text goes to item[key] (or the item dies)."""
        if not pairs:
            return
        texts = generate([r for _, _, r in pairs], s.temperature, s.top_p, seed=_hash64(f"{seed}:{chunk}:{stage}") % (1 << 62))
        for (item, key, _), text in zip(pairs, texts):
            text = text.strip()
            if key not in ("user", "user2", "answer"):
                text = PREAMBLE.sub("", text, count=1).strip()  # "Here is a paragraph about X:" is not the material
            problem = text_problem(text, s) if item["kind"] != "translation" or key != "text" else text_problem(text, SynthSettings(min_letter_ratio=0.5))
            if problem:
                drop(item, f"{key}:{problem}")
            elif isinstance(item.get(key), list):
                item[key].append(text)
            else:
                item[key] = text

    # stage 1: user turns and material
    stage1 = []
    for item in items:
        if "req" in item:
            key = {"chat": "user", "two_turn": "user", "translation": "text", "summarization": "doc", "qa": "passage", "math": "prompt",
                   "code": "prompt", "document": "opening"}[item["kind"]]
            stage1.append((item, key, item["req"]))
        for req in item.get("reqs", []):
            item.setdefault("passages", [])
            stage1.append((item, "passages", req))
    run_stage(1, stage1)
    # stage 2: questions over passages, the first answer of two-turn conversations
    stage2 = []
    for item in items:
        if item.get("dead"):
            continue
        if item["kind"] == "summarization" and count_tokens([{"role": "user", "content": item["doc"]}]) < s.min_document_tokens:
            drop(item, "doc:short")
        elif item["kind"] == "qa":
            stage2.append((item, "question", Request(96, messages=[{"role": "user", "content": f"Passage: {item['passage']}\n\nWrite one question that can be answered with a short phrase copied from this passage. Only write the question."}])))
        elif item["kind"] == "rag":
            j = rng.randrange(len(item["passages"]))
            stage2.append((item, "question", Request(96, messages=[{"role": "user", "content": f"Text: {item['passages'][j]}\n\nWrite one question that this text answers. Only write the question."}])))
        elif item["kind"] == "two_turn":
            stage2.append((item, "answer", Request(s.answer_tokens, messages=[{"role": "user", "content": item["user"]}])))
    run_stage(2, stage2)
    # stage 3: the second user turn
    stage3 = []
    for item in items:
        if not item.get("dead") and item["kind"] == "two_turn":
            history = [{"role": "user", "content": item["user"]}, {"role": "assistant", "content": item["answer"]}]
            item["history"] = history
            stage3.append((item, "user2", Request(s.user_turn_tokens, raw=user_turn_prefix(tokenizer, history))))
    run_stage(3, stage3)

    rows = []
    for item in items:
        if item.get("dead"):
            continue
        messages = _messages(item, rng)
        text = "\n".join(m["content"] for m in messages)
        if shares_ngram(text, suite):
            drop(item, "task-suite overlap")
        elif index.is_duplicate(text):
            drop(item, "duplicate")
        elif count_tokens(messages) > s.max_prompt_tokens:
            drop(item, "too long")
        else:
            index.add(text)
            split = "eval" if len(rows) % s.eval_every == s.eval_every - 1 else "train"
            rows.append({"id": f"c{chunk:05d}-{len(rows):04d}", "category": item["kind"], "split": split, "messages": messages})
    return rows, dropped


def _messages(item: dict, rng: random.Random) -> list[dict]:
    kind = item["kind"]
    if kind == "chat":
        content = item["user"]
    elif kind == "two_turn":
        return item["history"] + [{"role": "user", "content": item["user2"]}]
    elif kind == "translation":
        content = rng.choice(TRANSLATE_ASKS).format(src=item["src"], tgt=item["tgt"], text=item["text"])
    elif kind == "summarization":
        content = rng.choice(SUMMARY_ASKS).format(genre=item["genre"], n=rng.randint(2, 5), doc=item["doc"])
    elif kind == "qa":
        content = rng.choice(QA_ASKS).format(p=item["passage"], q=item["question"])
    elif kind == "rag":
        docs = "\n\n".join(f"[{i + 1}] {p}" for i, p in enumerate(item["passages"]))
        content = rng.choice(RAG_ASKS).format(docs=docs, q=item["question"])
    elif kind == "document":
        content = CONTINUE_ASK + item.get("title", "") + item["opening"]
    else:  # math, code
        content = item["prompt"]
    return [{"role": "user", "content": content}]


# --- the model adapter and the chunk files -----------------------------------------------------------
def model_text_generator(generate_ids, tokenizer, eos: list[int]):
    """generate(requests, temperature, top_p, seed) -> texts over `generate_ids(prompts, max_new_tokens,
    temperature, top_p, seed) -> answers` (lists of ids). Requests with the same max_new_tokens go
    together; the trailing eos is removed and the text decoded with its special tokens (the filters
    refuse template tokens)."""
    from coral_fast.training.data import prompt_token_ids

    eos_set = set(eos)

    def encode(request: Request) -> list[int]:
        if request.raw is not None:
            # a Magpie prefix is template text that holds its own BOS; a base model's document (`whole`) needs one
            return list(tokenizer(request.raw, add_special_tokens=request.whole)["input_ids"])
        return prompt_token_ids(tokenizer, request.messages)

    def generate(requests: list[Request], temperature: float, top_p: float, seed: int) -> list[str]:
        texts: list[str | None] = [None] * len(requests)
        by_length: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            by_length.setdefault(r.max_new_tokens, []).append(i)
        for n_new, rows in sorted(by_length.items()):
            answers = generate_ids([encode(requests[i]) for i in rows], n_new, temperature, top_p, seed + n_new)
            for i, ids in zip(rows, answers):
                if ids and ids[-1] in eos_set:
                    ids = ids[:-1]
                text = tokenizer.decode(ids, skip_special_tokens=False)
                if requests[i].raw is not None and not requests[i].whole and not getattr(tokenizer, "chat_template", None):
                    text = re.split(r"\n(?:User|Assistant):|\n\n", text)[0]  # a base model's turn ends at the line
                texts[i] = text
        return texts

    return generate


def chunk_path(out_dir, chunk: int) -> Path:
    return Path(out_dir) / "prompts" / f"chunk_{chunk:05d}.jsonl"


def read_chunk(out_dir, chunk: int) -> list[dict] | None:
    path = chunk_path(out_dir, chunk)
    if not path.exists():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_chunk(out_dir, chunk: int, rows: list[dict]) -> None:
    import os

    path = chunk_path(out_dir, chunk)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)  # a chunk appears whole or not at all


def rebuild_index(out_dir, chunks: int, settings: SynthSettings) -> DedupIndex:
    """The dedup index over the prompts of chunks 0..chunks-1 already on disk (resume)."""
    index = DedupIndex(settings.near_duplicate_jaccard)
    for c in range(chunks):
        for row in read_chunk(out_dir, c) or []:
            index.add("\n".join(m["content"] for m in row["messages"]))
    return index
