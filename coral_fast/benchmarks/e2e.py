"""`coral-fast bench e2e`: the draft/verify loop against the same engine decoding one token a step.

    coral-fast bench e2e --suite quick --out-dir bench/results/e2e            # task suite, SmolLM2
    coral-fast bench e2e --suite none --scale all --out-dir bench/results/e2e # 1B-8B shapes, random weights
    coral-fast bench e2e --prompt-file question.jsonl                         # Spec-Bench's questions

Task suite (coral_fast/benchmarks/tasks.py): per task and overall, mean accepted length (tau), loop tok/s,
plain tok/s (`generate(plain=True)`: same engine, same capture/compile, one token a step: the headline
baseline), Hugging Face `generate` over a StaticCache compiled by transformers (secondary), time to first
token. Every side generates exactly `--max-new-tokens` tokens (the engine with `ignore_eos=True`, HF with no
EOS token: neither masks EOS, so greedy outputs stay comparable) and the greedy outputs are compared: fp32
must agree exactly; in bf16 the agreement is reported beside HF's own eager-vs-static agreement (the noise
floor of bf16 greedy decoding). `--stop-at-eos`: answers end at their EOS instead, loop and plain alike (the
same tokens when they agree; each side's rate is its own tokens over its time): what a user sees on short
answers, where ignoring EOS makes the target write on past its answer. Warm-up (capture, compile) is timed
apart and excluded. `--sampling` adds a
temperature run (tok/s and tau of loop and plain).

Scale (coral_fast/benchmarks/scale.py, `--scale`): random weights of real 1B-8B configs; step times
against weight-bytes floors, R = round / plain step, projected speed-ups tau / R, and a profile of a round.

Outputs under --out-dir: e2e_suite.{json,csv,md,png}, e2e_scale.{json,csv,md,png}; rewritten as parts finish.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

from coral_fast.benchmarks import report
from coral_fast.benchmarks.tasks import EXTRA_TASKS, SUITE_TASKS, Prompt, load_spec_bench, load_suite
from coral_fast.cli_checks import float_in, nonnegative_int, positive_int

SUITE_SIZES = {"quick": 3, "full": None}  # prompts per task (None: all)
MODES = ("eager", "graphs", "compile", "compile-draft")  # = coral_fast.generate.MODES (tests/test_bench_e2e.py)


def _tree(text: str):
    try:
        depth, topk, total = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tree wants depth,topk,total_tokens (three integers), got {text!r}")
    return depth, topk, total


def build_parser():
    p = argparse.ArgumentParser(prog="coral-fast bench e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2", help="comma list of targets for the suite (smollm2, gemma3-270m, a path)")
    p.add_argument("--suite", default="quick", choices=("quick", "full", "none"),
                   help="built-in task suite: quick = first 3 prompts a task, full = all, none = skip the suite")
    p.add_argument("--tasks", default="all", help=f"comma list of: {', '.join(SUITE_TASKS + EXTRA_TASKS)} (default all: {', '.join(SUITE_TASKS)})")
    p.add_argument("--prompts-per-task", type=positive_int, default=None, help="override the suite size")
    p.add_argument("--prompt-file", default=None,
                   help="Spec-Bench question.jsonl (question_id, category, turns) instead of the built-in suite; "
                        "its first turns, grouped into Spec-Bench's tasks, as many a task as --suite says")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--mode", default=None, choices=MODES, help="engine mode (default: compile-draft on CUDA, eager on CPU)")
    p.add_argument("--draft", default=None, help="draft folder (default: the shipped draft of the model)")
    p.add_argument("--tree", type=_tree, default=(6, 10, 60), help="depth,topk,total_tokens (default 6,10,60)")
    p.add_argument("--lookup", type=int, default=None, help="prompt-lookup chain of L of the tree's tokens "
                   "(default: 10 with the default tree, as the generator's; 0 with another --tree; 0 = off)")
    p.add_argument("--stop-at-eos", action="store_true", help="answers end at their EOS (at most --max-new-tokens), "
                   "loop and plain alike: the same tokens when their greedy outputs agree; rates are each side's own "
                   "tokens / seconds (default: exactly --max-new-tokens, EOS ignored)")
    p.add_argument("--no-adaptive", action="store_true", help="always speculate (no fallback to plain decoding)")
    p.add_argument("--loop-streak", type=nonnegative_int, default=None,
                   help="lookup-chain hits in a row that start a round from plain decoding (default: the generator's "
                        "LOOP_STREAK; 0 = no loop watch)")
    p.add_argument("--ema-alpha", type=float_in(0.0, 1.0, low_open=True), default=None,
                   help="the adaptive policy's EMA weight of a round's tau (default: by the round's cost in plain steps, "
                        "coral_fast.generate.EMA_ALPHA_*)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face generate columns")
    p.add_argument("--noise-prompts", type=int, default=1,
                   help="prompts a task that also run HF eager generate (bf16 eager-vs-static noise floor); 0: none")
    p.add_argument("--sampling", action="store_true", help="also sample (loop and plain) at --temperature")
    p.add_argument("--temperature", type=float_in(0.0, 10.0, low_open=True), default=0.7)  # sampling
    p.add_argument("--scale", default="none",
                   help="comma list of configs on random weights (llama3.2-1b, llama3.1-8b, qwen2.5-7b, gemma3-1b), "
                        "'all', or 'none'")
    p.add_argument("--scale-mode", default="graphs", choices=MODES, help="engine mode of the scale runs")
    p.add_argument("--scale-tokens", type=positive_int, default=64, help="new tokens a scale run generates")
    p.add_argument("--profile", default="llama3.1-8b",
                   help="scale config whose round is profiled by kernel (torch.profiler); 'none' to skip")
    p.add_argument("--taus", default="3,4,5", help="taus to project speed-ups for (the suite's measured tau is added)")
    p.add_argument("--out-dir", default="bench/results/e2e", help="results folder (created)")
    return p


# --- helpers ------------------------------------------------------------------------------------------
PROMPTS = [  # four short chat prompts (benchmarks/profile_loop.py)
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that checks whether a number is prime.",
    "List five countries in Europe and their capitals.",
    "What is the difference between a list and a tuple in Python?",
]


def prompt_ids(tokenizer, text, vocab, device, seed):
    """Ids [P] of one user turn (chat template if any); random ids of a chat-prompt length without a tokenizer."""
    import torch

    if tokenizer is None:
        return torch.randint(0, vocab, (48,), generator=torch.Generator().manual_seed(seed)).to(device)
    return encode(tokenizer, Prompt(f"p{seed}", "chat", [text]), device)


def synchronize(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    """(fn(), wall seconds), the device synchronised on both sides."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def common_prefix(a, b) -> int:
    """Tokens equal before the first difference (greedy outputs diverge for good after one)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode(tokenizer, prompt: Prompt, device):
    """Prompt ids [P] int64: the chat template when the tokenizer has one, else plain text; a document to
    continue goes to a base model as plain text (models.document_ids)."""
    import torch

    from coral_fast.models import chat_prompt_ids, document_ids

    ids = document_ids(tokenizer, prompt.messages())
    if ids is None:
        ids = chat_prompt_ids(tokenizer, prompt.messages())
    if ids is None:
        ids = tokenizer(prompt.text()).input_ids
    return torch.tensor(ids, dtype=torch.int64, device=device)


def engine_api_missing() -> str | None:
    """Why the engine API this bench needs is not there (None when it is): `mode=`, `plain=`, `ignore_eos=`."""
    from coral_fast.generate import SpeculativeGenerator

    init = inspect.signature(SpeculativeGenerator.__init__).parameters
    gen = inspect.signature(SpeculativeGenerator.generate).parameters
    missing = [n for n in ("mode", "adaptive") if n not in init] + [n for n in ("plain", "ignore_eos") if n not in gen]
    return f"SpeculativeGenerator lacks {', '.join(missing)} (the engine of issue 16)" if missing else None


def make_generator(model, draft, tree, mode, adaptive=True, max_context=None):
    from coral_fast.generate import SpeculativeGenerator, TreeConfig

    return SpeculativeGenerator(model, draft, tree=TreeConfig(*tree), mode=mode, max_context=max_context,
                                adaptive=adaptive)


class HFStatic:
    """`model.generate` over one StaticCache sized once for the whole run (what cache_implementation="static"
    builds, but not rebuilt per prompt length, so transformers compiles its decode step once), plus the
    eager dynamic-cache generate for the noise floor. EOS is off: exactly n tokens, EOS not masked."""

    def __init__(self, model, max_len: int):
        from transformers import StaticCache

        self.model = model
        model.generation_config.eos_token_id = None
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = 0
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x

    def _generate(self, ids, n, **kw):
        import torch

        mask = torch.ones(1, ids.shape[0], dtype=torch.int64, device=ids.device)
        out = self.model.generate(ids[None], attention_mask=mask, max_new_tokens=n, do_sample=False, **kw)
        return out[0, ids.shape[0]:].tolist()

    def static(self, ids, n):
        self.cache.reset()
        return self._generate(ids, n, **{self.cache_kw: self.cache})

    def eager(self, ids, n):
        return self._generate(ids, n)


def load_draft(model, name: str, path: str | None):
    """(draft, label): --draft, else the shipped draft of `name`, else a random one (tau ~ 1)."""
    import torch

    from coral_fast.draft import DraftModel
    from coral_fast.generate_cli import shipped_draft

    path = path or shipped_draft(name)
    if path:
        return DraftModel.from_pretrained(path, model), f"trained ({os.path.basename(path.rstrip('/'))})"
    torch.manual_seed(0)
    return DraftModel.random_init(model), "untrained (random init)"


# --- the suite ---------------------------------------------------------------------------------------
def _round_tau(result) -> float:
    """Tokens a speculative round commits (plain steps of the fallback not counted); NaN without rounds."""
    return sum(result.accepted_lengths) / result.rounds if result.rounds else float("nan")


def run_prompt(gen, hf, ids, prompt, i, args, device, noise: bool) -> dict:
    """One prompt: loop and plain greedy (+ sampling), HF static (+ eager for the noise floor)."""
    import torch

    N, ignore_eos = args.max_new_tokens, not args.stop_at_eos
    loop, loop_s = timed(lambda: gen.generate(ids, N, ignore_eos=ignore_eos), device)
    plain, plain_s = timed(lambda: gen.generate(ids, N, plain=True, ignore_eos=ignore_eos), device)
    # new_tokens: the loop's answer (N unless it ended at its EOS); agreements are shares of it
    row = dict(task=prompt.task, id=prompt.id, prompt_len=int(ids.shape[0]), new_tokens=len(loop.token_ids),
               loop_tokens=len(loop.token_ids), plain_tokens=len(plain.token_ids))
    row.update(loop_tok_s=len(loop.token_ids) / loop_s, plain_tok_s=len(plain.token_ids) / plain_s,
               loop_s=loop_s, plain_s=plain_s, loop_ttft_s=loop.prefill_time_s, plain_ttft_s=plain.prefill_time_s,
               rounds=loop.rounds, accepted=sum(loop.accepted_lengths), tau=_round_tau(loop),
               plain_steps=getattr(loop, "plain_steps", 0), loop_probes=loop.loop_probes, draft_s=loop.draft_time_s,
               verify_s=loop.verify_time_s,
               loop_vs_plain=common_prefix(loop.token_ids, plain.token_ids))
    if ignore_eos and (len(loop.token_ids) != N or len(plain.token_ids) != N):
        raise RuntimeError(f"ignore_eos gave {len(loop.token_ids)} / {len(plain.token_ids)} tokens, asked {N}")
    if hf is not None:  # exactly N tokens (no EOS): a rate per token; agreement up to the loop's answer
        ref, hf_s = timed(lambda: hf.static(ids, N), device)
        row.update(hf_tokens=len(ref), hf_tok_s=len(ref) / hf_s, hf_s=hf_s, loop_vs_hf=common_prefix(loop.token_ids, ref),
                   plain_vs_hf=common_prefix(plain.token_ids, ref))
        if noise:
            eager = hf.eager(ids, N)
            row.update(hf_eager_vs_static=common_prefix(eager, ref))
    if args.sampling:
        seed = lambda: torch.Generator().manual_seed(1000 + i)  # noqa: E731
        T = args.temperature
        s_loop, s_loop_s = timed(lambda: gen.generate(ids, N, temperature=T, generator=seed(), ignore_eos=ignore_eos),
                                 device)
        s_plain, s_plain_s = timed(lambda: gen.generate(ids, N, temperature=T, generator=seed(), plain=True,
                                                        ignore_eos=ignore_eos), device)
        row.update(sample_loop_tokens=len(s_loop.token_ids), sample_plain_tokens=len(s_plain.token_ids),
                   sample_loop_tok_s=len(s_loop.token_ids) / s_loop_s, sample_plain_tok_s=len(s_plain.token_ids) / s_plain_s,
                   sample_loop_s=s_loop_s, sample_plain_s=s_plain_s, sample_rounds=s_loop.rounds,
                   sample_accepted=sum(s_loop.accepted_lengths), sample_tau=_round_tau(s_loop))
    return row


def lookup_of(args) -> int:
    """--lookup, or its default: the generator's chain with the default tree, none with another --tree."""
    from coral_fast.generate import DEFAULT_TREE

    if args.lookup is not None:
        return args.lookup
    return DEFAULT_TREE.lookup if tuple(args.tree) == (DEFAULT_TREE.depth, DEFAULT_TREE.topk, DEFAULT_TREE.total_tokens) else 0


