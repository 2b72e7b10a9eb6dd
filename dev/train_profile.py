"""Where a training iteration's time goes: the target's features (collate), the draft's unrolled forward, the
losses, backward, the optimizer step, each timed with the device synchronised, then torch.profiler's top ops.

    python dev/train_profile.py --data /tmp/coral_data/smollm2 [--model smollm2] [--steps 3] [--iters 12]
        [--batch-tokens 16384] [--max-seq-len 2048] [--long]

The batches are the training plan's own (length-bucketed, shuffled with seed 0); --long takes the plan's longest
ones instead (the quadratic parts at their worst). One device call on the GPU: dev/README.md.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from coral_fast.models import load_target
from coral_fast.training.cli import build_draft
from coral_fast.training.data import load_shards
from coral_fast.training.trainer import (SequenceData, TrainConfig, compute_losses, token_groups_of,
                                         token_loss_and_accuracy, unrolled_forward)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--steps", type=int, default=3, help="unrolled steps (1 = single-step)")
    p.add_argument("--iters", type=int, default=12, help="timed iterations (after 3 warm-up ones)")
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--long", action="store_true", help="the plan's longest batches")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    target, _ = load_target(args.model, torch.bfloat16 if cuda else torch.float32, str(device))
    target.requires_grad_(False)
    data = SequenceData(load_shards(args.data), device=device, max_seq_len=args.max_seq_len, target=target)
    cfg = TrainConfig(unroll_steps=args.steps, batch_tokens=args.batch_tokens, max_seq_len=args.max_seq_len)
    draft = build_draft(target, args.model, "contiguous", 32, 4, data, device, None, seed=0)
    draft.train()
    params = [q for q in draft.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    groups = token_groups_of(draft).to(device)
    plan = data.batch_plan(data.train, cfg.batch_tokens)
    if args.long:
        plan = sorted(plan, key=lambda g: max(e - s for s, e in g), reverse=True)
    else:
        random.Random(0).shuffle(plan)
    phases: dict[str, list[float]] = {k: [] for k in ("collate", "draft_forward", "losses", "backward", "optimizer", "total")}

    def one(group, record: bool):
        marks = [time.perf_counter()]

        def mark():
            sync()
            marks.append(time.perf_counter())

        batch = data.collate(group)
        mark()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            outputs = unrolled_forward(draft, batch["features"], batch["tokens"], batch["positions"], cfg.unroll_steps)
            mark()
            loss, _ = compute_losses(draft, batch, cfg, groups)  # runs the forward again: losses = its time - forward's
        mark()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mark()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        mark()
        del outputs
        if record:
            d = [b - a for a, b in zip(marks, marks[1:])]
            phases["collate"].append(d[0])
            phases["draft_forward"].append(d[1])
            phases["losses"].append(d[2] - d[1])
            phases["backward"].append(d[3])
            phases["optimizer"].append(d[4])
            phases["total"].append(d[0] + d[2] + d[3] + d[4])

    for group in plan[:3]:
        one(group, False)
    shapes = []
    for group in plan[3:3 + args.iters]:
        one(group, True)
        shapes.append((len(group), max(e - s for s, e in group)))
    summary = {k: round(1e3 * statistics.median(v), 2) for k, v in phases.items()}
    print(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu", "steps": args.steps,
                      "batch_tokens": args.batch_tokens, "max_seq_len": args.max_seq_len, "long": args.long,
                      "batches [rows, width]": shapes, "median_ms": summary}))
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for group in plan[3:6]:
            one(group, False)
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))
    # the token loss alone over one step's rows: the head's logits and the KL over the whole vocabulary
    h = torch.randn(args.batch_tokens, target.config.hidden_size, device=device, requires_grad=True)
    ids = torch.randint(0, target.config.vocab_size, (args.batch_tokens, 16), device=device)
    lps = torch.log_softmax(torch.randn(args.batch_tokens, 16, device=device), -1)
    times = []
    for i in range(6):
        sync()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = token_loss_and_accuracy(draft, h, ids, lps, "kl")
        loss.backward()
        sync()
        times.append(time.perf_counter() - t)
    print(json.dumps({"token_loss_fwd_bwd_ms (one step's rows)": round(1e3 * statistics.median(times[1:]), 2)}))


if __name__ == "__main__":
    main()
