"""Multi-step (HASS-style) CORAL draft training.

Unrolling. A sequence of N tokens gives L = N - 1 training positions t: inputs (f_t, x_{t+1}),
targets f_{t+1} and the target's distribution p_{t+1} (stored top-K). Step 0 is the EAGLE pass over
the target's features. At step s >= 1 the input feature at t is the draft's own step s-1 output at
t-1 (detached by default, as HASS does), and the query at t attends to

    step-0 keys at positions <= t - s    (the accepted context, built from target features)
    step-j keys at position t - s + j    for j = 1..s (the draft's own earlier tokens of this chain)

which is what the draft sees at depth s of a draft tree whose root is position t - s (the HASS mask).
Losses of step s count only positions t >= s (a chain needs a real root). Each step adds

    w_feature * SmoothL1(h, f_{t+1}) + w_token * KL(p_{t+1} || q) + w_router * router CE

weighted by step_decay**s; CSRA adds w_csra * InfoNCE over the steps' features at the same positions.
The target's embedding and LM head stay frozen; fc, the decoder layer and the router train.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from coral_fast.kernels._gqa import repeat_kv
from coral_fast.training import losses as L


@dataclass
class TrainConfig:
    unroll_steps: int = 3           # n: 1 = single-step EAGLE training
    detach_unroll: bool = True      # detach a step's features before feeding the next step
    w_feature: float = 1.0
    w_token: float = 0.5
    w_csra: float = 0.1
    w_router: float = 0.1
    step_decay: float = 1.0         # weight of step s: step_decay ** s
    token_loss: str = "kl"          # "kl" | "ce" | "hard"
    router_target: str = "mass"     # "mass" | "argmax"
    csra_temperature: float = 0.1
    csra_max_positions: int = 512   # positions sampled per batch for the InfoNCE matrix
    feature_noise: float = 0.0      # uniform noise on the step-0 input features (EAGLE uses 0.2 scaled)
    lr: float = 5e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    warmup: int = 50                # iterations
    iters: int = 1000               # total optimizer steps (cosine decay to min_lr_ratio * lr)
    min_lr_ratio: float = 0.05
    batch_tokens: int = 8192        # padded tokens per batch
    max_seq_len: int = 1024
    eval_every: int = 200
    eval_unroll: int = 6            # chain depth of the held-out acceptance estimate
    eval_max_seqs: int = 64
    checkpoint_every: int = 500
    seed: int = 0
    loss_on_prompt: bool = False    # train on the prompt positions too (default: answers only)
    skip_repeats: int = 0           # n > 0: no loss where a training answer repeats one of its own n-grams
    time_budget_s: float = 0.0      # stop after this many seconds (0: no limit); the cosine follows the time
    keep_best: bool = False         # end with the weights of the best held-out evaluation

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


# --- the HASS mask and the unrolled forward --------------------------------------------------------
def hass_mask(length: int, step: int, device=None) -> Tensor:
    """Boolean [L, (step+1) L] mask (True = attend) for queries of unrolled `step` over the keys of
    steps 0..step concatenated along the sequence axis (see the module docstring)."""
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    blocks = [k <= q - step]
    for j in range(1, step + 1):
        blocks.append(k == q - step + j)
    return torch.cat(blocks, dim=1)


def unrolled_forward(draft, features: Tensor, tokens: Tensor, positions: Tensor, steps: int, detach: bool = True, noise: float = 0.0) -> list[Tensor]:
    """Run the draft for `steps` unrolled steps. features: [B, L, H] (f_t; [B, L, k H] target states of a
    draft with feature_layers), tokens: [B, L] (x_{t+1}),
    positions: [B, L]. Returns [h_0, ..., h_{steps-1}], each [B, L, H]."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    length = features.shape[1]
    keys: list[Tensor] = []
    values: list[Tensor] = []
    outputs: list[Tensor] = []
    step_features = features
    if noise > 0:
        step_features = features + (torch.rand_like(features, dtype=torch.float32) * 2 - 1).to(features.dtype) * noise
    for step in range(steps):
        mask = hass_mask(length, step, features.device)

        def attn_fn(q, k, v, mask=mask, step=step):
            keys.append(k)
            values.append(v)
            if step == 0:
                groups = q.shape[1] // k.shape[1]
                return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), is_causal=True)
            all_k = torch.cat(keys, dim=2)
            all_v = torch.cat(values, dim=2)
            groups = q.shape[1] // all_k.shape[1]
            return F.scaled_dot_product_attention(q, repeat_kv(all_k, groups), repeat_kv(all_v, groups), attn_mask=mask)

        hidden = draft(step_features, tokens, positions, attn_fn=attn_fn)
        outputs.append(hidden)
        previous = hidden.detach() if detach else hidden
        first = features[:, :1]  # position 0 has no earlier draft output: its target feature again
        if first.shape[-1] != previous.shape[-1]:  # k H target states (feature_layers): fused to H
            first = draft.input_features(first)
        step_features = torch.cat([first.to(previous.dtype), previous[:, :-1]], dim=1)
    return outputs


