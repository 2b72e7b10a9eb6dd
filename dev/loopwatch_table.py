"""Two policies end to end (dev/gpu_loopwatch.sh: without and with the loop watch, or two EMA weights): the two
e2e runs of one call side by side.

    python dev/loopwatch_table.py OUT_STEM BEFORE/e2e_suite.json AFTER/e2e_suite.json
writes OUT_STEM.json (both runs as they came back, under "before" and "after") and OUT_STEM.md: per task, each
run's tau, plain steps, loop probes and loop / plain (each run against its own plain mode), the loop's tokens a
second after over before, and how far the plain rate moved between the runs (the noise of the comparison).
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from coral_fast.benchmarks.report import _policy_label, fmt  # noqa: E402


def main(argv: list[str]) -> None:
    stem, before_path, after_path = argv
    off, on = (json.load(open(p)) for p in (before_path, after_path))
    json.dump({"before": off, "after": on}, open(stem + ".json", "w"), indent=1)
    lines = []
    for part_off, part_on in zip(off["parts"], on["parts"]):
        m, m0 = part_on["meta"], part_off["meta"]
        a, b = _policy_label(m0), _policy_label(m)
        lines += [f"# Two policies end to end: {m['model']} ({m['dtype']}, mode {m['mode']}, chain {m['lookup']}, "
                  f"tree {','.join(map(str, m['tree']))})", "",
                  f"{on['env']['device']}, torch {on['env']['torch']}, triton {on['env']['triton']}, transformers "
                  f"{on['env']['transformers']}, {on['env']['date']}. Data: {stem.split('/')[-1]}.json. Two runs in one "
                  f"call (`dev/gpu_loopwatch.sh`): before = {a}, after = {b}; each against its own plain mode, answers "
                  f"to their EOS (at most {m['max_new_tokens']} tokens). Round {m0['round_ms']:.3f} / {m['round_ms']:.3f} ms, "
                  f"plain step {m0['plain_step_ms']:.3f} / {m['plain_step_ms']:.3f} ms (before / after).", "",
                  "| task | prompts | tau before / after | plain steps before / after | loop probes after | loop / plain before | "
                  "**loop / plain after** | loop tok/s after / before | plain tok/s after / before |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for x, y in zip(part_off["tasks"], part_on["tasks"]):
            assert x["task"] == y["task"], (x["task"], y["task"])
            name = f"**{x['task']}**" if x["task"] == "overall" else x["task"]
            lines.append(f"| {name} | {x['prompts']} | {fmt(x['tau'], '.2f')} / {fmt(y['tau'], '.2f')} | {x['plain_steps']} / "
                         f"{y['plain_steps']} of {y['new_tokens']} | {y.get('loop_probes', 'n/a')} | "
                         f"{fmt(x['speedup_plain'], '.2f', 'x')} | **{fmt(y['speedup_plain'], '.2f', 'x')}** | "
                         f"{fmt(y['loop_tok_s'] / x['loop_tok_s'], '.3f')} | {fmt(y['plain_tok_s'] / x['plain_tok_s'], '.3f')} |")
        lines += ["", "Greedy agreement, loop = plain (share of tokens before the first difference / identical sequences):",
                  "", "| task | before | after |", "|---|---|---|"]
        for x, y in zip(part_off["tasks"], part_on["tasks"]):
            lines.append(f"| {x['task']} | {fmt(100 * x['loop_vs_plain_tokens'], '.1f', '%')} / "
                         f"{fmt(100 * x['loop_vs_plain_seqs'], '.0f', '%')} | {fmt(100 * y['loop_vs_plain_tokens'], '.1f', '%')} / "
                         f"{fmt(100 * y['loop_vs_plain_seqs'], '.0f', '%')} |")
        lines.append("")
    open(stem + ".md", "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
