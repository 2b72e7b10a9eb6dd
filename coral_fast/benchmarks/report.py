"""Results of `bench e2e` as files: per-task summaries, JSON + CSV + markdown + a PNG plot.

Rates are totals (tokens / seconds over the task's prompts), so speed-up = loop tok/s / plain tok/s exactly.
Agreement of two greedy outputs = tokens equal before the first difference (after one, they diverge for
good); reported as a fraction of all tokens and as the fraction of identical sequences.
"""
from __future__ import annotations

import csv
import json
import math
import os

NAN = float("nan")


def _rate(rows, tokens_key, seconds_key):
    """Tokens / seconds over the rows that measured `seconds_key`; a row without `tokens_key` made new_tokens."""
    seconds = sum(r[seconds_key] for r in rows if seconds_key in r)
    tokens = sum(r.get(tokens_key, r["new_tokens"]) for r in rows if seconds_key in r)
    return tokens / seconds if seconds > 0 else NAN


def _agree(rows, key):
    """(fraction of tokens, fraction of sequences) identical, over the rows that measured `key`."""
    have = [r for r in rows if key in r]
    if not have:
        return NAN, NAN
    tokens = sum(r[key] for r in have) / sum(r["new_tokens"] for r in have)
    return tokens, sum(r[key] == r["new_tokens"] for r in have) / len(have)


def _ratio(a, b):
    return a / b if b and b == b and a == a else NAN


def _probes(summary: dict) -> str:
    """' (N loop probes)' where the loop watch ran rounds from plain decoding (docs/loop.md)."""
    n = summary.get("loop_probes", 0)
    return f" ({n} loop probe{'s' * (n != 1)})" if n else ""


def summarize_rows(task: str, rows: list[dict]) -> dict:
    rounds = sum(r["rounds"] for r in rows)
    s = dict(task=task, prompts=len(rows), new_tokens=sum(r["new_tokens"] for r in rows),
             tau=sum(r["accepted"] for r in rows) / rounds if rounds else NAN, rounds=rounds,
             plain_steps=sum(r["plain_steps"] for r in rows),
             loop_probes=sum(r.get("loop_probes", 0) for r in rows),  # results before the loop watch have none
             loop_tok_s=_rate(rows, "loop_tokens", "loop_s"), plain_tok_s=_rate(rows, "plain_tokens", "plain_s"),
             hf_tok_s=_rate(rows, "hf_tokens", "hf_s"),
             loop_ttft_ms=1e3 * sum(r["loop_ttft_s"] for r in rows) / len(rows),
             plain_ttft_ms=1e3 * sum(r["plain_ttft_s"] for r in rows) / len(rows))
    s["speedup_plain"] = _ratio(s["loop_tok_s"], s["plain_tok_s"])
    s["speedup_hf"] = _ratio(s["loop_tok_s"], s["hf_tok_s"])
    for key in ("loop_vs_plain", "loop_vs_hf", "plain_vs_hf", "hf_eager_vs_static"):
        s[f"{key}_tokens"], s[f"{key}_seqs"] = _agree(rows, key)
    if any("sample_loop_s" in r for r in rows):
        sample_rounds = sum(r["sample_rounds"] for r in rows)
        s.update(sample_tau=sum(r["sample_accepted"] for r in rows) / sample_rounds if sample_rounds else NAN,
                 sample_loop_tok_s=_rate(rows, "sample_loop_tokens", "sample_loop_s"),
                 sample_plain_tok_s=_rate(rows, "sample_plain_tokens", "sample_plain_s"))
        s["sample_speedup_plain"] = _ratio(s["sample_loop_tok_s"], s["sample_plain_tok_s"])
    return s


