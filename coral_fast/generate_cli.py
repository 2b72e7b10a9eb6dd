"""`coral-fast generate`: speculative generation on a target model, streamed as tokens are accepted.

    coral-fast generate --model smollm2 --chat --prompt "Why is the sky blue?" --compare
    coral-fast generate --model gemma3-270m --prompt "The capital of France is" --json
    coral-fast generate --model /path/to/llama --draft /path/to/draft --device cuda --dtype bfloat16
    coral-fast generate --model smollm2 --prompt "Hello" --no-draft        # plain decoding, same engine

Text goes to stdout as it is accepted; notes and statistics go to stderr; `--json` prints one JSON
object as the last line of stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from coral_fast.cli_checks import (ArgumentParser, argument_errors, check_draft_folder, check_model_arg, float_in,
                                   int_at_least, one_line)
from coral_fast.generate import DEFAULT_TREE, MAX_DEPTH, MAX_TOPK, MAX_TREE_TOKENS, MODES, TreeConfig

DEFAULT_DRAFTS = {"smollm2": "smollm2", "gemma3-270m": "gemma3-270m"}
COMPARE_REPS = 3  # --compare: runs of the loop and of plain mode each, interleaved


def temperature_type(text: str) -> float:
    """--temperature: 0 (greedy) or a finite number >= MIN_TEMPERATURE (smaller ones overflow 1 / T)."""
    from coral_fast.generate import MIN_TEMPERATURE

    accepted = f"0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}"
    try:
        value = float_in(0.0)(text)
    except argparse.ArgumentTypeError:
        value = None
    if value is None or 0 < value < MIN_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"must be {accepted}, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="coral-fast generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="smollm2 | gemma3-270m | PATH of a local checkpoint or .gguf")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--draft", default=None,
                   help="draft folder (config.json + model.safetensors); default: the shipped draft of the "
                        "model if present, else an untrained random draft")
    p.add_argument("--no-draft", action="store_true",
                   help="plain decoding (one token a step) through the same engine: the baseline")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=128)
    p.add_argument("--max-context", type=int_at_least(2), default=None,
                   help="prompt + new tokens the engine is sized for (default min(4096, the model's limit))")
    p.add_argument("--temperature", type=temperature_type, default=0.0, help="0 = greedy (default)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--mode", default=None, choices=list(MODES),
                   help="eager (the CPU default) | graphs (every step in a CUDA graph, no compile) | compile "
                        "(torch.compile the steps, then capture them: minutes once) | compile-draft (the CUDA "
                        "default: only the draft's steps compiled, ~40 s once)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--compare", action="store_true",
                   help="also run plain decoding (the engine's plain mode and HF model.generate) and print the speeds")
    p.add_argument("--json", action="store_true", help="print a JSON object with ids, text and stats last")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random draft and of sampling; sampling is exact for every tree, so the same "
                        "seed gives different (equally distributed) text for different tree sizes or modes")
    p.add_argument("--tree-depth", type=int, default=None,
                   help=f"draft tree depth in [1, {MAX_DEPTH}] (default {DEFAULT_TREE.depth} GPU, 4 CPU)")
    p.add_argument("--tree-topk", type=int, default=None,
                   help=f"children per expanded node in [1, {MAX_TOPK}] (default {DEFAULT_TREE.topk} GPU, 4 CPU)")
    p.add_argument("--tree-tokens", type=int, default=None,
                   help=f"tree size verified per round, in [1, {MAX_TREE_TOKENS}] (default {DEFAULT_TREE.total_tokens} GPU, "
                        "16 CPU)")
    p.add_argument("--lookup", type=int, default=None,
                   help="prompt lookup: a chain of N tokens copying what followed the context's final n-gram where "
                        "it occurred before takes the place of the draft's N lowest-ranked nodes (helps "
                        f"summaries, answers over passages; N may exceed the depth; default {DEFAULT_TREE.lookup} with "
                        "the GPU's default "
                        "tree, else 0; 0 = off)")
    return p


def shipped_draft(model_name: str) -> str | None:
    folder = DEFAULT_DRAFTS.get(model_name)
    if folder is None:
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "drafts", folder)
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def encode_prompt(tokenizer, prompt: str, chat: bool, note) -> list[int]:
    if chat:
        from coral_fast.models import chat_prompt_ids

        ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
        if ids is not None:
            return ids
        note("this tokenizer has no chat template (a base model): --chat ignored, plain continuation")
    return list(tokenizer(prompt).input_ids)


class _Streamer:
    """Prints the decoded text as tokens arrive (decoding the whole output keeps multi-byte tokens right)."""

    def __init__(self, tokenizer, enabled: bool):
        self.tokenizer, self.enabled = tokenizer, enabled
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, new_ids):
        self.ids.extend(new_ids)
        if not self.enabled:
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        sys.stdout.write(text[len(self.printed):])
        sys.stdout.flush()
        self.printed = text


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    note = lambda msg: print(f"[coral-fast] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    on_gpu = args.device == "cuda"
    with argument_errors(parser):  # every check before the model loads: one line, exit 2
        if not args.prompt.strip():
            raise ValueError("the prompt is empty")
        if args.mode == "graphs" and not on_gpu:
            raise ValueError("--mode graphs needs --device cuda (CUDA graphs)")
        context = args.max_context or 4096
        if args.max_new_tokens >= context:
            raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for the prompt in "
                             f"--max-context {context}: it must be < {context}")
        # the chain by default only with the GPU's default tree (a small tree has no room for it)
        default_chain = on_gpu and (args.tree_depth, args.tree_topk, args.tree_tokens) == (None,) * 3
        try:
            tree = TreeConfig(
                depth=(DEFAULT_TREE.depth if on_gpu else 4) if args.tree_depth is None else args.tree_depth,
                topk=(DEFAULT_TREE.topk if on_gpu else 4) if args.tree_topk is None else args.tree_topk,
                total_tokens=((DEFAULT_TREE.total_tokens if on_gpu else 16) if args.tree_tokens is None
                              else args.tree_tokens),
                lookup=(DEFAULT_TREE.lookup if default_chain else 0) if args.lookup is None else args.lookup,
            )
        except ValueError as e:  # name the flags
            message = str(e)
            for field, flag in (("depth", "--tree-depth"), ("topk", "--tree-topk"), ("total_tokens", "--tree-tokens"),
                                ("lookup", "--lookup")):
                message = message.replace(f"tree {field} ", f"{flag} ")
            message = message.replace("for depth", "for --tree-depth").replace("and topk", "and --tree-topk")
            message = message.replace("with lookup", "with --lookup").replace("depth=", "--tree-depth=")
            raise ValueError(message) from None
        check_model_arg(args.model)
        if args.draft and not args.no_draft:
            check_draft_folder(args.draft)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if on_gpu and not torch.cuda.is_available():
        print("coral-fast generate: error: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from coral_fast.draft import DraftModel
    from coral_fast.generate import SpeculativeGenerator
    from coral_fast.models import ModelNotAvailable, load_target

    t0 = time.perf_counter()
    try:
        model, tokenizer = load_target(args.model, dtype=args.dtype, device=args.device)
    except (ModelNotAvailable, ValueError, OSError) as e:
        print(f"coral-fast generate: error: {one_line(e)}", file=sys.stderr)
        return 2
    note(f"loaded {args.model} ({args.dtype}, {args.device}) in {time.perf_counter() - t0:.1f} s")

    torch.manual_seed(args.seed)
    draft, draft_path = None, None
    try:
        if not args.no_draft:
            draft_path = args.draft or shipped_draft(args.model)
            if draft_path:
                draft = DraftModel.from_pretrained(draft_path, model)
                note(f"draft: {draft_path}" + ("" if args.draft else " (shipped, trained)"))
            else:
                draft = DraftModel.random_init(model)
                note("draft: untrained random draft (few tokens are accepted; the output is still exactly the "
                     "target's)")
        else:
            note("no draft: plain decoding through the engine")
        generator = SpeculativeGenerator(model, draft, tree, mode=args.mode, max_context=args.max_context,
                                         speculative=not args.no_draft)
        prompt_ids = encode_prompt(tokenizer, args.prompt, args.chat, note)
        if not prompt_ids:
            raise ValueError("the prompt encodes to no tokens")
        generator._check_request(prompt_ids, args.max_new_tokens, args.temperature)
    except ValueError as e:
        print(f"coral-fast generate: error: {one_line(e)}", file=sys.stderr)
        return 2
    warmup_s = generator.warmup()
    note(f"engine ready ({generator.mode}, context {generator.max_context}) in {warmup_s:.2f} s: round "
         f"{1e3 * generator.round_time_s:.2f} ms, plain step {1e3 * generator.plain_step_time_s:.2f} ms")

    rng = torch.Generator().manual_seed(args.seed)
    streamer = _Streamer(tokenizer, enabled=True)
    result = generator.generate(torch.tensor(prompt_ids), args.max_new_tokens, args.temperature, rng, streamer)
    sys.stdout.write("\n")
    sys.stdout.flush()
    stats = result.stats()
    note(
        f"{'plain' if args.no_draft else 'speculative'}: {stats['new_tokens']} tokens in {stats['total_s']:.2f} s = "
        f"{stats['tokens_per_s']:.2f} tok/s, mean accepted length {stats['mean_accepted_length']:.2f} "
        f"({stats['rounds']} rounds, {stats['plain_steps']} plain steps), draft {stats['draft_s']:.2f} s / "
        f"verify {stats['verify_s']:.2f} s / first token {stats['prefill_s']:.2f} s"
        + ("" if args.no_draft else f" (tree {tree.depth}x{tree.topk}, {tree.total_tokens} tokens)")
    )
    text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    payload = {
        "model": args.model,
        "draft": "none" if args.no_draft else (draft_path or "random"),
        "prompt_ids": prompt_ids,
        "token_ids": result.token_ids,
        "text": text,
        **stats,
    }

    if args.compare:
        sample = args.temperature > 0
        # the loop again (not streamed) against the engine's own plain mode (the same caches, capture and
        # sampling, one token a step), interleaved COMPARE_REPS times, medians: one run each on a busy
        # 2-core CPU differs by +-5% between identical step sequences
        rates = {False: [], True: []}  # plain mode -> tokens/s of each run
        loop_probes = 0  # rounds and probes that ended at the first look
        for _ in range(COMPARE_REPS):
            for plain_mode in (False, True):
                run = generator.generate(torch.tensor(prompt_ids), args.max_new_tokens, args.temperature,
                                         torch.Generator().manual_seed(args.seed), plain=plain_mode)
                rates[plain_mode].append(run.tokens_per_s)
                loop_probes += 0 if plain_mode else run.rounds + run.scouted
        loop_tps, engine_tps = statistics.median(rates[False]), statistics.median(rates[True])
        runs = rates[False] + rates[True]
        spread = (max(runs) - min(runs)) / statistics.median(runs)
        ratio_note = (f" (the loop ran no round and no probe: the same plain steps as plain mode, so the ratio is this "
                      f"machine's noise; the {len(runs)} runs spread {100 * spread:.0f}%)" if loop_probes == 0 else "")
        ids = torch.tensor([prompt_ids], device=model.device)
        kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=sample, attention_mask=torch.ones_like(ids))
        if sample:
            kwargs.update(temperature=args.temperature, top_k=None, top_p=None)
        model.generate(ids, max_new_tokens=2, do_sample=False, attention_mask=torch.ones_like(ids))  # warm-up
        if on_gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        plain = model.generate(ids, **kwargs)[0, len(prompt_ids):].tolist()
        if on_gpu:
            torch.cuda.synchronize()
        plain_tps = len(plain) / (time.perf_counter() - t)
        same = plain == result.token_ids
        note(
            f"plain decoding (median of {COMPARE_REPS} runs each, interleaved): loop {loop_tps:.2f} tok/s, engine "
            f"plain mode {engine_tps:.2f} tok/s, HF model.generate {plain_tps:.2f} tok/s (one run); loop / engine "
            f"plain = {loop_tps / engine_tps:.2f}x{ratio_note}, loop / HF generate = {loop_tps / plain_tps:.2f}x; "
            + (f"identical tokens: {same}" if not sample else "sampling: outputs differ by chance")
        )
        payload.update(plain_tokens_per_s=round(plain_tps, 3), plain_token_ids=plain,
                       loop_tokens_per_s=round(loop_tps, 3), engine_plain_tokens_per_s=round(engine_tps, 3),
                       identical_to_plain=same if not sample else None)
        if not sample and not same:
            note("WARNING: greedy outputs differ from model.generate (see docs/loop.md on low-precision ties)")
    if args.json:
        print(json.dumps(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
