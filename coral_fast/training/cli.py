"""`coral-fast train`: train a CORAL draft for a target on self-distillation data.

    coral-fast data  --model smollm2 --out data/smollm2
    coral-fast train --model smollm2 --data data/smollm2 --out runs/smollm2 [--unroll-steps 3] [...]

The draft folder written to --out (config.json + model.safetensors, fp16) loads with
`DraftModel.from_pretrained(out, target)`; `--out/last/` holds the resumable checkpoint
(trainer_state.json + trainer_state.safetensors: AdamW moments, random states, data position; written
atomically, the previous one kept in `last.prev/`), `--out/log.jsonl` the logs. Arguments and files are
checked before the model loads; a bad one exits 2 with one line.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import torch

from coral_fast.cli_checks import (
    ArgumentParser, argument_errors, boolean, check_draft_folder, check_model_arg, check_safetensors, finite_float,
    finite_nonneg_float, float_in, int_at_least, nonnegative_int, positive_float, positive_int, read_json, unit_float,
)
from coral_fast.training.trainer import SequenceData, TrainConfig, find_checkpoint, train


# --draft-arch: "coral" is the shipped drafts' layer; "eagle" is EAGLE-1/2's (no input norm, fc over
# cat(embedding, feature)), which `coral-fast export --format eagle` can write for SGLang / vLLM
DRAFT_ARCHS = {"coral": {}, "eagle": {"input_norm": False, "fc_input_order": "embedding_first"}}


def feature_layers_arg(text: str):
    """--feature-layers: "last" -> None, "eagle3" (resolved once the target is known), "27,2,15" -> (2, 15, 27)."""
    if text in ("last", "eagle3"):
        return None if text == "last" else text
    from coral_fast.draft import checked_feature_layers

    try:
        return checked_feature_layers([int(part) for part in text.split(",")])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected last, eagle3 or at least two distinct comma-separated layer "
                                         f"indices >= 0, got {text!r}") from None


def resolve_feature_layers(layers, target):
    """--feature-layers for `target`: "eagle3" -> EAGLE-3's three layers of it (coral_fast.eagle)."""
    if layers == "eagle3":
        from coral_fast.eagle import eagle3_feature_layers
        from coral_fast.models import text_config

        return eagle3_feature_layers(text_config(target.config).num_hidden_layers)
    return layers


def make_grouping(kind: str, num_groups: int, lm_head_weight, data: SequenceData | None):
    """The VocabGrouping of `kind`: contiguous ids, frequency-balanced (token counts of `data`'s train split) or
    embedding (balanced k-means over the LM-head rows [V, H]: tokens the head confuses share a group, so the
    router has to find the neighbourhood, not the token)."""
    from coral_fast.grouping import VocabGrouping

    vocab_size = lm_head_weight.shape[0]
    if kind == "contiguous":
        return VocabGrouping.contiguous(vocab_size, num_groups)
    if kind == "frequency":
        if data is None:
            raise ValueError("grouping='frequency' needs data for the token counts")
        return VocabGrouping.from_token_counts(data.token_counts(vocab_size), num_groups)
    if kind == "embedding":
        return VocabGrouping.from_embeddings(lm_head_weight, num_groups)
    raise ValueError(f"no vocabulary grouping of kind {kind!r}: contiguous | frequency | embedding")


def build_draft(target, name: str, grouping: str, num_groups: int, active_groups: int, data: SequenceData | None, device, init_from: str | None = None, seed: int = 0, arch: str = "coral",
                feature_layers=None):
    """A fresh (or `init_from`) fp32 draft for `target` with the requested vocabulary grouping, layer
    architecture (`DRAFT_ARCHS`) and target features (`feature_layers`: None = the last hidden state, or
    layer indices / "eagle3" fused EAGLE-3-style); `data` is told which features to compute.

    A fresh draft's weights are drawn from torch's generator seeded with `seed` right here, so they
    do not depend on what ran before (loading the target draws from it, differently per process)."""
    from coral_fast.draft import DraftConfig, DraftModel, _check_matches_target

    if init_from:
        draft = DraftModel.from_pretrained(init_from, target)
        if data is not None:
            data.set_feature_layers(draft.config.feature_layers)
        return draft.to(device=device, dtype=torch.float32)
    config = DraftConfig.from_target_config(target.config, num_groups=num_groups, active_groups=active_groups,
                                            grouping=grouping, target=name, **DRAFT_ARCHS[arch],
                                            feature_layers=resolve_feature_layers(feature_layers, target))
    _check_matches_target(config, target)
    if data is not None:
        data.set_feature_layers(config.feature_layers)
    vocab_grouping = None
    if grouping in ("frequency", "embedding"):
        vocab_grouping = make_grouping(grouping, num_groups, target.get_output_embeddings().weight, data)
    torch.manual_seed(seed)
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


