"""Router retrofit: a grouped head for a draft that already exists (ours with a dense head, or an
imported EAGLE-1/2/HASS draft).

    coral-fast train --retrofit-router --draft DIR --model M --data D --out O [--grouping embedding]

The draft stays frozen. Its hidden states over the self-distilled data (`coral-fast data`; the same
unrolled forward as training, so deeper tree levels are covered) are computed once, with the dense
head's top-K at each row as the target; then only a `GroupRouter` trains, with the router loss of
training (`losses.router_loss`, the K ids' probability mass per group). What the router must learn is
where the draft's own dense head puts its mass, so that the grouped top-k proposes what the dense one
would. The folder written to --out is a coral-fast draft with the grouped head.
"""
from __future__ import annotations

import json
import sys
import time

import torch
from torch import Tensor

from coral_fast.training import losses as L
from coral_fast.training.trainer import SequenceData, unrolled_forward


@torch.no_grad()
def draft_rows(draft, data: SequenceData, spans, batch_tokens: int, unroll_steps: int, topk: int, max_rows: int,
               desc: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(hidden [N, H], dense top-k ids [N, k], their log-probs [N, k]) of the frozen draft over `spans`, at most
    max_rows rows; `desc`: a progress bar of that name (the target runs over every batch: minutes on a CPU)."""
    from tqdm.auto import tqdm

    hiddens, ids, lps, count = [], [], [], 0
    # rows come from the spans' positions, once per unrolled step: a bound for the bar when max_rows is "all"
    bound = sum(end - start for start, end in spans) * unroll_steps
    bar = tqdm(total=min(max_rows, bound), desc=desc, unit="row", disable=desc is None)
    for batch in data.batches(spans, batch_tokens, shuffle=False, rng=None):
        outputs = unrolled_forward(draft, batch["features"].to(draft.fc.weight.dtype), batch["tokens"],
                                   batch["positions"], unroll_steps)
        mask, length = batch["mask"], batch["mask"].shape[1]
        for step, hidden in enumerate(outputs):
            h = hidden[mask & (torch.arange(length, device=mask.device) >= step)[None]]
            top = torch.log_softmax(draft.logits(h).float(), dim=-1).topk(topk, dim=-1)
            hiddens.append(h.float())
            ids.append(top.indices)
            lps.append(top.values)
            count += h.shape[0]
            bar.update(min(h.shape[0], max(0, max_rows - bar.n)))
        if count >= max_rows:
            break
    bar.close()
    if not hiddens:
        raise ValueError("the data gave no training positions for the router")
    return torch.cat(hiddens)[:max_rows], torch.cat(ids)[:max_rows], torch.cat(lps)[:max_rows]


def group_recall(router, hidden: Tensor, top1: Tensor, group_of: Tensor, active: int) -> float:
    """Fraction of rows whose dense top-1 lies in the router's top-`active` groups."""
    with torch.no_grad():
        return float(L.router_hit_rate(router(hidden).float(), top1, group_of, active))


def fit_router(weight: Tensor, grouping, active_groups: int, train_rows: tuple, eval_rows: tuple, steps: int = 500,
               lr: float = 1e-3, batch_rows: int = 4096, seed: int = 0, log=None, router_width: int = 256):
    """Train a fresh router for a grouped head over `weight` [V, H] and `grouping` on a frozen draft's rows.
    train_rows: (hidden [N, H], dense top-k ids [N, k], log-probs [N, k]) from `draft_rows`; eval_rows the same
    (held out; only hidden and ids[:, 0] are read); router_width: the router MLP's hidden size.
    -> (RoutedLMHead with the fp32 router, recall before, recall after): the held-out fraction of rows whose
    dense top-1 lies in the router's top-`active_groups` groups."""
    from coral_fast.head import RoutedLMHead
    from coral_fast.router import GroupRouter

    train_h, train_ids, train_lps = train_rows
    eval_h, eval_ids = eval_rows[0], eval_rows[1]
    torch.manual_seed(seed)
    router = GroupRouter(weight.shape[1], grouping.num_groups, router_width, dtype=torch.float32, device=weight.device)
    head = RoutedLMHead(weight, grouping, active_groups, router=router).to(weight.device)
    group_of = grouping.group_of.to(weight.device)
    before = group_recall(router, eval_h, eval_ids[:, 0], group_of, active_groups)
    optimizer = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    router.train()
    for step in range(steps):
        rows = torch.randint(0, train_h.shape[0], (min(batch_rows, train_h.shape[0]),), generator=gen).to(train_h.device)
        loss = L.router_loss(router(train_h[rows]), train_ids[rows], train_lps[rows], group_of, "mass")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log and (step % 100 == 0 or step == steps - 1):
            log({"step": step, "router_loss": round(float(loss), 4)})
    router.eval()
    return head, before, group_recall(router, eval_h, eval_ids[:, 0], group_of, active_groups)


def retrofit_router(draft, data: SequenceData, grouping, active_groups: int, steps: int = 500, lr: float = 1e-3,
                    batch_rows: int = 4096, batch_tokens: int = 8192, unroll_steps: int = 1, topk: int = 16,
                    max_rows: int = 200_000, seed: int = 0, log=None, kind: str | None = None, progress: bool = False) -> dict:
    """Give `draft` (a DraftModel, modified in place) a routed grouped head over `grouping`; train the
    router only. Returns the held-out recall of the dense top-1 in the top-`active_groups` groups
    before (an untrained router) and after, with chance = active / G for equal groups. `kind`: the
    grouping's name in the draft's config (contiguous | frequency | embedding); only contiguous can be told
    from the grouping itself, so a re-laid grouping must name its kind."""
    from coral_fast.draft import DraftModel

    if not isinstance(draft, DraftModel):
        raise ValueError(f"router retrofit needs a DraftModel (ours or an EAGLE-1/2/HASS import), got "
                         f"{type(draft).__name__}: an EAGLE-3 draft has its own reduced head")
    kind = kind or "contiguous"
    if (kind == "contiguous") != grouping.is_identity:
        raise ValueError(f"kind={kind!r} does not match the grouping (contiguous ids: {grouping.is_identity}): "
                         f"name the kind a re-laid grouping was built as (frequency or embedding)")
    G = grouping.num_groups
    if grouping.vocab_size != draft.config.vocab_size or not 1 <= active_groups <= G:
        raise ValueError(f"grouping of V={grouping.vocab_size} into {G} groups with {active_groups} active does not fit "
                         f"a draft of vocabulary {draft.config.vocab_size}")
    started = time.perf_counter()
    draft.requires_grad_(False).eval()
    train_rows = draft_rows(draft, data, data.train, batch_tokens, unroll_steps, topk, max_rows,
                            desc="draft rows (train)" if progress else None)
    eval_rows = draft_rows(draft, data, data.eval or data.train, batch_tokens, unroll_steps, 1, max(1, max_rows // 4),
                           desc="draft rows (held out)" if progress else None)
    head, before, after = fit_router(draft.lm_head_weight, grouping, active_groups, train_rows, eval_rows, steps=steps,
                                     lr=lr, batch_rows=batch_rows, seed=seed, log=log)
    # the draft now carries the grouped head (router in the draft's dtype, like a trained draft's)
    head.router = head.router.to(draft.fc.weight.dtype)
    draft.head = head
    draft.grouping = grouping
    draft.config.grouping, draft.config.num_groups, draft.config.active_groups = kind, G, active_groups
    return {"recall_before": round(before, 4), "recall_after": round(after, 4), "chance": round(active_groups / G, 4),
            "train_rows": int(train_rows[0].shape[0]), "eval_rows": int(eval_rows[0].shape[0]), "steps": steps,
            "seconds": round(time.perf_counter() - started, 1)}


def main_retrofit(parser, args) -> int:
    """`coral-fast train --retrofit-router --draft DIR`, with the flags of training/cli.py: --grouping
    (contiguous | frequency | embedding), --num-groups, --active-groups, --iters (router steps), --lr,
    --batch-tokens, --unroll-steps (tree depths covered), --max-train-tokens, --seed. Bad input: one line,
    exit 2."""
    import os

    from coral_fast.cli_checks import argument_errors
    from coral_fast.cli_checks import read_json
    from coral_fast.draft import CONFIG_NAME, DraftModel
    from coral_fast.models import load_target
    from coral_fast.training.cli import make_grouping
    from coral_fast.training.data import load_shards

    with argument_errors(parser):
        if not args.draft:
            raise ValueError("--retrofit-router needs --draft DIR (a coral-fast or EAGLE draft folder)")
        kind = args.grouping or "contiguous"
        if kind == "dense":
            raise ValueError("--retrofit-router needs --grouping contiguous, frequency or embedding")
        if not os.path.isdir(args.draft):
            raise ValueError(f"--draft {args.draft!r} is not a folder")
        read_json(os.path.join(args.draft, CONFIG_NAME))
    device = torch.device(args.device)
    with argument_errors(parser):
        target, _ = load_target(args.model, torch.bfloat16 if device.type == "cuda" else torch.float32, args.device)
        target.requires_grad_(False)
        data = SequenceData(load_shards(args.data), device=device, max_seq_len=args.max_seq_len, loss_on_prompt=args.loss_on_prompt,
                            target=target)
        if not data.train:
            raise ValueError(f"--data {args.data} holds no training sequences")
        draft = DraftModel.from_pretrained(args.draft, target)
        if not isinstance(draft, DraftModel):
            raise ValueError("an EAGLE-3 draft has its own reduced-vocabulary head; retrofit takes EAGLE-1/2/HASS or coral-fast drafts")
        draft = draft.to(device=device, dtype=torch.float32)
        data.set_feature_layers(draft.config.feature_layers)
        if args.max_train_tokens:
            data.limit_train(args.max_train_tokens)
        grouping = make_grouping(kind, args.num_groups, draft.lm_head_weight, data)
        stats = retrofit_router(draft, data, grouping, args.active_groups, steps=args.iters, lr=args.lr,
                                batch_tokens=args.batch_tokens, unroll_steps=args.unroll_steps, seed=args.seed, kind=kind,
                                log=None if args.no_progress else (lambda d: print(json.dumps(d), file=sys.stderr)),
                                progress=not args.no_progress)
    draft.to(torch.float16).save_pretrained(args.out)
    print(json.dumps({"retrofit": stats, "out": str(args.out)}))
    return 0
