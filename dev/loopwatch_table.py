"""The loop watch end to end (dev/gpu_loopwatch.sh): the two e2e runs, without and with it, side by side.

    python dev/loopwatch_table.py OUT_STEM NOWATCH/e2e_suite.json WATCH/e2e_suite.json
writes OUT_STEM.json (both runs as they came back) and OUT_STEM.md: per task, each run's tau, plain steps, loop
probes and loop / plain (each run against its own plain mode), the loop's tokens a second with the watch over
without it, and how far each run's plain rate moved between the runs (the noise of the comparison).
"""
from __future__ import annotations

import json
import sys


def _f(x: float, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if x != x else f"{x:{spec}}{suffix}"


def main(argv: list[str]) -> None:
    stem, off_path, on_path = argv
    off, on = (json.load(open(p)) for p in (off_path, on_path))
    json.dump({"nowatch": off, "watch": on}, open(stem + ".json", "w"), indent=1)
    lines = []
    for part_off, part_on in zip(off["parts"], on["parts"]):
        m = part_on["meta"]
        lines += [f"# The loop watch end to end: {m['model']} ({m['dtype']}, mode {m['mode']}, chain {m['lookup']}, "
                  f"tree {','.join(map(str, m['tree']))})", "",
                  f"{on['env']['device']}, torch {on['env']['torch']}, triton {on['env']['triton']}, transformers "
                  f"{on['env']['transformers']}, {on['env']['date']}. Data: {stem.split('/')[-1]}.json. Two runs in one "
                  f"call (`bash dev/gpu_loopwatch.sh {m['model']}`): without the watch (`--loop-streak 0`), then with it "
                  f"(`LOOP_STREAK` = {m.get('loop_streak', 'n/a')}); each against its own plain mode, answers to their EOS "
                  f"(at most {m['max_new_tokens']} tokens). Round {part_off['meta']['round_ms']:.3f} / {m['round_ms']:.3f} ms, "
                  f"plain step {part_off['meta']['plain_step_ms']:.3f} / {m['plain_step_ms']:.3f} ms (without / with).", "",
                  "| task | prompts | tau without / with | plain steps without / with | loop probes | loop / plain without | "
                  "**loop / plain with** | loop tok/s with / without | plain tok/s, run 2 / run 1 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for a, b in zip(part_off["tasks"], part_on["tasks"]):
            assert a["task"] == b["task"], (a["task"], b["task"])
            name = f"**{a['task']}**" if a["task"] == "overall" else a["task"]
            lines.append(f"| {name} | {a['prompts']} | {_f(a['tau'])} / {_f(b['tau'])} | {a['plain_steps']} / "
                         f"{b['plain_steps']} of {b['new_tokens']} | {b.get('loop_probes', 'n/a')} | "
                         f"{_f(a['speedup_plain'], '.2f', 'x')} | **{_f(b['speedup_plain'], '.2f', 'x')}** | "
                         f"{_f(b['loop_tok_s'] / a['loop_tok_s'], '.3f')} | {_f(b['plain_tok_s'] / a['plain_tok_s'], '.3f')} |")
        lines += ["", "Greedy agreement, loop = plain (share of tokens before the first difference / identical sequences):",
                  "", "| task | without | with |", "|---|---|---|"]
        for a, b in zip(part_off["tasks"], part_on["tasks"]):
            lines.append(f"| {a['task']} | {_f(100 * a['loop_vs_plain_tokens'], '.1f', '%')} / "
                         f"{_f(100 * a['loop_vs_plain_seqs'], '.0f', '%')} | {_f(100 * b['loop_vs_plain_tokens'], '.1f', '%')} / "
                         f"{_f(100 * b['loop_vs_plain_seqs'], '.0f', '%')} |")
        lines.append("")
    open(stem + ".md", "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