def summarize(rows: list[dict]) -> list[dict]:
    """One summary per task (in order of first appearance), then "overall"."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    return [summarize_rows(t, [r for r in rows if r["task"] == t]) for t in tasks] + [summarize_rows("overall", rows)]


# --- files ---------------------------------------------------------------------------------------------
def _clean(x):
    """JSON without NaN (null instead), floats rounded for reading."""
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else round(x, 6)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(_clean(obj), f, indent=1)


def write_csv(rows: list[dict], path):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in _clean(r).items()})


def _percent(x):
    return None if x is None else 100 * x  # None: n/a (a NaN written to JSON comes back as None)


def fmt(x, spec=".0f", suffix=""):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


def _env_lines(env):
    """The device/versions/date line and the command; `env["note"]` (optional) says what the command line
    cannot (a draft's folder on the GPU machine that is now the shipped one, say)."""
    return ([f"{env['device']}, torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
             f"{env['date']}.", "", f"`{env['command']}`", ""] + ([env["note"], ""] if env.get("note") else []))


def _policy_label(meta: dict) -> str:
    """'adaptive', 'adaptive, loop watch 4' / 'no loop watch' (+ ', EMA weight 0.15': runs that record them), or
    'always speculative'."""
    if not meta["adaptive"]:
        return "always speculative"
    if "loop_streak" not in meta:  # runs before the loop watch
        return "adaptive"
    label = f"adaptive, loop watch {meta['loop_streak']}" if meta["loop_streak"] else "adaptive, no loop watch"
    return label + (f", EMA weight {meta['ema_alpha']:g}" if "ema_alpha" in meta else "")  # runs that record it


def suite_markdown(suite: dict) -> str:
    lines = ["# End-to-end: the loop against plain decoding in the same engine (batch 1)", ""] + _env_lines(suite["env"])
    for part in suite["parts"]:
        m = part["meta"]
        lines += [
            f"## {m['model']} ({m['dtype']}, draft {m['draft']}, mode {m['mode']}, tree {','.join(map(str, m['tree']))}, "
            f"{_policy_label(m)})", "",
            (f"Answers end at their EOS (at most {m['max_new_tokens']} tokens), loop and plain alike; HF static "
             f"generate makes {m['max_new_tokens']} (a rate per token)." if m.get("stop_at_eos") else
             f"{m['max_new_tokens']} new tokens a prompt on every side (EOS ignored).") + " Warm-up, excluded from every rate: "
            f"engine {m['warmup_s']:.1f} s (round {fmt(m['round_ms'], '.3f')} ms, plain step "
            f"{fmt(m['plain_step_ms'], '.3f')} ms as measured there; its weight-bytes floor {fmt(m['plain_floor_ms'], '.3f')} ms "
            f"= {m['weight_gb']:.3f} GB / {fmt(m['copy_tb_s'], '.2f')} TB/s copy), HF static generate {m['hf_warmup_s']:.1f} s.", "",
            "| task | prompts | tau | loop tok/s | plain tok/s | **loop / plain** | HF static tok/s | loop / HF | "
            "TTFT loop ms | TTFT plain ms | plain steps in loop |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in part["tasks"]:
            name = f"**{s['task']}**" if s["task"] == "overall" else s["task"]
            lines.append(
                f"| {name} | {s['prompts']} | {fmt(s['tau'], '.2f')} | {fmt(s['loop_tok_s'])} | {fmt(s['plain_tok_s'])} | "
                f"**{fmt(s['speedup_plain'], '.2f', 'x')}** | {fmt(s['hf_tok_s'])} | {fmt(s['speedup_hf'], '.2f', 'x')} | "
                f"{fmt(s['loop_ttft_ms'], '.1f')} | {fmt(s['plain_ttft_ms'], '.1f')} | "
                f"{s['plain_steps']}/{s['new_tokens']}{_probes(s)} |")
        lines += ["", "Greedy agreement (tokens before the first difference, as a share of all tokens / identical "
                  "sequences). HF eager = static is the noise floor of this dtype (HF against itself).", "",
                  "| task | loop = plain | loop = HF static | plain = HF static | HF eager = HF static |",
                  "|---|---|---|---|---|"]
        for s in part["tasks"]:
            cells = [f"{fmt(_percent(s[f'{k}_tokens']), '.1f', '%')} / {fmt(_percent(s[f'{k}_seqs']), '.0f', '%')}"
                     for k in ("loop_vs_plain", "loop_vs_hf", "plain_vs_hf", "hf_eager_vs_static")]
            lines.append(f"| {s['task']} | " + " | ".join(cells) + " |")
        lp = m.get("long_prompt")
        if lp:
            lines += ["", f"A {lp['prompt_len']}-token prompt on the warm engine (32 new tokens): time to first token "
                      f"{1e3 * lp['ttft_s_loop']:.1f} ms (plain mode {1e3 * lp['ttft_s_plain']:.1f} ms); new captures "
                      f"{lp['captures_after_warmup']}, new compiled graphs {lp['compiles_after_warmup']} (the engine is "
                      "sized once for its max_context)."]
        if "sample_loop_tok_s" in part["tasks"][-1]:
            lines += ["", f"Sampling at temperature {m['temperature']} (same prompts, a seed each):", "",
                      "| task | tau | loop tok/s | plain tok/s | loop / plain |", "|---|---|---|---|---|"]
            for s in part["tasks"]:
                lines.append(f"| {s['task']} | {fmt(s['sample_tau'], '.2f')} | {fmt(s['sample_loop_tok_s'])} | "
                             f"{fmt(s['sample_plain_tok_s'])} | {fmt(s['sample_speedup_plain'], '.2f', 'x')} |")
        lines.append("")
    lines += ["tau = tokens a speculative round commits (accepted + bonus). loop = the engine as users run it "
              "(`generate`); plain = the same engine with `plain=True` (one token a step, same capture/compile); HF "
              "static = `model.generate` over a StaticCache sized once, compiled by transformers. tok/s = tokens / "
              "wall time of the whole request (prefill included); TTFT = prefill + first token.", ""]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_suite(suite: dict, path) -> str | None:
    """tok/s per task, loop vs plain vs HF, one panel per model; None when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return None
    parts = suite["parts"]
    fig, axes = plt.subplots(len(parts), 1, figsize=(11, 3.6 * len(parts)), squeeze=False)
    for ax, part in zip(axes[:, 0], parts):
        tasks = part["tasks"]
        x = range(len(tasks))
        for j, (key, label) in enumerate((("loop_tok_s", "loop"), ("plain_tok_s", "plain (same engine)"),
                                          ("hf_tok_s", "HF static generate"))):
            values = [0 if s[key] is None or math.isnan(s[key]) else s[key] for s in tasks]
            bars = ax.bar([i + (j - 1) * 0.27 for i in x], values, width=0.27, label=label)
            if key == "loop_tok_s":
                for b, s in zip(bars, tasks):
                    ax.annotate(fmt(s["speedup_plain"], ".2f", "x"), (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), [s["task"] for s in tasks], fontsize=8)
        ax.set_ylabel("tokens / s")
        m = part["meta"]
        ax.set_title(f"{m['model']} {m['dtype']} ({suite['env']['device']}): loop over plain above the bars", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_suite(suite: dict, out_dir: str, plot: bool = True) -> dict:
    base = os.path.join(out_dir, "e2e_suite")
    write_json(suite, base + ".json")
    rows = []
    for part in suite["parts"]:
        rows += [dict(level="prompt", **r) for r in part["rows"]]
        rows += [dict(level="task", model=part["meta"]["model"], **s) for s in part["tasks"]]
    write_csv(rows, base + ".csv")
    md = suite_markdown(suite)
    paths = dict(json=base + ".json", csv=base + ".csv", md=base + ".md")
    if plot:
        png = plot_suite(suite, base + ".png")
        if png:
            paths["png"] = png
        else:
            md += "\n(No plot: matplotlib is not installed here.)\n"
    with open(base + ".md", "w") as f:
        f.write(md)
    return paths
