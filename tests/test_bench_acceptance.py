"""benchmarks/acceptance: bad input fails before any model loads; on a tiny CPU target the per-task tau is
tokens / rounds pooled over the task's prompts, the dense head runs, and the markdown holds every cell."""
import math

import pytest
import torch

from coral_fast.benchmarks import acceptance
from coral_fast.benchmarks.e2e import encode, make_generator
from coral_fast.benchmarks.tasks import load_suite
from coral_fast.training.evaluate import head_mode
from tests.test_bench_e2e import _CharTokenizer


@pytest.mark.parametrize("argv, message", [
    (["--drafts", "a=/does/not/exist"], "no folder"),
    (["--drafts", "a=.", "--heads", "sparse"], "grouped, grouped:A (A >= 1) or dense"),
    (["--drafts", "a=.", "--heads", "grouped:0"], "grouped, grouped:A (A >= 1) or dense"),
    (["--drafts", "a=.", "--heads", "dense:4"], "grouped, grouped:A (A >= 1) or dense"),
    (["--drafts", "a=.", "--temperatures", "-1"], "[0, 10]"),
    (["--drafts", "a=.", "--lookup", "17"], "lookup must be an integer in [0, 16]"),
    (["--drafts", "a=.", "--lookup-greedy-only"], "--lookup-greedy-only needs a chain"),
])
def test_bad_values_exit_2_in_one_line(argv, message, capsys):
    assert acceptance.main(argv + ["--device", "cpu"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("text, parsed", [("grouped", ("grouped", None)), ("grouped:7", ("grouped", 7)),
                                          ("dense", ("dense", None))])
def test_heads_name_the_mode_and_the_active_groups(text, parsed):
    assert acceptance.parse_head(text) == parsed


def test_more_active_groups_than_the_draft_has_is_an_error(tmp_path, monkeypatch, capsys):
    """Checked against the loaded draft (its number of groups is in its config), before any of its heads runs."""
    from coral_fast.draft import DraftModel
    from tests.test_models import tiny_llama

    model = tiny_llama(vocab=101, hidden=40, layers=2, seed=5)
    draft = DraftModel.random_init(model)
    draft.save_pretrained(str(tmp_path))
    monkeypatch.setattr("coral_fast.models.load_target", lambda *a, **k: (model, _CharTokenizer(101)))
    too_many = draft.config.num_groups + 1
    code = acceptance.main(["--drafts", f"a={tmp_path}", "--heads", f"grouped,grouped:{too_many}", "--device", "cpu",
                            "--tasks", "qa", "--prompts-per-task", "1", "--out-dir", str(tmp_path / "out")])
    assert code == 2 and f"has {draft.config.num_groups} groups" in capsys.readouterr().err
    assert not (tmp_path / "out" / "acceptance.json").exists()  # the valid head before it did not run


def test_drafts_without_a_name_are_an_argument_error(capsys):
    with pytest.raises(SystemExit) as stop:
        acceptance.main(["--drafts", "nodir"])
    assert stop.value.code == 2 and "NAME=DIR" in capsys.readouterr().err


def test_tiny_target_pools_tau_per_task_for_both_heads():
    from coral_fast.draft import DraftModel
    from tests.test_models import tiny_llama

    model = tiny_llama(vocab=101, hidden=40, layers=2, seed=5)
    torch.manual_seed(2)
    draft = DraftModel.random_init(model)
    prompts = load_suite(["qa", "math_reasoning"], per_task=2)
    encoded = [encode(_CharTokenizer(101), p, torch.device("cpu")) for p in prompts]
    rows = []
    for head in ("grouped", "dense"):
        with head_mode(draft, head):
            gen = make_generator(model, draft, (3, 3, 8), "eager", adaptive=False)
            for temperature in (0.0, 0.7):
                per_task = acceptance.measure(gen, prompts, encoded, 9, temperature)
                assert set(per_task) == {"qa", "math_reasoning"}
                rows += acceptance.rows_of("tiny", head, temperature, per_task)
    for r in rows:
        assert r["rounds"] >= 1 and 1 <= r["tau"] <= 4  # depth 3: at most 3 drafted + the bonus
        assert r["tau"] == pytest.approx(r["tokens"] / r["rounds"])
    for head in ("grouped", "dense"):
        for temperature in (0.0, 0.7):
            mine = [r for r in rows if r["head"] == head and r["temperature"] == temperature]
            overall = mine[-1]
            assert overall["task"] == "overall"
            assert overall["rounds"] == sum(r["rounds"] for r in mine[:-1])
            assert overall["tokens"] == sum(r["tokens"] for r in mine[:-1])
            # 4 prompts x 9 new tokens; the first comes from the prefill, the rest from rounds
            assert overall["tokens"] == 4 * 8
    result = dict(env=dict(device="cpu", torch="t", triton="tr", transformers="tf", date="d", command="c"), rows=rows,
                  settings=dict(model="tiny", drafts={"tiny": "x"}, heads=["grouped", "dense"], temperatures=[0.0, 0.7],
                                tree=[3, 3, 8], max_new_tokens=9, dtype="float32", mode="eager",
                                prompts_per_task={"qa": 2, "math_reasoning": 2}))
    md = acceptance.markdown(result)
    assert "## greedy" in md and "## temperature 0.7" in md and "tiny dense" in md
    greedy_qa = next(r for r in rows if (r["head"], r["temperature"], r["task"]) == ("dense", 0.0, "qa"))
    assert f"{greedy_qa['tau']:.2f}" in md
    assert not any(math.isnan(r["tau"]) for r in rows)
