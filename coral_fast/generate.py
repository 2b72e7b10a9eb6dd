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

from coral_fast.hf_attention import (ATTN_NAME, TreeKVCache, attention_implementation, causal_forward, default_impl,
                                     final_logits, register, static_tree_forward, tree_forward)
from coral_fast.tree import DraftTree, build_dynamic_tree
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
                 head_impl: str = "auto", static: bool | None = None, cuda_graphs: bool | None = None,
                 compile: bool = False, fuse: bool | None = None):
        """static: run greedy rounds through StaticEngine (fixed shapes, device-side state; default on CUDA).
        cuda_graphs: capture its two steps in CUDA graphs (default: on CUDA).
        compile: torch.compile the two steps before capturing them (fuses the small ops between our
        kernels; costs a one-time compilation).
        fuse: one product for q/k/v and one for gate/up in every layer of the target and the draft
        (coral_fast.fusion: in place, same weights and results; default: with CUDA graphs)."""
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
        on_cuda = self.device.type == "cuda"
        self.static = on_cuda if static is None else static
        self.cuda_graphs = (on_cuda if cuda_graphs is None else cuda_graphs) and self.static
        self.compile = compile and self.static
        if self.cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs needs the model on a CUDA device")
        self.fuse = self.cuda_graphs if fuse is None else fuse
        if self.fuse:
            from coral_fast.fusion import fuse_projections

            fuse_projections(self.model)
            fuse_projections(self.draft)
        self.engine: StaticEngine | None = None  # the last one used
        self.engines: dict[bool, StaticEngine] = {}

    def _engine_for(self, ids: Tensor, needed: int, sampling: bool = False) -> StaticEngine:
        """The engine of this mode (greedy or sampling: each has its own captured verify step)."""
        engine = self.engines.get(sampling)
        if engine is None or engine.capacity < needed:
            capacity = max(needed, 1024)
            engine = StaticEngine(self, capacity, self.cuda_graphs, compile=self.compile, sampling=sampling)
            if self.cuda_graphs:
                engine.prefill(ids)  # a valid state to warm up and capture from
                engine.capture()
            self.engines[sampling] = engine
        self.engine = engine
        return engine

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

        if self.static:
            return self._generate_static(ids, max_new_tokens, result, emit, temperature, generator)

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

    def _generate_static(self, ids: Tensor, max_new_tokens: int, result: GenerationResult, emit,
                         temperature: float = 0.0, generator: torch.Generator | None = None) -> GenerationResult:
        sampling = temperature > 0
        engine = self._engine_for(ids, ids.shape[0] + max_new_tokens + self.tree.depth + 1, sampling)
        if sampling:
            engine.set_sampling(temperature, generator)
        timer = _EventTimer() if engine.graphs is not None else _HostTimer(self.device)
        _synchronize(self.device)
        t0 = time.perf_counter()
        done = emit([engine.prefill(ids)])
        _synchronize(self.device)
        t1 = time.perf_counter()
        result.prefill_time_s = t1 - t0
        while not done:
            tokens = engine.round(timer)
            result.rounds += 1
            result.accepted_lengths.append(len(tokens))
            done = emit(tokens)
        result.total_time_s = time.perf_counter() - t0
        result.draft_time_s, result.verify_time_s = timer.split()
        self.last_caches = (engine.tcache, engine.dcache)
        return result


PREFILL_CHUNK = 64  # prompt tokens per captured prefill step (tree-attention kernel: at most 128 rows)


def accept_greedy_static(logits: Tensor, tokens: Tensor, tree, max_depth: int):
    """verify_greedy without host syncs (fixed shapes, for CUDA graphs).

    logits [T+1, V] (row 0: the root); tokens [T]; tree: DraftTree. Returns
    rows [A] int64 (A = max_depth + 1): verify rows to keep, root first, padded with 0;
    count [1] int64: valid rows (accepted nodes + 1); out_tokens [A]: accepted tokens then the bonus, 0-padded.
    """
    target = logits.argmax(dim=-1)
    matches = tokens == target[tree.parents + 1]
    accepted = ~(tree.mask & ~matches[None, :]).any(dim=1)
    score = torch.where(accepted, tree.depth, torch.full_like(tree.depth, -1))
    best_depth, best = score.max(dim=0, keepdim=True)
    path = tree.ancestor_paths(max_depth).index_select(0, best)[0]  # [max_depth] root-to-best ids, -1 padded
    path = torch.where(best_depth >= 0, path, torch.full_like(path, -1))
    rows, count = _accepted_rows(path)
    bonus = target.gather(0, rows.gather(0, count - 1))
    return rows, count, _accepted_tokens(path, count, bonus, tokens)


