"""Several `benchmarks.acceptance` runs (same model and suite) as one table: a column per run and head.

    python dev/combine_acceptance.py OUT_STEM LABEL=RUN/acceptance.json[:HEAD,...][@TEMPERATURE][#DRAFT] ...
writes OUT_STEM.json (the runs as they were, labelled) and OUT_STEM.md (tau per task at the temperature named,
else at each run's first, of the draft named, else of the run's only one; one run may appear under several
labels, once per temperature or draft).
"""
from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> None:
    stem, specs = argv[0], argv[1:]
    runs, columns = [], []
    for spec in specs:
        label, _, rest = spec.partition("=")
        rest, _, draft = rest.partition("#")
        rest, _, temperature = rest.partition("@")
        path, _, heads = rest.partition(":")
        run = json.load(open(path))
        keep = heads.split(",") if heads else run["settings"]["heads"]
        measured = run["settings"]["temperatures"]
        temperature = float(temperature) if temperature else measured[0]  # greedy when 0
        if temperature not in measured:
            raise SystemExit(f"{path} has temperatures {measured}, not {temperature}")
        drafts = run["settings"]["drafts"]
        if draft and draft not in drafts:
            raise SystemExit(f"{path} has drafts {list(drafts)}, not {draft}")
        if not draft and len(drafts) > 1:
            raise SystemExit(f"{path} has drafts {list(drafts)}: name one (LABEL=PATH#DRAFT)")
        draft = draft or next(iter(drafts))
        run["settings"] = {**run["settings"], "temperatures": [temperature], "drafts": {draft: drafts[draft]}}
        run["rows"] = [r for r in run["rows"]
                       if r["head"] in keep and r["temperature"] == temperature and r["draft"] == draft]
        runs.append({"label": label, **run})
        columns += [(label, head) for head in keep]
    tasks = list(dict.fromkeys(r["task"] for run in runs for r in run["rows"]))
    first = runs[0]
    temperatures = sorted({run["settings"]["temperatures"][0] for run in runs})
    sampling = ", ".join("greedy" if t == 0 else f"temperature {t}" for t in temperatures)
    lines = [f"# Mean accepted length per task, {sampling} ({first['settings']['model']}, held-out task suite)", "",
             f"{first['env']['device']}, torch {first['env']['torch']}, {first['env']['date']}; tree "
             f"{','.join(map(str, first['settings']['tree']))}, {first['settings']['max_new_tokens']} new tokens, "
             f"{first['settings']['dtype']}, speculation forced on. Runs (data: {stem.split('/')[-1]}.json):", ""]
    for run in runs:
        lines.append(f"- {run['label']}: `{run['env']['command']}`")
    lines += ["", "| task | " + " | ".join(f"{label} {head}" for label, head in columns) + " |",
              "|---|" + "---|" * len(columns)]
    for task in tasks:
        cells = []
        for label, head in columns:
            # runs may share a label (one run a head): the first that measured this head
            match = [r for run in runs if run["label"] == label for r in run["rows"] if r["head"] == head and r["task"] == task]
            cells.append(f"{match[0]['tau']:.2f}" if match else "-")
        name = f"**{task}**" if task == "overall" else task
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    with open(stem + ".json", "w") as f:
        json.dump(runs, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
