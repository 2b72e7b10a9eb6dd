"""Self-distillation data: the target writes the answers (EAGLE / HASS style), stored as token ids.

    coral-fast data --model smollm2 --out DIR --synth 20000 [--samples 2] [--time-budget-s 480]
    coral-fast data --model smollm2 --out DIR [--prompts FILE]          # the shipped prompt set

Prompts come from a file (the shipped set by default) or are synthesized by the target itself
(`--synth N`, coral_fast/training/synth.py; chunk files under DIR/prompts/). They go in chunks of
`--batch-size`; for each chunk c and round r the target answers (round 0 greedy, rounds 1.. sampled at
`--temperature` over the chunk's train prompts) with batched static-cache decoding (batched.py) and
one shard `shard_{c:05d}_{r:02d}.safetensors` is written, atomically, holding token ids only:

    input_ids       [N]    uint16 (int32 when the vocabulary has more than 65536 ids)  prompt + answer
    offsets         [S+1]  int64   sequence s is input_ids[offsets[s]:offsets[s+1]]
    prompt_lengths  [S]    int32   the first prompt_lengths[s] tokens are the prompt
    task_ids        [S]    uint8   index into "tasks" of the shard's metadata (one key, "coral_data": JSON)
    is_eval         [S]    uint8   held-out prompt
    sampled         [S]    uint8   answer sampled (1) or greedy (0)

10M answer tokens are ~20 MB plus their prompts. The trainer recomputes the target's features and
top-k online (trainer.SequenceData with target=). Existing shards (and chunks) are skipped, so the
same command resumes a stopped run; `--time-budget-s` starts no new chunk or shard after the budget.
`meta.json` records everything that changes the shards (model, dtype, prompts or synthesis settings,
every setting); a rerun with a different one into the same folder is refused with one line, before
the model loads. Folders of the older format (stored hidden states, `shard_00000.safetensors`) still
load for training; new shards are never added to them (meta.json differs).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from coral_fast.cli_checks import ArgumentParser, argument_errors, check_model_arg, finite_nonneg_float, nonnegative_int, positive_float, positive_int, unit_float
from coral_fast.models import DTYPES, chat_prompt_ids, document_ids, load_target, text_config
from coral_fast.training.prompts import load_prompts

FORMAT = "tokens-v2"
SHARD_TENSORS = ("input_ids", "offsets", "prompt_lengths", "task_ids", "is_eval", "sampled")
LEGACY_TENSORS = ("input_ids", "hidden", "topk_ids", "topk_logprobs", "loss_mask", "offsets", "is_eval")
CACHE_BUCKETS = (1024, 4096)  # static-cache lengths (longer: multiples of 4096); one captured decode step each


def prompt_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt as the target sees it: a base model (Gemma 3 270M's GGUF) gets a document to continue as it is;
    else the chat template with the generation prompt, or without one a plain "User: ...\nAssistant:" transcript."""
    ids = document_ids(tokenizer, messages)
    if ids is None:
        ids = chat_prompt_ids(tokenizer, messages)
    if ids is not None:
        return ids
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


@dataclass
class DataSettings:
    max_new_tokens: int = 512
    batch_size: int = 256           # prompts per chunk (one shard per chunk and round)
    gen_rows: int = 256             # rows of one decode step
    samples: int = 1                # rounds: 1 greedy + (samples - 1) sampled
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    max_prompt_tokens: int = 3584   # longer prompts are dropped (counted)
    synth: int = 0                  # prompts to synthesize (0: the prompts file)
    stop_loops: int = 0             # n > 0: an answer also ends once its last n tokens loop (batched.looping)


# --- one shard -------------------------------------------------------------------------------------
def id_dtype(vocab_size: int) -> torch.dtype:
    return torch.uint16 if vocab_size <= 1 << 16 else torch.int32


