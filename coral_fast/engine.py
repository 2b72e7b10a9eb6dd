"""The speculative engine: fixed shapes and device-side state, run eagerly, captured or compiled.

One round of EAGLE-2-style speculative decoding is four named steps over the state below:

    draft_tree  the draft catches up on the target's newest rows, then builds a dynamic tree
    verify      the target runs [root] + tree in one forward
    accept      the longest matching path (greedy) or tree rejection sampling, plus the bonus token
    commit      the accepted rows' keys/values move to contiguous slots; ids / features recorded

A plain step (target forward of one token, argmax or sampling, commit) shares the caches, so a request
can switch between speculation and plain decoding at any token. Every step has fixed shapes and reads
no device value on the host, so each one is captured in a CUDA graph ("graphs"), or torch.compile'd
and then captured ("compile"; "compile-draft": only the draft's steps); on the CPU they run eagerly
("eager"), attending only up to the host's copy of the committed length so that a large cache does not
slow small prompts down.

State (device tensors; the host keeps `n` and `d_len` mirrors from what each step reports):
    n       [1]  the target's committed length; ids[n] is the root (the last token, not yet in its cache)
    d_len   [1]  the draft's committed length: its cache holds the pairs (feats[t], ids[t + 1]), t < d_len
    ids     [S]  the token at every position (prompt, then accepted tokens)
    feats   [S, F] the target's feature at every position (what the draft reads)
Recording ids and features at every position is what lets the draft catch up in chunks
(`draft_extend`, the same step the prompt's draft half uses) after any number of plain steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from coral_fast.hf_attention import (ATTN_NAME, TreeKVCache, attention_implementation, final_logits, register,
                                     tree_forward)
from coral_fast.lookup import prompt_lookup
from coral_fast.models import text_config
from coral_fast.tree import DraftTree, build_dynamic_tree
from coral_fast.verify import accept_greedy, accept_sampling, sample_from

DRAFT_STEPS = ("draft", "extend", "extend_scout")  # what mode "compile-draft" compiles
PREFILL_CHUNK = 64  # prompt tokens per captured prefill / draft-extend step (tree attention: <= 128 rows)
# a probe's first look judges the draft's guesses at the last SCOUT_ROWS rows of its catch-up only: the head
# over a whole 64-row chunk cost 2 plain steps of SmolLM2 on the 2-core CPU, more than the round it saves
SCOUT_ROWS = 16


@dataclass
class Position:
    """Committed lengths (device [1] int64): target `n`, draft `d_len`."""

    n: Tensor
    d_len: Tensor


@dataclass
class History:
    """Per position: ids [S] int64 (ids[n] = root), feats [S, F] (the target's feature at t)."""

    ids: Tensor
    feats: Tensor


@dataclass
class Chunk:
    """Inputs of a prefill / draft-extend step: `count` [1] real rows of C; `last` [1] bool: the chunk
    ends the prompt (its last row's prediction is the first new token)."""

    count: Tensor
    last: Tensor


@dataclass
class TreeInputs:
    """What draft_tree writes and verify reads: tokens [R] (root first), mask [R, R], depth [R] (root 0),
    parents [T] (tree nodes, -1 = child of the root)."""

    tokens: Tensor
    mask: Tensor
    depth: Tensor
    parents: Tensor


@dataclass
class Sampling:
    """temperature [1] float64 (> 0 when sampling); uniforms [levels + 1, children + 1] float64 in [0, 1)
    (children: topk, one more with a lookup chain), drawn on the host from the caller's generator before every
    step (reproducible, CPU == GPU)."""

    temperature: Tensor
    uniforms: Tensor


class Engine:
    """Fixed-shape speculative (or plain, draft=None) decoding of one sequence; see the module docstring.

    Sizes: target cache and history `max_context` + slack (a verify writes R rows past n, a chunk C);
    draft cache the same plus the tree's node slots.
    """

    def __init__(self, model, draft, tree, max_context: int, mode: str, impl: str, head_impl: str,
                 feature_size: int | None = None, chunk: int | None = None):
        self.model, self.draft, self.mode = model, draft, mode
        self.impl, self.head_impl = impl, head_impl
        self.device = dev = model.get_output_embeddings().weight.device
        self.depth, self.topk, self.T = tree.depth, tree.topk, tree.total_tokens
        # a prompt-lookup chain (coral_fast.lookup) takes the tree's last `lookup` nodes when the context's
        # final n-gram recurs, one more child of the root: sampling's verify tries up to topk + 1 there
        self.lookup, self.chain_serves = tree.lookup, tree.chain_serves
        self.children = self.topk + (1 if self.lookup else 0)
        self.levels = tree.levels  # a chain longer than the draft's tree is deep reaches further
        self.R, self.A = self.T + 1, self.levels + 1
        self.C = chunk or PREFILL_CHUNK
        self.max_context = max_context
        self.S = max_context + self.A + max(self.R, self.C) + 1
        self.tcache = TreeKVCache.for_model(model, self.S)
        i64 = dict(dtype=torch.int64, device=dev)
        self.pos = Position(torch.zeros(1, **i64), torch.zeros(1, **i64))
        self.n_host = self.d_len_host = 0
        H = text_config(model.config).hidden_size
        self.feature_layers = getattr(draft, "feature_layers", None) if draft is not None else None
        F = feature_size or H
        fdtype = model.get_output_embeddings().weight.dtype
        self.hist = History(torch.zeros(self.S, **i64), torch.zeros(self.S, F, dtype=fdtype, device=dev))
        self.chunk = Chunk(torch.ones(1, **i64), torch.zeros(1, dtype=torch.bool, device=dev))
        self.chain_on = torch.ones(1, dtype=torch.bool, device=dev)  # this request takes the lookup chain
        self.sampling = Sampling(torch.ones(1, dtype=torch.float64, device=dev),
                                 torch.zeros(self.levels + 1, self.children + 1, dtype=torch.float64, device=dev))
        self.result = torch.zeros(self.A + 1, **i64)  # [count, tokens...] of the last round / plain step
        # a probe's first look (`draft_extend_step(scout=True)`): [hits, rows] of the draft's top-1 against the
        # tokens the target chose over the rows it caught up on; prompt_len: rows predicting prompt tokens
        # do not count (the draft is judged on the answer)
        self.scout = torch.zeros(2, **i64)
        self.prompt_len = torch.zeros(1, **i64)
        self.prompt_len_host = 0
        if draft is not None:
            dcfg = draft.config
            self.d_slots = self.S + max(self.A, (self.depth - 1) * self.topk, self.C)
            shape = (1, dcfg.num_key_value_heads, self.d_slots, dcfg.head_dim)
            self.dk = torch.zeros(shape, dtype=draft.fc.weight.dtype, device=dev)
            self.dv = torch.zeros_like(self.dk)
            self.tree_in = TreeInputs(torch.zeros(self.R, **i64), torch.eye(self.R, dtype=torch.bool, device=dev),
                                      torch.zeros(self.R, **i64), torch.full((self.T,), -1, **i64))
            self.tree_builder = dynamic_tree  # (engine, last [1, H], n, width) -> (DraftTree, tokens [T])
        self.head_check = mode == "eager"
        self.rng: torch.Generator | None = None
        self.sampling_on = False
        self.captures = 0  # graphs captured + steps compiled: none may happen after warm-up
        self._prepared: dict = {}
        self._pool = None
        register()

    # --- host-side helpers -----------------------------------------------------------------------------
    def _width(self, extra: int) -> int | None:
        """Eager: how many cache slots a step attends over (committed + what it writes); captured: all."""
        return self.n_host + extra if self.mode == "eager" else None

    def reset(self, prompt: Tensor, temperature: float, generator) -> None:
        """A new request: the prompt into the history, both caches empty, the sampling inputs set."""
        P = prompt.shape[0]
        self.hist.ids[:P].copy_(prompt)
        self.pos.n.zero_()
        self.pos.d_len.zero_()
        self.n_host = self.d_len_host = 0
        self.prompt_len.fill_(P)
        self.prompt_len_host = P
        self.scout.zero_()
        self.sampling_on = temperature > 0
        self.sampling.temperature.fill_(temperature if temperature > 0 else 1.0)
        self.chain_on.fill_(self.chain_serves(self.sampling_on))
        self.rng = generator

    def _next_uniforms(self) -> None:
        if self.sampling_on:
            self.sampling.uniforms.copy_(torch.rand(self.sampling.uniforms.shape, generator=self.rng,
                                                    dtype=torch.float64))

    # --- the steps (bodies; `run` replays their graphs or calls them) -----------------------------------
    def _target(self, tokens: Tensor, mask: Tensor, depth: Tensor, width: int | None, logits: bool = True):
        """The target over `tokens` at positions n + depth -> (features [T, F], hidden [T, H], logits)."""
        hidden, lg, states = tree_forward(self.model, self.tcache, tokens, mask, depth, self.pos.n, self.impl,
                                          switch_attention=False, logits=logits, host_len=width,
                                          hidden_states=self.feature_layers is not None)
        feats = hidden if self.feature_layers is None else self.draft.target_features(states, hidden)
        return feats, hidden, lg

    def _pick(self, logits_row: Tensor, uniform: Tensor, sampling: bool) -> Tensor:
        """[V] -> [1] int64: argmax, or an exact sample with the device-side uniform [1]."""
        if sampling:
            return sample_from(torch.softmax(logits_row.double() / self.sampling.temperature, dim=-1), uniform)
        return logits_row.argmax(dim=-1, keepdim=True)

    def prefill_step(self, sampling: bool = False) -> None:
        """C prompt rows ids[n : n + C) (chunk.count real) through the target; features recorded; the last
        chunk's last row predicts the first new token, written at ids[n + count]."""
        dev, C, pos, hist = self.device, self.C, self.pos, self.hist
        rows = torch.arange(C, device=dev)
        tokens = hist.ids.index_select(0, pos.n + rows)
        causal = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
        feats, hidden, _ = self._target(tokens, causal, rows, self._width(C), logits=False)
        hist.feats.index_copy_(0, pos.n + rows, feats.to(hist.feats.dtype))
        last = hidden.index_select(0, self.chunk.count - 1)
        first = self._pick(final_logits(self.model, last)[0], self.sampling.uniforms[0, :1], sampling)
        at = pos.n + self.chunk.count
        hist.ids.index_copy_(0, at, torch.where(self.chunk.last, first, hist.ids.index_select(0, at)))
        pos.n.add_(self.chunk.count)

    def _draft_forward(self, positions: Tensor, width: int | None) -> Tensor:
        """The draft over pairs (feats[t], ids[t + 1]) at `positions` [M] (slot = position) -> hidden [M, H]."""
        last = self.S - 1
        feats = self.hist.feats.index_select(0, positions.clamp(max=last))
        tokens = self.hist.ids.index_select(0, (positions + 1).clamp(max=last))
        cols = torch.arange(width or self.d_slots, device=self.device)
        allowed = cols[None, :] <= positions[:, None]
        return self.draft(feats[None], tokens[None], positions[None],
                          attn_fn=self._draft_attention(positions, allowed, width))[0]

    def _draft_attention(self, slots: Tensor, allowed: Tensor, width: int | None):
        """attn_fn for DraftModel.forward: write k, v at `slots`, attend over the first `width` slots."""
        dk, dv, scale = self.dk, self.dv, self.draft.layer.scaling

        def attend(q, k, v):
            dk.index_copy_(2, slots, k.to(dk.dtype))
            dv.index_copy_(2, slots, v.to(dv.dtype))
            keys, values = (dk, dv) if width is None else (dk[:, :, :width], dv[:, :, :width])
            # GQA by folding each KV head's query heads into its rows ([1, Hq, M, D] -> [1, Hkv, g * M, D]),
            # never by repeating the keys: that would copy the whole cache every call
            B, Hq, M, D = q.shape
            groups = Hq // keys.shape[1]
            out = torch.nn.functional.scaled_dot_product_attention(
                q.reshape(B, keys.shape[1], groups * M, D), keys.to(q.dtype), values.to(q.dtype),
                attn_mask=allowed.repeat(groups, 1), scale=scale)
            return out.reshape(B, Hq, M, D)  # SDPA may return another layout of the same values

        return attend

    def draft_extend_step(self, scout: bool = False) -> None:
        """Catch-up: the draft over positions [d_len, d_len + C), chunk.count of them real. scout: also count
        how often its first guess at the chunk's last SCOUT_ROWS real rows (top-1 of its head, teacher-forced
        on the target's features) is the token the target chose, into `scout` [hits, rows]: what a probe
        looks at before paying for a round."""
        positions = self.pos.d_len + torch.arange(self.C, device=self.device)
        width = None if self.mode != "eager" else self.d_len_host + self.C
        hidden = self._draft_forward(positions, width)
        if scout:
            judge = min(SCOUT_ROWS, self.C)
            rows = self.chunk.count - judge + torch.arange(judge, device=self.device)
            real = rows >= 0  # a chunk of fewer rows: the ones before it are not judged
            rows = rows.clamp(min=0)
            at = positions.index_select(0, rows)
            # the pair at t predicts the feature at t + 1, so its head's guess is the token ids[t + 2]
            guess, _ = self.draft.topk(hidden.index_select(0, rows), 1, impl=self.head_impl, check=self.head_check)
            chosen = self.hist.ids.index_select(0, (at + 2).clamp(max=self.S - 1))
            judged = real & (at + 2 >= self.prompt_len) & (at + 2 <= self.pos.n)
            self.scout[0].add_((judged & (guess[:, 0] == chosen)).sum())
            self.scout[1].add_(judged.sum())
        self.pos.d_len.add_(self.chunk.count)

    def draft_tree_step(self) -> None:
        """The draft over its pending rows [d_len, n) (at most A), then a tree from the last one's hidden."""
        k, pos, ti = self.topk, self.pos, self.tree_in
        positions = pos.d_len + torch.arange(self.A, device=self.device)
        width = self._width(max(self.A, (self.depth - 1) * k))
        hidden = self._draft_forward(positions, width)
        last = hidden.index_select(0, pos.n - pos.d_len - 1)  # [1, H]: predicts the target's feature at n
        pos.d_len.copy_(pos.n)
        tree, tokens = self.tree_builder(self, last, pos.n, width)
        if self.lookup:
            tree, tokens = self._with_lookup(tree, tokens)
        ti.tokens[:1].copy_(self.hist.ids.index_select(0, pos.n))
        ti.tokens[1:].copy_(tokens)
        ti.mask[1:, 1:].copy_(tree.mask)
        ti.mask[1:, 0] = True
        ti.depth[1:].copy_(tree.depth + 1)
        ti.parents.copy_(tree.parents)

    def _with_lookup(self, tree: DraftTree, tokens: Tensor) -> tuple[DraftTree, Tensor]:
        """The draft's T nodes, the last L of them its lowest-ranked (build_dynamic_tree's tail), or, when the
        context's final n-gram recurs and the request takes the chain (`chain_on`), the best T - L and the
        prompt-lookup chain from the root in place of the tail (node T - L + i's parent is the chain's node
        before it). The head is ancestor-closed and shares nothing with the chain, so the mask is the head's
        beside the chain's lower triangle: no second ancestor closure. The choice depends on committed tokens
        only, never on this round's draws: sampling stays exact."""
        L, first, dev = self.lookup, self.T - self.lookup, self.device
        chain, found = prompt_lookup(self.hist.ids, self.pos.n, L)
        use = found & self.chain_on  # [1] bool
        steps = torch.arange(L, device=dev)
        chain_parents = torch.where(steps > 0, first - 1 + steps, torch.full_like(steps, -1))
        chain_mask = torch.block_diag(tree.mask[:first, :first], torch.ones(L, L, dtype=torch.bool, device=dev).tril())
        parents = torch.cat([tree.parents[:first], torch.where(use, chain_parents, tree.parents[first:])])
        depth = torch.cat([tree.depth[:first], torch.where(use, steps, tree.depth[first:])])
        tokens = torch.cat([tokens[:first], torch.where(use, chain, tokens[first:])])
        return DraftTree(parents, torch.where(use, chain_mask, tree.mask), depth), tokens

    def verify_step(self, sampling: bool = False) -> None:
        """verify -> accept -> commit."""
        ti = self.tree_in
        feats, _, logits = self._target(ti.tokens, ti.mask, ti.depth, self._width(self.R))
        if sampling:
            rows, count, tokens = accept_sampling(logits, ti.tokens[1:], ti.parents, self.levels, self.children,
                                                  self.sampling.temperature, self.sampling.uniforms)
        else:
            rows, count, tokens = accept_greedy(logits, ti.tokens[1:], DraftTree(ti.parents, ti.mask[1:, 1:],
                                                                                ti.depth[1:] - 1), self.levels)
        self.commit(feats, rows, count, tokens)

    def commit(self, feats: Tensor, rows: Tensor, count: Tensor, tokens: Tensor) -> None:
        """Keep verify rows `rows` [A] (count valid, root first) as slots n .. n + count - 1 of the target's
        cache; record their features and the accepted tokens + bonus (ids[n + 1 ..]); advance n. Rows past
        `count` write garbage past the new n (never read before being overwritten)."""
        n, hist = self.pos.n, self.hist
        keep = n + torch.arange(self.A, device=self.device)
        self.tcache.move_rows(n + rows, keep)
        hist.feats.index_copy_(0, keep, feats.index_select(0, rows).to(hist.feats.dtype))
        hist.ids.index_copy_(0, keep + 1, tokens)
        n.add_(count)
        self.result[:1].copy_(count)
        self.result[1:].copy_(tokens)

    def plain_step(self, sampling: bool = False) -> None:
        """One token: the target over the root at n, its feature recorded, the next token at ids[n + 1]."""
        n, hist = self.pos.n, self.hist
        root = hist.ids.index_select(0, n)
        one = torch.ones(1, 1, dtype=torch.bool, device=self.device)
        feats, _, logits = self._target(root, one, torch.zeros_like(root), self._width(1))
        token = self._pick(logits[0], self.sampling.uniforms[0, :1], sampling)
        hist.feats.index_copy_(0, n, feats.to(hist.feats.dtype))
        hist.ids.index_copy_(0, n + 1, token)
        n.add_(1)
        self.result[:1].fill_(1)
        self.result[1:2].copy_(token)

    # --- running, capturing, compiling ------------------------------------------------------------------
    def _body(self, name: str, sampling: bool):
        if name == "prefill":
            return lambda: self.prefill_step(sampling)
        if name == "verify":
            return lambda: self.verify_step(sampling)
        if name == "plain":
            return lambda: self.plain_step(sampling)
        if name == "extend_scout":
            return lambda: self.draft_extend_step(scout=True)
        return {"extend": self.draft_extend_step, "draft": self.draft_tree_step}[name]

    def run(self, name: str) -> None:
        """Run step `name` for the current request (sampling or greedy): a replay when captured."""
        sampling = self.sampling_on and name in ("prefill", "verify", "plain")
        if self.mode == "eager":
            with attention_implementation(self.model, ATTN_NAME):
                self._body(name, sampling)()
            return
        fn = self._prepared.get((name, sampling))
        if fn is None:
            fn = self._prepared[(name, sampling)] = self._prepare(name, sampling)
        fn()

    def _prepare(self, name: str, sampling: bool):
        """Compile (mode "compile"; "compile-draft": the draft's steps) and capture (on CUDA) one step;
        counted in `captures`."""
        body = self._body(name, sampling)
        if self.mode == "compile" or (self.mode == "compile-draft" and name in DRAFT_STEPS):
            body = torch.compile(body, dynamic=False)

        def call():
            with attention_implementation(self.model, ATTN_NAME):
                body()

        self.captures += 1
        if self.device.type != "cuda":
            return call
        saved = self.save_positions()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up runs (autotuning, compilation, allocator) off the graph
            for _ in range(3):
                call()
                self.restore_positions(saved)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            call()
        torch.cuda.synchronize()
        return graph.replay

    def save_positions(self) -> tuple[Tensor, Tensor]:
        """Copies of (n, d_len), for running steps that must leave the request where it was."""
        return self.pos.n.clone(), self.pos.d_len.clone()

    def restore_positions(self, saved) -> None:
        self.pos.n.copy_(saved[0])
        self.pos.d_len.copy_(saved[1])

    # --- what a request does ---------------------------------------------------------------------------
    def prefill(self, prompt_len: int) -> int:
        """The prompt (already in the history) through the target in chunks. Returns the first new token."""
        for start in range(0, prompt_len, self.C):
            count = min(self.C, prompt_len - start)
            self.chunk.count.fill_(count)
            self.chunk.last.fill_(start + count == prompt_len)
            self._next_uniforms()
            self.run("prefill")
            self.n_host += count
        return int(self.hist.ids[prompt_len])

    def catch_up(self, scout: bool = False) -> None:
        """Extend the draft in chunks until at most A rows are pending (what draft_tree takes). scout: the
        last chunk, made as full as the stretch allows, also counts the draft's first guesses (`take_scout`)."""
        while self.n_host - self.d_len_host > self.A:
            rest = self.n_host - self.d_len_host - 1
            # scouting, the short chunk goes first, so that the last one holds SCOUT_ROWS rows where it can
            count = min(self.C, rest - self.C) if scout and rest > self.C else min(self.C, rest)
            last = rest - count <= self.A - 1  # what this chunk leaves pending ends the loop
            self.chunk.count.fill_(count)
            # rows t predict ids[t + 2]: a chunk judges some answer token when t + 2 >= prompt_len
            judges = scout and last and self.d_len_host + count + 1 >= self.prompt_len_host
            self.run("extend_scout" if judges else "extend")
            self.d_len_host += count

    def take_scout(self) -> tuple[int, int]:
        """(hits, rows) counted since the last call, then zeroed (one small read-back)."""
        hits, rows = self.scout.tolist()
        self.scout.zero_()
        return hits, rows

    def round(self, timer) -> list[int]:
        """draft_tree, then verify/accept/commit; returns the emitted tokens (one host read)."""
        self._next_uniforms()
        timer.mark("draft")
        self.run("draft")
        self.d_len_host = self.n_host
        timer.mark("verify")
        self.run("verify")
        timer.mark(None)
        result = self.result.tolist()
        self.n_host += result[0]
        return result[1 : 1 + result[0]]

    def plain(self, timer) -> list[int]:
        self._next_uniforms()
        timer.mark("verify")
        self.run("plain")
        timer.mark(None)
        self.n_host += 1
        return [int(self.result[1])]


def dynamic_tree(engine: Engine, last: Tensor, n: Tensor, width: int | None):
    """The EAGLE-2 dynamic tree from the draft's hidden state `last` [1, H] predicting position n: each
    level runs the draft on the `topk` best frontier nodes, their keys/values in the draft's cache after
    the committed prefix (slots n + (level - 1) * topk ..), masked to their ancestors.
    Returns (DraftTree of T nodes, tokens [T]); the last `lookup` are the lowest-ranked (the chain's place)."""
    draft, dev, k = engine.draft, engine.device, engine.topk
    S = width or engine.d_slots
    cols = torch.arange(S, device=dev)
    table_size = k + (engine.depth - 1) * k * k
    hidden_of = torch.zeros(table_size, last.shape[-1], dtype=last.dtype, device=dev)
    # an expanded node's draft-cache slots: its ancestors' at columns 0 .. level - 2, its own at level - 1,
    # S ("no slot") after; a level's attention rows are then one gather of its parents' rows (every
    # ancestor of a frontier node was itself expanded) instead of a walk up the table
    path_slots = torch.full((table_size, engine.depth), S, dtype=torch.int64, device=dev)
    prefix = cols[None, :] < n

    def expand(level, frontier, table):
        parents = table.parents[frontier]
        features = last.expand(k, -1) if level == 1 else hidden_of[parents]
        node_slots = n + (level - 1) * k + torch.arange(k, device=dev)
        rows = torch.full((k, engine.depth), S, dtype=torch.int64, device=dev) if level == 1 else path_slots[parents]
        rows[:, level - 1] = node_slots
        path_slots[frontier] = rows
        allowed = torch.zeros(k, S + 1, dtype=torch.bool, device=dev)
        allowed.scatter_(1, rows, True)
        allowed = allowed[:, :S] | prefix
        h = draft(features[None], table.tokens[frontier][None], (n + table.depth[frontier])[None],
                  attn_fn=engine._draft_attention(node_slots, allowed, width))[0]
        hidden_of[frontier] = h
        return draft.topk(h, k, impl=engine.head_impl, check=engine.head_check)

    root_ids, root_logprobs = draft.topk(last, k, impl=engine.head_impl, check=engine.head_check)
    tree, tokens, _ = build_dynamic_tree(root_ids[0], root_logprobs[0], expand, depth=engine.depth, topk=k,
                                         total_tokens=engine.T, tail=engine.lookup)
    return tree, tokens


class HostTimer:
    """Step times from the host clock, synchronising at each mark (eager engines)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals = {"draft": 0.0, "verify": 0.0}
        self.current, self.last = None, 0.0

    def mark(self, name: str | None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self.current is not None:
            self.totals[self.current] += now - self.last
        self.current, self.last = name, now

    def split(self):
        return self.totals["draft"], self.totals["verify"]


class EventTimer:
    """Step times from CUDA events (no host sync inside a step)."""

    def __init__(self):
        self.events: list = []

    def mark(self, name: str | None) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.events.append((name, event))

    def split(self):
        torch.cuda.synchronize()
        totals = {"draft": 0.0, "verify": 0.0}
        for (name, a), (_, b) in zip(self.events, self.events[1:]):
            if name is not None:
                totals[name] += a.elapsed_time(b) / 1e3
        return totals["draft"], totals["verify"]
