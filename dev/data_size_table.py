"""Mean accepted length against the self-distilled data a SmolLM2 draft was trained on (issue 18): table and plot.

    .venv/bin/python dev/data_size_table.py   # -> bench/results/data_size.{md,png}

The drafts form a chain (879k -> 2.9M -> 7.4M -> 10.2M answer tokens, each trained on from the one before, so
data and iterations grow together). Two measures of each, full held-out task suite, greedy, tree 6/10/60,
speculation forced, no lookup chain:
- H100, bf16, 128 new tokens with EOS ignored, grouped and dense heads: each draft in the acceptance run that
  measured it beside its predecessor (drafts_smollm2_h100.json, drafts_smollm2_10m_h100.json);
- CPU, fp32, answers to their EOS, grouped head (deterministic, so separate runs pair): data_size_cpu.json (the
  two earlier drafts) and drafts_smollm2_10m_cpu.json.
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
TOKENS = (879_000, 2_881_068, 7_442_912, 10_152_441)  # training answer tokens (held-out sequences excluded)


def _rows(name: str, draft: str, label: str | None = None) -> list[dict]:
    """The greedy rows of `draft` in a results file: a drafts_* file's acceptance run, a labelled run of a
    combined file (`label`), or a plain acceptance run."""
    data = json.loads((RESULTS / name).read_text())
    if "acceptance_greedy" in data:
        run = data["acceptance_greedy"]
    elif label is not None:
        run = next(r for r in data["greedy"] if r["label"] == label)
    else:
        run = data
    return [r for r in run["rows"] if r["draft"] == draft and r["temperature"] == 0]


def _taus(rows: list[dict], head: str) -> dict[str, float]:
    return {r["task"]: r["tau"] for r in rows if r["head"] == head}


def series() -> list[tuple[str, dict]]:
    """(column label, {tokens: {task: tau}}) per measure and head."""
    h100 = [_rows("drafts_smollm2_h100.json", "shipped"), _rows("drafts_smollm2_h100.json", "ft"),
            _rows("drafts_smollm2_10m_h100.json", "shipped"), _rows("drafts_smollm2_10m_h100.json", "ft")]
    cpu = [_rows("data_size_cpu.json", "d0p88m"), _rows("data_size_cpu.json", "d2p9m"),
           _rows("drafts_smollm2_10m_cpu.json", "shipped", "old, no chain"),
           _rows("drafts_smollm2_10m_cpu.json", "new", "new, no chain")]
    out = [(f"H100 128 tokens, {head}", {t: _taus(rows, head) for t, rows in zip(TOKENS, h100)})
           for head in ("grouped", "dense")]
    out.append(("CPU to EOS, grouped", {t: _taus(rows, "grouped") for t, rows in zip(TOKENS, cpu)}))
    return out


def main() -> None:
    columns = series()
    tasks = list(columns[0][1][TOKENS[0]])
    lines = ["# Mean accepted length against training data (SmolLM2 drafts)", "",
             "Each draft trained on from the one before on more self-distilled answer tokens of the default task mix "
             "(data and iterations grow together). Full held-out task suite, greedy, tree 6/10/60, speculation forced, "
             "no lookup chain. H100 (bf16): 128 new tokens a prompt, EOS ignored, each draft in the run that measured "
             "it beside its predecessor. CPU (fp32, deterministic): answers to their EOS. Made by "
             "`dev/data_size_table.py` from drafts_smollm2_h100.json, drafts_smollm2_10m_h100.json, data_size_cpu.json "
             "and drafts_smollm2_10m_cpu.json.", ""]
    for label, by_tokens in columns:
        lines += [f"## {label}", "", "| task | " + " | ".join(f"{t / 1e6:.2f}M" for t in TOKENS) + " |",
                  "|---|" + "---|" * len(TOKENS)]
        for task in tasks:
            name = f"**{task}**" if task == "overall" else task
            lines.append(f"| {name} | " + " | ".join(f"{by_tokens[t].get(task, float('nan')):.2f}" for t in TOKENS) + " |")
        lines.append("")
    (RESULTS / "data_size.md").write_text("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(columns), figsize=(5 * len(columns), 4), sharey=True)
    xs = [t / 1e6 for t in TOKENS]
    for ax, (label, by_tokens) in zip(axes, columns):
        for task in tasks:
            overall = task == "overall"
            ax.plot(xs, [by_tokens[t].get(task, float("nan")) for t in TOKENS], marker="o", lw=2.5 if overall else 1,
                    color="k" if overall else None, label=task)
        ax.set_xscale("log")
        ax.set_xlabel("self-distilled answer tokens (millions, log)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean accepted length (greedy, loop)")
    axes[-1].legend(fontsize=8, loc="upper left")
    fig.suptitle("SmolLM2 draft: acceptance against training data (full task suite, no lookup chain)")
    fig.tight_layout()
    fig.savefig(RESULTS / "data_size.png", dpi=100)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
