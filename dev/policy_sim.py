"""The adaptive policy's decisions on this CPU (fp32, eager) under a GPU's measured costs, per prompt: rounds,
plain steps, probes; modelled time = rounds x round + plain steps x plain step (prefill, the draft's catch-up
and the host's own work left out). The decisions are the GPU's as far as fp32 text is bf16's: replaying Gemma's
continuation run at its H100 costs gave the same plain steps on its first six prompts and the same overall 1.3x.

    python dev/policy_sim.py --model gemma3-270m --tasks continuation --suite full --round-ms 6.525 \
        --plain-ms 3.318 --variants old,watch,forced --out bench/results/policy_NAME
variants: old (no loop watch: policy option loop_streak=0), watch (the generator as shipped, or --loop-streak N),
forced (adaptive=False). --data DIR replays a data set's held-out prompts instead of the suite (choose constants there).
Writes OUT.json (every prompt's counts and tokens) and OUT.md (per task and overall: modelled speed-up over
plain decoding, plain steps, loop probes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--draft", default=None, help="draft folder (default: the model's shipped draft)")
    p.add_argument("--tasks", default="all")
    p.add_argument("--data", default=None, help="prompts from a training data folder (gpu_data.sh / coral-fast data) instead "
                   "of the task suite: --per-task of each task's prompts, greedy ones, chosen with --seed (policy "
                   "constants are chosen on its held-out split, then checked on the suite)")
    p.add_argument("--per-task", type=int, default=3)
    p.add_argument("--split", default="eval", choices=("eval", "train"), help="--data's held-out split (default; the "
                   "draft never trained on it) or its training prompts (answers the draft has learnt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=None, help="the policy's EMA weight of the latest round (default: "
                   "by the cost ratio, coral_fast.generate.ema_alpha_for)")
    p.add_argument("--suite", default="quick", choices=("quick", "full"))
    p.add_argument("--round-ms", type=float, required=True, help="a round's cost on the GPU (e2e's warm-up line)")
    p.add_argument("--plain-ms", type=float, required=True, help="a plain step's cost on the GPU")
    p.add_argument("--lookup", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--variants", default="old,watch")
    p.add_argument("--loop-streak", type=int, default=None, help="the watch variant's streak (default: LOOP_STREAK)")
    p.add_argument("--out", required=True, help="output stem (OUT.json, OUT.md)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tqdm.auto import tqdm

    from coral_fast.benchmarks.e2e import encode, environment, make_generator
    from coral_fast.benchmarks.tasks import load_suite
    from coral_fast.draft import DraftModel
    from coral_fast.models import load_target

    round_s, plain_s = args.round_ms * 1e-3, args.plain_ms * 1e-3
    model, tok = load_target(args.model, dtype=torch.float32, device="cpu")
    model.requires_grad_(False)
    if args.data:
        prompts, encoded = data_prompts(args.data, args.per_task, args.seed, args.split == "eval")
    else:
        prompts = load_suite(args.tasks, 3 if args.suite == "quick" else None)
        encoded = [encode(tok, q, torch.device("cpu")) for q in prompts]
    draft = DraftModel.from_pretrained(args.draft or os.path.join("coral_fast", "drafts", args.model), model)
    result = dict(env=environment(sys.argv[1:]), settings=vars(args), runs={})
    result["env"]["command"] = "python dev/policy_sim.py " + " ".join(sys.argv[1:])
    for variant in args.variants.split(","):
        if variant not in ("old", "watch", "forced"):
            raise SystemExit(f"policy_sim: unknown variant {variant!r} (old, watch, forced)")
        gen = make_generator(model, draft, (6, 10, 60, args.lookup, True), "eager", adaptive=variant != "forced")
        gen.policy_options = {} if args.alpha is None else dict(alpha=args.alpha)
        if variant == "old":
            gen.policy_options["loop_streak"] = 0
        elif variant == "watch" and args.loop_streak is not None:
            gen.policy_options["loop_streak"] = args.loop_streak
        gen.warmup()
        gen.round_time_s, gen.plain_step_time_s, gen.refine_costs = round_s, plain_s, False  # the GPU's costs
        rows = []
        for q, ids in zip(tqdm(prompts, desc=variant, file=sys.stderr), encoded):
            r = gen.generate(ids, args.max_new_tokens)
            rows.append(dict(task=q.task, id=q.id, tokens=len(r.token_ids), rounds=r.rounds, plain=r.plain_steps,
                             scouted=r.scouted, loop_probes=r.loop_probes, token_ids=r.token_ids,
                             model_ms=1e3 * (r.rounds * round_s + r.plain_steps * plain_s)))
        result["runs"][variant] = rows
        json.dump(result, open(args.out + ".json", "w"), indent=1)
    open(args.out + ".md", "w").write(table(result) + "\n")
    print(table(result))


def data_prompts(folder: str, per_task: int, seed: int, held_out: bool):
    """per_task prompts of each task in a data folder, from its eval split (held_out) or its training split,
    greedy answers only: the prompts as records with task and id, and their token ids [P] int64."""
    import random
    from types import SimpleNamespace

    from coral_fast.training.data import load_shards

    data = load_shards(folder)
    rng = random.Random(seed)
    prompts, encoded = [], []
    for t, task in enumerate(data["tasks"]):
        rows = [i for i in range(len(data["prompt_lengths"])) if data["task_ids"][i] == t
                and bool(data["is_eval"][i]) == held_out and not data["sampled"][i]]
        for i in sorted(rng.sample(rows, min(per_task, len(rows)))):
            start = int(data["offsets"][i])
            prompts.append(SimpleNamespace(task=task, id=f"{task}-{i}"))
            encoded.append(data["input_ids"][start:start + int(data["prompt_lengths"][i])].long())
    return prompts, encoded


def table(result: dict) -> str:
    """Per task: modelled speed-up over plain decoding (tokens x plain step / modelled time), plain steps."""
    s, runs = result["settings"], result["runs"]
    variants = list(runs)
    first = runs[variants[0]]
    tasks = list(dict.fromkeys(r["task"] for r in first))
    lines = [f"| task | prompts | " + " | ".join(f"{v}: speed-up / plain steps" for v in variants) + " |",
             "|---|---|" + "---|" * len(variants)]
    for task in tasks + [None]:
        cells = []
        for v in variants:
            rows = [r for r in runs[v] if task is None or r["task"] == task]
            ms = sum(r["model_ms"] for r in rows)
            plain_ms = sum(r["tokens"] for r in rows) * s["plain_ms"]
            cells.append(f"{plain_ms / ms:.2f}x / {sum(r['plain'] for r in rows)}/{sum(r['tokens'] for r in rows)}")
        n = sum(1 for r in first if task is None or r["task"] == task)
        lines.append(f"| {'**overall**' if task is None else task} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
