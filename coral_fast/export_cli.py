"""`coral-fast export`: a coral-fast draft folder in EAGLE's checkpoint format.

    coral-fast export --format eagle DRAFT_DIR OUT_DIR [--with-embedding --model M] [--weights bin]

Reads only the draft folder (no model load) unless --with-embedding copies the target's embedding in.
The router and grouping are dropped (EAGLE's format has a dense head); a draft whose architecture
EAGLE cannot express (an input norm on its layer, head_dim != hidden / heads) is refused in one line.
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace

import torch
from torch import nn


def draft_without_target(path):
    """A DraftModel from a coral-fast folder with placeholders for the target's embedding and head
    (export needs only the draft's own tensors)."""
    from coral_fast.cli_checks import read_json
    from coral_fast.draft import CONFIG_NAME, WEIGHTS_NAME, DraftConfig, DraftModel, load_weights
    from coral_fast.eagle import is_eagle_config

    raw = read_json(os.path.join(path, CONFIG_NAME))
    if is_eagle_config(raw):
        raise ValueError(f"{path} is already an EAGLE draft folder")
    config = DraftConfig.from_file_dict(raw, os.path.join(path, CONFIG_NAME))
    tensors = load_weights(os.path.join(path, WEIGHTS_NAME))
    dtype = tensors["fc.weight"].dtype if "fc.weight" in tensors else torch.float32
    dense = replace(config, grouping="dense")  # a zero-stride stand-in head: nothing to re-lay
    head = torch.zeros(1, config.hidden_size, dtype=dtype).expand(config.vocab_size, config.hidden_size)
    draft = DraftModel(dense, nn.Identity(), head)
    mine = {k: v for k, v in tensors.items() if not k.startswith(("head.", "grouping."))}
    missing, unexpected = draft.load_state_dict(mine, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(f"{path}: draft weights do not match its config (missing {missing[:4]}, unexpected {unexpected[:4]})")
    draft.config = config  # the notes say what the grouped head loses
    return draft.to(dtype)


def main(argv=None) -> int:
    from coral_fast.cli_checks import ArgumentParser, argument_errors

    parser = ArgumentParser(prog="coral-fast export", description="Write a coral-fast draft in another checkpoint format.")
    parser.add_argument("--format", required=True, choices=["eagle"], help="eagle: EAGLE-1/2 (EAGLE's code, SGLang, vLLM)")
    parser.add_argument("draft", metavar="DRAFT_DIR")
    parser.add_argument("out", metavar="OUT_DIR")
    parser.add_argument("--weights", default="safetensors", choices=["safetensors", "bin"], help="model.safetensors or pytorch_model.bin")
    parser.add_argument("--architecture", default=None, help="architectures[0] to write (default LlamaForCausalLMEagle, SGLang's name)")
    parser.add_argument("--max-position-embeddings", type=int, default=None, help="default: the target's with --model, else 8192")
    parser.add_argument("--with-embedding", action="store_true", help="copy the target's embedding in (needs --model)")
    parser.add_argument("--model", default=None, help="the target (smollm2 | gemma3-270m | PATH): only for --with-embedding / max positions")
    args = parser.parse_args(argv)
    with argument_errors(parser):
        if args.with_embedding and not args.model:
            raise ValueError("--with-embedding needs --model (the target whose embedding to copy)")
        if not os.path.isdir(args.draft):
            raise ValueError(f"DRAFT_DIR {args.draft!r} is not a folder")
        if os.path.abspath(args.draft) == os.path.abspath(args.out):
            raise ValueError("OUT_DIR must differ from DRAFT_DIR")
        draft = draft_without_target(args.draft)
        from coral_fast.eagle import eagle_state

        eagle_state(draft)  # refuse before any model loads
        embedding, positions = None, args.max_position_embeddings
        if args.model:
            from coral_fast.draft import _check_matches_target
            from coral_fast.models import load_target, text_config

            target, _ = load_target(args.model, torch.float32, "cpu")
            _check_matches_target(draft.config, target, source=args.draft)
            if args.with_embedding:
                embedding = target.get_input_embeddings().weight
            text = text_config(target.config)
            positions = positions or getattr(text, "max_position_embeddings", None)
        notes = draft.save_pretrained(args.out, format="eagle", embedding=embedding, weights=args.weights,
                                      architecture=args.architecture, max_position_embeddings=positions or 8192)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote an EAGLE draft to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