def run_suite(model, tokenizer, draft, prompts: list[Prompt], args, log, name="model", draft_label="",
              on_task_done=None) -> dict:
    """The suite on one target: {"meta": ..., "rows": [per prompt], "tasks": [per task + overall]}.
    on_task_done(part) is called after each task (incremental results files)."""
    from coral_fast.benchmarks.scale import copy_bandwidth, weight_bytes
    from coral_fast.generate import LOOP_STREAK, ema_alpha_for

    device = next(model.parameters()).device
    encoded = [encode(tokenizer, p, device) for p in prompts]
    w_bytes, bandwidth = weight_bytes(model), copy_bandwidth(device)
    t0 = time.perf_counter()
    gen = make_generator(model, draft, (*args.tree, lookup_of(args)), args.mode, adaptive=not args.no_adaptive)
    if args.loop_streak is not None:
        gen.policy_options["loop_streak"] = args.loop_streak
    if args.ema_alpha is not None:
        gen.policy_options["alpha"] = args.ema_alpha
    warmup_s = gen.warmup()
    log(f"{name}: engine warm-up {warmup_s:.1f} s (mode {args.mode or 'default'}; constructor + warm-up "
        f"{time.perf_counter() - t0:.1f} s); round {1e3 * gen.round_time_s:.3f} ms, plain step "
        f"{1e3 * gen.plain_step_time_s:.3f} ms")
    args = argparse.Namespace(**vars(args))  # a part that fails below is switched off for this model only
    if args.sampling:  # sampling steps may be captured on first use: keep that out of the timings
        import torch

        try:
            _, s = timed(lambda: gen.generate(encoded[0], 8, temperature=args.temperature,
                                              generator=torch.Generator().manual_seed(0), ignore_eos=True), device)
            _, s2 = timed(lambda: gen.generate(encoded[0], 8, temperature=args.temperature, plain=True,
                                               generator=torch.Generator().manual_seed(0), ignore_eos=True), device)
            warmup_s += s + s2
            log(f"{name}: first sampling requests (warm-up) {s + s2:.1f} s")
        except Exception as e:
            log(f"{name}: sampling skipped, its warm-up failed: {type(e).__name__}: {e}")
            args.sampling = False
    hf, hf_warmup_s = None, 0.0
    if not args.no_hf:
        max_len = max(int(ids.shape[0]) for ids in encoded) + args.max_new_tokens + 8
        try:
            hf = HFStatic(model, max_len)
            for _ in range(2):  # transformers compiles its decode step on first use (and captures on the second)
                _, s = timed(lambda: hf.static(encoded[0], args.max_new_tokens), device)
                hf_warmup_s += s
            log(f"{name}: HF static generate warm-up {hf_warmup_s:.1f} s (cache {max_len} slots)")
        except Exception as e:
            log(f"{name}: HF static generate skipped, its warm-up failed: {type(e).__name__}: {e}")
            hf = None
    meta = dict(model=name, draft=draft_label, dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                mode=gen.mode, tree=list(args.tree), lookup=lookup_of(args),
                adaptive=not args.no_adaptive, max_new_tokens=args.max_new_tokens, stop_at_eos=args.stop_at_eos,
                loop_streak=gen.policy_options.get("loop_streak", LOOP_STREAK),
                ema_alpha=gen.policy_options.get("alpha") or ema_alpha_for(gen.round_time_s, gen.plain_step_time_s),
                warmup_s=warmup_s,
                hf_warmup_s=hf_warmup_s, round_ms=1e3 * gen.round_time_s,
                plain_step_ms=1e3 * gen.plain_step_time_s, weight_gb=w_bytes / 1e9, copy_tb_s=bandwidth / 1e12,
                plain_floor_ms=1e3 * w_bytes / bandwidth, temperature=args.temperature if args.sampling else None)
    part = dict(meta=meta, rows=[], tasks=[])
    seen: dict[str, int] = {}
    for i, (prompt, ids) in enumerate(zip(prompts, encoded)):
        k = seen[prompt.task] = seen.get(prompt.task, 0) + 1
        row = run_prompt(gen, hf, ids, prompt, i, args, device, noise=k <= args.noise_prompts)
        row["model"] = name
        part["rows"].append(row)
        log(f"  {prompt.id}: P={row['prompt_len']} tau {row['tau']:.2f} loop {row['loop_tok_s']:.0f} tok/s, plain "
            f"{row['plain_tok_s']:.0f}" + (f", HF {row['hf_tok_s']:.0f}" if hf else "") +
            f"; agree loop=plain {row['loop_vs_plain']}/{args.max_new_tokens}")
        last_of_task = i + 1 == len(prompts) or prompts[i + 1].task != prompt.task
        if last_of_task:
            part["tasks"] = report.summarize(part["rows"])
            if on_task_done:
                on_task_done(part)
    part["meta"]["long_prompt"] = long_prompt_check(gen, encoded, args, device, log, name)
    if on_task_done:
        on_task_done(part)
    return part


