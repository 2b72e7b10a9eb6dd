"""Self-distillation data: the target writes the answers (EAGLE / HASS style).

    coral-fast data --model smollm2 --out DIR [--max-new-tokens 256] [--batch-size 256] [--samples 3]

For each prompt of the shipped set (or `--prompts FILE`), the target answers with its chat template
(round 0 greedy, rounds 1.. sampled at `--temperature` for more varied data); then one forward over
prompt + answer stores, per token position t:

    input_ids      [N]      int32   the token at t
    hidden         [N, H]   bf16    the target's last hidden state at t (after its final norm)
    topk_ids       [N, K]   int32   the target's top-K next-token ids at t (predicting token t+1)
    topk_logprobs  [N, K]   fp32    their log-probabilities (full softmax, not renormalized)
    loss_mask      [N]      uint8   1 where token t+1 belongs to the answer (t = P-1 .. N-2)

Sequences are concatenated; `offsets` [S+1] int64 delimits them and `is_eval` [S] uint8 marks the
held-out prompts. One safetensors shard per generation batch (`shard_00000.safetensors`, ...);
existing shards are skipped, so an interrupted run resumes where it stopped. `meta.json` records
everything that changes the shards (model, dtype, prompts, every setting); a rerun with a different
one into the same folder is refused with one line, before the model loads.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from coral_fast.cli_checks import ArgumentParser, argument_errors, check_model_arg, nonnegative_int, positive_float, positive_int
from coral_fast.models import DTYPES, chat_prompt_ids, load_target
from coral_fast.training.prompts import load_prompts

SHARD_TENSORS = ("input_ids", "hidden", "topk_ids", "topk_logprobs", "loss_mask", "offsets", "is_eval")


def prompt_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt as the target sees it: its chat template with the generation prompt, or plain text."""
    ids = chat_prompt_ids(tokenizer, messages)
    if ids is not None:
        return ids
    # base models (Gemma 3 270M's GGUF): a plain "User: ...\nAssistant:" transcript
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    ids = tokenizer(text)["input_ids"]
    return list(ids)


def eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return sorted(int(i) for i in ids)


