"""`coral-fast generate`: speculative generation on a target model, streamed as tokens are accepted.

    coral-fast generate --model smollm2 --chat --prompt "Why is the sky blue?" --compare
    coral-fast generate --model gemma3-270m --prompt "The capital of France is" --json
    coral-fast generate --model /path/to/llama --draft /path/to/draft --device cuda --dtype bfloat16

Text goes to stdout as it is accepted; notes and statistics go to stderr; `--json` prints one JSON
object as the last line of stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_DRAFTS = {"smollm2": "smollm2", "gemma3-270m": "gemma3-270m"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coral-fast generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="smollm2 | gemma3-270m | PATH of a local checkpoint or .gguf")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--draft", default=None,
                   help="draft folder (config.json + model.safetensors); default: the shipped draft of the "
                        "model if present, else an untrained random draft")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--compare", action="store_true", help="also run plain model.generate and print both speeds")
    p.add_argument("--json", action="store_true", help="print a JSON object with ids, text and stats last")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draft and of sampling")
    p.add_argument("--tree-depth", type=int, default=None, help="draft tree depth (default 6 GPU, 4 CPU)")
    p.add_argument("--tree-topk", type=int, default=None, help="children per expanded node (default 10 GPU, 4 CPU)")
    p.add_argument("--tree-tokens", type=int, default=None, help="tree size verified per round (default 60 GPU, 16 CPU)")
    p.add_argument("--compile", action="store_true",
                   help="GPU: torch.compile the draft and verify steps before capturing them (minutes once)")
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
    args = build_parser().parse_args(argv)
    note = lambda msg: print(f"[coral-fast] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if not args.prompt.strip():
        print("coral-fast generate: error: the prompt is empty", file=sys.stderr)
        return 2
    if args.max_new_tokens < 1:
        print("coral-fast generate: error: --max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    if args.temperature < 0:
        print("coral-fast generate: error: --temperature must be >= 0", file=sys.stderr)
        return 2
    if args.compile and args.device != "cuda":
        print("coral-fast generate: error: --compile needs --device cuda (it compiles the GPU engine)", file=sys.stderr)
        return 2
    if args.draft and not os.path.isfile(os.path.join(args.draft, "config.json")):
        print(f"coral-fast generate: error: no draft at {args.draft!r}: config.json not found", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("coral-fast generate: error: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from coral_fast.draft import DraftModel
    from coral_fast.generate import SpeculativeGenerator, TreeConfig
    from coral_fast.models import ModelNotAvailable, load_target

    t0 = time.perf_counter()
    try:
        model, tokenizer = load_target(args.model, dtype=args.dtype, device=args.device)
    except (ModelNotAvailable, ValueError) as e:
        print(f"coral-fast generate: error: {e}", file=sys.stderr)
        return 2
    note(f"loaded {args.model} ({args.dtype}, {args.device}) in {time.perf_counter() - t0:.1f} s")

    torch.manual_seed(args.seed)
    draft_path = args.draft or shipped_draft(args.model)
    try:
        if draft_path:
            draft = DraftModel.from_pretrained(draft_path, model)
            note(f"draft: {draft_path}" + ("" if args.draft else " (shipped, trained)"))
        else:
            draft = DraftModel.random_init(model)
            note("draft: untrained random draft (few tokens are accepted; the output is still exactly the target's)")
    except ValueError as e:
        print(f"coral-fast generate: error: {e}", file=sys.stderr)
        return 2

    on_gpu = args.device == "cuda"
    tree = TreeConfig(
        depth=args.tree_depth or (6 if on_gpu else 4),
        topk=args.tree_topk or (10 if on_gpu else 4),
        total_tokens=args.tree_tokens or (60 if on_gpu else 16),
    )
    generator = SpeculativeGenerator(model, draft, tree, mode="compile" if args.compile else None)
    prompt_ids = encode_prompt(tokenizer, args.prompt, args.chat, note)
    if not prompt_ids:
        print("coral-fast generate: error: the prompt encodes to no tokens", file=sys.stderr)
        return 2

    rng = torch.Generator().manual_seed(args.seed)
    streamer = _Streamer(tokenizer, enabled=True)
    result = generator.generate(torch.tensor(prompt_ids), args.max_new_tokens, args.temperature, rng, streamer)
    sys.stdout.write("\n")
    sys.stdout.flush()
    stats = result.stats()
    note(
        f"speculative: {stats['new_tokens']} tokens in {stats['total_s']:.2f} s = {stats['tokens_per_s']:.2f} tok/s, "
        f"mean accepted length {stats['mean_accepted_length']:.2f}, draft {stats['draft_s']:.2f} s / "
        f"verify {stats['verify_s']:.2f} s / prefill {stats['prefill_s']:.2f} s (tree {tree.depth}x{tree.topk}, "
        f"{tree.total_tokens} tokens)"
    )
    text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    payload = {
        "model": args.model,
        "draft": draft_path or "random",
        "prompt_ids": prompt_ids,
        "token_ids": result.token_ids,
        "text": text,
        **stats,
    }

    if args.compare:
        ids = torch.tensor([prompt_ids], device=model.device)
        sample = args.temperature > 0
        kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=sample,
                      attention_mask=torch.ones_like(ids))
        if sample:
            kwargs.update(temperature=args.temperature, top_k=None, top_p=None)
        model.generate(ids, max_new_tokens=2, do_sample=False, attention_mask=torch.ones_like(ids))  # warm-up
        if on_gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        plain = model.generate(ids, **kwargs)[0, len(prompt_ids):].tolist()
        if on_gpu:
            torch.cuda.synchronize()
        plain_s = time.perf_counter() - t
        plain_tps = len(plain) / plain_s
        same = plain == result.token_ids
        note(
            f"plain model.generate: {len(plain)} tokens in {plain_s:.2f} s = {plain_tps:.2f} tok/s; "
            f"speculative/plain = {stats['tokens_per_s'] / plain_tps:.2f}x; "
            + (f"identical tokens: {same}" if not sample else "sampling: outputs differ by chance")
        )
        payload.update(plain_tokens_per_s=round(plain_tps, 3), plain_token_ids=plain,
                       identical_to_plain=same if not sample else None)
        if not sample and not same:
            note("WARNING: greedy outputs differ from model.generate (see docs/loop.md on low-precision ties)")
    if args.json:
        print(json.dumps(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
