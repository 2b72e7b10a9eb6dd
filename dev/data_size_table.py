"""Mean accepted length against the self-distilled data a SmolLM2 draft was trained on (issue 18): table and plot.

    .venv/bin/python dev/data_size_table.py   # -> bench/results/data_size_h100.{md,png}

Each draft of the chain (879k -> 2.9M -> 7.4M -> 10.2M answer tokens, 10.15M of them training, each trained on from the one before) is
read from the acceptance run that measured it beside its predecessor on an H100 (full task suite, greedy, tree
6/10/60, 128 new tokens, bf16, speculation forced, no lookup chain): drafts_smollm2_h100.json and
drafts_smollm2_10m_h100.json.
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
# (training answer tokens, held-out sequences excluded; results file; draft label in its acceptance run)
POINTS = [
    (879_000, "drafts_smollm2_h100.json", "shipped"),
    (2_881_068, "drafts_smollm2_h100.json", "ft"),
    (7_442_912, "drafts_smollm2_10m_h100.json", "shipped"),
    (10_152_441, "drafts_smollm2_10m_h100.json", "ft"),
]
HEADS = ("grouped", "dense")


def taus(run: dict, draft: str, head: str) -> dict[str, float]:
    return {r["task"]: r["tau"] for r in run["rows"]
            if r["draft"] == draft and r["head"] == head and r["temperature"] == 0}


def main() -> None:
    points = []
    for tokens, name, draft in POINTS:
        run = json.loads((RESULTS / name).read_text())["acceptance_greedy"]
        points.append((tokens, name, {head: taus(run, draft, head) for head in HEADS}))
    tasks = list(points[0][2]["grouped"])
    header = " | ".join(f"{t / 1e6:.2f}M {head}" for t, _, _ in points for head in HEADS)
    lines = ["# Mean accepted length against training data (SmolLM2 drafts, NVIDIA H100)", "",
             "Each draft trained on from the one before on more self-distilled answer tokens of the default task mix; "
             "each measured in the same acceptance run as its predecessor (full held-out suite, greedy, tree 6/10/60, "
             "128 new tokens, bf16, speculation forced, no lookup chain). Data: "
             + ", ".join(sorted({name for _, name, _ in points})) + "; made by `dev/data_size_table.py`.", "",
             f"| task | {header} |", "|---|" + "---|" * (len(points) * len(HEADS))]
    for task in tasks:
        cells = [f"{p[2][head].get(task, float('nan')):.2f}" for p in points for head in HEADS]
        name = f"**{task}**" if task == "overall" else task
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (RESULTS / "data_size_h100.md").write_text("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    xs = [t / 1e6 for t, _, _ in points]
    for ax, head in zip(axes, HEADS):
        for task in tasks:
            ys = [p[2][head].get(task, float("nan")) for p in points]
            ax.plot(xs, ys, marker="o", lw=2.5 if task == "overall" else 1, color="k" if task == "overall" else None,
                    label=task)
        ax.set_xscale("log")
        ax.set_xlabel("self-distilled answer tokens (millions, log)")
        ax.set_title(f"{head} head")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean accepted length (greedy, loop)")
    axes[1].legend(fontsize=8, loc="upper left")
    fig.suptitle("SmolLM2 draft: acceptance against training data (H100, full task suite)")
    fig.tight_layout()
    fig.savefig(RESULTS / "data_size_h100.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