# --- one shard -------------------------------------------------------------------------------------
@dataclass
class DataSettings:
    max_new_tokens: int = 256
    batch_size: int = 256
    forward_batch_size: int = 32
    samples: int = 1
    temperature: float = 0.8
    top_p: float = 0.95
    topk: int = 16
    seed: int = 0


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[int]], settings: DataSettings, sample: bool, eos: list[int]) -> list[list[int]]:
    """Batched `generate` with left padding; returns the answer ids, cut after the first eos."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    kwargs = dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0) if sample else dict(do_sample=False)
    out = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
        max_new_tokens=settings.max_new_tokens, eos_token_id=eos, pad_token_id=pad, **kwargs,
    )
    answers = []
    eos_set = set(eos)
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, tok in enumerate(row) if tok in eos_set), len(row))
        answers.append(row[:cut])
    return answers


@torch.no_grad()
def target_outputs(model, sequences: list[list[int]], topk: int, batch_size: int) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """One forward per batch (right padding): last hidden states [N, H] and top-k (ids, logprobs) [N, K]."""
    device = next(model.parameters()).device
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    head = model.get_output_embeddings()
    hiddens, ids_out, lps_out = [], [], []
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    results: dict[int, tuple] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(sequences[i]) for i in chunk)
        input_ids = torch.zeros((len(chunk), width), dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            input_ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            attention_mask[row, : len(sequences[i])] = 1
        hidden = base(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).last_hidden_state
        logits = head(hidden)
        softcap = getattr(model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        values, ids = logprobs.topk(topk, dim=-1)
        for row, i in enumerate(chunk):
            n = len(sequences[i])
            results[i] = (hidden[row, :n].to(torch.bfloat16).cpu(), ids[row, :n].int().cpu(), values[row, :n].cpu())
        del logits, logprobs
    for i in range(len(sequences)):
        h, k, v = results[i]
        hiddens.append(h)
        ids_out.append(k)
        lps_out.append(v)
    return hiddens, ids_out, lps_out


def build_shard(sequences: list[list[int]], prompt_lengths: list[int], is_eval: list[bool], hiddens, topk_ids, topk_logprobs) -> dict[str, Tensor]:
    """Concatenate sequences into the flat shard layout (see module docstring)."""
    lengths = [len(s) for s in sequences]
    offsets = torch.zeros(len(sequences) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    loss_mask = torch.zeros(int(offsets[-1]), dtype=torch.uint8)
    for i, (n, p) in enumerate(zip(lengths, prompt_lengths)):
        if not 0 < p <= n:
            raise ValueError(f"sequence {i}: prompt length {p} outside 1..{n}")
        loss_mask[offsets[i] + p - 1: offsets[i] + n - 1] = 1
    return {
        "input_ids": torch.tensor([t for s in sequences for t in s], dtype=torch.int32),
        "hidden": torch.cat(hiddens).contiguous(),
        "topk_ids": torch.cat(topk_ids).contiguous(),
        "topk_logprobs": torch.cat(topk_logprobs).float().contiguous(),
        "loss_mask": loss_mask,
        "offsets": offsets,
        "is_eval": torch.tensor([bool(e) for e in is_eval], dtype=torch.uint8),
    }


def plan_shards(prompts: list[dict], settings: DataSettings) -> list[dict]:
    """Jobs in a fixed order: round 0 greedy over all prompts, rounds 1.. sampled over the train split."""
    shards = []
    for round_ in range(settings.samples):
        rows = prompts if round_ == 0 else [p for p in prompts if p["split"] == "train"]
        for start in range(0, len(rows), settings.batch_size):
            shards.append({"round": round_, "sample": round_ > 0, "rows": rows[start:start + settings.batch_size]})
    return shards


def data_meta(model_name: str, dtype, prompts: list[dict], settings: DataSettings) -> dict:
    """Everything that changes the shards and is known before the model loads (meta.json records it
    together with the model's type and sizes)."""
    import hashlib

    prompts_hash = hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()
    return {"model": model_name, "dtype": str(dtype).removeprefix("torch."), "num_prompts": len(prompts), "prompts_sha256": prompts_hash, "settings": dict(settings.__dict__)}


def check_meta(out_dir: str | Path, meta: dict) -> None:
    """Refuse (one-line ValueError) to add shards to a folder whose meta.json records other settings;
    only the keys in `meta` are compared. `samples` may grow (more sampled rounds only append shards)."""
    path = Path(out_dir) / "meta.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): use a new folder") from None
    old_settings, new_settings = old.get("settings", {}), meta.get("settings", {})
    differ = [f"{k}={old.get(k, '(not recorded)')!r} (now {v!r})" for k, v in meta.items() if k != "settings" and old.get(k) != v]
    differ += [f"{k}={old_settings.get(k, '(not recorded)')!r} (now {v!r})" for k, v in new_settings.items()
               if k != "samples" and old_settings.get(k) != v]
    if old_settings.get("samples", 0) > new_settings.get("samples", old_settings.get("samples", 0)):
        differ.append(f"samples={old_settings['samples']} (now {new_settings['samples']}: it may only grow)")
    if differ:
        shown = "; ".join(k.replace("prompts_sha256=", "prompts=") for k in differ[:3]) + ("; ..." if len(differ) > 3 else "")
        raise ValueError(f"{out_dir} holds data made with other settings: {shown}; use a new --out folder or the same settings")