# accepted range of each TrainConfig flag (argparse types from coral_fast.cli_checks)
CONFIG_TYPES = {
    "unroll_steps": positive_int, "iters": positive_int, "batch_tokens": positive_int, "max_seq_len": int_at_least(3),
    "eval_unroll": positive_int, "eval_max_seqs": positive_int, "csra_max_positions": positive_int,
    "warmup": nonnegative_int, "skip_repeats": nonnegative_int, "eval_every": nonnegative_int, "checkpoint_every": nonnegative_int, "seed": nonnegative_int,
    "lr": positive_float, "step_decay": positive_float, "csra_temperature": positive_float, "min_lr_ratio": unit_float,
    "betas": float_in(0.0, 1.0, high_open=True),
}
CONFIG_CHOICES = {"token_loss": ["kl", "ce", "hard"], "router_target": ["mass", "argmax"]}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, each checked against its accepted range at parse time."""
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            parser.add_argument(flag, type=boolean, default=value, metavar="BOOL")
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=CONFIG_TYPES.get(f.name, finite_float), nargs=len(value), default=value)
        elif f.name in CONFIG_CHOICES:
            parser.add_argument(flag, choices=CONFIG_CHOICES[f.name], default=value)
        elif isinstance(value, float):
            parser.add_argument(flag, type=CONFIG_TYPES.get(f.name, finite_nonneg_float), default=value)
        elif isinstance(value, int):
            parser.add_argument(flag, type=CONFIG_TYPES.get(f.name, nonnegative_int), default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)


def check_data_folder(path: str) -> None:
    """--data: a folder with shard_*.safetensors whose headers read (before the model loads)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"--data {path} is not a folder (write one with `coral-fast data --out {path}`)")
    shards = sorted(folder.glob("shard_*.safetensors"))
    if not shards:
        raise ValueError(f"--data {path} holds no shard_*.safetensors (write them with `coral-fast data --out {path}`)")
    for shard in shards:
        check_safetensors(str(shard))


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="coral-fast train", description="CORAL draft training (multi-step, CSRA, router).")
    parser.add_argument("--model", default="smollm2", help="smollm2 | gemma3-270m | PATH")
    parser.add_argument("--data", required=True, help="folder written by `coral-fast data`")
    parser.add_argument("--out", required=True, help="output folder (draft + checkpoints + logs)")
    parser.add_argument("--grouping", default=None, choices=["contiguous", "frequency", "embedding", "dense"],
                        help="how the grouped head splits the vocabulary (docs/head.md; default contiguous); dense: no "
                             "grouped head. A draft from --init-from or --resume keeps its own")
    parser.add_argument("--draft-arch", default="coral", choices=sorted(DRAFT_ARCHS),
                        help="coral: input norm on the layer (the shipped drafts); eagle: EAGLE-1/2's layer, exportable")
    parser.add_argument("--feature-layers", type=feature_layers_arg, default=None, metavar="last|eagle3|I,J,K",
                        help="the target features the draft reads: the last hidden state (default), or these hidden "
                             "states (0 = embeddings; eagle3 = layers 2, L/2, L-3) fused by a linear layer")
    parser.add_argument("--max-train-tokens", type=positive_int, default=None,
                        help="train on the first sequences up to this many answer tokens (acceptance against data size)")
    parser.add_argument("--num-groups", type=positive_int, default=32)
    parser.add_argument("--active-groups", type=positive_int, default=4)
    parser.add_argument("--eval-groups", type=positive_int, nargs="*", default=[1, 2, 4, 8], help="active-group counts of the held-out estimate")
    parser.add_argument("--init-from", default=None, help="start from this draft folder")
    parser.add_argument("--resume", action="store_true", help="continue exactly from the newest complete checkpoint in --out (last/, else last.tmp/ or last.prev/)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--retrofit-router", action="store_true", help="freeze --draft and train only a router for its grouped head (coral_fast/training/retrofit.py)")
    parser.add_argument("--draft", default=None, help="with --retrofit-router: the draft folder (coral-fast or EAGLE-1/2/HASS)")
    add_train_arguments(parser)
    return parser