# --- batches ---------------------------------------------------------------------------------------
def repeated_ngram_ends(input_ids: Tensor, offsets: list[int], answer_mask: Tensor, n: int) -> Tensor:
    """bool [N]: answer positions whose token ends an n-gram (all n tokens in the answer) that already
    ended at an earlier position of the same sequence's answer.

    A small target's long greedy answers drift into loops (in the SmolLM2 data over half of the answer
    tokens end a 5-gram seen earlier in their answer); those tokens are easy, and the prompt-lookup chain
    copies them at no draft cost. `--skip-repeats n` leaves them out of the loss (they stay context), so
    the draft's training goes to the tokens the loop finds hard. Copies from the prompt still count.
    input_ids: [N] int64 flat sequences, offsets: [S + 1], answer_mask: [N] bool (True on answer tokens).
    """
    if n < 1:
        raise ValueError(f"skip_repeats wants n >= 1, got {n}")
    total = input_ids.numel()
    seq = torch.repeat_interleave(torch.arange(len(offsets) - 1), torch.tensor(offsets).diff())
    # a position ends an answer n-gram when it and its n - 1 predecessors are answer tokens of its sequence
    inside = answer_mask.clone()
    key = input_ids.clone()
    for back in range(1, n):
        prev_ok = torch.zeros(total, dtype=torch.bool)
        prev_ok[back:] = answer_mask[:-back] & (seq[back:] == seq[:-back])
        inside &= prev_ok
        shifted = torch.zeros(total, dtype=torch.int64)
        shifted[back:] = input_ids[:-back]
        key = key * 1_000_003 + shifted  # a polynomial hash of the n-gram, mod 2^64: a rare collision only drops one loss position
    key = key * 1_000_003 + seq
    where = inside.nonzero().squeeze(1)
    _, inverse = torch.unique(key[where], return_inverse=True)
    first = torch.full((int(inverse.max()) + 1 if len(where) else 0,), total, dtype=torch.int64)
    first.scatter_reduce_(0, inverse, where, reduce="amin")
    repeated = torch.zeros(total, dtype=torch.bool)
    repeated[where] = where > first[inverse]
    return repeated