def build_token_shard(sequences: list[list[int]], prompt_lengths: list[int], tasks: list[str], is_eval: list[bool],
                      sampled: list[bool], vocab_size: int) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of one shard (see the module docstring)."""
    for i, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
        if not 0 < p < len(seq):
            raise ValueError(f"sequence {i}: prompt length {p} outside 1..{len(seq) - 1} (no answer token)")
    names = sorted(set(tasks))
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    offsets = torch.zeros(len(sequences) + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    flat = torch.tensor([t for s in sequences for t in s], dtype=torch.int64)
    if flat.numel() and not 0 <= int(flat.min()) <= int(flat.max()) < vocab_size:
        raise ValueError(f"token ids outside 0..{vocab_size - 1}")
    tensors = {
        "input_ids": flat.to(id_dtype(vocab_size)),
        "offsets": offsets,
        "prompt_lengths": torch.tensor(prompt_lengths, dtype=torch.int32),
        "task_ids": torch.tensor([names.index(t) for t in tasks], dtype=torch.uint8),
        "is_eval": torch.tensor([bool(e) for e in is_eval], dtype=torch.uint8),
        "sampled": torch.tensor([bool(x) for x in sampled], dtype=torch.uint8),
    }
    return tensors, {"format": FORMAT, "tasks": names}


def build_shard(sequences: list[list[int]], prompt_lengths: list[int], is_eval: list[bool], hiddens, topk_ids, topk_logprobs) -> dict[str, Tensor]:
    """A shard of the older format with stored features (tests and old folders)."""
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


@torch.no_grad()
def target_outputs(model, sequences: list[list[int]], topk: int, batch_size: int) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Per sequence: the target's last hidden states [N, H] and top-k (ids [N, K], logprobs [N, K])."""
    device = next(model.parameters()).device
    out = ([], [], [])
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        hidden, top_ids, top_lps, _ = target_features(model, ids.to(device), mask.to(device), topk)
        for row, seq in enumerate(chunk):
            n = len(seq)
            out[0].append(hidden[row, :n].to(torch.bfloat16).cpu())
            out[1].append(top_ids[row, :n].int().cpu())
            out[2].append(top_lps[row, :n].cpu())
    return out


