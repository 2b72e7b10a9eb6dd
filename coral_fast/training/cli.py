"""`coral-fast train`: train a CORAL draft for a target on self-distillation data.

    coral-fast data  --model smollm2 --out data/smollm2
    coral-fast train --model smollm2 --data data/smollm2 --out runs/smollm2 [--unroll-steps 3] [...]

The draft folder written to --out (config.json + model.safetensors, fp16) loads with
`DraftModel.from_pretrained(out, target)`; `--out/last/` holds the resumable checkpoint
(trainer_state.json + trainer_state.safetensors with the AdamW moments), `--out/log.jsonl` the logs.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import torch

from coral_fast.training.trainer import SequenceData, TrainConfig, train


def build_draft(target, name: str, grouping: str, num_groups: int, active_groups: int, data: SequenceData | None, device, init_from: str | None = None):
    """A fresh (or `init_from`) fp32 draft for `target` with the requested vocabulary grouping."""
    from coral_fast.draft import DraftConfig, DraftModel

    if init_from:
        draft = DraftModel.from_pretrained(init_from, target)
        return draft.to(device=device, dtype=torch.float32)
    config = DraftConfig.from_target_config(target.config, num_groups=num_groups, active_groups=active_groups, grouping=grouping, target=name)
    vocab_grouping = None
    if grouping == "frequency":
        try:
            from coral_fast.grouping import VocabGrouping
        except ImportError as error:
            raise ValueError("grouping='frequency' needs coral_fast.grouping (VocabGrouping)") from error
        if data is None:
            raise ValueError("grouping='frequency' needs data for the token counts")
        vocab_grouping = VocabGrouping.from_token_counts(data.token_counts(config.vocab_size), num_groups)
    draft = DraftModel(config, target.get_input_embeddings(), target.get_output_embeddings().weight, vocab_grouping)
    draft.reset_parameters()
    return draft.to(device=device, dtype=torch.float32)


def save_small(draft, path) -> None:
    """Save the draft in fp16 (a few MB: fc, the layer, the router, the grouping)."""
    dtype = next(draft.parameters()).dtype
    draft.to(torch.float16)
    try:
        draft.save_pretrained(path)
    finally:
        draft.to(dtype)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=value, metavar="BOOL")
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=float, nargs=len(value), default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="coral-fast train", description="CORAL draft training (multi-step, CSRA, router).")
    parser.add_argument("--model", default="smollm2", help="smollm2 | gemma3-270m | PATH")
    parser.add_argument("--data", required=True, help="folder written by `coral-fast data`")
    parser.add_argument("--out", required=True, help="output folder (draft + checkpoints + logs)")
    parser.add_argument("--grouping", default="contiguous", choices=["contiguous", "frequency", "dense"])
    parser.add_argument("--num-groups", type=int, default=32)
    parser.add_argument("--active-groups", type=int, default=4)
    parser.add_argument("--eval-groups", type=int, nargs="*", default=[1, 2, 4, 8], help="active-group counts of the held-out estimate")
    parser.add_argument("--init-from", default=None, help="start from this draft folder")
    parser.add_argument("--resume", action="store_true", help="continue from --out/last")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    cfg = TrainConfig.from_dict({f.name: getattr(args, f.name) for f in fields(TrainConfig)})

    from coral_fast.models import load_target
    from coral_fast.training.data import load_shards

    device = torch.device(args.device)
    target_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    target, _ = load_target(args.model, target_dtype, args.device)
    target.requires_grad_(False)
    data = SequenceData(load_shards(args.data), device=device, max_seq_len=cfg.max_seq_len, loss_on_prompt=cfg.loss_on_prompt)
    if not data.train:
        raise ValueError(f"{args.data} holds no training sequences")
    init = str(Path(args.out) / "last") if args.resume else args.init_from
    draft = build_draft(target, args.model, args.grouping, args.num_groups, args.active_groups, data, device, init)
    print(json.dumps({"train_seqs": len(data.train), "eval_seqs": len(data.eval), "params": sum(p.numel() for p in draft.parameters() if p.requires_grad), "config": cfg.to_dict()}))
    eval_groups = [a for a in args.eval_groups if a <= draft.config.num_groups] if args.grouping != "dense" else []
    history = train(draft, data, cfg, out_dir=args.out, resume=args.resume, progress=not args.no_progress, eval_groups=eval_groups)
    save_small(draft, args.out)
    print(json.dumps({"final_eval": history["final_eval"], "iterations": history["iterations"], "seconds": round(history["seconds"], 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
