"""Acceptance length of a trained draft through the real draft/verify loop (greedy).

`loop_acceptance` runs `SpeculativeGenerator` (EAGLE-2 dynamic tree) over held-out chat prompts and
reports the mean accepted length (tokens per target forward, bonus included, pooled over all rounds)
and tokens/s; `head="dense"` swaps the routed grouped top-k for a dense full-vocabulary top-k, and
`active_groups` overrides the router's a for the sweep.
"""
from __future__ import annotations

import contextlib
import time

import torch


@contextlib.contextmanager
def head_mode(draft, head: str = "grouped", active_groups: int | None = None):
    """Temporarily use a dense top-k (`head="dense"`) or another number of active groups."""
    saved_a = getattr(draft.head, "active_groups", None)
    try:
        if head == "dense":
            def dense_topk(hidden, k, impl="auto", check=True, groups=None):
                logprobs = torch.log_softmax(draft.head.dense_logits(hidden).float(), dim=-1)
                values, ids = logprobs.topk(k, dim=-1)
                return ids, values

            draft.head.topk = dense_topk
        elif head != "grouped":
            raise ValueError(f"head must be 'grouped' or 'dense', got {head!r}")
        if active_groups is not None:
            draft.head.active_groups = int(active_groups)
        yield draft
    finally:
        if head == "dense":
            del draft.head.topk  # the instance attribute shadowed the class's method
        if saved_a is not None:
            draft.head.active_groups = saved_a


@torch.no_grad()
def loop_acceptance(target, tokenizer, draft, prompts: list[dict], max_new_tokens: int = 128, head: str = "grouped", active_groups: int | None = None, depth: int = 6, topk: int = 10, total_tokens: int = 60, warmup: int = 1, deadline: float | None = None, loop_mode: dict | None = None, timed_s: float | None = None) -> dict:
    """Greedy speculative generation over `prompts` (rows of prompts.jsonl); pooled statistics.

    loop_mode: keyword arguments of SpeculativeGenerator (e.g. {"mode": "eager"}); default: its fastest
    mode, falling back to eager ones if that fails. No prompt starts after `deadline` (a
    time.perf_counter() value) nor more than `timed_s` seconds after the untimed warm-up."""
    from coral_fast.generate import SpeculativeGenerator, TreeConfig
    from coral_fast.training.data import prompt_token_ids

    draft.eval()
    tree = TreeConfig(depth=depth, topk=topk, total_tokens=total_tokens)
    accepted, rounds, tokens, seconds, done = 0, 0, 0, 0.0, 0
    per_prompt = []
    with head_mode(draft, head, active_groups):
        # the loop's default mode first (compile-draft on the GPU), eager if that fails; always speculative
        # (adaptive=False): this measures the draft's acceptance, not the fallback's choice
        errors = []
        for mode in ([loop_mode] if loop_mode is not None else ({}, {"mode": "eager"})):
            try:
                gen = SpeculativeGenerator(target, draft, tree, adaptive=False, **mode)
                for row in prompts[:max(warmup, 1)]:  # a short untimed run: allocations, compilation, capture
                    gen.generate(prompt_token_ids(tokenizer, row["messages"]), max_new_tokens=16, temperature=0.0)
                break
            except Exception as error:  # noqa: BLE001 (recorded, next mode)
                errors.append(f"{mode or 'default'}: {error!r}"[:300])
                gen = None
        if gen is None:
            raise RuntimeError("the loop failed in every mode: " + " | ".join(errors))
        timed_start = time.perf_counter()
        for row in prompts:
            if deadline is not None and time.perf_counter() > deadline:
                break
            if timed_s is not None and time.perf_counter() - timed_start > timed_s:
                break
            ids = prompt_token_ids(tokenizer, row["messages"])
            result = gen.generate(ids, max_new_tokens=max_new_tokens, temperature=0.0)
            accepted += sum(result.accepted_lengths)
            rounds += len(result.accepted_lengths)
            tokens += len(result.token_ids)
            seconds += result.total_time_s
            per_prompt.append(result.mean_accepted_length)
            done += 1
    return {
        "loop_mode": mode or "default", "loop_errors": errors,
        "head": head, "active_groups": active_groups if active_groups is not None else getattr(draft.head, "active_groups", None),
        "prompts": done, "new_tokens": tokens, "mean_accepted_length": accepted / max(rounds, 1),
        "tokens_per_s": tokens / seconds if seconds else float("nan"),
        "per_prompt_min": min(per_prompt) if per_prompt else None, "per_prompt_max": max(per_prompt) if per_prompt else None,
    }


@torch.no_grad()
def baseline_tokens_per_s(target, tokenizer, prompts: list[dict], max_new_tokens: int = 128, warmup: int = 1) -> float:
    """Plain greedy `model.generate` (eager, dynamic cache) tokens/s over the same prompts."""
    from coral_fast.training.data import prompt_token_ids

    device = target.get_output_embeddings().weight.device
    tokens, seconds = 0, 0.0
    for i, row in enumerate(prompts):
        ids = torch.tensor([prompt_token_ids(tokenizer, row["messages"])], device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            tokens += out.shape[1] - ids.shape[1]
            seconds += time.perf_counter() - t0
    return tokens / seconds if seconds else float("nan")
