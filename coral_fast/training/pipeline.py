"""Data + training + evaluation + ablation in one process, inside a fixed time budget.

    python -m coral_fast.training.pipeline --model smollm2|gemma3-270m --out OUT [--budget 560]

Used by `dev/gpu_train.sh` for one device call: the target is loaded once, every stage has a
deadline, and the stages run in order of importance:
  1. data (token ids; per chunk of prompts round 0 greedy, then sampled rounds, while time allows;
     the shipped prompt set or `--synth N` prompts made by the target)
  2. the shipped draft: multi-step (3) + CSRA, grouped head (router, contiguous G=32, a=4)
  3. its acceptance through the real loop (greedy, EAGLE-2 tree depth 6 / top-k 10 / 60 tokens)
  4. ablation at equal iterations: single-step, multi-step, multi-step + CSRA; grouped vs dense
     head; acceptance as fewer groups are active
Writes OUT/<model>/{config.json,model.safetensors}, OUT/results.json, OUT/ablation.md, OUT/train_main.jsonl.
Large vocabularies (Gemma 3: 262144 ids) get smaller batches by default (--batch-tokens, the target's
forward batch of the data stage) so that the full-vocabulary logits fit.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
import traceback
from pathlib import Path

import torch

from coral_fast.training.cli import build_draft, save_small
from coral_fast.models import load_target
from coral_fast.training.data import DataSettings, generate_dataset, load_shards
from coral_fast.training.evaluate import baseline_tokens_per_s, loop_acceptance
from coral_fast.training.prompts import load_prompts
from coral_fast.training.trainer import SequenceData, TrainConfig, chain_acceptance, token_groups_of, train


class Clock:
    def __init__(self, budget: float):
        self.start = time.perf_counter()
        self.budget = budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()

    def deadline(self, seconds_from_now: float) -> float:
        return time.perf_counter() + min(seconds_from_now, max(self.left(), 0))


def log(msg, **kv):
    print(f"[pipeline] {msg} " + json.dumps(kv, default=str), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m coral_fast.training.pipeline")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", default="/tmp/coral_data")
    p.add_argument("--budget", type=float, default=555.0, help="seconds for everything")
    p.add_argument("--data-budget", type=float, default=80.0)
    p.add_argument("--main-budget", type=float, default=400.0)
    p.add_argument("--ablation-budget", type=float, default=25.0, help="seconds of the multi+CSRA ablation run; the others match its iterations")
    p.add_argument("--samples", type=int, default=11)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--gen-batch", type=int, default=256, help="prompts per data chunk (one shard per chunk and round)")
    p.add_argument("--synth", type=int, default=0, help="synthesize N prompts with the target instead of the shipped set")
    p.add_argument("--max-seq-len", type=int, default=2048, help="training sequences are cut to this many tokens")
    p.add_argument("--batch-tokens", type=int, default=None, help="padded tokens per training batch (default 16384; 8192 above 65536 ids)")
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--main-eval-every", type=int, default=500, help="held-out estimate every N iterations (best kept)")
    p.add_argument("--eval-prompts", type=int, default=40)
    p.add_argument("--ablation-eval-prompts", type=int, default=20)
    p.add_argument("--eval-new-tokens", type=int, default=128)
    p.add_argument("--main-loop-s", type=float, default=30.0, help="seconds for each loop evaluation of the shipped draft (after its warm-up)")
    p.add_argument("--ablation-loop-s", type=float, default=12.0, help="seconds for each ablation loop evaluation (after its warm-up)")
    p.add_argument("--ablation-active-groups", type=int, nargs="*", default=[1, 2, 8], help="loop evaluations of the shipped draft with these a")
    p.add_argument("--main-from", default=None, help="start the shipped draft from this draft folder (e.g. coral_fast/drafts/smollm2); with --main-budget 0 it is only evaluated")
    p.add_argument("--skip-ablation", action="store_true", help="spend the whole budget on the shipped draft and its evaluation")
    p.add_argument("--limit-prompts", type=int, default=None, help="smoke tests: fewer prompts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    clock = Clock(args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results: dict = {"env": {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": _version("triton"), "transformers": _version("transformers"),
        "date": time.strftime("%Y-%m-%d"),
    }, "args": vars(args)}

    def save_results():
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        (out / "ablation.md").write_text(render_markdown(results))

    if args.model.startswith("random:"):  # GPU smoke test without the model file
        target, tokenizer = random_target(args.model.split(":", 1)[1], dtype, args.device)
    else:
        target, tokenizer = load_target(args.model, dtype, args.device)
    target.requires_grad_(False)
    vocab_size = target.get_output_embeddings().weight.shape[0]
    large_vocab = vocab_size > 65536
    if args.batch_tokens is None:
        args.batch_tokens = 8192 if large_vocab else 16384
    results["env"]["vocab_size"] = vocab_size
    log("target loaded", seconds=round(clock.elapsed(), 1), vocab_size=vocab_size, batch_tokens=args.batch_tokens)

    # 1. data ---------------------------------------------------------------------------------------
    prompts = load_prompts()
    if args.limit_prompts:
        prompts = [r for r in prompts if r["split"] == "eval"][: max(2, args.limit_prompts // 8)] + [r for r in prompts if r["split"] == "train"][: args.limit_prompts]
    settings = DataSettings(max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch, gen_rows=min(args.gen_batch, 256), samples=args.samples, synth=args.synth)
    t0 = time.perf_counter()
    stats = generate_dataset(target, tokenizer, None if args.synth else prompts, args.data_dir, settings, model_name=args.model,
                             progress=not args.no_progress, deadline=clock.deadline(args.data_budget))
    results["data"] = {**stats, "seconds": round(time.perf_counter() - t0, 1)}
    log("data", **results["data"])
    # token-only shards: the target recomputes features and top-16 for every batch
    data = SequenceData(load_shards(args.data_dir), device=device, max_seq_len=args.max_seq_len, target=target, topk=16)
    mask_cumsum = torch.cat([torch.zeros(1, dtype=torch.int64), data.loss_mask.cpu().long().cumsum(0)])
    results["data"].update(train_seqs=len(data.train), eval_seqs=len(data.eval),
                           train_answer_tokens=int(sum(int(mask_cumsum[e] - mask_cumsum[s]) for s, e in data.train)))
    save_results()

    eval_rows = [r for r in prompts if r["split"] == "eval"]
    proxy_groups = [1, 2, 4, 8, 16, 32]

    def new_draft():
        return build_draft(target, args.model, "contiguous", 32, 4, data, device)

    def run(name, cfg, budget, draft=None):
        draft = new_draft() if draft is None else draft
        cfg.time_budget_s = budget
        t = time.perf_counter()
        history = train(draft, data, cfg, out_dir=None, progress=not args.no_progress, eval_groups=proxy_groups,
                        log_fn=lambda r: print(json.dumps({"run": name, **r}), file=train_log, flush=True))
        entry = {"iterations": history["iterations"], "best_iteration": history.get("best_iteration"), "evals": [(r["iteration"], round(r["eval"]["tau"], 4)) for r in history["eval"]], "train_seconds": round(time.perf_counter() - t, 1),
                 "proxy": history["final_eval"], "last_train": history["train"][-1] if history["train"] else None,
                 "config": cfg.to_dict()}
        results.setdefault("runs", {})[name] = entry
        log(f"trained {name}", iterations=entry["iterations"], seconds=entry["train_seconds"], proxy_tau=(entry["proxy"] or {}).get("tau"))
        save_results()
        return draft

    def loop_eval(name, draft, rows, allowance=None, **kw):
        if clock.left() < 15:
            log(f"skip loop eval {name}: out of time")
            return None
        t = time.perf_counter()
        draft.to(dtype)  # as shipped: from_pretrained puts the draft in the target's dtype
        try:
            r = loop_acceptance(target, tokenizer, draft, rows, max_new_tokens=args.eval_new_tokens, deadline=clock.deadline(clock.left() - 5), timed_s=allowance, **kw)
        except Exception as error:  # keep the other stages: the numbers of this one are simply missing
            traceback.print_exc()
            results.setdefault("errors", {})[f"loop {name}"] = repr(error)
            save_results()
            return None
        finally:
            draft.to(torch.float32)
        r["seconds"] = round(time.perf_counter() - t, 1)
        results.setdefault("loop", {})[name] = r
        log(f"loop {name}", **r)
        save_results()
        return r

    base_cfg = TrainConfig(unroll_steps=3, w_csra=0.1, lr=args.lr, batch_tokens=args.batch_tokens, warmup=50,
                           iters=100_000, eval_every=0, checkpoint_every=0, eval_unroll=6, eval_max_seqs=96)
    with open(out / "train_main.jsonl", "w") as train_log:
        # 2. the shipped draft ---------------------------------------------------------------------
        # everything after the shipped draft needs about this much; the shipped draft gets the rest
        # (each loop evaluation also has an untimed warm-up of a few seconds: graph capture)
        reserve = 2 * (args.main_loop_s + 8) + len(args.ablation_active_groups) * (args.ablation_loop_s + 8) + 35
        if not args.skip_ablation:
            reserve += 3 * (args.ablation_budget + args.ablation_loop_s + 12)
        main_cfg = copy.deepcopy(base_cfg)
        main_cfg.__dict__.update(eval_every=args.main_eval_every, keep_best=True)
        main_budget = max(30.0, min(args.main_budget, clock.left() - reserve))
        if args.main_from:
            main_draft = build_draft(target, args.model, "contiguous", 32, 4, data, device, init_from=args.main_from)
            start = chain_acceptance(main_draft, data, data.eval[:96], 6, args.batch_tokens, proxy_groups, token_groups_of(main_draft).to(device), device.type == "cuda")
            results.setdefault("runs", {})[f"from {args.main_from}"] = {"iterations": 0, "train_seconds": 0.0, "proxy": start}
            log("main draft loaded", path=args.main_from, proxy_tau=start["tau"])
            if args.main_budget > 0:
                main_cfg.warmup = 20
                main_draft = run("main: continued from " + args.main_from, main_cfg, main_budget, main_draft)
        else:
            log("main budget", seconds=round(main_budget, 1), reserve=reserve)
            main_draft = run("main: multi-step 3 + CSRA", main_cfg, main_budget)
        save_small(main_draft, out / args.model)
        # 3. its acceptance through the loop -------------------------------------------------------
        loop_eval("main grouped a=4", main_draft, eval_rows[: args.eval_prompts], args.main_loop_s)
        loop_eval("main dense", main_draft, eval_rows[: args.eval_prompts], args.main_loop_s, head="dense")
        # 4. ablation at equal iterations ------------------------------------------------------------
        abl_rows = eval_rows[: args.ablation_eval_prompts]
        try:
            if not args.skip_ablation and clock.left() > 3 * args.ablation_budget + 3 * args.ablation_loop_s + 20:
                csra_draft = run("ablation: multi-step 3 + CSRA", copy.deepcopy(base_cfg), args.ablation_budget)
                n_iters = results["runs"]["ablation: multi-step 3 + CSRA"]["iterations"]
                fixed = dict(iters=n_iters, time_budget_s=0.0)
                loop_eval("ablation multi+CSRA", csra_draft, abl_rows, args.ablation_loop_s)
                del csra_draft
                _free()
                single = copy.deepcopy(base_cfg)
                single.__dict__.update(unroll_steps=1, w_csra=0.0, **fixed)
                single_draft = run("ablation: single-step (EAGLE)", single, 0)
                loop_eval("ablation single-step", single_draft, abl_rows, args.ablation_loop_s)
                del single_draft
                _free()
                multi = copy.deepcopy(base_cfg)
                multi.__dict__.update(w_csra=0.0, **fixed)
                multi_draft = run("ablation: multi-step 3", multi, 0)
                loop_eval("ablation multi-step", multi_draft, abl_rows, args.ablation_loop_s)
                del multi_draft
                _free()
        except Exception as error:
            traceback.print_exc()
            results.setdefault("errors", {})["ablation"] = repr(error)
        for a in args.ablation_active_groups:
            loop_eval(f"main grouped a={a}", main_draft, abl_rows, args.ablation_loop_s, active_groups=a)
    if clock.left() > 20:
        try:
            results["baseline_generate_tok_s"] = baseline_tokens_per_s(target, tokenizer, eval_rows[:4], max_new_tokens=args.eval_new_tokens)
        except Exception as error:
            traceback.print_exc()
            results.setdefault("errors", {})["baseline"] = repr(error)
    results["total_seconds"] = round(clock.elapsed(), 1)
    save_results()
    log("done", seconds=results["total_seconds"])
    return 0


class ByteChatTokenizer:
    """A stand-in chat tokenizer (bytes of the text) for smoke tests with a random target."""

    chat_template = "bytes"
    pad_token_id = 0
    eos_token_id = 2

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return [1] + [3 + b for b in text.encode()[:200]]


def random_target(name: str, dtype, device):
    """A random-weight target with the shapes of `name` (smollm2 only) and a byte tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name != "smollm2":
        raise ValueError(f"random targets: smollm2 only, got {name!r}")
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = 2
    return model, ByteChatTokenizer(config.vocab_size)