class SequenceData:
    """Sequences from `load_shards` (flat tensors + offsets), split into train and held-out eval.

    Token-only shards (the `coral-fast data` format) need `target`: each batch runs the frozen target
    over its sequences (`data.target_features`: last hidden states and top-`topk` log-probabilities)
    when it is collated, so features are never stored. Shards of the older format carry them.
    `set_feature_layers` for a draft with EAGLE-3-style inputs."""

    def __init__(self, shards: dict, device="cpu", max_seq_len: int = 1024, loss_on_prompt: bool = False, target=None, topk: int = 16, skip_repeats: int = 0):
        self.device = torch.device(device)
        offsets = shards["offsets"].tolist()
        self.input_ids = shards["input_ids"].long().to(device)
        self.target, self.topk, self.feature_layers = target, topk, None
        if "hidden" in shards:
            self.hidden = shards["hidden"].to(device)
            self.topk_ids = shards["topk_ids"].long().to(device)
            self.topk_logprobs = shards["topk_logprobs"].float().to(device)
            self.hidden_size = self.hidden.shape[-1]
        else:
            if target is None:
                raise ValueError("token-only shards need the target model to compute features online (SequenceData(..., target=model))")
            self.hidden = self.topk_ids = self.topk_logprobs = None
            self.hidden_size = target.get_input_embeddings().weight.shape[1]
            vocab = target.get_input_embeddings().weight.shape[0]
            if int(self.input_ids.max()) >= vocab:
                raise ValueError(f"token ids up to {int(self.input_ids.max())} in the data, but the target has {vocab} ids: data of another model")
        mask = shards["loss_mask"].bool()
        if loss_on_prompt:
            mask = torch.ones_like(mask)
            for end in offsets[1:]:
                mask[end - 1] = False  # the last position has no next token
        self.loss_mask = mask.to(device)
        # a sequence longer than max_seq_len keeps its end: the answer is what it is there for (a long
        # document's summary would otherwise be cut away with the document's tail)
        spans = [(max(s, e - max_seq_len), e) for s, e in zip(offsets[:-1], offsets[1:])]
        is_eval = shards["is_eval"].bool().tolist()
        if skip_repeats:
            repeats = repeated_ngram_ends(shards["input_ids"].long(), offsets, shards["loss_mask"].bool(), skip_repeats)
            held_out = torch.repeat_interleave(shards["is_eval"].bool(), torch.tensor(offsets).diff())
            self.loss_mask &= ~(repeats & ~held_out).to(device)  # held-out answers keep every position
        self.train = [sp for sp, ev in zip(spans, is_eval) if not ev and sp[1] - sp[0] >= 3]
        self.eval = [sp for sp, ev in zip(spans, is_eval) if ev and sp[1] - sp[0] >= 3]

    def set_feature_layers(self, layers) -> None:
        """A draft's DraftConfig.feature_layers (None: the last hidden state): the batches' "features" are
        then those target hidden states concatenated [B, L, k H]; "target_features" stay the last."""
        if layers is not None and self.hidden is not None:
            raise ValueError("shards with stored features hold the last hidden state only: a draft with feature_layers "
                             "needs token-only shards (features computed online by the target)")
        self.feature_layers = layers

    def answer_tokens(self, spans) -> int:
        """Positions with a loss (answer tokens) in `spans`."""
        return sum(int(self.loss_mask[s + 1:e].sum()) for s, e in spans)

    def limit_train(self, max_tokens: int) -> int:
        """Keep the first training sequences (in the data's order) up to `max_tokens` answer tokens (at
        least one sequence): a smaller data set of the same kind (acceptance against data size). -> kept."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        kept, total = [], 0
        for span in self.train:
            n = self.answer_tokens([span])
            if kept and total + n > max_tokens:
                break
            kept.append(span)
            total += n
        self.train = kept
        return total

    def token_counts(self, vocab_size: int) -> Tensor:
        """Counts of the answer tokens of the train split (for frequency-balanced grouping)."""
        counts = torch.zeros(vocab_size, dtype=torch.float64)
        for s, e in self.train:
            ids = self.input_ids[s:e][self.loss_mask[s:e].roll(1)[: e - s]]
            counts += torch.bincount(ids.cpu(), minlength=vocab_size).double()
        return counts

    def batch_plan(self, spans: list[tuple[int, int]], batch_tokens: int) -> list[list[tuple[int, int]]]:
        """Length-bucketed groups of spans of at most `batch_tokens` padded tokens, shortest first."""
        order = sorted(spans, key=lambda sp: sp[1] - sp[0])
        groups, current, width = [], [], 0
        for sp in order:
            n = sp[1] - sp[0]
            if current and max(width, n) * (len(current) + 1) > batch_tokens:
                groups.append(current)
                current, width = [], 0
            current.append(sp)
            width = max(width, n)
        if current:
            groups.append(current)
        return groups

    def batches(self, spans: list[tuple[int, int]], batch_tokens: int, shuffle: bool, rng: random.Random):
        """Length-bucketed batches of at most `batch_tokens` padded tokens (in `rng`'s order if shuffle)."""
        groups = self.batch_plan(spans, batch_tokens)
        if shuffle:
            rng.shuffle(groups)
        for group in groups:
            yield self.collate(group)

    def collate(self, spans: list[tuple[int, int]]) -> dict[str, Tensor]:
        """Right-padded batch of L = N - 1 positions per sequence (see the module docstring)."""
        if self.hidden is None:
            return self.collate_online(spans)
        length = max(e - s for s, e in spans) - 1
        B, H, K = len(spans), self.hidden_size, self.topk_ids.shape[-1]
        dev = self.device
        batch = {
            "features": torch.zeros(B, length, H, dtype=self.hidden.dtype, device=dev),
            "tokens": torch.zeros(B, length, dtype=torch.long, device=dev),
            "target_features": torch.zeros(B, length, H, dtype=self.hidden.dtype, device=dev),
            "topk_ids": torch.zeros(B, length, K, dtype=torch.long, device=dev),
            "topk_logprobs": torch.zeros(B, length, K, dtype=torch.float32, device=dev),
            "mask": torch.zeros(B, length, dtype=torch.bool, device=dev),
        }
        for row, (s, e) in enumerate(spans):
            n = e - s - 1
            batch["features"][row, :n] = self.hidden[s:e - 1]
            batch["tokens"][row, :n] = self.input_ids[s + 1:e]
            batch["target_features"][row, :n] = self.hidden[s + 1:e]
            batch["topk_ids"][row, :n] = self.topk_ids[s + 1:e]
            batch["topk_logprobs"][row, :n] = self.topk_logprobs[s + 1:e]
            batch["mask"][row, :n] = self.loss_mask[s + 1:e]
        batch["positions"] = torch.arange(length, device=dev).expand(B, length)
        return batch

    def collate_online(self, spans: list[tuple[int, int]]) -> dict[str, Tensor]:
        """The same batch with the target's features and top-k computed now: one forward of the
        frozen target over the [B, N] right-padded tokens (what the older shards stored)."""
        from coral_fast.training.data import target_features

        width = max(e - s for s, e in spans)
        B, dev = len(spans), self.device
        ids = torch.zeros(B, width, dtype=torch.long, device=dev)
        attention = torch.zeros(B, width, dtype=torch.long, device=dev)
        mask = torch.zeros(B, width - 1, dtype=torch.bool, device=dev)
        for row, (s, e) in enumerate(spans):
            ids[row, : e - s] = self.input_ids[s:e]
            attention[row, : e - s] = 1
            mask[row, : e - s - 1] = self.loss_mask[s + 1:e]
        hidden, top_ids, top_lps, inputs = target_features(self.target, ids, attention, self.topk,
                                                           feature_layers=self.feature_layers)
        return {
            "features": inputs[:, :-1], "tokens": ids[:, 1:], "target_features": hidden[:, 1:],
            "topk_ids": top_ids[:, 1:], "topk_logprobs": top_lps[:, 1:], "mask": mask,
            "positions": torch.arange(width - 1, device=dev).expand(B, width - 1),
        }


# --- groups of the vocabulary ----------------------------------------------------------------------
def token_groups_of(draft) -> Tensor:
    """[V] int64: the group of every vocabulary id under the draft head's grouping."""
    grouping = getattr(draft.head, "grouping", None) or getattr(draft, "grouping", None)
    V, G = draft.config.vocab_size, draft.config.num_groups
    if grouping is not None:
        for name in ("group_of", "token_to_group", "group_of_token", "token_groups"):
            value = getattr(grouping, name, None)
            if isinstance(value, Tensor) and value.shape == (V,):
                return value.long()
        perm = getattr(grouping, "permutation", None)
        sizes = getattr(grouping, "group_size", None)
        if isinstance(perm, Tensor) and isinstance(sizes, int):
            groups = torch.empty(V, dtype=torch.long, device=perm.device)
            groups[perm.long()] = torch.arange(perm.numel(), device=perm.device) // sizes
            return groups
    # contiguous groups of ceil(V / G) ids (the dense stand-in's router)
    size = -(-V // G)
    return torch.arange(V) // size


# --- losses of one batch ---------------------------------------------------------------------------
# Above this many logits (rows x vocabulary) a step's token loss runs in row chunks, each recomputed
# in the backward pass (activation checkpointing): Gemma 3's 262144-id head at 8192 rows would keep
# 8.6 GB of fp32 log-probabilities per unrolled step otherwise.
CHUNKED_LOGITS = 1 << 30


def token_loss_and_accuracy(draft, h: Tensor, ids: Tensor, lps: Tensor, kind: str, max_logits: int = CHUNKED_LOGITS) -> tuple[Tensor, Tensor]:
    """Token loss (mean over rows) and top-1 accuracy of the draft's dense logits for rows h [M, H];
    row chunks with recomputation when M x V exceeds `max_logits` (same values, less memory)."""
    rows, vocab = h.shape[0], draft.config.vocab_size
    if rows == 0 or rows * vocab <= max_logits:
        logits = draft.logits(h)
        loss = L.token_loss(logits, ids, lps, kind)
        with torch.no_grad():
            acc = (logits.argmax(-1) == ids[:, 0]).float().mean() if rows else h.new_zeros((), dtype=torch.float32)
        return loss, acc
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(h_chunk, ids_chunk, lps_chunk):
        logits = draft.logits(h_chunk)
        loss = L.token_loss(logits, ids_chunk, lps_chunk, kind) * h_chunk.shape[0]
        correct = (logits.argmax(-1) == ids_chunk[:, 0]).sum().detach()
        return loss, correct

    step = max(1, max_logits // vocab)
    total, correct = h.new_zeros((), dtype=torch.float32), 0
    for start in range(0, rows, step):
        part = slice(start, start + step)
        loss, hits = checkpoint(chunk_loss, h[part], ids[part], lps[part], use_reentrant=False)
        total = total + loss
        correct = correct + hits
    return total / rows, (correct / rows).float()


def compute_losses(draft, batch: dict[str, Tensor], cfg: TrainConfig, token_groups: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
    outputs = unrolled_forward(draft, batch["features"], batch["tokens"], batch["positions"], cfg.unroll_steps, cfg.detach_unroll, cfg.feature_noise)
    mask = batch["mask"]
    length = mask.shape[1]
    total = outputs[0].new_zeros((), dtype=torch.float32)
    logs: dict[str, float] = {}
    sums = {"feature": 0.0, "token": 0.0, "router": 0.0}
    weight_sum = 0.0
    for step, hidden in enumerate(outputs):
        valid = mask & (torch.arange(length, device=mask.device) >= step)[None]
        h = hidden[valid]
        ids, lps = batch["topk_ids"][valid], batch["topk_logprobs"][valid]
        w = cfg.step_decay**step
        weight_sum += w
        f_loss = L.feature_loss(h, batch["target_features"][valid])
        t_loss, acc = token_loss_and_accuracy(draft, h, ids, lps, cfg.token_loss)
        r_logits = draft.router_logits(h)
        r_loss = L.router_loss(r_logits, ids, lps, token_groups, cfg.router_target)
        total = total + w * (cfg.w_feature * f_loss + cfg.w_token * t_loss + cfg.w_router * r_loss)
        with torch.no_grad():
            hit = L.router_hit_rate(r_logits.float(), ids[:, 0], token_groups, draft.config.active_groups)
        logs[f"acc{step}"] = float(acc)
        logs[f"hit{step}"] = float(hit)
        for name, value in (("feature", f_loss), ("token", t_loss), ("router", r_loss)):
            sums[name] += float(value.detach()) / cfg.unroll_steps
    total = total / weight_sum
    if cfg.unroll_steps > 1 and cfg.w_csra > 0:
        valid = mask & (torch.arange(length, device=mask.device) >= cfg.unroll_steps - 1)[None]
        index = valid.flatten().nonzero().squeeze(1)
        if index.numel() > cfg.csra_max_positions:
            pick = torch.randperm(index.numel(), device=index.device, generator=generator)[: cfg.csra_max_positions]
            index = index[pick]
        stacked = torch.stack([o.reshape(-1, o.shape[-1])[index] for o in outputs])
        c_loss = L.csra_loss(stacked, cfg.csra_temperature)
        total = total + cfg.w_csra * c_loss
        logs["csra"] = float(c_loss.detach())
    logs.update(sums)
    logs["loss"] = float(total.detach())
    return total, logs


# --- held-out acceptance estimate ------------------------------------------------------------------
@torch.no_grad()
def chain_acceptance(draft, data: SequenceData, spans, depth: int, batch_tokens: int, active_groups: list[int] | None = None, token_groups: Tensor | None = None, autocast: bool = False, early_tokens: int = 128) -> dict:
    """Teacher-forced estimate of the greedy accepted length of a chain of `depth` draft tokens.

    From every answer position b, the draft unrolls on its own features (the HASS mask) with the
    target's tokens as inputs; the chain accepts its d-th token while all of the draft's argmax tokens
    so far equal the target's top-1. tau = 1 + mean accepted (the target's own token counts one, as
    in the loop's mean accepted length). With `active_groups`, also the tau of the routed head that
    only ranks ids in the router's top-a groups, for each a. "tau_early": the same from the first
    `early_tokens` answer positions of each sequence only. Long greedy answers of a small target drift
    into repetition that is easy to predict, so the whole-answer tau runs far above what the loop sees
    on answers of the benchmark's length; the early one tracks it (docs/training.md).
    """
    was_training = draft.training
    draft.eval()
    device = data.device
    accepted, n_bases = None, 0
    accepted_early, n_early = 0.0, 0
    step_hits = torch.zeros(depth, dtype=torch.float64)
    step_counts = torch.zeros(depth, dtype=torch.float64)
    routed = {a: 0.0 for a in (active_groups or [])}
    rng = random.Random(0)
    for batch in data.batches(spans, batch_tokens, shuffle=False, rng=rng):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            outputs = unrolled_forward(draft, batch["features"], batch["tokens"], batch["positions"], depth, True)
        mask = batch["mask"]
        B, length = mask.shape
        top1 = batch["topk_ids"][..., 0]
        matches = {a: torch.zeros(depth, B, length, dtype=torch.bool, device=device) for a in [None] + list(routed)}
        for d, hidden in enumerate(outputs):
            logits = draft.logits(hidden).float()
            matches[None][d] = (logits.argmax(-1) == top1) & mask
            if routed:
                r_top = draft.router_logits(hidden).float()
                for a in routed:
                    chosen = r_top.topk(a, dim=-1).indices  # [B, L, a]
                    allowed = torch.zeros(B, length, draft.config.num_groups, dtype=torch.bool, device=device)
                    allowed.scatter_(-1, chosen, True)
                    in_active = allowed[..., token_groups]  # [B, L, V]
                    restricted = logits.masked_fill(~in_active, float("-inf"))
                    matches[a][d] = (restricted.argmax(-1) == top1) & mask
            step_hits[d] += float(matches[None][d].sum())
            step_counts[d] += float(mask.sum())
        # bases b: answer positions; the chain's d-th token sits at position b + d
        base = mask.clone()
        early = base & (mask.cumsum(-1) <= early_tokens)  # the first early_tokens answer positions of a row
        for key, match in matches.items():
            alive = base.clone()
            count = torch.zeros(B, length, device=device)
            for d in range(depth):
                shifted = torch.zeros_like(alive)
                shifted[:, : length - d] = match[d][:, d:]
                alive = alive & shifted
                count += alive.float()
            if key is None:
                accepted = (accepted or 0.0) + float(count[base].sum())
                n_bases += int(base.sum())
                accepted_early += float(count[early].sum())
                n_early += int(early.sum())
            else:
                routed[key] += float(count[base].sum())
    draft.train(was_training)
    n = max(n_bases, 1)
    result = {"tau": 1.0 + (accepted or 0.0) / n, "bases": n_bases, "step_acc": (step_hits / step_counts.clamp_min(1)).tolist(),
              "tau_early": 1.0 + accepted_early / max(n_early, 1), "early_tokens": early_tokens}
    for a, value in routed.items():
        result[f"tau_a{a}"] = 1.0 + value / n
    return result


# --- checkpoints -----------------------------------------------------------------------------------
# `out/last/` holds the newest complete checkpoint: the draft (config.json + model.safetensors, fp32),
# trainer_state.safetensors (AdamW moments, the best weights of keep_best) and trainer_state.json
# (iteration, every random state, the data position, elapsed time, history, and a manifest: each
# other file's size and sha256). A new checkpoint is written whole into `last.tmp/` and fsynced, then
# `last` -> `last.prev` and `last.tmp` -> `last` (renames); the previous one stays in `last.prev`. A
# kill at any point leaves a complete checkpoint in `last`, `last.tmp` (between the two renames) or
# `last.prev`; `find_checkpoint` takes the first one that verifies, in that order.
CHECKPOINT_DIRS = ("last", "last.tmp", "last.prev")
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
DRAFT_FILES = ("config.json", "model.safetensors")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, or mixes parts of different steps (one-line message)."""


def _written(what: str) -> None:
    """Called after each file and each rename of a checkpoint write (tests raise here to simulate a kill)."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_tree(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def optimizer_tensors(draft, optimizer) -> tuple[dict[str, Tensor], list[dict]]:
    """AdamW moments by parameter name: ({name.exp_avg, name.exp_avg_sq}, [{name, step}])."""
    names = {id(p): n for n, p in draft.named_parameters()}
    tensors, params_meta = {}, []
    state = optimizer.state_dict()
    id_to_param = {}
    for group_index, group in enumerate(optimizer.param_groups):
        for p_index, p in zip(state["param_groups"][group_index]["params"], group["params"]):
            id_to_param[p_index] = p
    for p_index, p_state in state["state"].items():
        name = names[id(id_to_param[p_index])]
        params_meta.append({"name": name, "step": float(p_state["step"])})
        tensors[f"{name}.exp_avg"] = p_state["exp_avg"].contiguous().cpu()
        tensors[f"{name}.exp_avg_sq"] = p_state["exp_avg_sq"].contiguous().cpu()
    return tensors, params_meta


def save_checkpoint(path: str | Path, draft, optimizer, iteration: int, cfg: TrainConfig, extra: dict | None = None, extra_tensors: dict[str, Tensor] | None = None) -> None:
    """Atomically replace the checkpoint `path/` (see above); the old one moves to `path.prev/`.
    `extra` goes into trainer_state.json, `extra_tensors` into trainer_state.safetensors."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp, prev = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".prev")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_tree(tmp)
    draft.save_pretrained(tmp)
    for name in DRAFT_FILES:
        _fsync_file(tmp / name)
        _written(name)
    tensors, params_meta = optimizer_tensors(draft, optimizer)
    tensors.update(extra_tensors or {})
    save_file(tensors, str(tmp / STATE_TENSORS), metadata={"iteration": str(iteration)})
    _fsync_file(tmp / STATE_TENSORS)
    _written(STATE_TENSORS)
    manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in DRAFT_FILES + (STATE_TENSORS,)}
    meta = {"iteration": iteration, "train_config": cfg.to_dict(), "optimizer_params": params_meta, "files": manifest, **(extra or {})}
    with open(tmp / STATE_JSON, "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    _written(STATE_JSON)
    _fsync_dir(tmp)
    if path.exists():
        _remove_tree(prev)
        _written("remove prev")
        os.replace(path, prev)
        _written("rename to prev")
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    _written("rename to last")


def verify_checkpoint(path: str | Path) -> dict:
    """trainer_state.json of a complete checkpoint; CheckpointError (one line) when a part is missing,
    truncated, or belongs to another step."""
    from coral_fast.cli_checks import check_json_file, check_safetensors

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        meta = check_json_file(str(path / STATE_JSON))
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path} is incomplete: {error}") from None
    files = meta.get("files")
    if not isinstance(files, dict) or "iteration" not in meta:
        raise CheckpointError(f"checkpoint {path} has no file manifest (written by an older coral-fast): start a new run")
    for name, want in files.items():
        part = path / name
        if not part.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if part.stat().st_size != want["bytes"] or _sha256(part) != want["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} is not the file written with iteration {meta['iteration']} (truncated or from another step)")
    try:
        header = check_safetensors(str(path / STATE_TENSORS))
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    step = header.get("__metadata__", {}).get("iteration")
    if step != str(meta["iteration"]):
        raise CheckpointError(f"checkpoint {path}: {STATE_TENSORS} is from iteration {step}, {STATE_JSON} from {meta['iteration']}")
    return meta


def find_checkpoint(out_dir: str | Path, report=None) -> Path:
    """The newest complete checkpoint under `out_dir`: `last`, else `last.tmp` (a kill between the
    renames), else `last.prev`. A skipped broken `last` is reported through `report(line)`.
    CheckpointError when there is none."""
    out = Path(out_dir)
    problems = []
    for name in CHECKPOINT_DIRS:
        candidate = out / name
        if not candidate.exists():
            continue
        try:
            meta = verify_checkpoint(candidate)
        except CheckpointError as error:
            problems.append(str(error))
            continue
        if problems and report is not None:
            report(f"{problems[0]}; resuming from {candidate} (iteration {meta['iteration']})")
        return candidate
    if problems:
        raise CheckpointError(problems[0] + " (and no earlier complete checkpoint)")
    raise CheckpointError(f"--resume: no checkpoint in {out} (expected {out / 'last'})")


def load_checkpoint_state(path: str | Path, draft, optimizer, load_weights: bool = False) -> int:
    """Restore AdamW moments into `optimizer` (built over `draft`'s parameters), and with
    `load_weights` the draft's weights too; returns the iteration."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / STATE_JSON).read_text())
    tensors = load_file(str(path / STATE_TENSORS))
    if load_weights:
        weights = load_file(str(path / "model.safetensors"))
        draft.load_state_dict({k: v for k, v in weights.items() if not k.startswith("grouping.")})
    params = dict(draft.named_parameters())
    for entry in meta["optimizer_params"]:
        p = params[entry["name"]]
        optimizer.state[p] = {
            "step": torch.tensor(entry["step"]),
            "exp_avg": tensors[f"{entry['name']}.exp_avg"].to(p.device, p.dtype),
            "exp_avg_sq": tensors[f"{entry['name']}.exp_avg_sq"].to(p.device, p.dtype),
        }
    return int(meta["iteration"])


# --- random states ---------------------------------------------------------------------------------
def _tensor_list(state) -> list[int]:
    return state.tolist()


def random_states(rng: random.Random, generator: torch.Generator) -> dict:
    """Every random state the loop draws from, as JSON: torch CPU and CUDA, the loop's generator, its
    data-order `rng`, python's and numpy's global ones."""
    states = {
        "torch_cpu": _tensor_list(torch.get_rng_state()),
        "torch_cuda": [_tensor_list(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "generator": _tensor_list(generator.get_state()),
        "data_rng": _json_random_state(rng.getstate()),
        "python": _json_random_state(random.getstate()),
    }
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        states["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
    except ImportError:
        pass
    return states


def set_random_states(states: dict, rng: random.Random, generator: torch.Generator) -> None:
    torch.set_rng_state(torch.tensor(states["torch_cpu"], dtype=torch.uint8))
    if torch.cuda.is_available() and states["torch_cuda"]:
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in states["torch_cuda"]])
    generator.set_state(torch.tensor(states["generator"], dtype=torch.uint8))
    rng.setstate(_python_random_state(states["data_rng"]))
    random.setstate(_python_random_state(states["python"]))
    if "numpy" in states:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _json_random_state(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_random_state(state) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


# --- the loop --------------------------------------------------------------------------------------
def lr_at(iteration: int, cfg: TrainConfig, time_progress: float | None = None) -> float:
    """Linear warm-up, then cosine to min_lr_ratio * lr over the iterations (or over the time budget:
    `time_progress` in [0, 1], which keeps the schedule right whatever the speed turns out to be)."""
    if iteration < cfg.warmup:
        return cfg.lr * (iteration + 1) / cfg.warmup
    progress = min(1.0, (iteration - cfg.warmup) / max(1, cfg.iters - cfg.warmup))
    if time_progress is not None:
        progress = min(1.0, max(progress, time_progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(draft, data: SequenceData, cfg: TrainConfig, out_dir: str | Path | None = None, resume: bool = False, progress: bool = True, log_fn=None, eval_groups: list[int] | None = None, report=None) -> dict:
    """Train `draft` in place; returns the history (train logs and evals). Writes `out_dir/last/`
    checkpoints, `out_dir/log.jsonl`, and the final draft into `out_dir/` itself.

    With `resume`, the newest complete checkpoint of `out_dir` (`find_checkpoint`) restores the
    weights, the AdamW moments, every random state, the data position, the elapsed time and the
    history: the run continues exactly as if it had not stopped (bit-identical on the CPU, without
    `time_budget_s`). `report(line)` hears about a broken checkpoint that was skipped."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    device = data.device
    autocast = device.type == "cuda"
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    token_groups = token_groups_of(draft).to(device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    out = Path(out_dir) if out_dir else None
    history = {"train": [], "eval": []}
    plan = data.batch_plan(data.train, cfg.batch_tokens)
    if not plan:
        raise ValueError("no training sequences (every sequence is held out or shorter than 3 tokens)")
    epoch, order, index = 0, None, 0
    iteration, elapsed, running, best = 0, 0.0, {}, None
    if resume:
        if out is None:
            raise CheckpointError("resume needs out_dir")
        checkpoint = find_checkpoint(out, report)
        iteration = load_checkpoint_state(checkpoint, draft, optimizer, load_weights=True)
        meta = json.loads((checkpoint / STATE_JSON).read_text())
        loop = meta["loop"]
        if loop["batches_per_epoch"] != len(plan):
            raise CheckpointError(f"checkpoint {checkpoint} was written with other data or --batch-tokens ({loop['batches_per_epoch']} batches an epoch, now {len(plan)})")
        set_random_states(meta["random"], rng, generator)
        epoch, order, index = loop["epoch"], loop["order"], loop["index"]
        elapsed, running, history = loop["elapsed_s"], loop["running"], loop["history"]
        if loop.get("best") is not None:
            from safetensors.torch import load_file

            best_tensors = load_file(str(checkpoint / STATE_TENSORS))
            weights = {k[len("best."):]: v.to(device) for k, v in best_tensors.items() if k.startswith("best.")}
            best = (loop["best"]["tau"], loop["best"]["iteration"], weights)
        if cfg.time_budget_s and meta["train_config"].get("iters") != cfg.iters:
            cfg.iters = min(cfg.iters, meta["train_config"]["iters"])  # a run that ran out of time stays finished
    if out:
        out.mkdir(parents=True, exist_ok=True)
        # the log holds exactly the restored history (records written after the checkpoint are dropped)
        (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(history["train"] + history["eval"], key=lambda r: r["iteration"])))
    log_file = open(out / "log.jsonl", "a") if out else None

    def log(record):
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if log_fn:
            log_fn(record)

    def evaluate(iteration):
        if not data.eval:
            return None
        nonlocal best
        result = chain_acceptance(draft, data, data.eval[: cfg.eval_max_seqs], cfg.eval_unroll, cfg.batch_tokens, eval_groups, token_groups, autocast)
        if cfg.keep_best and (best is None or result["tau"] > best[0]):
            best = (result["tau"], iteration, {k: v.detach().clone() for k, v in draft.state_dict().items()})
        record = {"iteration": iteration, "eval": result}
        history["eval"].append(record)
        log(record)
        return result

    def checkpoint_now(iteration):
        loop = {
            "epoch": epoch, "order": order, "index": index, "batches_per_epoch": len(plan),
            "elapsed_s": time.perf_counter() - started, "running": running, "history": history,
            "best": {"tau": best[0], "iteration": best[1]} if best is not None else None,
        }
        best_tensors = {f"best.{k}": v.contiguous().cpu() for k, v in best[2].items()} if best is not None else None
        save_checkpoint(out / "last", draft, optimizer, iteration, cfg, extra={"loop": loop, "random": random_states(rng, generator)}, extra_tensors=best_tensors)

    draft.train()
    started = time.perf_counter() - elapsed
    bar = tqdm(total=cfg.iters, initial=iteration, desc="train", disable=not progress)
    saved_at = None
    while iteration < cfg.iters:
        if order is None or index >= len(order):
            if order is not None:
                epoch += 1
            order = list(range(len(plan)))
            rng.shuffle(order)
            index = 0
        batch = data.collate(plan[order[index]])
        index += 1
        time_progress = (time.perf_counter() - started) / cfg.time_budget_s if cfg.time_budget_s else None
        lr = lr_at(iteration, cfg, time_progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, logs = compute_losses(draft, batch, cfg, token_groups, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        iteration += 1
        for k, v in logs.items():
            running[k] = v if k not in running else 0.9 * running[k] + 0.1 * v
        bar.update(1)
        bar.set_postfix({k: f"{running[k]:.3f}" for k in ("loss", "feature", "token", "csra", "acc0") if k in running})
        if iteration % 20 == 0 or iteration == cfg.iters:
            record = {"iteration": iteration, "lr": lr, "seconds": time.perf_counter() - started, **logs}
            history["train"].append(record)
            log(record)
        if cfg.eval_every and iteration % cfg.eval_every == 0:
            evaluate(iteration)
        if cfg.time_budget_s and time.perf_counter() - started > cfg.time_budget_s:
            cfg.iters = iteration  # out of time: finish here (recorded in the checkpoint)
        if out and cfg.checkpoint_every and iteration % cfg.checkpoint_every == 0:
            checkpoint_now(iteration)
            saved_at = iteration
    bar.close()
    last_eval = history["eval"][-1] if history["eval"] else None
    final = last_eval["eval"] if last_eval and last_eval["iteration"] == iteration else evaluate(iteration)
    if cfg.keep_best and best is not None and best[1] != iteration:
        # an earlier evaluation was better (over-fitting the small data): go back to it
        draft.load_state_dict(best[2])
        final = next(r["eval"] for r in history["eval"] if r["iteration"] == best[1])
        history["best_iteration"] = best[1]
    if out:
        if saved_at != iteration or history.get("best_iteration") is not None:
            checkpoint_now(iteration)
        draft.save_pretrained(out)
    if log_file:
        log_file.close()
    history["final_eval"] = final
    history["iterations"] = iteration
    history["seconds"] = time.perf_counter() - started
    return history