def generate_dataset(model, tokenizer, prompts: list[dict], out_dir: str | Path, settings: DataSettings, model_name: str = "", progress: bool = True, deadline: float | None = None) -> dict:
    """Write shards + meta.json into `out_dir`, skipping shards that already exist (resume).
    With `deadline` (a time.perf_counter() value) no new shard starts after it (rerun to finish)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    meta = {
        **data_meta(model_name, next(model.parameters()).dtype, prompts, settings),
        "model_type": getattr(text_config, "model_type", ""),
        "hidden_size": text_config.hidden_size, "vocab_size": text_config.vocab_size,
    }
    check_meta(out, meta)
    meta_path = out / "meta.json"
    tmp_meta = meta_path.with_suffix(".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_meta, meta_path)
    eos = eos_ids(model, tokenizer)
    if not eos:
        raise ValueError("the tokenizer and model define no eos token")
    shards = plan_shards(prompts, settings)
    done = tokens = 0
    stopped = None
    bar = tqdm(shards, desc="data shards", disable=not progress)
    started = time.perf_counter()
    for index, shard in enumerate(bar):
        path = out / f"shard_{index:05d}.safetensors"
        if path.exists():
            done += 1
            continue
        if deadline is not None and time.perf_counter() > deadline:
            stopped = index
            break
        torch.manual_seed(settings.seed + index)
        prompt_ids = [prompt_token_ids(tokenizer, row["messages"]) for row in shard["rows"]]
        answers = generate_answers(model, tokenizer, prompt_ids, settings, shard["sample"], eos)
        sequences = [p + a for p, a in zip(prompt_ids, answers)]
        keep = [i for i, a in enumerate(answers) if len(a) >= 2]
        sequences = [sequences[i] for i in keep]
        hiddens, ids, lps = target_outputs(model, sequences, settings.topk, settings.forward_batch_size)
        tensors = build_shard(
            sequences, [len(prompt_ids[i]) for i in keep], [shard["rows"][i]["split"] == "eval" for i in keep],
            hiddens, ids, lps,
        )
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"round": str(shard["round"])})
        os.replace(tmp, path)  # a shard appears whole or not at all
        tokens += int(tensors["loss_mask"].sum())
        bar.set_postfix(answer_tokens=tokens, tok_s=f"{tokens / (time.perf_counter() - started):.0f}")
    return {"shards": len(shards), "skipped": done, "stopped_at_shard": stopped, "answer_tokens": tokens, "seconds": time.perf_counter() - started}


# --- reading shards --------------------------------------------------------------------------------
def load_shards(data_dir: str | Path) -> dict[str, Tensor]:
    """All shards of a folder concatenated into one flat dict (offsets re-based)."""
    from safetensors.torch import load_file

    paths = sorted(Path(data_dir).glob("shard_*.safetensors"))
    if not paths:
        raise ValueError(f"no shard_*.safetensors in {data_dir}")
    parts = [load_file(str(p)) for p in paths]
    for p, part in zip(paths, parts):
        missing = set(SHARD_TENSORS) - set(part)
        if missing:
            raise ValueError(f"{p} lacks {sorted(missing)}")
    merged = {k: torch.cat([part[k] for part in parts]) for k in SHARD_TENSORS if k != "offsets"}
    offsets, base = [torch.zeros(1, dtype=torch.int64)], 0
    for part in parts:
        offsets.append(part["offsets"][1:] + base)
        base += int(part["offsets"][-1])
    merged["offsets"] = torch.cat(offsets)
    return merged


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    return json.loads(path.read_text()) if path.exists() else {}


# --- command line ----------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = ArgumentParser(prog="coral-fast data", description="Self-distillation data from a target model.")
    parser.add_argument("--model", default="smollm2", help="smollm2 | gemma3-270m | PATH")
    parser.add_argument("--out", required=True, help="output folder (resumable: the same command continues it)")
    parser.add_argument("--prompts", default=None, help="prompts.jsonl (default: the shipped set)")
    parser.add_argument("--limit", type=positive_int, default=None, help="use only the first N prompts")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256)
    parser.add_argument("--batch-size", type=positive_int, default=256, help="prompts per generate call (= per shard)")
    parser.add_argument("--forward-batch-size", type=positive_int, default=32)
    parser.add_argument("--samples", type=positive_int, default=1, help="answers per train prompt: 1 greedy + (n-1) sampled")
    parser.add_argument("--temperature", type=positive_float, default=0.8, help="of the sampled rounds (> 0)")
    parser.add_argument("--topk", type=positive_int, default=16, help="target log-probs kept per position")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    settings = DataSettings(
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, forward_batch_size=args.forward_batch_size,
        samples=args.samples, temperature=args.temperature, topk=args.topk, seed=args.seed,
    )
    with argument_errors(parser):  # everything that needs no model, before it loads
        check_model_arg(args.model)
        prompts = load_prompts(args.prompts)
        if args.limit:
            prompts = prompts[: args.limit]
        check_meta(args.out, data_meta(args.model, dtype, prompts, settings))
    with argument_errors(parser):
        model, tokenizer = load_target(args.model, dtype, args.device)
        stats = generate_dataset(model, tokenizer, prompts, args.out, settings, model_name=args.model, progress=not args.no_progress)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
