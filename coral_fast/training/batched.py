"""Batched generation for the data pipeline: one static KV cache, rows of their own lengths, per-row stop.

    gen = BatchedGenerator(model, batch_size=256, max_len=4096)
    answers = gen.generate(prompts, max_new_tokens=512, eos=[2], pad_id=0)            # greedy
    answers = gen.generate(prompts, 512, [2], 0, temperature=0.8, top_p=0.95, seed=7)  # sampled

Every row keeps its own length: row b's prompt fills cache slots [0, len_b) and its k-th new token goes
to slot len_b + k (position len_b + k). The model runs under the "coral_tree" attention function
(`coral_fast.hf_attention`) with a `_Rows` call that writes the keys/values and attends:

    prefill   [B, W] right-padded prompts (eager: W changes from call to call), causal SDPA; a row's
              pads sit after its prompt and are overwritten by its decode before anything reads them
    decode    [B, 1] tokens, one write per row at its own slot, then the tree-attention kernel with
              T = 1 and kv_len[b] = len_b + k + 1: it reads only the row's filled slots and the KV
              heads as they are (GQA without repeating them), so a step costs the weights plus the
              keys actually written, not the whole static cache

The decode step has one shape (the batch is always `batch_size` rows; missing rows are one-token dummies,
done from the start, and a row that stopped stays on its last slot, so neither reads more keys a step):
on CUDA it is captured in a CUDA graph once (mode "graphs", the default there) or compiled
and then captured ("compile"); "eager" runs it as is (the CPU). Rows stop at an eos id or after
`max_new_tokens`; every `sync_every` steps (the only host read-back) stopped rows hand in their answers
and take the next prompts (continuous batching, `generate`). The answer of a row is cut after its first
eos (the eos is kept). With `stop_loops=n` a row also stops once its last n tokens equal the n tokens p
before them for some period p <= `loop_period` (`looping`): a small model's long greedy answers drift into
such loops (two thirds of SmolLM2's greedy answer tokens lay past the first repeated 16-gram of their answer),
and decoding them costs as much as any token while the draft learns nothing from the repeats that the
prompt-lookup chain does not copy for free.

Greedy answers equal `model.generate(do_sample=False)` of each prompt alone (fp32, tests/test_synth.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from coral_fast.hf_attention import ATTN_NAME, TreeKVCache, _MaskAndBits, attention_implementation, final_logits, register

MODES = ("auto", "eager", "graphs", "compile")


def looping(out: Tensor, produced: Tensor, n: int, max_period: int) -> Tensor:
    """bool [B]: rows whose last n tokens repeat the n tokens p before them for some 1 <= p <= max_period.
    out: [B, W] the rows' new tokens so far, produced: [B] how many (fixed shapes: graph- and compile-safe)."""
    last = produced[:, None] - 1 - torch.arange(n, device=out.device)  # [B, n] the last n slots
    periods = torch.arange(1, max_period + 1, device=out.device)
    earlier = last[:, None, :] - periods[None, :, None]  # [B, P, n]
    B = out.shape[0]
    now = out.gather(1, last.clamp(min=0))[:, None, :]
    before = out.gather(1, earlier.clamp(min=0).view(B, -1)).view(earlier.shape)
    valid = earlier[:, :, -1] >= 0  # the oldest slot compared exists: produced >= n + p
    return (valid & (now == before).all(-1)).any(-1)


def loop_end(answer: Tensor, n: int, max_period: int) -> int:
    """`looping`'s rule over a finished answer [L]: how many tokens a row stopped by it would have kept (the
    first t whose last n tokens equal the n tokens p before them, p <= max_period; L if none). One pass over
    [max_period, L] instead of a step at a time (the data statistics of dev/data_loops.py)."""
    length = answer.numel()
    t = torch.arange(length, device=answer.device)[None, :]
    period = torch.arange(1, max_period + 1, device=answer.device)[:, None]
    match = (answer[None, :] == answer[(t - period).clamp(min=0)]) & (t - period >= 0)  # [P, L]
    last_miss = torch.where(match, torch.full_like(t, -1), t).cummax(1).values  # [P, L]
    hit = ((t - last_miss) >= n).any(0)  # a run of n matches at some period ends at t
    return int(hit.nonzero()[0]) + 1 if hit.any() else length


