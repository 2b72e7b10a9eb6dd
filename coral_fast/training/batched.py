"""Batched generation for the data pipeline: left-padded prompts, one static KV cache, per-row stop.

    gen = BatchedGenerator(model, batch_size=256, max_len=2048, mode="auto")
    answers = gen.generate(prompts, max_new_tokens=512, eos=[2], pad_id=0)            # greedy
    answers = gen.generate(prompts, 512, [2], 0, temperature=0.8, top_p=0.95, seed=7)  # sampled

Prompts (lists of ids) of one call are left-padded to the longest; the batch is always `batch_size`
rows (missing rows are dummies that are done from the start), so every decode step has one shape:

    prefill   [B, W] tokens at cache positions 0..W-1 (eager: W changes from call to call)
    decode    [B, 1] tokens at cache position W + k, attention mask [B, max_len] (static)

On CUDA the decode step is `model.forward` compiled with mode="reduce-overhead" (Inductor + CUDA
graphs, replayed each step); on the CPU it runs eager. Rows stop at an eos id or after
`max_new_tokens`; the loop ends when every row stopped (checked every `sync_every` steps, the only
host read-back). The answer of a row is cut after its first eos (the eos is kept).

Greedy answers equal `model.generate(do_sample=False)` of each prompt alone (fp32, tests/test_synth.py):
pad positions are masked out of attention and positions count from each row's first real token.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor


def _cache_argument(model) -> str:
    """transformers renamed `past_key_values` to `cache` in model.forward (5.2x); the GPU image has 5.17."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


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


class BatchedGenerator:
    """Static-cache batched decoding of one model (see the module docstring).

    batch_size: rows per step (B); max_len: prompt width + new tokens, at most (the cache length).
    mode: "eager" | "compile" (reduce-overhead: CUDA graphs) | "auto" (compile on CUDA, else eager)."""

    def __init__(self, model, batch_size: int, max_len: int, mode: str = "auto"):
        if mode not in ("auto", "eager", "compile"):
            raise ValueError(f"mode must be auto, eager or compile, got {mode!r}")
        if batch_size < 1 or max_len < 2:
            raise ValueError(f"batch_size must be >= 1 and max_len >= 2, got {batch_size} and {max_len}")
        from transformers import StaticCache

        self.model = model
        self.device = next(model.parameters()).device
        self.batch_size, self.max_len = batch_size, max_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.cache_kw = _cache_argument(model)
        if mode == "auto":
            mode = "compile" if self.device.type == "cuda" else "eager"
        self.mode = mode
        if mode == "compile":
            # every generator's decode step is one more compiled shape of the same code object
            import torch._dynamo.config as dynamo_config

            for name in ("cache_size_limit", "recompile_limit"):
                if hasattr(dynamo_config, name):
                    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
            self._decode = torch.compile(self._forward, mode="reduce-overhead", dynamic=False)
        else:
            self._decode = self._forward
        # decode inputs live in fixed buffers (the captured graph reads them from the same addresses)
        B = batch_size
        self.mask = torch.zeros(B, max_len, dtype=torch.long, device=self.device)
        self.step_ids = torch.zeros(B, 1, dtype=torch.long, device=self.device)
        self.step_pos = torch.zeros(B, 1, dtype=torch.long, device=self.device)
        self.step_cache_pos = torch.zeros(1, dtype=torch.long, device=self.device)

    def _forward(self, input_ids: Tensor, position_ids: Tensor, cache_position: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model(input_ids=input_ids, position_ids=position_ids, cache_position=cache_position,
                         attention_mask=attention_mask, use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache})
        return out.logits[:, -1].float()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos: list[int], pad_id: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, sync_every: int = 16) -> list[list[int]]:
        """Answers (ids after each prompt, cut after the first eos) of up to `batch_size` prompts."""
        if not 1 <= len(prompts) <= self.batch_size:
            raise ValueError(f"between 1 and {self.batch_size} prompts per call, got {len(prompts)}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("an empty prompt (every prompt needs at least one token)")
        if not eos:
            raise ValueError("no eos ids: rows could never stop before max_new_tokens (pass the model's eos ids)")
        width = max(len(p) for p in prompts)
        if width + max_new_tokens > self.max_len:
            raise ValueError(f"prompt width {width} + max_new_tokens {max_new_tokens} exceeds the cache length {self.max_len}")
        B, dev = self.batch_size, self.device
        rows = prompts + [prompts[0]] * (B - len(prompts))  # dummies: done from the start
        ids = torch.full((B, width), pad_id, dtype=torch.long)
        for r, p in enumerate(rows):
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        lengths = torch.tensor([len(p) for p in rows], dtype=torch.long, device=dev)
        self.cache.reset()
        self.mask.zero_()
        self.mask[:, :width] = (torch.arange(width, device=dev)[None] >= width - lengths[:, None]).long()
        positions = (self.mask[:, :width].cumsum(-1) - 1).clamp_min(0)
        generator = torch.Generator(device=dev).manual_seed(seed) if temperature > 0 else None
        eos_ids = torch.tensor(sorted(set(eos)), dtype=torch.long, device=dev)

        logits = self._forward(ids.to(dev), positions, torch.arange(width, device=dev), self.mask)
        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        done[len(prompts):] = True
        steps = 0
        for k in range(max_new_tokens):
            token = sample_next(logits, temperature, top_p, generator)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            out[:, k] = token
            done |= torch.isin(token, eos_ids)
            steps = k + 1
            if k + 1 == max_new_tokens:
                break
            if (k + 1) % sync_every == 0 and bool(done.all()):
                break
            self.mask[:, width + k] = 1
            self.step_ids.copy_(token[:, None])
            self.step_pos.copy_((lengths + k)[:, None])
            self.step_cache_pos.fill_(width + k)
            logits = self._decode(self.step_ids, self.step_pos, self.step_cache_pos, self.mask)
            if self.mode == "compile":
                logits = logits.clone()  # the graph's output buffer is overwritten by the next replay
        answers = []
        eos_set = set(eos)
        for row in out[: len(prompts), :steps].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos_set), len(row))
            answers.append(row[:cut])
        return answers