def _accepted_rows(path: Tensor):
    """path [D] accepted node ids root first, -1 padded -> (rows [D+1]: verify rows to keep, root first,
    0-padded; count [1]: valid rows)."""
    valid = path >= 0
    rows = torch.cat([torch.zeros_like(path[:1]), torch.where(valid, path + 1, torch.zeros_like(path))])
    return rows, valid.sum(dim=0, keepdim=True) + 1


def _accepted_tokens(path: Tensor, count: Tensor, bonus: Tensor, tokens: Tensor) -> Tensor:
    """The accepted nodes' tokens then the bonus [1], 0-padded to [D+1]."""
    idx = torch.arange(path.shape[0] + 1, device=path.device)
    path_tokens = torch.cat([torch.where(path >= 0, tokens[path.clamp(min=0)], torch.zeros_like(path)),
                             torch.zeros_like(path[:1])])
    return torch.where(idx == count - 1, bonus, torch.where(idx < count - 1, path_tokens, torch.zeros_like(idx)))


def _sample_from(weights: Tensor, uniform: Tensor) -> Tensor:
    """Inverse-CDF draw from unnormalised weights [V] (float64) with uniform [1] in [0, 1) -> [1] int64."""
    cdf = weights.cumsum(0)
    return torch.searchsorted(cdf, uniform * cdf[-1:], right=True).clamp(max=weights.shape[0] - 1)


def accept_sampling_static(logits: Tensor, tokens: Tensor, parents: Tensor, max_depth: int, topk: int,
                           temperature: Tensor, uniforms: Tensor):
    """verify_sampling without host syncs: the same tree rejection sampling, exact for top-k drafts.

    logits [T+1, V]; tokens, parents [T]; temperature [1] (> 0); uniforms [max_depth + 1, topk + 1] in
    [0, 1) (drawn on the host from the caller's generator). Returns what accept_greedy_static returns.

    At each level the children of the current node (parents == node, in index order, at most `topk`) are
    tried in order: child j (token x_j) is accepted with probability p(x_j) / (1 - p(x_0) - ... - p(x_{j-1}))
    (the residual after rejecting the earlier ones, sibling tokens being distinct); the first success is the
    next node. When none is accepted, the bonus is drawn from p with the children's tokens removed.
    """
    T = tokens.shape[0]
    dev = logits.device
    node_ids = torch.arange(T, device=dev)
    k = min(topk, T)
    earlier = torch.ones(k, k, dtype=torch.bool, device=dev).tril(-1)  # earlier[j, i]: i < j
    current = torch.full((1,), -1, dtype=torch.int64, device=dev)
    done = torch.zeros(1, dtype=torch.bool, device=dev)
    path = torch.full((max_depth,), -1, dtype=torch.int64, device=dev)
    bonus = torch.zeros(1, dtype=torch.int64, device=dev)
    for level in range(max_depth + 1):
        p = torch.softmax(logits.index_select(0, current + 1)[0].double() / temperature.double(), dim=-1)
        is_child = parents == current
        order = torch.where(is_child, node_ids, node_ids + T).argsort()[:k]  # children first, in index order
        valid = is_child.index_select(0, order)
        x = tokens.index_select(0, order)
        repeated = ((x[:, None] == x[None, :]) & earlier & valid[None, :]).any(dim=1)  # p(x) already zeroed
        px = torch.where(valid & ~repeated, p.index_select(0, x), torch.zeros_like(p[:1]))
        residual = 1.0 - (px.cumsum(0) - px)  # mass left before trying child j
        take = valid & (uniforms[level, :k] * residual < px)
        first = torch.where(take, torch.arange(k, device=dev), torch.full_like(order, k)).min(dim=0, keepdim=True).values
        accepted = (first < k) & ~done
        child = order.gather(0, first.clamp(max=k - 1))
        if level < max_depth:
            path[level : level + 1] = torch.where(accepted, child, path[level : level + 1])
        rejected = valid & (torch.arange(k, device=dev) < first)  # every child tried before the success
        # the residual: rejected tokens removed (accumulate: padding entries may repeat a token)
        removed = torch.zeros_like(p).index_put((x,), rejected.double(), accumulate=True) > 0
        p = torch.where(removed, torch.zeros_like(p), p)
        stop = ~done & ~accepted
        bonus = torch.where(stop, _sample_from(p, uniforms[level, k:k + 1].double()), bonus)
        done = done | stop
        current = torch.where(accepted, child, current)
    rows, count = _accepted_rows(path)
    return rows, count, _accepted_tokens(path, count, bonus, tokens)


