"""The draft/verify loop: EAGLE-2-style speculative decoding with a CORAL draft over an HF target.

    gen = SpeculativeGenerator(model, draft, TreeConfig(depth=6, topk=10, total_tokens=60))
    result = gen.generate(input_ids, max_new_tokens=128, temperature=0.0)
    result.token_ids, result.mean_accepted_length, result.draft_time_s, result.verify_time_s

One round, with n tokens committed in both caches and `root` the last accepted token (not yet in them):
1. draft: from the draft's last hidden state (it predicts the target's feature at n), build a dynamic
   tree (`build_dynamic_tree`): each level runs the draft once on the `topk` best frontier nodes, their
   keys/values in the draft's cache after the committed prefix, masked to their ancestors.
2. verify: the target runs [root] + tree tokens in one forward (`hf_attention.tree_forward`).
3. accept: the longest path that matches the target (greedy) or tree rejection sampling; plus the bonus.
4. commit: the accepted rows' keys/values move to contiguous slots in the target's cache; the draft
   discards its tree entries and re-runs the accepted positions on the target's real features.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from coral_fast.hf_attention import TreeKVCache, causal_forward, default_impl, tree_forward
from coral_fast.tree import build_dynamic_tree
from coral_fast.verify import verify_greedy, verify_sampling


@dataclass
class TreeConfig:
    """EAGLE-2 dynamic tree: `depth` levels, `topk` children per expanded node, `total_tokens` kept."""

    depth: int = 6
    topk: int = 10
    total_tokens: int = 60

    def __post_init__(self):
        if self.depth < 1 or self.topk < 1:
            raise ValueError(f"depth and topk must be >= 1, got {self.depth}, {self.topk}")
        table = self.topk + (self.depth - 1) * self.topk**2
        if not 1 <= self.total_tokens <= min(table, 128):
            raise ValueError(f"total_tokens must be in [1, {min(table, 128)}] for depth {self.depth}, topk {self.topk}")


@dataclass
class GenerationResult:
    token_ids: list[int]  # the new tokens (EOS included when it stopped there, like HF generate)
    prompt_len: int
    rounds: int = 0
    accepted_lengths: list[int] = field(default_factory=list)  # tokens per round, bonus included
    prefill_time_s: float = 0.0
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    total_time_s: float = 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens produced per verify forward (EAGLE's tau: accepted draft tokens + 1 bonus)."""
        return sum(self.accepted_lengths) / max(1, len(self.accepted_lengths))

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.total_time_s if self.total_time_s > 0 else float("nan")

    def stats(self) -> dict:
        return {
            "new_tokens": len(self.token_ids),
            "rounds": self.rounds,
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "prefill_s": round(self.prefill_time_s, 4),
            "draft_s": round(self.draft_time_s, 4),
            "verify_s": round(self.verify_time_s, 4),
            "total_s": round(self.total_time_s, 4),
        }


