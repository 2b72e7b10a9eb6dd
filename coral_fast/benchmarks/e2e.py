"""`coral-fast bench e2e`: tokens/s of the draft/verify loop against plain `model.generate`.

Same model, prompts and length, greedy, batch 1. Baselines: `generate` as is (eager, dynamic cache)
and `generate(cache_implementation="static")` (transformers compiles the decode step itself). The loop
runs through StaticEngine with both steps captured in CUDA graphs. Every run forces `--max-new-tokens`
new tokens (EOS ignored on both sides) so that the rates compare like for like.

    coral-fast bench e2e --models smollm2,gemma3-270m --max-new-tokens 128 --out bench/results/e2e_h100.md

Gemma 3 270M may use random weights of its real config (`--gemma-random`, no 253 MB file to carry); the
loop's cost per round does not depend on the weights, its acceptance does (random draft: ~1).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that checks whether a number is prime.",
    "List five countries in Europe and their capitals.",
    "What is the difference between a list and a tuple in Python?",
]

PROMPT_SETS = ("builtin", "heldout")


def heldout_prompts(n: int) -> list[str]:
    """The first n held-out chat prompts of the shipped prompt set (no draft was trained on them)."""
    from coral_fast.training.prompts import load_prompts

    return [row["messages"][-1]["content"] for row in load_prompts(split="eval")[:n]]


def prompt_texts(prompt_sets: str, n: int) -> list[tuple[str, str]]:
    """(set name, text) for the first n prompts of each named set; ValueError on an unknown set."""
    prompts = []
    for set_name in prompt_sets.split(","):
        if set_name not in PROMPT_SETS:
            raise ValueError(f"unknown prompt set {set_name!r}; known: {', '.join(PROMPT_SETS)}")
        texts = PROMPTS[:n] if set_name == "builtin" else heldout_prompts(n)
        prompts += [(set_name, text) for text in texts]
    return prompts


GEMMA3_270M_CONFIG = dict(
    vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
    num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512, rms_norm_eps=1e-6,
    max_position_embeddings=32768, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
    rope_parameters={"full_attention": {"rope_theta": 1_000_000.0, "rope_type": "default"},
                     "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"}},
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
)


def build_parser():
    p = argparse.ArgumentParser(prog="coral-fast bench e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,gemma3-270m")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=4, help="how many prompts of each set")
    p.add_argument("--prompt-set", default="builtin",
                   help="comma list of: builtin (the 4 prompts above), heldout (held-out chat prompts of the "
                        "shipped prompt set, coral_fast/data/prompts.jsonl)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--draft", default=None, help="draft folder (default: the shipped draft, else random)")
    p.add_argument("--gemma-random", action="store_true", help="Gemma 3: random weights of the real config")
    p.add_argument("--tree", default="6,10,60", help="depth,topk,total_tokens")
    p.add_argument("--no-compiled", action="store_true", help="skip the compiled static-cache baseline")
    p.add_argument("--compile", action="store_true", help="torch.compile the loop's steps before capturing them")
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("--json", default=None, help="write raw results here")
    return p


def load(name, dtype, device, gemma_random):
    import torch

    if name == "gemma3-270m" and gemma_random:
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        torch.manual_seed(0)
        config = Gemma3TextConfig(**GEMMA3_270M_CONFIG, attn_implementation="sdpa")
        model = Gemma3ForCausalLM(config).to(device=device, dtype=dtype).eval().requires_grad_(False)
        return model, None
    from coral_fast.models import load_target

    return load_target(name, dtype=dtype, device=device)


def prompt_ids(tokenizer, text, vocab, device, seed):
    import torch

    if tokenizer is None:  # random weights: random ids of a chat-prompt length
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (48,), generator=g).to(device)
    from coral_fast.models import chat_prompt_ids

    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])
    if ids is None:
        ids = tokenizer(text).input_ids
    return torch.tensor(ids, device=device)


def timed(fn, device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def bench_model(name, args, log, prompts):
    import torch

    from coral_fast.draft import DraftModel
    from coral_fast.generate import SpeculativeGenerator, TreeConfig
    from coral_fast.generate_cli import shipped_draft
    from coral_fast.models import parse_dtype

    dtype = parse_dtype(args.dtype)
    model, tok = load(name, dtype, args.device, args.gemma_random)
    V = model.config.vocab_size
    # forced length on both sides without suppressing EOS (min_new_tokens would mask it in generate only)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    draft_path = args.draft or shipped_draft(name)
    if draft_path and not (name == "gemma3-270m" and args.gemma_random):
        draft, draft_label = DraftModel.from_pretrained(draft_path, model), f"trained ({os.path.basename(draft_path)})"
    else:
        torch.manual_seed(0)
        draft, draft_label = DraftModel.random_init(model), "untrained (random init)"
    depth, topk, total = (int(x) for x in args.tree.split(","))
    t0 = time.perf_counter()
    gen = SpeculativeGenerator(model, draft, TreeConfig(depth, topk, total), eos_token_id=[], compile=args.compile)
    gen.generate(prompt_ids(tok, PROMPTS[0], V, args.device, seed=0), 8)  # capture (and compile) once
    log(f"{name}: loop set up in {time.perf_counter() - t0:.1f} s (capture{' + compile' if args.compile else ''})")
    N = args.max_new_tokens
    rows = []
    compiled_s = float("nan")
    for i, (set_name, text) in enumerate(prompts):
        ids = prompt_ids(tok, text, V, args.device, seed=i)
        mask = torch.ones(1, len(ids), dtype=torch.int64, device=ids.device)
        plain_kwargs = dict(max_new_tokens=N, do_sample=False, attention_mask=mask)
        # loop (the first call captures the graphs: warm up on the same prompt)
        gen.generate(ids, N)
        res, loop_s = timed(lambda: gen.generate(ids, N), args.device)
        ref, eager_s = timed(lambda: model.generate(ids[None], **plain_kwargs)[0, len(ids):].tolist(), args.device)
        if i == 0:  # warm the eager path too (first call pays allocations)
            ref, eager_s = timed(lambda: model.generate(ids[None], **plain_kwargs)[0, len(ids):].tolist(), args.device)
        # the compiled baseline recompiles for every new cache length: measured on the first prompt only,
        # and that rate stands beside every prompt of the model (its cost per token hardly depends on it)
        if not args.no_compiled and i == 0:
            static_kwargs = dict(plain_kwargs, cache_implementation="static")
            for _ in range(2):  # compile + warm-up
                model.generate(ids[None], **static_kwargs)
            _, compiled_s = timed(lambda: model.generate(ids[None], **static_kwargs), args.device)
        same = 0
        for a, b in zip(res.token_ids, ref):
            if a != b:
                break
            same += 1
        row = dict(model=name, prompt_set=set_name, prompt=i, prompt_len=len(ids), new_tokens=len(res.token_ids),
                   loop_tok_s=len(res.token_ids) / loop_s, eager_tok_s=N / eager_s, compiled_tok_s=N / compiled_s,
                   tau=res.mean_accepted_length, draft_s=res.draft_time_s, verify_s=res.verify_time_s,
                   prefill_s=res.prefill_time_s, loop_s=loop_s, agree_prefix=same, draft=draft_label)
        log(json.dumps(row))
        rows.append(row)
    return rows


def markdown(rows, args, env):
    lines = [
        "# End-to-end: draft/verify loop vs `model.generate` (batch 1, greedy)",
        "",
        f"{env}. {args.max_new_tokens} new tokens forced per prompt (EOS ignored on both sides), "
        f"tree depth,topk,tokens = {args.tree}, {args.dtype}. Loop: StaticEngine, prefill (64-token chunks), draft "
        f"and verify steps in CUDA graphs{', the draft and verify steps torch.compiled first' if args.compile else ''}, "
        "one host sync per round. tok/s = new tokens / wall time including prefill; medians over "
        "prompts (the compiled baseline: first prompt only, it recompiles per cache length; that rate stands beside every prompt set). prompts: builtin = the 4 prompts of this module, heldout = held-out chat prompts of coral_fast/data/prompts.jsonl. tau = tokens per verify round (accepted + bonus). draft/verify = share of the rounds' GPU "
        "time (CUDA events). agree = tokens equal to plain `generate` before the first difference "
        "(bf16: tree and incremental decoding round differently, so near-ties can flip).",
        "",
        "| model | weights | draft | prompts | loop tok/s | generate eager tok/s | generate static+compile tok/s | loop / eager | loop / compiled | tau | prefill ms | draft ms/round | verify ms/round | agree |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, set_name in dict.fromkeys((r["model"], r["prompt_set"]) for r in rows):
        rs = [r for r in rows if r["model"] == name and r["prompt_set"] == set_name]
        def med(key):  # NaN rows (a baseline not run) skipped; NaN if none ran
            values = [r[key] for r in rs if r[key] == r[key]]
            return statistics.median(values) if values else float("nan")

        rounds = [r["new_tokens"] / r["tau"] for r in rs]
        draft_ms = statistics.median(1e3 * r["draft_s"] / n for r, n in zip(rs, rounds))
        verify_ms = statistics.median(1e3 * r["verify_s"] / n for r, n in zip(rs, rounds))
        weights = "random (real config)" if (name == "gemma3-270m" and args.gemma_random) else "GGUF"
        lines.append(
            f"| {name} | {weights} | {rs[0]['draft']} | {set_name} ({len(rs)}) | {med('loop_tok_s'):.0f} | {med('eager_tok_s'):.0f} | "
            f"{med('compiled_tok_s'):.0f} | {med('loop_tok_s') / med('eager_tok_s'):.2f}x | "
            f"{med('loop_tok_s') / med('compiled_tok_s'):.2f}x | {med('tau'):.2f} | {1e3 * med('prefill_s'):.1f} | {draft_ms:.2f} | {verify_ms:.2f} | "
            f"{min(r['agree_prefix'] for r in rs)}-{max(r['agree_prefix'] for r in rs)}/{args.max_new_tokens} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:  # before any model loads: a typo in --prompt-set fails at once, not after minutes of compiling
        prompts = prompt_texts(args.prompt_set, args.prompts)
    except ValueError as e:
        print(f"bench e2e: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import triton
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench e2e: needs a CUDA GPU (--device cuda); use --device cpu for a smoke run", file=sys.stderr)
        return 2
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    env = (f"{dev_name}, torch {torch.__version__}, triton {triton.__version__}, transformers "
           f"{transformers.__version__}, {time.strftime('%Y-%m-%d')}")
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(env)
    rows = []
    for name in args.models.split(","):
        try:
            rows += bench_model(name, args, log, prompts)
        except Exception as e:  # keep the other model's numbers
            import traceback

            traceback.print_exc()
            log(f"bench e2e: {name} failed: {e}")
    if not rows:
        return 1
    table = markdown(rows, args, env)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
