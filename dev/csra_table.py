"""The CSRA ablation's runs (dev/gpu_csra.sh) as one table per temperature: mean and spread over seeds.

    python dev/csra_table.py OUT_STEM TRAIN.jsonl[,TRAIN2.jsonl] ACCEPTANCE.json [ACCEPTANCE.json ...]
writes OUT_STEM.json (every run's training record and loop row), OUT_STEM.md (per task: each variant's mean over
seeds, min-max) and OUT_STEM.png (the same, greedy and sampled side by side) when matplotlib is there.
Draft names are csra_VARIANT_sSEED (gpu_csra.sh).
"""
from __future__ import annotations

import json
import statistics
import sys

ORDER = ("single", "multi", "csra", "unroll5", "token1", "fused")  # dev/gpu_csra.sh's variants
LABELS = {"single": "single-step", "multi": "multi-step (3)", "csra": "multi-step (3) + CSRA",
          "unroll5": "5 steps + CSRA", "token1": "+ CSRA, token weight 1.0", "fused": "+ CSRA, fused inputs"}


def variant_of(name: str) -> tuple[str, int]:
    _, variant, seed = name.split("_")
    return variant, int(seed[1:])


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({min(values):.2f}-{max(values):.2f})"


def main(argv: list[str]) -> None:
    stem, train_files, acceptance_files = argv[0], argv[1].split(","), argv[2:]
    training = [json.loads(line) for path in train_files for line in open(path) if line.strip()]
    runs = [json.load(open(path)) for path in acceptance_files]
    rows = [r for run in runs for r in run["rows"] if r["task"] != "overall"]  # pooled again below
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    temperatures = sorted({r["temperature"] for r in rows})
    env, settings = runs[0]["env"], runs[0]["settings"]
    present = {variant_of(r["draft"])[0] for r in rows}
    VARIANTS = [v for v in ORDER if v in present] + sorted(present - set(ORDER))
    json.dump({"env": env, "settings": settings, "training": training, "loop": runs}, open(stem + ".json", "w"), indent=1)

    def pooled(variant, temperature, task=None):
        """tau per seed: tokens / rounds over the task's prompts (all tasks when None)."""
        per_seed = {}
        for r in rows:
            v, seed = variant_of(r["draft"])
            if v == variant and r["temperature"] == temperature and (task is None or r["task"] == task):
                tokens, rounds = per_seed.get(seed, (0, 0))
                per_seed[seed] = (tokens + r["tokens"], rounds + r["rounds"])
        return [t / n for _, (t, n) in sorted(per_seed.items())]

    if {"single", "multi"} & present:
        title = "CSRA ablation: single-step vs multi-step vs multi-step + CSRA"
    else:  # the other levers, each against multi-step + CSRA (the defaults)
        title = "Training levers against the defaults (multi-step + CSRA)"
    all_seeds = sorted({variant_of(r["draft"])[1] for r in rows})
    lines = [f"# {title} ({settings['model']})", "",
             f"{env['device']}, torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
             f"{env['date']}. Data: {stem.split('/')[-1]}.json. "
             + ("Every cell: the mean over seeds (min-max)." if len(all_seeds) > 1 else f"One seed ({all_seeds[0]})."), "",
             "## Training (teacher-forced, held-out answers of the training data)", "",
             "| variant | seeds | tau, 6-step chain, dense | tau, 4 of 32 groups | top-1 match at unrolled step 1 / 3 / 6 | train s |",
             "|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        mine = [t for t in training if variant_of(t["run"])[0] == variant]
        final = [t["last"]["final_eval"] for t in mine]
        steps = " / ".join(f"{statistics.mean(f['step_acc'][i] for f in final):.3f}" for i in (0, 2, 5))
        lines.append(f"| {LABELS.get(variant, variant)} | {len(mine)} | {spread([f['tau'] for f in final])} | "
                     f"{spread([f['tau_a4'] for f in final])} | {steps} | "
                     f"{statistics.mean(t['last']['seconds'] for t in mine):.0f} |")
    for temperature in temperatures:
        name = "greedy" if temperature == 0 else f"temperature {temperature}"
        lines += ["", f"## The real loop, {name}: mean accepted length per task, grouped head", "",
                  "| task | " + " | ".join(LABELS.get(v, v) for v in VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
        for task in tasks + [None]:
            cells = [spread(pooled(v, temperature, task)) for v in VARIANTS]
            label = "**overall**" if task is None else task
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    # the same seed gives every variant the same initial weights and batch order: differences per seed are paired
    tf = {(variant_of(t["run"])): t["last"]["final_eval"]["tau"] for t in training}
    lines += ["", "## Paired by seed (same initial weights and batches): differences per seed "
              + " / ".join(map(str, all_seeds)), "",
              "| comparison | teacher-forced tau | loop, " + " | loop, ".join(
                  "greedy" if t == 0 else f"T={t}" for t in temperatures) + " |", "|---|---|" + "---|" * len(temperatures)]
    pairs = [("multi", "single"), ("csra", "multi"), ("csra", "single")] + [(v, "csra") for v in VARIANTS if v not in ("single", "multi", "csra")]
    for better, base in pairs:
        seeds = sorted(seed for v, seed in tf if v == better and (base, seed) in tf)
        cells = [" / ".join(f"{tf[(better, s)] - tf[(base, s)]:+.3f}" for s in seeds)]
        for temperature in temperatures:
            a, b = pooled(better, temperature), pooled(base, temperature)
            cells.append(" / ".join(f"{x - y:+.3f}" for x, y in zip(a, b)))
        if seeds:
            lines.append(f"| {LABELS.get(better, better)} - {LABELS.get(base, base)} | " + " | ".join(cells) + " |")
    open(stem + ".md", "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(temperatures), figsize=(6 * len(temperatures), 4), squeeze=False)
    for ax, temperature in zip(axes[0], temperatures):
        width = 0.8 / len(VARIANTS)
        for i, variant in enumerate(VARIANTS):
            values = [pooled(variant, temperature, task) for task in tasks + [None]]
            means = [statistics.mean(v) for v in values]
            errors = [[m - min(v) for m, v in zip(means, values)], [max(v) - m for m, v in zip(means, values)]]
            xs = [x + (i - (len(VARIANTS) - 1) / 2) * width for x in range(len(values))]
            ax.bar(xs, means, width, yerr=errors, capsize=2, label=LABELS.get(variant, variant))
        ax.set_xticks(range(len(tasks) + 1), [t.replace("_", "\n") for t in tasks] + ["overall"], fontsize=7, rotation=30)
        ax.set_ylim(1.0, None)
        ax.set_ylabel("mean accepted length")
        ax.set_title("greedy" if temperature == 0 else f"T={temperature}")
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}, {env['device']}" + (": mean over seeds, bars min-max" if len(all_seeds) > 1 else f", seed {all_seeds[0]}"))
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)


if __name__ == "__main__":
    main(sys.argv[1:])