def long_prompt_check(gen, encoded, args, device, log, name, target_len: int = 3000) -> dict:
    """Time to first token of a ~3,000-token prompt (the suite's prompts end to end) on the warm engine,
    and the captures/compiles it caused (must be none: the engine is sized once for max_context)."""
    import torch

    ids = torch.cat(encoded)
    while ids.shape[0] < target_len:
        ids = torch.cat([ids, ids])
    ids = ids[:min(target_len, gen.max_context - 64)]
    before = (gen.captures, gen.compiles)
    out = {"prompt_len": int(ids.shape[0])}
    for label, plain in (("loop", False), ("plain", True)):
        result = gen.generate(ids, 32, plain=plain, ignore_eos=True)
        out[f"ttft_s_{label}"] = round(result.prefill_time_s, 4)
        out[f"tok_s_{label}"] = round(result.tokens_per_s, 2)
    out["captures_after_warmup"] = gen.captures - before[0]
    out["compiles_after_warmup"] = gen.compiles - before[1]
    log(f"{name}: {out['prompt_len']}-token prompt on the warm engine: time to first token "
        f"{1e3 * out['ttft_s_loop']:.1f} ms (plain mode {1e3 * out['ttft_s_plain']:.1f} ms), "
        f"new captures {out['captures_after_warmup']}, new compiled graphs {out['compiles_after_warmup']}")
    return out