def sample_next(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """logits: [B, V] fp32 -> [B] int64: argmax when temperature == 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Rows:
    """One forward of BatchedGenerator inside "coral_tree" (hf_attention calls `attend` per layer).

    prefill: [R, W] tokens at slots [0, W) of the cache rows `rows` (None: all B rows). decode: one token a
    row at slot start[b] (device [B]), attending over slots [0, start[b]] of its row; positions [B, 1] =
    start[:, None]."""

    def __init__(self, cache: TreeKVCache, start: Tensor | None, impl: str, one: _MaskAndBits, rows: Tensor | None = None):
        self.cache, self.start, self.impl, self.one = cache, start, impl, one
        self.prefill, self.prefill_rows = start is None, rows
        if not self.prefill:
            self.rows = torch.arange(start.shape[0], device=start.device)
            self.kv_len, self.positions = start + 1, start[:, None]

    def attend(self, module, query: Tensor, key: Tensor, value: Tensor, scaling, window):
        """query [B, Hq, T, D], key/value [B, Hkv, T, D] -> ([B, T, Hq, D], None), as HF expects."""
        k_layer, v_layer = self.cache.k[module.layer_idx], self.cache.v[module.layer_idx]
        if self.prefill:
            width = query.shape[2]
            if self.prefill_rows is None:
                k_layer[:, :, :width].copy_(key)
                v_layer[:, :, :width].copy_(value)
            else:  # a refill: these rows only, the others keep decoding from their slots
                k_layer[self.prefill_rows, :, :width] = key.to(k_layer.dtype)
                v_layer[self.prefill_rows, :, :width] = value.to(v_layer.dtype)
            if window and window < width:  # a sliding layer (Gemma 3): a mask, so the memory-efficient kernel
                from coral_fast.kernels.tree_attention import repeat_kv

                idx = torch.arange(width, device=query.device)
                seen = (idx[:, None] >= idx[None, :]) & (idx[:, None] - idx[None, :] < window)
                group = query.shape[1] // key.shape[1]
                out = F.scaled_dot_product_attention(query, repeat_kv(key, group), repeat_kv(value, group),
                                                     attn_mask=seen, scale=scaling)
            else:  # causal, no mask: the flash kernel, GQA as is (a masked GQA call would take the math kernel)
                out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                     enable_gqa=query.shape[1] != key.shape[1])
        else:
            from coral_fast.kernels.tree_attention import SUPPORTED_HEAD_DIMS, tree_attention, tree_attention_reference

            k_layer[self.rows, :, self.start] = key[:, :, 0].to(k_layer.dtype)  # [B, Hkv, D] at each row's slot
            v_layer[self.rows, :, self.start] = value[:, :, 0].to(v_layer.dtype)
            window, positions = window or None, self.positions if window else None
            if self.impl == "reference" or query.shape[-1] not in SUPPORTED_HEAD_DIMS:
                out = tree_attention_reference(query, k_layer, v_layer, self.one.mask, scaling, self.kv_len, window, positions)
            else:
                out = tree_attention(query, k_layer, v_layer, self.one, impl=self.impl, scale=scaling, kv_len=self.kv_len,
                                     window=window, query_positions=positions, check=False)
        return out.transpose(1, 2).contiguous(), None


class BatchedGenerator:
    """Static-cache batched decoding of one model (see the module docstring).

    batch_size: rows per step (B); max_len: the cache length (a row's prompt + new tokens, at most).
    mode: "auto" (graphs on CUDA, else eager) | "eager" | "graphs" (the decode step captured in a CUDA
    graph) | "compile" (torch.compile, then captured)."""

    def __init__(self, model, batch_size: int, max_len: int, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if batch_size < 1 or max_len < 2:
            raise ValueError(f"batch_size must be >= 1 and max_len >= 2, got {batch_size} and {max_len}")
        self.model = model
        self.device = next(model.parameters()).device
        if mode == "auto":
            mode = "graphs" if self.device.type == "cuda" else "eager"
        if mode != "eager" and self.device.type != "cuda":
            raise ValueError(f"mode {mode!r} needs the model on a CUDA device")
        self.mode, self.batch_size, self.max_len = mode, batch_size, max_len
        register()
        self.cache = TreeKVCache.for_model(model, max_len, batch_size)
        self.impl = "auto" if self.device.type == "cuda" else "reference"
        self.one = _MaskAndBits(torch.ones(1, 1, dtype=torch.bool, device=self.device))  # the T = 1 "tree"
        # the decode step's inputs and output live in fixed buffers (a captured graph reads and writes them)
        self.step_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.step_start = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.logits = None
        self._decode = None  # built on the first decode (graphs / compile: a capture)

    def _forward(self, ids: Tensor, start: Tensor | None, last: Tensor, rows: Tensor | None = None) -> Tensor:
        """[R, V] fp32 logits at column `last` [R] of each row (prefill of cache rows `rows`: len_b - 1;
        decode: 0)."""
        out = self.model.model(input_ids=ids, position_ids=self.positions(ids, start), use_cache=False,
                               coral_tree=_Rows(self.cache, start, self.impl, self.one, rows))
        hidden = out.last_hidden_state[torch.arange(ids.shape[0], device=ids.device), last]
        return final_logits(self.model, hidden).float()

    @staticmethod
    def positions(ids: Tensor, start: Tensor | None) -> Tensor:
        if start is None:
            return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        return start[:, None]

    def _decode_body(self) -> None:
        zero = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        self.logits.copy_(self._forward(self.step_ids, self.step_start, zero))

    def _build_decode(self):
        if self.mode == "eager":
            return self._decode_body
        body = torch.compile(self._decode_body, dynamic=False) if self.mode == "compile" else self._decode_body
        # warm-up runs (compilation, autotuning, the allocator) off the graph; they write the next token's
        # slot of every row, which the real step rewrites before anything reads it
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                body()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        torch.cuda.synchronize()
        return graph.replay

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos: list[int], pad_id: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, sync_every: int = 16,
                 budgets: list[int] | None = None, stop_loops: int = 0, loop_period: int = 128) -> list[list[int]]:
        """Answers (ids after each prompt, cut after the first eos) of any number of prompts.
        budgets: new tokens each prompt may take (1 to max_new_tokens; default max_new_tokens for all).
        stop_loops: n > 0 also stops a row where `looping` finds its last n tokens periodic (period
        <= loop_period); the answer keeps those tokens.

        The first `batch_size` prompts fill the rows; every `sync_every` steps (the only host read-back)
        the rows that stopped hand in their answers and, once at least batch_size // 8 of them are free
        (or no row is left running), take the next prompts: one prefill of those rows, while the others
        keep their caches (continuous batching: a step decodes rows, not padding behind a long answer)."""
        if not prompts:
            raise ValueError("no prompts")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("an empty prompt (every prompt needs at least one token)")
        if not eos:
            raise ValueError("no eos ids: rows could never stop before max_new_tokens (pass the model's eos ids)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if budgets is not None and (len(budgets) != len(prompts)
                                    or any(not isinstance(b, int) or not 1 <= b <= max_new_tokens for b in budgets)):
            raise ValueError(f"budgets must give each of the {len(prompts)} prompts an int in [1, {max_new_tokens}]")
        if stop_loops < 0 or loop_period < 1:
            raise ValueError(f"stop_loops must be >= 0 and loop_period >= 1, got {stop_loops}, {loop_period}")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_len:
            raise ValueError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the cache length {self.max_len}")
        B, dev = self.batch_size, self.device
        generator = torch.Generator(device=dev).manual_seed(seed) if temperature > 0 else None
        eos_ids = torch.tensor(sorted(set(eos)), dtype=torch.long, device=dev)
        lengths = torch.ones(B, dtype=torch.long, device=dev)
        produced = torch.zeros(B, dtype=torch.long, device=dev)  # new tokens of each row's current prompt
        limit = torch.full((B,), max_new_tokens, dtype=torch.long, device=dev)  # its budget
        done = torch.ones(B, dtype=torch.bool, device=dev)
        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
        owner = [-1] * B  # the prompt each row decodes (-1: none)
        answers: list[list[int] | None] = [None] * len(prompts)

        def fill(rows: list[int], members: list[int]) -> None:
            """Prefill `members`' prompts into cache `rows` (rows past the members: one-token dummies, done)."""
            chosen = [prompts[i] for i in members] + [prompts[0][:1]] * (len(rows) - len(members))
            width = max(len(p) for p in chosen)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            for r, p in enumerate(chosen):
                ids[r, :len(p)] = torch.tensor(p, dtype=torch.long)
            index = torch.tensor(rows, dtype=torch.long, device=dev)
            row_lengths = torch.tensor([len(p) for p in chosen], dtype=torch.long, device=dev)
            logits = self._forward(ids.to(dev), None, row_lengths - 1, None if len(rows) == B else index)
            if self.logits is None:
                self.logits = torch.empty(B, logits.shape[-1], dtype=logits.dtype, device=dev)
            self.logits[index] = logits
            lengths[index] = row_lengths
            produced[index] = 0
            if budgets is not None:
                limit[index] = torch.tensor([budgets[i] for i in members] + [1] * (len(rows) - len(members)),
                                            dtype=torch.long, device=dev)
            done[index] = torch.arange(len(rows), device=dev) >= len(members)
            out[index] = pad_id
            self.step_start[index] = row_lengths - 1
            for r, i in zip(rows, members):
                owner[r] = i

        with attention_implementation(self.model, ATTN_NAME):
            taken = min(B, len(prompts))  # prompts[:taken] have had a row
            fill(list(range(B)), list(range(taken)))
            step = filled_at = 0
            while True:
                token = sample_next(self.logits, temperature, top_p, generator)
                running = ~done
                at = produced.clamp(max=max_new_tokens - 1)[:, None]
                out.scatter_(1, at, torch.where(running, token, out.gather(1, at)[:, 0])[:, None])
                slot = lengths + produced  # this token's cache slot
                produced += running
                stop = torch.isin(token, eos_ids) | (produced >= limit)
                if stop_loops:
                    stop |= looping(out, produced, stop_loops, loop_period)  # produced <= limit <= max_new_tokens
                done |= running & stop
                # the token's slot and position; a stopped row stays on its last slot (its reads stop growing)
                self.step_ids.copy_(token[:, None])
                torch.where(done, self.step_start, slot, out=self.step_start)
                if self._decode is None:
                    self._decode = self._build_decode()
                self._decode()
                step += 1
                if step % sync_every and step - filled_at < max_new_tokens:  # (by then every row stopped)
                    continue
                stopped, counts = done.tolist(), produced.tolist()
                finished = [r for r in range(B) if owner[r] >= 0 and stopped[r]]
                if finished:  # one read-back of their rows
                    for r, row in zip(finished, out[torch.tensor(finished, device=dev)].tolist()):
                        answers[owner[r]] = row[:counts[r]]  # a row stops at its first eos: the cut is here
                        owner[r] = -1
                free = [r for r in range(B) if owner[r] < 0]
                pending = len(prompts) - taken
                if pending and (len(free) >= min(pending, max(1, B // 8)) or len(free) == B):
                    members = list(range(taken, taken + min(len(free), pending)))
                    taken += len(members)
                    fill(free[:len(members)], members)  # their first tokens come from this prefill's logits
                    filled_at = step
                elif not pending and len(free) == B:
                    break
        return answers
