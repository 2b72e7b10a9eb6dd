"""Which vocabulary grouping lets a router find the dense head's choice? (issue 18: grouped within 2% of dense)

The shipped draft stays frozen; its hidden states over held-out self-distilled data (the unrolled forward of
training, so deeper tree levels count) are computed once. For each grouping (contiguous ids, frequency-balanced,
balanced k-means over the LM-head rows) a fresh router is fitted (`training.retrofit.fit_router`, the same
steps for each by default; --fits sets grouping, router width and steps; the router loss does not depend on a), then on held-out rows: recall of the dense top-1 in the router's top-a groups, and the share of
the dense top-10's probability mass inside them (what the tree's top-k draws from). The draft's own jointly
trained router (contiguous) is the first row.

    .venv/bin/python dev/router_grouping.py --data dev/data/smollm2 [--train-seqs 160 --eval-seqs 48] [--out F.json]
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

from coral_fast.draft import DraftModel
from coral_fast.models import load_target
from coral_fast.training.cli import make_grouping
from coral_fast.training.data import load_shards
from coral_fast.training.retrofit import draft_rows, fit_router
from coral_fast.training.trainer import SequenceData


@torch.no_grad()
def coverage(router, hidden, ids, lps, group_of, active: int) -> tuple[float, float]:
    """(recall of ids[:, 0], mean share of the top-k mass) inside the router's top-`active` groups."""
    top = router(hidden).float().topk(active, dim=-1).indices                      # [N, a]
    inside = (group_of[ids][:, :, None] == top[:, None, :]).any(-1)                # [N, k]
    mass = lps.exp()
    return float(inside[:, 0].float().mean()), float(((mass * inside).sum(-1) / mass.sum(-1)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="dev/data/smollm2")
    parser.add_argument("--draft", default="coral_fast/drafts/smollm2")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--train-seqs", type=int, default=160)
    parser.add_argument("--eval-seqs", type=int, default=48)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--unroll-steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--active", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--fits", nargs="+", default=["contiguous:256:1000", "frequency:256:1000", "embedding:256:1000"],
                        help="GROUPING:ROUTER_WIDTH:STEPS of each fitted router")
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    started = time.perf_counter()
    device = torch.device(args.device)
    target, _ = load_target(args.model, torch.bfloat16 if device.type == "cuda" else torch.float32, args.device)
    target.requires_grad_(False)
    data = SequenceData(load_shards(args.data), device=device, max_seq_len=args.max_seq_len, target=target)
    rng = random.Random(0)
    data.train = rng.sample(data.train, min(args.train_seqs, len(data.train)))
    data.eval = rng.sample(data.eval, min(args.eval_seqs, len(data.eval)))
    draft = DraftModel.from_pretrained(args.draft, target).to(device=device, dtype=torch.float32).eval()
    data.set_feature_layers(draft.config.feature_layers)
    train_rows = draft_rows(draft, data, data.train, 8192, args.unroll_steps, 16, 10**9, desc="draft rows (train)")
    eval_rows = draft_rows(draft, data, data.eval, 8192, args.unroll_steps, 16, 10**9, desc="draft rows (held out)")
    print(f"rows: {train_rows[0].shape[0]} train, {eval_rows[0].shape[0]} held out "
          f"({time.perf_counter() - started:.0f} s)", flush=True)

    G = args.groups
    weight = draft.lm_head_weight.float()
    groupings, results = {}, []

    def report(name, router, grouping, extra=None):
        group_of = grouping.group_of.to(device)
        for a in args.active:
            recall, mass = coverage(router, eval_rows[0], eval_rows[1], eval_rows[2], group_of, a)
            row = {"grouping": name, "active": a, "top1_recall": round(recall, 4), "top10_mass": round(mass, 4), **(extra or {})}
            results.append(row)
            print(json.dumps(row), flush=True)

    if draft.grouping is not None and draft.config.num_groups == G:
        report("shipped router (joint, contiguous)", draft.head.router.float(), draft.grouping)
    for fit in args.fits:  # the router loss does not depend on a: one fit serves every a
        kind, width, steps = fit.split(":")
        if kind not in groupings:
            groupings[kind] = make_grouping(kind, G, weight, data)
        t0 = time.perf_counter()
        head, _, _ = fit_router(weight, groupings[kind], max(args.active), train_rows, eval_rows, steps=int(steps),
                                router_width=int(width))
        report(kind, head.router, groupings[kind], {"router_width": int(width), "steps": int(steps),
                                                    "fit_seconds": round(time.perf_counter() - t0, 1)})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "train_rows": int(train_rows[0].shape[0]),
                       "eval_rows": int(eval_rows[0].shape[0]), "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d %H:%M"), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
