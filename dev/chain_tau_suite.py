"""The trainer's teacher-forced chain estimate (training.trainer.chain_acceptance) of a draft on the task suite's
own greedy answers, beside the same estimate on the training data's held-out answers (whole and first N tokens).

    .venv/bin/python dev/chain_tau_suite.py [--draft coral_fast/drafts/smollm2] [--new 64] [--heldout 40] [--out F.json]

Why: the trainer's held-out estimate ran far above the loop's acceptance (3.9 against ~2.5); this shows how much of
the gap is the answers' position (long answers drift into easy loops) and how much the prompts (the target's own
synthesized prompts against the suite's). CPU, fp32, quick suite (3 prompts a task); ~10 min on 2 cores.
"""
import argparse
import json
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from coral_fast.benchmarks.e2e import encode, environment  # noqa: E402
from coral_fast.benchmarks.tasks import load_suite  # noqa: E402
from coral_fast.draft import DraftModel  # noqa: E402
from coral_fast.models import load_target  # noqa: E402
from coral_fast.training.data import load_shards  # noqa: E402
from coral_fast.training.trainer import SequenceData, chain_acceptance  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--draft", default="coral_fast/drafts/smollm2")
    p.add_argument("--data", default="dev/data/smollm2", help="token shards with held-out answers ('' to skip)")
    p.add_argument("--new", type=int, default=64, help="greedy tokens per suite prompt; also the held-out cut")
    p.add_argument("--heldout", type=int, default=40, help="held-out sequences to judge")
    p.add_argument("--out", default="bench/results/chain_tau_cpu.json")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_target("smollm2", dtype=torch.float32, device="cpu")
    model.requires_grad_(False)
    draft = DraftModel.from_pretrained(args.draft, model)
    env = environment([])
    env["command"] = "dev/chain_tau_suite.py " + " ".join(sys.argv[1:])
    result = dict(env=env, settings=vars(args), suite={}, heldout={})
    ids, offsets, mask, tasks = [], [0], [], []
    for prompt in load_suite("all", 3):
        x = encode(tok, prompt, "cpu").view(1, -1)
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new, do_sample=False)[0]
        m = torch.zeros(out.numel(), dtype=torch.bool)
        m[x.shape[1]:] = True
        ids.append(out), mask.append(m), offsets.append(offsets[-1] + out.numel()), tasks.append(prompt.task)
    shards = dict(input_ids=torch.cat(ids), offsets=torch.tensor(offsets), loss_mask=torch.cat(mask),
                  is_eval=torch.ones(len(ids), dtype=torch.bool))
    data = SequenceData(shards, "cpu", max_seq_len=4096, target=model)
    for task in dict.fromkeys(tasks):
        spans = [s for s, t in zip(data.eval, tasks) if t == task]
        result["suite"][task] = chain_acceptance(draft, data, spans, 6, 16384)["tau"]
    result["suite"]["overall"] = chain_acceptance(draft, data, data.eval, 6, 16384)["tau"]
    print("suite", json.dumps(result["suite"]), flush=True)
    if args.data:
        held = SequenceData(load_shards(args.data), "cpu", max_seq_len=4096, target=model)
        spans = held.eval[: args.heldout]
        cut = []
        for s, e in spans:
            first = s + int(held.loss_mask[s:e].nonzero()[0])
            cut.append((s, min(e, first + args.new)))
        result["heldout"] = {"whole": chain_acceptance(draft, held, spans, 6, 16384)["tau"],
                             f"first_{args.new}": chain_acceptance(draft, held, cut, 6, 16384)["tau"]}
        print("heldout", json.dumps(result["heldout"]), flush=True)
    result["env"]["date"] = time.strftime("%Y-%m-%d %H:%M")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
