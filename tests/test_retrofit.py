"""Router retrofit: a frozen dense draft (ours or an imported EAGLE one) gets a grouped head whose router
learns where the draft's dense head puts its top token."""
import pytest
import torch

from coral_fast import DraftModel, VocabGrouping
from coral_fast.training.retrofit import draft_rows, retrofit_router
from coral_fast.training.trainer import SequenceData
from test_eagle import eagle1_folder
from test_training import tiny_data, tiny_target


def _grouped_agrees_with_dense(draft, data, spans):
    h, dense_ids, _ = draft_rows(draft, data, spans, 4096, 1, 1, 10_000)
    return float((draft.topk(h, 1, impl="reference")[0][:, 0] == dense_ids[:, 0]).float().mean())


@pytest.mark.parametrize("source, kind", [("ours", "contiguous"), ("eagle", "frequency"), ("ours", "embedding")])
def test_router_learns_the_dense_argmax_groups(tmp_path, source, kind, seed):
    from coral_fast.training.cli import make_grouping

    target = tiny_target()
    with torch.no_grad():  # a random target's next-token distributions are near-uniform: sharpen them
        target.lm_head.weight.mul_(20)
    data = SequenceData(tiny_data(target, n_seqs=36))
    if source == "ours":
        torch.manual_seed(1)
        draft = DraftModel.random_init(target, grouping="dense").float()
        with torch.no_grad():  # a draft that passes its feature on, as a trained one roughly does
            draft.fc.weight[:, :32] += torch.eye(32)
    else:
        eagle1_folder(tmp_path / "eagle", target)
        draft = DraftModel.from_pretrained(tmp_path / "eagle", target)
    grouping = make_grouping(kind, 8, draft.lm_head_weight, data)
    frozen = {n: p.detach().clone() for n, p in draft.named_parameters() if not n.startswith("head.")}
    f = data.collate(data.eval[:2])
    dense_before = draft(f["features"], f["tokens"], f["positions"])
    stats = retrofit_router(draft, data, grouping, active_groups=2, steps=300, lr=3e-3, unroll_steps=2, kind=kind)
    assert stats["chance"] == 0.25
    # the embedding groups of this random head are harder to route (0.53): twice chance there
    assert stats["recall_after"] > (0.5 if kind == "embedding" else 0.55), stats
    assert stats["recall_after"] > stats["recall_before"] + 0.25, stats
    # the draft itself did not move; only the head changed
    assert all(torch.equal(p, frozen[n]) for n, p in draft.named_parameters() if not n.startswith("head."))
    torch.testing.assert_close(draft(f["features"], f["tokens"], f["positions"]), dense_before)
    assert draft.config.grouping == kind
    assert (draft.config.num_groups, draft.config.active_groups) == (8, 2)
    assert _grouped_agrees_with_dense(draft, data, data.eval) > 0.45  # chance: 0.25
    # the saved folder is an ordinary coral-fast draft with the grouped head
    draft.save_pretrained(tmp_path / "out")
    loaded = DraftModel.from_pretrained(tmp_path / "out", target).float()
    h = torch.randn(5, 32)
    ids, lps = draft.topk(h, 3, impl="reference")
    ids2, lps2 = loaded.topk(h, 3, impl="reference")
    assert torch.equal(ids, ids2)
    torch.testing.assert_close(lps, lps2)


def test_retrofit_refuses_what_it_cannot_do(tmp_path):
    target = tiny_target()
    data = SequenceData(tiny_data(target, n_seqs=6))
    draft = DraftModel.random_init(target, grouping="dense").float()
    with pytest.raises(ValueError, match="does not fit"):
        retrofit_router(draft, data, VocabGrouping.contiguous(60, 8), 2, steps=1)
    with pytest.raises(ValueError, match="does not fit"):
        retrofit_router(draft, data, VocabGrouping.contiguous(67, 8), 9, steps=1)
    with pytest.raises(ValueError, match="name the kind a re-laid grouping"):
        retrofit_router(draft, data, VocabGrouping.from_token_counts(data.token_counts(67), 8), 2, steps=1)
    with pytest.raises(ValueError, match="needs a DraftModel"):
        retrofit_router(torch.nn.Linear(2, 2), data, VocabGrouping.contiguous(67, 8), 2, steps=1)


def test_cli_flags_fail_in_one_line(tmp_path, capsys):
    from coral_fast.training.cli import build_parser
    from coral_fast.training.retrofit import main_retrofit

    parser = build_parser()
    for argv, message in [([], "needs --draft"), (["--draft", str(tmp_path / "none")], "is not a folder"),
                          (["--draft", str(tmp_path), "--grouping", "dense"], "contiguous, frequency or embedding")]:
        args = parser.parse_args(["--retrofit-router", "--data", "d", "--out", "o", *argv])
        with pytest.raises(SystemExit) as exit_:
            main_retrofit(parser, args)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