class StaticEngine:
    """The loop with fixed shapes and device-side state: one draft step and one verify step per round,
    each capturable as a CUDA graph (`use_graphs`); the only host sync of a round reads what was accepted.

    Device state between rounds: n (target's committed length), d_start / d_feats / d_tokens / d_count
    (the draft's pending extension: the rows the target just accepted), root (the bonus token).
    Without graphs the same code runs eagerly (how the CPU tests check it).
    """

    def __init__(self, gen: "SpeculativeGenerator", capacity: int, use_graphs: bool, compile: bool = False,
                 prefill_chunk: int | None = None, sampling: bool = False):
        self.gen = gen
        model, draft, cfg = gen.model, gen.draft, gen.tree
        dev = gen.device
        self.depth, self.topk, self.T = cfg.depth, cfg.topk, cfg.total_tokens
        self.R, self.A = self.T + 1, cfg.depth + 1
        self.C = prefill_chunk or PREFILL_CHUNK
        self.capacity = capacity
        # slack past the committed length: a verify step writes R rows there, a prefill chunk C
        self.tcache = TreeKVCache.for_model(model, capacity + max(self.R, self.C))
        dcfg = draft.config
        self.d_slots = capacity + max(self.A + cfg.depth * cfg.topk, self.C)
        self.dcache = DraftKVCache(dcfg.num_key_value_heads, dcfg.head_dim, self.d_slots, draft.fc.weight.dtype, dev)
        H = dcfg.hidden_size
        i64 = dict(dtype=torch.int64, device=dev)
        self.n = torch.zeros(1, **i64)
        self.d_start = torch.zeros(1, **i64)
        self.d_count = torch.ones(1, **i64)
        self.d_feats = torch.zeros(self.A, H, dtype=draft.fc.weight.dtype, device=dev)
        self.d_tokens = torch.zeros(self.A, **i64)
        self.root = torch.zeros(1, **i64)
        self.v_tokens = torch.zeros(self.R, **i64)
        self.v_mask = torch.eye(self.R, dtype=torch.bool, device=dev)
        self.v_depth = torch.zeros(self.R, **i64)
        self.t_parents = torch.full((self.T,), -1, **i64)
        self.result = torch.zeros(self.A + 1, **i64)  # [count, out_tokens...]
        # prefill chunk inputs: C prompt tokens (padded), the token after each, how many are real
        self.p_tokens = torch.zeros(self.C, **i64)
        self.p_next = torch.zeros(self.C, **i64)
        self.p_count = torch.ones(1, **i64)
        self.p_mask = torch.ones(self.C, self.C, dtype=torch.bool, device=dev).tril()
        self.p_depth = torch.arange(self.C, device=dev)
        # sampling (temperature > 0): the temperature and the round's uniforms are inputs of the graphs;
        # the uniforms come from the caller's generator on the host (reproducible, CPU == GPU)
        self.sampling = sampling
        self.temperature = torch.ones(1, dtype=torch.float64, device=dev)
        self.uniforms = torch.zeros(self.depth + 1, self.topk + 1, dtype=torch.float64, device=dev)
        self.rng: torch.Generator | None = None
        self.use_graphs = use_graphs
        self.graphs = None
        self.head_check = not use_graphs and not compile
        register()
        self._draft_fn, self._verify_fn = self._draft_body, self._verify_body
        if compile:
            # fixed shapes: one graph per step; our Triton kernels stay opaque ops (coral_fast.compiled)
            self._draft_fn = torch.compile(self._draft_body, dynamic=False)
            self._verify_fn = torch.compile(self._verify_body, dynamic=False)

    # --- the two steps -------------------------------------------------------------------------------
    def _draft_attention(self, slots: Tensor, allowed: Tensor):
        dcache, scale = self.dcache, self.gen.draft.layer.scaling

        def attend(q, k, v):
            dcache.k.index_copy_(2, slots, k.to(dcache.k.dtype))
            dcache.v.index_copy_(2, slots, v.to(dcache.v.dtype))
            keys, values = dcache.k, dcache.v
            groups = q.shape[1] // keys.shape[1]
            if groups > 1:
                keys = keys.repeat_interleave(groups, dim=1)
                values = values.repeat_interleave(groups, dim=1)
            return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=allowed,
                                                  scale=scale)

        return attend

    def draft_step(self) -> None:
        """Extend the draft by the pending rows, then build the next tree into the verify inputs."""
        self._draft_fn()

    def verify_step(self) -> None:
        """Target forward over root + tree, greedy acceptance, commit, and the draft's pending rows."""
        with attention_implementation(self.gen.model, ATTN_NAME):
            self._verify_fn()

    def _draft_body(self) -> None:
        draft, dev, k = self.gen.draft, self.gen.device, self.topk
        S = self.d_slots
        cols = torch.arange(S, device=dev)
        ext = torch.arange(self.A, device=dev)
        slots = self.d_start + ext
        allowed = cols[None, :] <= slots[:, None]  # the prefix and the pending rows up to each one
        hidden = draft(self.d_feats[None], self.d_tokens[None], slots[None],
                       attn_fn=self._draft_attention(slots, allowed))[0]
        last = hidden.index_select(0, self.d_count - 1)  # [1, H]
        n = self.d_start + self.d_count  # == the target's committed length
        table_size = k + (self.depth - 1) * k * k
        hidden_of = torch.zeros(table_size, last.shape[-1], dtype=last.dtype, device=dev)
        slot_of = torch.full((table_size,), S, dtype=torch.int64, device=dev)  # S: "no slot"
        prefix = cols[None, :] < n

        def expand(level, frontier, table):
            features = last.expand(k, -1) if level == 1 else hidden_of[table.parents[frontier]]
            node_slots = n + (level - 1) * k + torch.arange(k, device=dev)
            slot_of[frontier] = node_slots
            ancestors = table.ancestors(frontier, level)
            anc_slots = torch.where(ancestors >= 0, slot_of[ancestors.clamp(min=0)], torch.full_like(ancestors, S))
            allowed_nodes = torch.zeros(k, S + 1, dtype=torch.bool, device=dev)
            allowed_nodes.scatter_(1, anc_slots, True)
            allowed_nodes = allowed_nodes[:, :S] | prefix
            h = draft(features[None], table.tokens[frontier][None], (n + table.depth[frontier])[None],
                      attn_fn=self._draft_attention(node_slots, allowed_nodes))[0]
            hidden_of[frontier] = h
            return draft.topk(h, k, impl=self.gen.head_impl, check=self.head_check)

        root_ids, root_logprobs = draft.topk(last, k, impl=self.gen.head_impl, check=self.head_check)
        tree, tokens, _ = build_dynamic_tree(root_ids[0], root_logprobs[0], expand, depth=self.depth, topk=k,
                                             total_tokens=self.T)
        self.v_tokens[:1].copy_(self.root)
        self.v_tokens[1:].copy_(tokens)
        self.v_mask[1:, 1:].copy_(tree.mask)
        self.v_mask[1:, 0] = True
        self.v_depth[1:].copy_(tree.depth + 1)
        self.t_parents.copy_(tree.parents)

    def _verify_body(self) -> None:
        model, tc = self.gen.model, self.tcache
        hidden, logits = static_tree_forward(model, tc, self.v_tokens, self.v_mask, self.v_depth, self.n,
                                             self.gen.impl, switch_attention=False)
        if self.sampling:
            rows, count, out_tokens = accept_sampling_static(logits, self.v_tokens[1:], self.t_parents, self.depth,
                                                             self.topk, self.temperature, self.uniforms)
        else:
            tree = DraftTree(self.t_parents, self.v_mask[1:, 1:], self.v_depth[1:] - 1)
            rows, count, out_tokens = accept_greedy_static(logits, self.v_tokens[1:], tree, self.depth)
        # commit: the kept rows' keys/values to contiguous slots n .. n + A - 1 (past n + count: garbage,
        # beyond the committed length)
        src = self.n + rows
        dst = self.n + torch.arange(self.A, device=rows.device)
        tc.k.index_copy_(3, dst, tc.k.index_select(3, src))
        tc.v.index_copy_(3, dst, tc.v.index_select(3, src))
        self.d_start.copy_(self.n)
        self.d_feats.copy_(hidden.index_select(0, rows))
        self.d_tokens.copy_(out_tokens)
        self.d_count.copy_(count)
        self.root.copy_(out_tokens.gather(0, count - 1))
        self.n.add_(count)
        self.result[:1].copy_(count)
        self.result[1:].copy_(out_tokens)

    # --- graphs ------------------------------------------------------------------------------------
    def capture(self) -> None:
        """Warm up (Triton autotuning, allocator) on a side stream, then capture both steps."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.draft_step()
                self.verify_step()
            n = self.n.clone()
            self.n.zero_()
            self.prefill_step()
            self.n.copy_(n)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graphs = (torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph())
        with torch.cuda.graph(graphs[0]):
            self.draft_step()
        with torch.cuda.graph(graphs[1]):
            self.verify_step()
        with torch.cuda.graph(graphs[2]):
            self.prefill_step()
        torch.cuda.synchronize()
        self.graphs = graphs

    def prefill_step(self) -> None:
        """One prompt chunk (p_tokens, p_count real rows) through the target at slots n.., then the draft
        over the same positions; leaves the pending row (the chunk's last position, its first prediction)
        as if the prompt ended here (the last chunk's is the one that counts)."""
        with attention_implementation(self.gen.model, ATTN_NAME):
            self._prefill_body()

    def _prefill_body(self) -> None:
        gen, dev = self.gen, self.gen.device
        hidden, _ = static_tree_forward(gen.model, self.tcache, self.p_tokens, self.p_mask, self.p_depth, self.n,
                                        gen.impl, switch_attention=False, logits=False)
        last = hidden.index_select(0, self.p_count - 1)  # [1, H]
        logits = final_logits(gen.model, last)[0]
        if self.sampling:
            first = _sample_from(torch.softmax(logits.double() / self.temperature, dim=-1), self.uniforms[0, :1])
        else:
            first = logits.argmax(dim=-1, keepdim=True)  # [1]
        # the draft at the same slots (slot == position); rows past p_count write slots that later
        # steps overwrite before anything reads them, and the chunk's last row is redone as the pending row
        slots = self.n + torch.arange(self.C, device=dev)
        allowed = torch.arange(self.d_slots, device=dev)[None, :] <= slots[:, None]
        gen.draft(hidden[None], self.p_next[None], slots[None], attn_fn=self._draft_attention(slots, allowed))
        self.d_start.copy_(self.n + self.p_count - 1)
        self.d_count.fill_(1)
        self.d_feats[:1].copy_(last)
        self.d_tokens[:1].copy_(first)
        self.root.copy_(first)
        self.n.add_(self.p_count)

    def prefill(self, ids: Tensor) -> int:
        """The prompt in chunks of C tokens (one captured step, replayed): target committed, draft over all
        but the last position, which becomes the draft's pending row. Returns the first new token."""
        P, C = ids.shape[0], self.C
        self.n.zero_()
        for start in range(0, P, C):
            count = min(C, P - start)
            self.p_tokens.zero_()
            self.p_next.zero_()
            self.p_tokens[:count].copy_(ids[start : start + count])
            nxt = ids[start + 1 : start + count + 1]
            self.p_next[: nxt.shape[0]].copy_(nxt)
            self.p_count.fill_(count)
            self.next_uniforms()
            if self.graphs is not None:
                self.graphs[2].replay()
            else:
                self.prefill_step()
        return int(self.root)

    def set_sampling(self, temperature: float, generator: torch.Generator | None) -> None:
        self.temperature.fill_(temperature)
        self.rng = generator

    def next_uniforms(self) -> None:
        """The next round's uniforms (sampling only), drawn on the host from the caller's generator."""
        if self.sampling:
            self.uniforms.copy_(torch.rand(self.uniforms.shape, generator=self.rng, dtype=torch.float64))

    def round(self, timer) -> list[int]:
        """One draft step and one verify step (graph replays when captured); returns the emitted tokens.
        timer: _EventTimer with graphs, _HostTimer without (marks 0, 1, 2 around the two steps)."""
        self.next_uniforms()
        timer.mark(0)
        if self.graphs is not None:
            self.graphs[0].replay()
        else:
            self.draft_step()
        timer.mark(1)
        if self.graphs is not None:
            self.graphs[1].replay()
        else:
            self.verify_step()
        timer.mark(2)
        result = self.result.tolist()
        return result[1 : 1 + result[0]]


class _HostTimer:
    """Draft/verify split from the host clock, synchronising at each mark (the eager engine)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals = [0.0, 0.0]
        self.last = 0.0

    def mark(self, i):
        _synchronize(self.device)
        now = time.perf_counter()
        if i > 0:
            self.totals[i - 1] += now - self.last
        self.last = now

    def split(self):
        return self.totals[0], self.totals[1]


class _EventTimer:
    """Draft/verify split from CUDA events (no host sync inside a round)."""

    def __init__(self):
        self.pairs = []
        self.current = None

    def mark(self, i):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        if i == 0:
            self.current = [event]
        else:
            self.current.append(event)
            if i == 2:
                self.pairs.append(self.current)

    def split(self):
        torch.cuda.synchronize()
        draft = sum(a.elapsed_time(b) for a, b, _ in self.pairs) / 1e3
        verify = sum(b.elapsed_time(c) for _, b, c in self.pairs) / 1e3
        return draft, verify