@torch.no_grad()
def target_features(model, input_ids: Tensor, attention_mask: Tensor, topk: int, max_logits: int = 1 << 28,
                    feature_layers=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One forward of the frozen target over right-padded rows: input_ids, attention_mask [B, N] ->
    last hidden states [B, N, H] (after the final norm, in the model's dtype), top-k next-token ids
    [B, N, K] int64, their log-probabilities [B, N, K] fp32 (full softmax) and the draft's inputs: the
    last hidden states again, or with feature_layers (a draft's EAGLE-3-style inputs) those hidden
    states (HF's output_hidden_states indices) concatenated, [B, N, k H]. The head runs in row chunks
    of at most `max_logits` logits (Gemma 3's 262144 ids at 16k rows would be 17 GB)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    head = model.get_output_embeddings()
    config = text_config(model.config)
    softcap = getattr(config, "final_logit_softcapping", None)
    out = base(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=feature_layers is not None)
    hidden = out.last_hidden_state
    inputs = hidden if feature_layers is None else torch.cat([out.hidden_states[i] for i in feature_layers], dim=-1)
    B, N, H = hidden.shape
    flat = hidden.reshape(B * N, H)
    vocab = head.weight.shape[0]
    step = max(1, max_logits // vocab)
    ids = torch.empty(B * N, topk, dtype=torch.long, device=hidden.device)
    lps = torch.empty(B * N, topk, dtype=torch.float32, device=hidden.device)
    for start in range(0, B * N, step):
        logits = head(flat[start:start + step]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        values, top = torch.log_softmax(logits, dim=-1).topk(topk, dim=-1)
        ids[start:start + step], lps[start:start + step] = top, values
    return hidden, ids.view(B, N, topk), lps.view(B, N, topk), inputs


def shard_path(out_dir, chunk: int, round_: int) -> Path:
    return Path(out_dir) / f"shard_{chunk:05d}_{round_:02d}.safetensors"


def data_meta(model_name: str, dtype, prompts: list[dict] | None, settings: DataSettings, synth_settings=None) -> dict:
    """Everything that changes the shards and is known before the model loads (meta.json records it
    together with the model's type and sizes). Synthesized prompts are named by their settings."""
    if settings.synth:
        source = {"synth": synth_settings.to_dict()}
    else:
        source = prompts
    prompts_hash = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()
    return {"format": FORMAT, "model": model_name, "dtype": str(dtype).removeprefix("torch."),
            "num_prompts": settings.synth or len(prompts), "prompts_sha256": prompts_hash, "settings": dict(settings.__dict__)}


def check_meta(out_dir: str | Path, meta: dict) -> None:
    """Refuse (one-line ValueError) to add shards to a folder whose meta.json records other settings;
    only the keys in `meta` are compared. `samples` may grow (more sampled rounds only add shards)."""
    path = Path(out_dir) / "meta.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): use a new folder") from None
    old_settings, new_settings = old.get("settings", {}), meta.get("settings", {})
    differ = [f"{k}={old.get(k, '(not recorded)')!r} (now {v!r})" for k, v in meta.items() if k != "settings" and old.get(k) != v]
    defaults = DataSettings().__dict__  # a setting added later: data made before it had its default
    differ += [f"{k}={old_settings.get(k, '(not recorded)')!r} (now {v!r})" for k, v in new_settings.items()
               if k != "samples" and old_settings.get(k, defaults.get(k)) != v]
    if old_settings.get("samples", 0) > new_settings.get("samples", old_settings.get("samples", 0)):
        differ.append(f"samples={old_settings['samples']} (now {new_settings['samples']}: it may only grow)")
    if differ:
        shown = "; ".join(k.replace("prompts_sha256=", "prompts=") for k in differ[:3]) + ("; ..." if len(differ) > 3 else "")
        raise ValueError(f"{out_dir} holds data made with other settings: {shown}; use a new --out folder or the same settings")


def _seed_of(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "little") % (1 << 62)


class IdGenerator:
    """generate(prompts, max_new_tokens, temperature, top_p, seed) -> answers over batched.py.

    Prompts are grouped by the static-cache length they need (CACHE_BUCKETS: a step reads only each row's
    filled slots, so the length costs memory, not time), and each group is decoded in one call over
    `rows` rows, a stopped row taking the next prompt (continuous batching, batched.py); a group of at
    most rows // 8 prompts (the long documents of a chunk) uses a generator of rows // 8 rows. Each
    (length, rows) pair is one captured decode step on the GPU (4 for the defaults)."""

    def __init__(self, model, rows: int, eos: list[int], pad: int, mode: str = "auto"):
        self.model, self.rows, self.eos, self.pad, self.mode = model, rows, eos, pad, mode
        self.generators = {}
        self.tokens = 0
        # where the time goes, per (cache length, rows): calls, steps' tokens, seconds; a generator's first
        # call apart (it includes building its decode step: compile + capture on the GPU)
        self.timings: dict[str, dict] = {}

    def __call__(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float, seed: int,
                 stop_loops: int = 0) -> list[list[int]]:
        from coral_fast.training.batched import BatchedGenerator

        groups: dict[int, list[int]] = {}
        for i in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
            need = len(prompts[i]) + max_new_tokens
            groups.setdefault(next((b for b in CACHE_BUCKETS if b >= need), -(-need // 4096) * 4096), []).append(i)
        answers: list[list[int] | None] = [None] * len(prompts)
        for length, members in sorted(groups.items()):
            width = self.rows if len(members) > max(1, self.rows // 8) else max(1, self.rows // 8)
            first = (length, width) not in self.generators
            started = time.perf_counter()
            if first:
                self.generators[length, width] = BatchedGenerator(self.model, width, length, self.mode)
            out = self.generators[length, width].generate([prompts[i] for i in members], max_new_tokens, self.eos, self.pad,
                                                          temperature, top_p, seed=_seed_of(seed, length), stop_loops=stop_loops)
            t = self.timings.setdefault(f"{length}x{width}" + (" first call" if first else ""),
                                        {"calls": 0, "tokens": 0, "seconds": 0.0})
            t["calls"] += 1
            t["tokens"] += sum(len(a) for a in out)
            t["seconds"] = round(t["seconds"] + time.perf_counter() - started, 2)
            for i, a in zip(members, out):
                answers[i] = a
                self.tokens += len(a)
        return answers


def generate_dataset(model, tokenizer, prompts: list[dict] | None, out_dir: str | Path, settings: DataSettings, model_name: str = "",
                     progress: bool = True, deadline: float | None = None, synth_settings=None, mode: str = "auto") -> dict:
    """Write chunks, shards and meta.json into `out_dir`, skipping what exists (resume). With
    `deadline` (a time.perf_counter() value) no new chunk or shard starts after it (rerun to finish)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from coral_fast.training import synth as S

    if settings.synth and synth_settings is None:
        synth_settings = S.SynthSettings(max_prompt_tokens=settings.max_prompt_tokens)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = text_config(model.config)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    meta = {
        **data_meta(model_name, next(model.parameters()).dtype, prompts, settings, synth_settings),
        "model_type": getattr(text, "model_type", ""), "hidden_size": text.hidden_size, "vocab_size": vocab_size,
    }
    check_meta(out, meta)
    meta_path = out / "meta.json"
    tmp_meta = meta_path.with_suffix(".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_meta, meta_path)
    eos = eos_ids(model, tokenizer)
    if not eos:
        raise ValueError("the tokenizer and model define no eos token")
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else eos[0]
    generate_ids = IdGenerator(model, settings.gen_rows, eos, pad, mode)
    n_items = settings.synth or len(prompts)
    n_chunks = math.ceil(n_items / settings.batch_size)
    stats = {"chunks": n_chunks, "shards": n_chunks * settings.samples, "skipped": 0, "written": 0, "stopped_at": None,
             "answer_tokens": 0, "prompt_tokens": 0, "prompts_synthesized": 0, "dropped": {}}
    suite, index = None, None
    started = time.perf_counter()
    bar = tqdm(range(n_chunks), desc="data chunks", disable=not progress)

    def out_of_time():
        return deadline is not None and time.perf_counter() > deadline

    def count(why, n=1):
        stats["dropped"][why] = stats["dropped"].get(why, 0) + n

    for c in bar:
        missing = [r for r in range(settings.samples) if not shard_path(out, c, r).exists()]
        stats["skipped"] += settings.samples - len(missing)
        if not missing:
            continue
        if out_of_time():
            stats["stopped_at"] = f"chunk {c}"
            break
        if settings.synth:
            rows = S.read_chunk(out, c)
            if rows is None:
                if index is None:
                    suite, index = S.suite_ngrams(), S.rebuild_index(out, c, synth_settings)
                generate_text = S.model_text_generator(generate_ids, tokenizer, eos)
                n = min(settings.batch_size, n_items - c * settings.batch_size)
                rows, dropped = S.synthesize_chunk(generate_text, tokenizer, c, n, settings.seed, synth_settings, index, suite,
                                                   lambda messages: len(prompt_token_ids(tokenizer, messages)))
                S.write_chunk(out, c, rows)
                stats["prompts_synthesized"] += len(rows)
                for why, k in dropped.items():
                    count(f"synth {why}", k)
        else:
            rows = prompts[c * settings.batch_size:(c + 1) * settings.batch_size]
        for r in missing:
            if out_of_time():
                stats["stopped_at"] = f"chunk {c} round {r}"
                break
            rows_r = rows if r == 0 else [row for row in rows if row["split"] == "train"]
            ids = [prompt_token_ids(tokenizer, row["messages"]) for row in rows_r]
            keep = [i for i, p in enumerate(ids) if len(p) <= settings.max_prompt_tokens]
            count("prompt too long", len(ids) - len(keep))
            temperature = settings.temperature if r > 0 else 0.0
            answers = generate_ids([ids[i] for i in keep], settings.max_new_tokens, temperature, settings.top_p, _seed_of(settings.seed, c, r),
                                   settings.stop_loops) if keep else []
            kept = [(i, a) for i, a in zip(keep, answers) if a]
            tensors, metadata = build_token_shard(
                [ids[i] + a for i, a in kept], [len(ids[i]) for i, _ in kept], [rows_r[i].get("category", "") for i, _ in kept],
                [rows_r[i]["split"] == "eval" for i, _ in kept], [r > 0] * len(kept), vocab_size)
            path = shard_path(out, c, r)
            tmp = path.with_suffix(".tmp")
            # one metadata key: safetensors writes several in hash order, and shards should be byte-reproducible
            save_file(tensors, str(tmp), metadata={"coral_data": json.dumps({**metadata, "chunk": c, "round": r}, sort_keys=True)})
            os.replace(tmp, path)  # a shard appears whole or not at all
            stats["written"] += 1
            stats["answer_tokens"] += sum(len(a) for _, a in kept)
            stats["prompt_tokens"] += sum(len(ids[i]) for i, _ in kept)
            bar.set_postfix(answer_tokens=stats["answer_tokens"], tok_s=f"{generate_ids.tokens / (time.perf_counter() - started):.0f}")
            if not progress:  # logs of runs that a hard stop may cut: each shard's totals as it lands
                print(json.dumps({"shard": path.name, "answer_tokens": stats["answer_tokens"],
                                  "seconds": round(time.perf_counter() - started, 1),
                                  "decode_timings": generate_ids.timings}), file=sys.stderr, flush=True)
        if stats["stopped_at"]:
            break
    stats["seconds"] = round(time.perf_counter() - started, 1)
    stats["generated_tok_s"] = round(generate_ids.tokens / max(stats["seconds"], 1e-9), 1)
    stats["decode_timings"] = generate_ids.timings
    return stats


# --- reading shards --------------------------------------------------------------------------------
def shard_files(data_dir: str | Path) -> list[Path]:
    return sorted(Path(data_dir).glob("shard_*.safetensors"))


def load_shards(data_dir: str | Path) -> dict:
    """All shards of a folder concatenated into one flat dict (offsets re-based), with `loss_mask`
    [N] uint8 (1 where token t+1 is an answer token). Token-only shards also give `prompt_lengths`,
    `task_ids` (into the list under "tasks") and `sampled`; shards of the older format give the stored
    `hidden`, `topk_ids`, `topk_logprobs`. One folder holds one format."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    paths = shard_files(data_dir)
    if not paths:
        raise ValueError(f"no shard_*.safetensors in {data_dir}")
    parts, task_lists = [], []
    for p in paths:
        part = load_file(str(p))
        with safe_open(str(p), "pt") as f:
            metadata = f.metadata() or {}
        legacy = "hidden" in part
        missing = set(LEGACY_TENSORS if legacy else SHARD_TENSORS) - set(part)
        if missing:
            raise ValueError(f"{p} lacks {sorted(missing)}")
        if parts and legacy != ("hidden" in parts[0]):
            raise ValueError(f"{data_dir} mixes token-only shards and shards with stored features ({p.name}): use one folder per format")
        parts.append(part)
        task_lists.append(json.loads(metadata.get("coral_data", "{}")).get("tasks", []))
    legacy = "hidden" in parts[0]
    keys = [k for k in (LEGACY_TENSORS if legacy else SHARD_TENSORS) if k != "offsets"]
    merged: dict = {}
    for k in keys:
        merged[k] = torch.cat([part[k].to(torch.int32) if k == "input_ids" else part[k] for part in parts])
    offsets, base = [torch.zeros(1, dtype=torch.int64)], 0
    for part in parts:
        offsets.append(part["offsets"][1:] + base)
        base += int(part["offsets"][-1])
    merged["offsets"] = torch.cat(offsets)
    if not legacy:
        names = sorted({t for tasks in task_lists for t in tasks})
        merged["task_ids"] = torch.cat([torch.tensor([names.index(tasks[i]) for i in part["task_ids"].tolist()], dtype=torch.int64)
                                        for part, tasks in zip(parts, task_lists)])
        merged["tasks"] = names
        loss_mask = torch.zeros(base, dtype=torch.uint8)
        starts, ends = merged["offsets"][:-1].tolist(), merged["offsets"][1:].tolist()
        for s, e, p in zip(starts, ends, merged["prompt_lengths"].tolist()):
            loss_mask[s + p - 1: e - 1] = 1
        merged["loss_mask"] = loss_mask
    return merged


# --- command line ----------------------------------------------------------------------------------
def parse_mix(text: str) -> dict:
    """--synth-mix "chat=0.3,qa=0.2,...": weights of the synthesized kinds (the others get 0)."""
    from coral_fast.training.synth import KINDS

    mix = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if name not in KINDS or not math.isfinite(weight) or weight < 0:
            raise argparse.ArgumentTypeError(f"must be KIND=WEIGHT,... with KIND among {', '.join(KINDS)} and WEIGHT >= 0, got {part!r}")
        mix[name] = weight
    if not any(mix.values()):
        raise argparse.ArgumentTypeError("at least one kind needs a weight > 0")
    return mix


def main(argv=None) -> int:
    parser = ArgumentParser(prog="coral-fast data", description="Self-distillation data (token ids) from a target model.")
    parser.add_argument("--model", default="smollm2", help="smollm2 | gemma3-270m | PATH")
    parser.add_argument("--out", required=True, help="output folder (resumable: the same command continues it)")
    parser.add_argument("--prompts", default=None, help="prompts.jsonl (default: the shipped set; not with --synth)")
    parser.add_argument("--limit", type=positive_int, default=None, help="use only the first N prompts of the file")
    parser.add_argument("--synth", type=nonnegative_int, default=0, help="synthesize N prompts with the target (Magpie + task templates)")
    parser.add_argument("--synth-mix", type=parse_mix, default=None, help="KIND=WEIGHT,... of the synthesized kinds (default: synth.DEFAULT_MIX)")
    parser.add_argument("--synth-temperature", type=positive_float, default=1.0)
    parser.add_argument("--max-new-tokens", type=positive_int, default=512)
    parser.add_argument("--max-prompt-tokens", type=positive_int, default=3584)
    parser.add_argument("--batch-size", type=positive_int, default=256, help="prompts per chunk (= per shard)")
    parser.add_argument("--gen-rows", type=positive_int, default=256, help="rows of one decode step")
    parser.add_argument("--samples", type=positive_int, default=1, help="answers per train prompt: 1 greedy + (n-1) sampled")
    parser.add_argument("--temperature", type=positive_float, default=0.8, help="of the sampled rounds (> 0)")
    parser.add_argument("--top-p", type=unit_float, default=0.95)
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--stop-loops", type=nonnegative_int, default=0,
                        help="N > 0: an answer also ends once its last N tokens repeat with a period of at most 128 tokens")
    parser.add_argument("--time-budget-s", type=finite_nonneg_float, default=0.0, help="start no chunk or shard after this many seconds (0: no limit)")
    parser.add_argument("--decode", default="auto", choices=["auto", "eager", "graphs", "compile"],
                        help="decode step: captured in a CUDA graph on the GPU (auto), eager on the CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    settings = DataSettings(
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, gen_rows=args.gen_rows, samples=args.samples,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, max_prompt_tokens=args.max_prompt_tokens, synth=args.synth,
        stop_loops=args.stop_loops,
    )
    with argument_errors(parser):  # everything that needs no model, before it loads
        check_model_arg(args.model)
        synth_settings, prompts = None, None
        if args.synth:
            from coral_fast.training.synth import DEFAULT_MIX, SynthSettings

            if args.prompts or args.limit:
                raise ValueError("--synth makes its own prompts: leave out --prompts and --limit")
            synth_settings = SynthSettings(mix=args.synth_mix or dict(DEFAULT_MIX), temperature=args.synth_temperature,
                                           max_prompt_tokens=args.max_prompt_tokens)
        else:
            prompts = load_prompts(args.prompts)
            if args.limit:
                prompts = prompts[: args.limit]
        check_meta(args.out, data_meta(args.model, dtype, prompts, settings, synth_settings))
    with argument_errors(parser):
        model, tokenizer = load_target(args.model, dtype, args.device)
        model.requires_grad_(False)
        deadline = started + args.time_budget_s if args.time_budget_s else None
        stats = generate_dataset(model, tokenizer, prompts, args.out, settings, model_name=args.model, progress=not args.no_progress,
                                 deadline=deadline, synth_settings=synth_settings, mode=args.decode)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
