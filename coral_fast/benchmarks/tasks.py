"""Prompt sets for `coral-fast bench e2e`: the built-in task suite, or a Spec-Bench `question.jsonl`.

The built-in suite (coral_fast/data/tasks/<task>.jsonl) was written for this project, in Spec-Bench's
task categories; it is for evaluation only: never train a draft on it. A row:

    {"id": "qa-01", "task": "qa", "turns": ["user turn", ...], "answers": ["assistant turn", ...], "system": "..."}

`turns` are the user's turns; `answers` (optional) the assistant's replies to all but the last, written into
the prompt as a prior exchange (multi-turn chat without generating the first answer); `system` optional.

A Spec-Bench file has rows {"question_id", "category", "turns"}; its first turn is the prompt, and its
categories are grouped into tasks as Spec-Bench's own speed report groups them (the eight MT-bench
categories -> mt_bench; translation, summarization, qa, math_reasoning, rag as they are).

`continuation` (EXTRA_TASKS, by name only): openings of documents of several kinds (history, minutes,
code, fiction, a recipe, a manual, a paper, a letter, a guide, terms, sport, health) for a base model
to continue; rows {"id", "task": "continuation", "turns": [opening]}.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

TASKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tasks")
SUITE_TASKS = ("multi_turn", "code", "math_reasoning", "translation", "summarization", "qa", "rag")
# tasks outside "all": document continuation, what a base model (Gemma 3 270M) is for; a chat model gets
# the opening in a user turn that asks it to continue
EXTRA_TASKS = ("continuation",)
CONTINUE_ASK = "Continue this text:\n\n"
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


@dataclass
class Prompt:
    id: str
    task: str
    turns: list[str]
    answers: list[str] = field(default_factory=list)
    system: str | None = None

    def messages(self) -> list[dict]:
        """Chat messages: system, then user/assistant alternating, ending with the last user turn."""
        if self.task == "continuation":
            return [{"role": "user", "content": CONTINUE_ASK + self.turns[0]}]
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for i, turn in enumerate(self.turns):
            msgs.append({"role": "user", "content": turn})
            if i < len(self.turns) - 1:
                msgs.append({"role": "assistant", "content": self.answers[i]})
        return msgs

    def text(self) -> str:
        """The conversation as plain text, for a tokenizer without a chat template (a continuation: the
        opening itself)."""
        if self.task == "continuation":
            return self.turns[0]
        parts = [self.system] if self.system else []
        for m in self.messages()[len(parts):]:
            parts.append(("User: " if m["role"] == "user" else "Assistant: ") + m["content"])
        return "\n\n".join(parts) + "\n\nAssistant:"


def _read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, row) for each non-blank line; ValueError naming the line on bad JSON or a non-object."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _turns(path: str, lineno: int, row: dict, key: str = "turns", required: bool = True) -> list[str]:
    value = row.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value) or not all(isinstance(t, str) and t for t in value):
        raise ValueError(f"{path}:{lineno}: {key!r} must be a list of non-empty strings"
                         f"{' (at least one)' if required else ''}")
    return value


def load_suite(tasks: str | list[str] | None = None, per_task: int | None = None) -> list[Prompt]:
    """The built-in suite: the first `per_task` prompts (all if None) of each task, in SUITE_TASKS order
    ("all"; EXTRA_TASKS only by name)."""
    names = list(SUITE_TASKS) if tasks in (None, "all") else (tasks.split(",") if isinstance(tasks, str) else tasks)
    unknown = [t for t in names if t not in SUITE_TASKS + EXTRA_TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; known: {', '.join(SUITE_TASKS + EXTRA_TASKS)}")
    if per_task is not None and per_task < 1:
        raise ValueError(f"prompts per task must be >= 1, got {per_task}")
    prompts = []
    for task in names:
        path = os.path.join(TASKS_DIR, f"{task}.jsonl")
        if not os.path.isfile(path):
            raise ValueError(f"the built-in task file {path} is missing (package data not installed?)")
        for lineno, row in _read_jsonl(path)[:per_task]:
            turns, answers = _turns(path, lineno, row), _turns(path, lineno, row, "answers", required=False)
            if len(answers) != len(turns) - 1:
                raise ValueError(f"{path}:{lineno}: {len(turns)} turns need {len(turns) - 1} answers, got {len(answers)}")
            prompts.append(Prompt(row["id"], task, turns, answers, row.get("system")))
    return prompts


def spec_bench_task(category: str) -> str:
    """Spec-Bench's grouping: the MT-bench categories are one task, the others are their own."""
    return "mt_bench" if category in MT_BENCH_CATEGORIES else category


def load_spec_bench(path: str, per_task: int | None = None) -> list[Prompt]:
    """Spec-Bench's question.jsonl (question_id, category, turns): the first turn of each question, the
    first `per_task` of each task (all if None), tasks in the order they first appear."""
    if not os.path.isfile(path):
        raise ValueError(f"--prompt-file {path}: no such file")
    if per_task is not None and per_task < 1:
        raise ValueError(f"prompts per task must be >= 1, got {per_task}")
    by_task: dict[str, list[Prompt]] = {}
    for lineno, row in _read_jsonl(path):
        missing = [k for k in ("question_id", "category", "turns") if k not in row]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing {', '.join(repr(k) for k in missing)} "
                             "(Spec-Bench rows have question_id, category, turns)")
        if not isinstance(row["category"], str) or not row["category"]:
            raise ValueError(f"{path}:{lineno}: 'category' must be a non-empty string")
        turns = _turns(path, lineno, row)
        task = spec_bench_task(row["category"])
        by_task.setdefault(task, []).append(Prompt(str(row["question_id"]), task, turns[:1]))
    return [p for rows in by_task.values() for p in rows[:per_task]]