def check_arguments(parser: argparse.ArgumentParser, args) -> str | None:
    """Every check that needs no model, before the model loads (exit 2 with one line).
    -> the folder the draft starts from (a checkpoint on --resume, --init-from, or None)."""
    with argument_errors(parser):
        if args.active_groups > args.num_groups:
            raise ValueError(f"--active-groups ({args.active_groups}) must be <= --num-groups ({args.num_groups})")
        if args.resume and args.init_from:
            raise ValueError("--resume continues from --out's checkpoint: leave out --init-from")
        if args.feature_layers is not None and (args.resume or args.init_from):
            raise ValueError("the draft's features are set by the draft it starts from: leave out --feature-layers "
                             "with --resume or --init-from")
        check_model_arg(args.model)
        check_data_folder(args.data)
        start = None
        if args.init_from:
            check_draft_folder(args.init_from)
            start = args.init_from
        elif args.resume:
            start = str(find_checkpoint(args.out, report=lambda line: print(line, file=sys.stderr)))
        if start and args.grouping and not args.retrofit_router:
            config = Path(start) / "config.json"
            kind = read_json(str(config)).get("grouping", "contiguous") if config.is_file() else args.grouping
            if kind != args.grouping:
                raise ValueError(f"--grouping {args.grouping}: the draft in {start} has {kind} groups, which training keeps; "
                                 f"move it first with --retrofit-router --draft {start} --grouping {args.grouping}, then "
                                 f"--init-from the result")
    return start


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = TrainConfig.from_dict({f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    init = check_arguments(parser, args)
    if args.retrofit_router:
        from coral_fast.training.retrofit import main_retrofit

        return main_retrofit(parser, args)

    from coral_fast.models import load_target
    from coral_fast.training.data import load_shards

    device = torch.device(args.device)
    target_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with argument_errors(parser):
        target, _ = load_target(args.model, target_dtype, args.device)
        target.requires_grad_(False)
        # token-only shards: the target computes the features of each batch online
        data = SequenceData(load_shards(args.data), device=device, max_seq_len=cfg.max_seq_len, loss_on_prompt=cfg.loss_on_prompt, target=target,
                            skip_repeats=cfg.skip_repeats)
        if not data.train:
            raise ValueError(f"--data {args.data} holds no training sequences")
        if args.max_train_tokens:
            data.limit_train(args.max_train_tokens)
        draft = build_draft(target, args.model, args.grouping or "contiguous", args.num_groups, args.active_groups, data, device, init, seed=cfg.seed,
                            arch=args.draft_arch, feature_layers=args.feature_layers)
    print(json.dumps({"train_seqs": len(data.train), "train_answer_tokens": data.answer_tokens(data.train), "eval_seqs": len(data.eval), "params": sum(p.numel() for p in draft.parameters() if p.requires_grad), "config": cfg.to_dict()}))
    eval_groups = [a for a in args.eval_groups if a <= draft.config.num_groups] if draft.config.grouping != "dense" else []
    history = train(draft, data, cfg, out_dir=args.out, resume=args.resume, progress=not args.no_progress, eval_groups=eval_groups,
                    report=lambda line: print(line, file=sys.stderr))
    save_small(draft, args.out)
    print(json.dumps({"final_eval": history["final_eval"], "iterations": history["iterations"], "seconds": round(history["seconds"], 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