def _free():
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _version(name):
    try:
        return __import__(name).__version__
    except Exception:
        return None


def render_markdown(results: dict) -> str:
    env = results.get("env", {})
    lines = [
        f"# Draft training and loop evaluation ({results.get('args', {}).get('model')} target)",
        "",
        f"Device: {env.get('device')}; torch {env.get('torch')}, triton {env.get('triton')}, transformers {env.get('transformers')}; {env.get('date')}.",
        "Produced by `dev/gpu_train.sh` (`python -m coral_fast.training.pipeline`) in one device call.",
        "",
    ]
    data = results.get("data")
    if data:
        lines += [f"Data: {data.get('train_seqs')} train / {data.get('eval_seqs')} held-out sequences, "
                  f"{data.get('train_answer_tokens')} train answer tokens, generated in {data.get('seconds')} s.", ""]
    runs = results.get("runs", {})
    if runs:
        lines += ["## Training runs (held-out teacher-forced chain estimate, depth 6)", "",
                  "| run | iterations | train s | chain tau (dense) | a=1 | a=2 | a=4 | a=8 | a=32 | step acc d0..d5 |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in runs.items():
            pr = r.get("proxy") or {}
            acc = " ".join(f"{x:.2f}" for x in pr.get("step_acc", []))
            cells = [f"{pr.get(k, float('nan')):.3f}" if isinstance(pr.get(k), float) else "-" for k in ("tau", "tau_a1", "tau_a2", "tau_a4", "tau_a8", "tau_a32")]
            lines.append(f"| {name} | {r['iterations']} | {r['train_seconds']} | " + " | ".join(cells) + f" | {acc} |")
        lines.append("")
    loop = results.get("loop", {})
    if loop:
        lines += ["## Real draft/verify loop (greedy, EAGLE-2 tree depth 6, top-k 10, 60 tokens; held-out chat prompts)", "",
                  "| setting | head | active groups | prompts | new tokens | mean accepted length | tokens/s |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in loop.items():
            lines.append(f"| {name} | {r['head']} | {r['active_groups'] if r['head'] == 'grouped' else 'all'} | {r['prompts']} | {r['new_tokens']} | "
                         f"{r['mean_accepted_length']:.3f} | {r['tokens_per_s']:.1f} |")
        lines.append("")
    if "baseline_generate_tok_s" in results:
        lines += [f"Plain `model.generate` (eager, greedy) on the same machine: {results['baseline_generate_tok_s']:.1f} tokens/s.", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
