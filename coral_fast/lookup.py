"""Prompt lookup: a chain of tokens copied from the context, verified beside the draft's tree.

Summaries, answers over passages and multi-turn replies repeat spans of their context; a one-layer draft
predicts such spans less surely than a lookup finds them. `prompt_lookup` takes the context's last g tokens
(g = ngram_max down to ngram_min), finds their latest earlier occurrence, and proposes what followed it.
When that occurrence is closer than the chain is long, the context is in a loop of that period: the chain
repeats the loop rather than run past the last token.
When the context's final n-gram recurs, the engine hangs that chain from the root in place of the draft tree's
`TreeConfig.lookup` lowest-ranked nodes; when it does not, the draft keeps them. Verification judges every node
against the target, so any proposal is safe: the output stays exactly the target's.
"""
from __future__ import annotations

import torch
from torch import Tensor


def prompt_lookup(ids: Tensor, n: Tensor, length: int, ngram_max: int = 4,
                  ngram_min: int = 2) -> tuple[Tensor, Tensor]:
    """ids: [S] int64, the committed tokens at [0, n] (ids[n] = the last one); n: [1] int64 (device).
    -> (chain [length] int64, found [1] bool). chain: the tokens after the latest earlier occurrence of
    ids[n - g + 1 .. n] for the largest g in [ngram_min, ngram_max] that recurs, up to ids[n], then again from
    the first of them (a loop of period n + 1 - start repeats); all ids[n] when nothing recurs. found: some g
    recurs. Fixed shapes, no host sync (capturable)."""
    if not 1 <= ngram_min <= ngram_max or length < 1:
        raise ValueError(f"need 1 <= ngram_min <= ngram_max and length >= 1, got {ngram_min}, {ngram_max}, {length}")
    S = ids.shape[0]
    follow = torch.full_like(n, -1)  # where the proposal starts; -1: no match yet
    for g in range(ngram_min, ngram_max + 1):  # a longer n-gram's match overrides a shorter one's
        if g >= S:
            break
        key = ids.index_select(0, (n - g + 1 + torch.arange(g, device=ids.device)).clamp(min=0))  # [g]
        starts = torch.arange(S - g + 1, device=ids.device)
        # windows ending before n: an earlier occurrence, never the suffix itself
        hit = (ids.unfold(0, g, 1) == key[None, :]).all(dim=1) & (starts + g - 1 < n) & (n >= g - 1)
        latest = torch.where(hit, starts, torch.full_like(starts, -1)).max(dim=0, keepdim=True).values
        follow = torch.where(latest >= 0, latest + g, follow)
    found = follow >= 0
    period = (n + 1 - follow).clamp(min=1)  # the match ends before n, so follow <= n when found
    at = follow + torch.arange(length, device=ids.device) % period
    chain = torch.where(found, ids.index_select(0, at.clamp(0, S - 1)), ids.index_select(0, n).expand(length))
    return chain, found


def reference_prompt_lookup(context: list[int], length: int, ngram_max: int = 4,
                            ngram_min: int = 2) -> tuple[list[int], bool]:
    """The same rule over a Python list (context[-1] = the last committed token): the tests' oracle."""
    for g in range(ngram_max, ngram_min - 1, -1):
        if len(context) < g:
            continue
        key = context[-g:]
        for s in range(len(context) - g - 1, -1, -1):
            if context[s:s + g] == key:
                loop = context[s + g:]  # what followed, up to the last token: repeated past it
                return [loop[i % len(loop)] for i in range(length)], True
    return [context[-1]] * length, False


class LoopWatch:
    """The lookup's host-side twin for a speculative request's plain stretches: whether the chain's first
    token would have been each committed token. A run of such hits (`streak`) is a loop or a copy under way,
    which the chain commits many tokens a round of, however poorly the draft itself guesses there.

    Incremental: an index of every n-gram's latest end, so a token costs a few dict operations (the same
    rule as `reference_prompt_lookup`, first token only)."""

    def __init__(self, context: list[int], ngram_max: int = 4, ngram_min: int = 2):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}")
        self.grams = range(ngram_max, ngram_min - 1, -1)  # the longest recurring n-gram decides
        self.ends: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest occurrence ends
        self.ids: list[int] = []
        self.fed = 0  # tokens of the answer list taken so far (feed)
        self.streak = 0  # (push counts it)
        for token in context:
            self.push(token)
        self.streak = 0  # hits in a row, counted from the first token after the context

    def _suffixes(self) -> list[tuple[int, ...]]:
        """The n-grams ending at the last token, longest first."""
        n = len(self.ids)
        return [tuple(self.ids[n - g:]) for g in self.grams if n >= g]

    def _follow(self, suffixes: list[tuple[int, ...]]) -> int | None:
        for key in suffixes:
            end = self.ends.get(key)
            if end is not None:
                return self.ids[end + 1]
        return None

    def proposal(self) -> int | None:
        """The chain's first token after the tokens so far (None: no n-gram recurs)."""
        return self._follow(self._suffixes())

    def push(self, token: int) -> bool:
        """Commit one token; True when the chain would have proposed it."""
        suffixes = self._suffixes()  # looked up, then indexed: the same keys serve both
        hit = self._follow(suffixes) == token
        self.streak = self.streak + 1 if hit else 0
        for key in suffixes:  # the n-grams ending at the last token become earlier occurrences
            self.ends[key] = len(self.ids) - 1
        self.ids.append(token)
        return hit

    def feed(self, answer: list[int]) -> int:
        """Push the tokens of `answer` (a growing list) not pushed yet; returns the streak."""
        for token in answer[self.fed:]:
            self.push(token)
        self.fed = len(answer)
        return self.streak