def fp32_disagreements(part) -> list[str]:
    """fp32 greedy must be identical: loop == plain == HF static, every prompt."""
    if part["meta"]["dtype"] != "float32":
        return []
    bad = []
    for r in part["rows"]:
        for key in ("loop_vs_plain", "loop_vs_hf"):
            if key in r and r[key] != r["new_tokens"]:
                bad.append(f"{r['model']} {r['id']}: {key} agree on {r[key]}/{r['new_tokens']} tokens (fp32 must be identical)")
    return bad


def environment(argv) -> dict:
    import platform

    import torch
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    return dict(device=device, torch=torch.__version__, triton=triton_version, transformers=transformers.__version__,
                date=time.strftime("%Y-%m-%d %H:%M"), command="coral-fast bench e2e " + " ".join(argv))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from coral_fast.benchmarks.scale import SCALE_CONFIGS

    # everything a typo can break is checked before any model loads
    try:
        if args.suite == "none" and not args.prompt_file:
            prompts = []
        elif args.prompt_file:  # --suite quick/full sizes it too (Spec-Bench has 480 questions)
            prompts = load_spec_bench(args.prompt_file, args.prompts_per_task or SUITE_SIZES.get(args.suite))
        else:
            prompts = load_suite(args.tasks, args.prompts_per_task or SUITE_SIZES[args.suite])
        scale = [] if args.scale == "none" else (list(SCALE_CONFIGS) if args.scale == "all" else args.scale.split(","))
        unknown = [c for c in scale if c not in SCALE_CONFIGS]
        if unknown:
            raise ValueError(f"unknown --scale config {unknown[0]!r}; known: {', '.join(SCALE_CONFIGS)}, all, none")
        taus = [float(t) for t in args.taus.split(",") if t]
        if any(not 1 <= t <= 64 for t in taus):
            raise ValueError(f"--taus must be numbers in [1, 64], got {args.taus!r}")
        if args.noise_prompts < 0:
            raise ValueError(f"--noise-prompts must be >= 0, got {args.noise_prompts}")
        from coral_fast.generate import TreeConfig

        TreeConfig(*args.tree, lookup=lookup_of(args))  # the tree and its lookup chain, before any model loads
    except ValueError as e:
        print(f"bench e2e: {e}", file=sys.stderr)
        return 2
    if not prompts and not scale:
        print("bench e2e: nothing to run (--suite none and --scale none)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench e2e: needs a CUDA GPU (--device cuda); use --device cpu for a smoke run", file=sys.stderr)
        return 2
    missing = engine_api_missing()
    if missing:
        print(f"bench e2e: {missing}", file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    env = environment(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(" | ".join(f"{k} {v}" for k, v in env.items()))
    from coral_fast.models import load_target, parse_dtype

    status = 0
    suite = dict(env=env, parts=[])
    write_suite = lambda: report.write_suite(suite, args.out_dir, plot=False)  # noqa: E731
    for name in args.models.split(",") if prompts else []:
        try:
            t0 = time.perf_counter()
            model, tokenizer = load_target(name, dtype=parse_dtype(args.dtype), device=args.device)
            model.requires_grad_(False)
            draft, label = load_draft(model, name, args.draft)
            log(f"{name}: loaded in {time.perf_counter() - t0:.1f} s; draft {label}; {len(prompts)} prompts")
            suite["parts"].append(None)
            def done(part):  # noqa: E306
                suite["parts"][-1] = part
                write_suite()
            part = run_suite(model, tokenizer, draft, prompts, args, log, name=name, draft_label=label,
                             on_task_done=done)
            done(part)
            for line in fp32_disagreements(part):
                log(f"bench e2e: FAIL {line}")
                status = 1
            del model, draft
        except Exception as e:  # keep the other parts' numbers
            import traceback

            traceback.print_exc()
            log(f"bench e2e: {name} failed: {type(e).__name__}: {e}")
            status = 1
        suite["parts"] = [p for p in suite["parts"] if p is not None]
    if suite["parts"]:
        paths = report.write_suite(suite, args.out_dir, plot=True)
        log(open(paths["md"]).read())
        for part in suite["parts"]:  # the measured tau joins the projected speed-ups
            overall = part["tasks"][-1]
            taus.append(round(overall["tau"], 2))
    if scale:
        from coral_fast.benchmarks.scale import run_scale

        try:
            run_scale(scale, args, env, taus, log)
        except Exception as e:
            import traceback

            traceback.print_exc()
            log(f"bench e2e: scale failed: {type(e).__name__}: {e}")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