class DraftKVCache:
    """The draft layer's keys/values [B, Hkv, S, D]; `length` committed slots (prefix), tree entries after."""

    def __init__(self, num_kv_heads, head_dim, max_len, dtype, device):
        self.k = torch.zeros(1, num_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0
        self.max_len = max_len

    def attn_fn(self, slots: Tensor, allowed: Tensor, scale: float):
        """An attn_fn for DraftModel.forward: write k, v at `slots` [T], attend over [0, S') with `allowed`
        [T, S'] bool."""
        S = allowed.shape[1]

        def attend(q, k, v):
            self.k[:, :, slots] = k.to(self.k.dtype)
            self.v[:, :, slots] = v.to(self.v.dtype)
            keys, values = self.k[:, :, :S], self.v[:, :, :S]
            groups = q.shape[1] // keys.shape[1]
            if groups > 1:
                keys = keys.repeat_interleave(groups, dim=1)
                values = values.repeat_interleave(groups, dim=1)
            return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=allowed, scale=scale)

        return attend


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SpeculativeGenerator:
    """Speculative decoding of an HF causal LM (`model`) with a `DraftModel` (random if None). Batch 1."""

    def __init__(self, model, draft=None, tree: TreeConfig | None = None, eos_token_id=None, impl: str | None = None,
                 head_impl: str = "auto"):
        from coral_fast.draft import DraftModel, _check_matches_target

        self.model = model
        if draft is None:
            draft = DraftModel.random_init(model)
        else:
            _check_matches_target(draft.config, model)
        self.draft = draft.eval()
        self.tree = tree or TreeConfig()
        self.device = model.get_output_embeddings().weight.device
        self.impl = impl or default_impl(self.device)
        self.head_impl = head_impl
        if eos_token_id is None:
            eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            if eos_token_id is None:
                eos_token_id = model.config.eos_token_id
        if isinstance(eos_token_id, int):
            eos_token_id = [eos_token_id]
        self.eos_token_ids = set(eos_token_id or [])

    # --- the draft side -------------------------------------------------------------------------------
    def _draft_extend(self, dcache: DraftKVCache, features: Tensor, next_tokens: Tensor) -> Tensor:
        """Commit positions [length, length + a) to the draft: features [a, H] of the target, next_tokens [a].
        Returns the draft's hidden states [a, H]."""
        a = features.shape[0]
        start = dcache.length
        slots = torch.arange(start, start + a, device=self.device)
        allowed = torch.ones(a, start + a, dtype=torch.bool, device=self.device)
        allowed[:, start:] = torch.ones(a, a, dtype=torch.bool, device=self.device).tril()
        attn = dcache.attn_fn(slots, allowed, self.draft.layer.scaling)
        hidden = self.draft(features[None], next_tokens[None], slots[None], attn_fn=attn)[0]
        dcache.length = start + a
        return hidden

    def _draft_tree(self, dcache: DraftKVCache, last_hidden: Tensor):
        """-> (tree, tokens [T]) from the draft's last committed hidden state [H]."""
        cfg = self.tree
        k = cfg.topk
        n = dcache.length
        root_ids, root_logprobs = self.draft.topk(last_hidden[None], k, impl=self.head_impl)
        table_size = k + (cfg.depth - 1) * k * k
        hidden_of = torch.empty(table_size, last_hidden.shape[-1], dtype=last_hidden.dtype, device=self.device)
        slot_of = torch.full((table_size,), -1, dtype=torch.int64, device=self.device)

        def expand(level, frontier, table):
            if level == 1:
                features = last_hidden.expand(k, -1)
            else:
                features = hidden_of[table.parents[frontier]]
            slots = n + (level - 1) * k + torch.arange(k, device=self.device)
            slot_of[frontier] = slots
            positions = n + table.depth[frontier]
            ancestors = table.ancestors(frontier, level)  # [k, level], self first, -1 padded
            width = n + level * k
            allowed = torch.zeros(k, width + 1, dtype=torch.bool, device=self.device)
            allowed[:, :n] = True
            anc_slots = torch.where(ancestors >= 0, slot_of[ancestors.clamp(min=0)], torch.full_like(ancestors, width))
            allowed.scatter_(1, anc_slots, True)
            allowed = allowed[:, :width]
            attn = dcache.attn_fn(slots, allowed, self.draft.layer.scaling)
            h = self.draft(features[None], table.tokens[frontier][None], positions[None], attn_fn=attn)[0]
            hidden_of[frontier] = h
            return self.draft.topk(h, k, impl=self.head_impl)

        tree, tokens, _ = build_dynamic_tree(root_ids[0], root_logprobs[0], expand, depth=cfg.depth, topk=k,
                                             total_tokens=cfg.total_tokens)
        return tree, tokens

    # --- the loop ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 128, temperature: float = 0.0,
                 generator: torch.Generator | None = None, callback=None) -> GenerationResult:
        """input_ids: [P] or [1, P] prompt ids. Returns a GenerationResult (new tokens + statistics).

        callback(list_of_new_token_ids) is called as tokens are accepted (streaming).
        """
        ids = torch.as_tensor(input_ids, device=self.device)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"batch size 1 only, got input_ids of shape {tuple(ids.shape)}")
            ids = ids[0]
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError("the prompt is empty: input_ids must hold at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        vocab = self.draft.config.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"input_ids out of range [0, {vocab})")
        ids = ids.to(torch.int64)
        P = ids.shape[0]
        max_len = P + max_new_tokens + self.tree.total_tokens + 2
        tcache = TreeKVCache.for_model(self.model, max_len)
        dcfg = self.draft.config
        dcache = DraftKVCache(dcfg.num_key_value_heads, dcfg.head_dim, max_len + self.tree.depth * self.tree.topk,
                              self.draft.fc.weight.dtype, self.device)
        result = GenerationResult(token_ids=[], prompt_len=P)
        out = result.token_ids

        def emit(tokens: list[int]) -> bool:
            """Append up to the budget / first EOS; True when generation is finished."""
            take = []
            done = False
            for t in tokens:
                take.append(t)
                if t in self.eos_token_ids or len(out) + len(take) >= max_new_tokens:
                    done = True
                    break
            out.extend(take)
            if callback is not None and take:
                callback(take)
            return done

        def pick(logits_row: Tensor) -> int:
            if temperature > 0:
                p = torch.softmax(logits_row.double() / temperature, dim=-1)
                return int(torch.multinomial(p.cpu(), 1, generator=generator))
            return int(logits_row.argmax())

        _synchronize(self.device)
        t0 = time.perf_counter()
        # prefill: the prompt through the target, then the draft on its features
        hidden, logits = causal_forward(self.model, tcache, ids, self.impl, logits_rows=torch.tensor([P - 1]))
        tcache.commit(torch.arange(P, device=self.device))
        root = pick(logits[0])
        next_tokens = torch.cat([ids[1:], torch.tensor([root], device=self.device)])
        draft_hidden = self._draft_extend(dcache, hidden, next_tokens)
        _synchronize(self.device)
        t1 = time.perf_counter()
        result.prefill_time_s = t1 - t0
        done = emit([root])

        while not done:
            ta = time.perf_counter()
            tree, tokens = self._draft_tree(dcache, draft_hidden[-1])
            T = tree.num_nodes
            mask = torch.zeros(T + 1, T + 1, dtype=torch.bool, device=self.device)
            mask[:, 0] = True
            mask[1:, 1:] = tree.mask
            depth = torch.cat([torch.zeros(1, dtype=torch.int64, device=self.device), tree.depth + 1])
            verify_tokens = torch.cat([torch.tensor([root], device=self.device), tokens])
            _synchronize(self.device)
            tb = time.perf_counter()
            hidden, logits = tree_forward(self.model, tcache, verify_tokens, mask, depth, self.impl)
            if temperature > 0:
                path, bonus = verify_sampling(logits, tokens, tree.parents, temperature, generator)
            else:
                path, bonus = verify_greedy(logits, tokens, tree.parents, tree.mask, tree.depth)
            rows = torch.cat([torch.zeros(1, dtype=torch.int64, device=self.device), path.to(self.device) + 1])
            tcache.commit(rows)
            accepted = tokens[path].tolist() + [bonus]
            tc = time.perf_counter()
            result.rounds += 1
            result.accepted_lengths.append(len(accepted))
            done = emit(accepted)
            if not done:
                # the draft forgets its tree and re-runs the accepted positions on the target's features
                dcache.length = tcache.length - len(accepted)
                next_tokens = torch.tensor(accepted, dtype=torch.int64, device=self.device)
                draft_hidden = self._draft_extend(dcache, hidden[rows], next_tokens)
                root = bonus
            _synchronize(self.device)
            td = time.perf_counter()
            result.draft_time_s += (tb - ta) + (td - tc)
            result.verify_time_s += tc - tb
        result.total_time_s = time.perf_counter() - t0
        self.last_caches = (tcache, dcache)  # for inspection (tests): committed slots [0, length)
        return result
