"""How much of a self-distilled data set is its answers looping (docs/training.md, "Loops").

    .venv/bin/python dev/data_loops.py [dev/data/smollm2] [--out bench/results/data_loops_smollm2.json]

- answers at the --max-new-tokens cap;
- answer tokens past the first 16-gram their answer repeats (greedy and sampled rounds apart);
- what `coral-fast train --skip-repeats N` leaves out of the loss (training.trainer.repeated_ngram_ends);
- what `coral-fast data --stop-loops N` would have kept: each answer cut where its last N tokens first equal the
  N tokens p before them, p <= 128 (training.batched.loop_end: looping's rule over the finished answers).
"""
import argparse
import json
import time

import torch

from coral_fast.training.batched import loop_end
from coral_fast.training.data import load_shards
from coral_fast.training.trainer import repeated_ngram_ends


def main():
    p = argparse.ArgumentParser()
    p.add_argument("data", nargs="?", default="dev/data/smollm2")
    p.add_argument("--out", default="bench/results/data_loops_smollm2.json")
    args = p.parse_args()
    shards = load_shards(args.data)
    meta = json.load(open(f"{args.data}/meta.json"))
    offsets, prompt_lengths = shards["offsets"].tolist(), shards["prompt_lengths"].tolist()
    ids, answer, sampled = shards["input_ids"].long(), shards["loss_mask"].bool(), shards["sampled"].bool()
    rows = len(offsets) - 1
    lengths = torch.tensor([e - s - q for s, e, q in zip(offsets[:-1], offsets[1:], prompt_lengths)])
    row_of = torch.repeat_interleave(torch.arange(rows), torch.tensor(offsets).diff())
    cap = meta["settings"]["max_new_tokens"]
    result = {"data": args.data, "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows, "answer_tokens": int(answer.sum()),
              "at_cap": float((lengths >= cap).float().mean()), "max_new_tokens": cap}
    repeats16 = repeated_ngram_ends(ids, offsets, answer, 16)
    first = torch.full((rows,), 1 << 40, dtype=torch.long)
    position = torch.arange(ids.numel())
    first.scatter_reduce_(0, row_of[repeats16], position[repeats16], reduce="amin")
    past = answer & (position >= first[row_of])
    for name, kind in (("greedy", False), ("sampled", True)):
        in_kind = answer & (sampled[row_of] == kind)
        result[f"past_first_repeated_16gram_{name}"] = float((past & in_kind).sum()) / float(in_kind.sum())
    result["skip_repeats_left_out"] = {n: float(repeated_ngram_ends(ids, offsets, answer, n).sum()) / float(answer.sum())
                                       for n in (4, 6, 8, 12)}
    result["stop_loops_kept"] = {}
    for n in (16, 32, 64):
        kept = {False: 0, True: 0}
        total = {False: 0, True: 0}
        for row, (s, e, q) in enumerate(zip(offsets[:-1], offsets[1:], prompt_lengths)):
            kind = bool(sampled[row])
            total[kind] += e - s - q
            kept[kind] += loop_end(ids[s + q:e], n, 128)
        result["stop_loops_kept"][n] = {"greedy": kept[False] / total[False], "sampled": kept[True] / total[True],
                                        "all": (kept[False] + kept[True]) / (total[False] + total[True])}
        print(n, result["stop_loops_kept"][n], flush=True)
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
