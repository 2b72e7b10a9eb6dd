"""Speculative generation: EAGLE-2-style draft/verify over an HF target, with a plain mode that it falls
back to when speculation does not pay.

    gen = SpeculativeGenerator(model, draft, TreeConfig(depth=6, topk=10, total_tokens=60))
    gen.warmup()                                     # once: allocation, capture/compile, cost measurement
    r = gen.generate(input_ids, max_new_tokens=128)  # r.token_ids, r.mean_accepted_length, r.tokens_per_s

A request: the prompt is prefilled in chunks (`Engine.prefill`), then each step is either a speculative
round (`Engine.round`: draft_tree -> verify -> accept -> commit) or a plain one-token step
(`Engine.plain`), chosen by `SpeculationPolicy` from the engine's measured round and step costs and the
acceptance seen so far (in this request and the ones before). Greedy output is the target's argmax sequence either way.
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from coral_fast.engine import SCOUT_ROWS, Engine, EventTimer, HostTimer
from coral_fast.hf_attention import default_impl
from coral_fast.lookup import LoopWatch
from coral_fast.models import text_config

MODES = ("eager", "graphs", "compile", "compile-draft")
MAX_DEPTH, MAX_TOPK, MAX_TREE_TOKENS = 16, 32, 128
MIN_TEMPERATURE = 1e-6  # below it 1 / temperature scales logits past float64 (denormals crash sampling)


def default_mode(device) -> str:
    """The engine mode used when none is named: "compile-draft" on CUDA (the draft's ~700 small kernels a
    round fused by Inductor, the target captured; a one-time compile of ~40 s, seconds with a warm Inductor
    cache), "eager" elsewhere. bench/results/e2e_suite_full_compile-draft_h100.md has it against "graphs"."""
    return "compile-draft" if torch.device(device).type == "cuda" else "eager"


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass
class TreeConfig:
    """EAGLE-2 dynamic tree: `depth` levels, `topk` children per expanded node, `total_tokens` verified.

    lookup > 0: a chain copied from the context (coral_fast.lookup) takes the place of the draft's `lookup`
    lowest-ranked nodes whenever the context's final n-gram recurs (else the draft keeps all total_tokens).
    It may be longer than the draft's tree is deep (it costs no draft step): a round accepts up to `levels` =
    max(depth, lookup) tokens + 1. Sampling requests too (at temperature 0.7: tau +8% on the H100's full task
    suite, +3% on the CPU's quick one; bench/results/sampling_h100.md), unless lookup_sampling=False."""

    depth: int = 6
    topk: int = 10
    total_tokens: int = 60
    lookup: int = 0
    lookup_sampling: bool = True

    def __post_init__(self):
        for name, value, hi in (("depth", self.depth, MAX_DEPTH), ("topk", self.topk, MAX_TOPK)):
            if not _is_int(value) or not 1 <= value <= hi:
                raise ValueError(f"tree {name} must be an integer in [1, {hi}], got {value!r}")
        most = self.max_tokens(self.depth, self.topk)
        if not _is_int(self.lookup) or not 0 <= self.lookup <= MAX_DEPTH:
            raise ValueError(f"tree lookup must be an integer in [0, {MAX_DEPTH}], got {self.lookup!r}")
        if 1 + self.lookup > most:  # the chain replaces the draft's lowest-ranked nodes: the table must hold it
            raise ValueError(f"tree lookup {self.lookup} needs at least {1 + self.lookup} tree tokens, more than the {most} "
                             f"a tree holds for depth {self.depth} and topk {self.topk}: a smaller lookup or a larger tree")
        if not _is_int(self.total_tokens) or not 1 + self.lookup <= self.total_tokens <= most:
            raise ValueError(f"tree total_tokens must be an integer in [{1 + self.lookup}, {most}] for depth "
                             f"{self.depth} and topk {self.topk}" + (f" with lookup {self.lookup}" if self.lookup else "")
                             + f", got {self.total_tokens!r}")
        if not isinstance(self.lookup_sampling, bool):
            raise ValueError(f"tree lookup_sampling must be a bool, got {self.lookup_sampling!r}")

    def chain_serves(self, sampling: bool) -> bool:
        """Whether a request (sampling or greedy) takes the lookup chain."""
        return self.lookup > 0 and (not sampling or self.lookup_sampling)

    @property
    def levels(self) -> int:
        """The deepest node below the root: a fully accepted round commits levels + 1 tokens."""
        return max(self.depth, self.lookup)

    @staticmethod
    def max_tokens(depth: int, topk: int) -> int:
        """The candidate table's size (topk + (depth - 1) * topk^2), at most 128 (the kernel's rows)."""
        return min(topk + (depth - 1) * topk * topk, MAX_TREE_TOKENS)


# the generator's tree: EAGLE-2's 6/10/60 with a 16-token lookup chain (H100, bf16, full task suite, answers to
# their EOS: the loop over the plain mode 1.66x with 10, 1.70x with 16, a round no dearer;
# bench/results/drafts_smollm2_10m_eos_h100.md)
DEFAULT_TREE = TreeConfig(6, 10, 60, lookup=16)


@dataclass
class GenerationResult:
    token_ids: list[int]  # the new tokens (EOS included when it stopped there, like HF generate)
    prompt_len: int
    rounds: int = 0  # speculative rounds
    accepted_lengths: list[int] = field(default_factory=list)  # tokens per round, bonus included
    plain_steps: int = 0  # one-token steps (plain mode: fallback or plain=True)
    scouted: int = 0  # probes that ended at the draft's first look (SpeculationPolicy.scout_fails): no round
    loop_probes: int = 0  # rounds run from plain decoding because the lookup chain's tokens kept coming (LOOP_STREAK)
    prefill_time_s: float = 0.0  # time to first token (prompt prefill + first token), warm-up excluded
    draft_time_s: float = 0.0  # draft catch-up + tree building
    verify_time_s: float = 0.0  # verify rounds and plain steps (the target's forwards)
    total_time_s: float = 0.0
    warmup_time_s: float = 0.0  # 0.0 unless this call warmed the engine up

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per target forward after the first token (EAGLE's tau; a plain step counts 1)."""
        forwards = len(self.accepted_lengths) + self.plain_steps
        return (sum(self.accepted_lengths) + self.plain_steps) / forwards if forwards else 1.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.total_time_s if self.total_time_s > 0 else float("nan")

    def stats(self) -> dict:
        return {
            "new_tokens": len(self.token_ids),
            "rounds": self.rounds,
            "plain_steps": self.plain_steps,
            "scouted": self.scouted,
            "loop_probes": self.loop_probes,
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "prefill_s": round(self.prefill_time_s, 4),
            "draft_s": round(self.draft_time_s, 4),
            "verify_s": round(self.verify_time_s, 4),
            "total_s": round(self.total_time_s, 4),
            "warmup_s": round(self.warmup_time_s, 4),
        }


# plain steps between probes per plain step a probe costs beyond one: a failed probe costs
# (round / plain - 1) steps, so probing a useless draft costs ~1/32 of the tokens
PROBE_STEPS_PER_EXTRA_COST = 32
# a request opens with a round only where a fully accepted one would be this much faster than plain
# steps (captured GPU engines: 3-4x; the 2-core CPU: ~1.6x, where a round rarely pays)
START_GAIN = 2.0
# the EMA's weight of the latest round. A round's tau spreads as wide as its mean (1 to levels + 1): where a round
# costs under CHEAP_ROUND plain steps (captured GPU engines: 1.8-2.0) a miss costs little and a false turn to plain
# a whole probe interval, so the EMA remembers longer (at 0.3 two or three misses in a row turned paying requests
# plain); where rounds are dear (the CPU: ~4) it follows the latest rounds faster (bench/results/policy_ema_cpu.md)
EMA_ALPHA_CHEAP, EMA_ALPHA_DEAR, CHEAP_ROUND = 0.15, 0.3, 3.0


def ema_alpha_for(round_s: float, plain_s: float) -> float:
    """The policy's default EMA weight for a round costing round_s against a plain step of plain_s."""
    return EMA_ALPHA_CHEAP if plain_s > 0 and round_s / plain_s < CHEAP_ROUND else EMA_ALPHA_DEAR


# a probe looks first at the draft's top-1 guesses over the plain stretch it catches up on (teacher-forced
# hit rate p) and ends there when a chain's 1 + p + ... + p^depth tokens a round is below this share of
# what a round must commit to pay (a tree commits more than its top-1 chain, hence the slack)
SCOUT_FRACTION = 0.75
# while decoding plainly, a request with the lookup chain probes at once when the chain's first token would
# have been right this many times in a row (LoopWatch): the text loops or copies, which a round's chain
# commits in long runs, however poorly the draft alone guesses (its scout is skipped then)
LOOP_STREAK = 4
# the prompt's last tokens LoopWatch indexes (at a request's first plain step: ~1 ms on the 2-core CPU)
LOOP_WATCH_PROMPT = 512


@dataclass
class SpeculationPolicy:
    """Speculate while the expected rate (EMA of accepted length / round cost) beats plain decoding
    (1 / step cost) by `margin` (before any round: while a fully accepted round would gain 2x); in plain
    mode, probe with one round every `interval` tokens (its accepted length replaces the EMA; doubling
    after each probe that does not pay, up to `max_interval`). The first interval grows with the cost
    ratio (PROBE_STEPS_PER_EXTRA_COST), so that failed probes cost ~3% where a round is dear (the
    CPU) and probes stay frequent where it is cheap (captured on a GPU). A greedy probe may end before its
    round (`scout_fails`): the draft's guesses over the stretch it caught up on say the round cannot pay."""

    round_s: float
    plain_s: float
    max_tau: int | None = None  # tokens of a fully accepted round (TreeConfig.levels + 1; depth + 1 without the chain)
    margin: float = 0.05
    first_interval: int = 16
    max_interval: int = 128
    alpha: float | None = None  # the EMA's weight of the latest round (None: by the cost ratio, EMA_ALPHA_*)
    scout_fraction: float = SCOUT_FRACTION
    min_scout_rows: int = SCOUT_ROWS  # fewer judged guesses: the probe runs its round
    loop_streak: int = LOOP_STREAK  # lookup-chain hits in a row that start a round from plain decoding; 0: no watch
    ema_tau: float | None = None
    since_probe: int = 0
    interval: int = 16

    def __post_init__(self):
        if not _is_int(self.loop_streak) or self.loop_streak < 0:
            raise ValueError(f"loop_streak must be an integer >= 0 (0: no loop watch), got {self.loop_streak!r}")
        ratio = self.round_s / self.plain_s if self.plain_s > 0 else float("nan")
        if math.isfinite(ratio):
            self.first_interval = max(self.first_interval, math.ceil(PROBE_STEPS_PER_EXTRA_COST * (ratio - 1)))
            self.max_interval = max(self.max_interval, 8 * self.first_interval)
        self.interval = self.first_interval
        if self.alpha is None:
            self.alpha = ema_alpha_for(self.round_s, self.plain_s)
        # start with a round unless even full acceptance would gain less than 2x: then start plainly and
        # let the first probe find out (a round that dear costs more than it can win when it fails)
        self.start_speculating = self.max_tau is None or self.max_tau / self.round_s >= START_GAIN / self.plain_s
        # no probes where even a fully accepted round cannot beat plain decoding
        self.can_pay = self.max_tau is None or self.tau_pays(self.max_tau)

    def tau_pays(self, tau: float) -> bool:
        """Rounds of tau tokens beat plain steps by the margin."""
        return tau / self.round_s > (1.0 + self.margin) / self.plain_s

    def pays(self) -> bool:
        if self.ema_tau is None:
            return self.start_speculating
        return self.tau_pays(self.ema_tau)

    def speculate(self) -> bool:
        return self.pays() or (self.can_pay and self.since_probe >= self.interval)

    def after_round(self, tau: int, scheduled: bool = True) -> None:
        """A round committed tau tokens. scheduled=False: a round run from plain decoding out of the probe
        schedule (a loop the lookup chain would copy, LOOP_STREAK): speculation resumes when it pays, and the
        schedule stays as it was when it does not (a failed one must not delay the next timed probe)."""
        if not scheduled and not self.pays():
            if self.tau_pays(tau):
                self.ema_tau, self.since_probe, self.interval = float(tau), 0, self.first_interval
            return
        probing = not self.pays()
        # a probe's round stands on its own: blended into the estimate of a poor stretch (or of an earlier
        # request) one good probe could not switch speculation back on, and a request would end plainly
        if probing or self.ema_tau is None:
            self.ema_tau = float(tau)
        else:
            self.ema_tau = (1 - self.alpha) * self.ema_tau + self.alpha * tau
        self.since_probe = 0
        if self.pays():
            self.interval = self.first_interval
        elif probing:
            self.interval = min(2 * self.interval, self.max_interval)

    def scout_fails(self, hits: int, rows: int) -> bool:
        """A probe's first look: the draft guessed `hits` of `rows` answer tokens right (top-1, teacher-forced)
        over the stretch it just caught up on. True: even a chain at that hit rate is far from paying, so the
        probe ends without its round and counts as a failed one (the interval doubles)."""
        if rows < self.min_scout_rows or self.max_tau is None:
            return False
        p = hits / rows
        chain = sum(p ** i for i in range(self.max_tau))  # 1 + p + ... + p^levels
        if chain >= self.scout_fraction * (1.0 + self.margin) * self.round_s / self.plain_s:
            return False
        self.since_probe = 0
        self.interval = min(2 * self.interval, self.max_interval)
        return True

    def after_plain(self) -> None:
        self.since_probe += 1

    def new_request(self) -> None:
        """A request starts from what the previous ones saw (the EMA, the probe interval): a stream of
        requests where the draft is poor does not pay a failed round at each start. A request probes
        within `first_interval` plain tokens at the latest, so a task where the draft is good is found
        quickly after a poor one."""
        self.since_probe = max(self.since_probe, self.interval - self.first_interval)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _feature_size(model, draft) -> int | None:
    """Width of the draft's target features: None (the hidden size), or for an EAGLE-3 draft
    (`feature_layers` set) its `feature_size`, else what `target_features` returns on zeros."""
    if draft is None or getattr(draft, "feature_layers", None) is None:
        return None
    if isinstance(getattr(draft, "feature_size", None), int):
        return draft.feature_size
    cfg = text_config(model.config)
    w = model.get_output_embeddings().weight
    states = tuple(torch.zeros(1, 1, cfg.hidden_size, dtype=w.dtype, device=w.device)
                   for _ in range(cfg.num_hidden_layers + 1))
    return int(draft.target_features(states, states[-1][0]).shape[-1])


class SpeculativeGenerator:
    """Speculative decoding of an HF causal LM (`model`) with a `DraftModel` (random if None). Batch 1.

    tree: the draft tree (default DEFAULT_TREE: 6/10/60 with a 16-token lookup chain).
    mode: "eager" (the CPU default), "graphs" (every step captured in a CUDA graph; no compile),
    "compile" (torch.compile'd steps, then captured on CUDA), "compile-draft" (the CUDA default: only the
    draft's steps compiled, where a round's many small kernels are; the target's captured as in "graphs").
    max_context: prompt + new tokens a request may hold; the caches are sized once for it (default
    min(4096, the model's max_position_embeddings)).
    adaptive: fall back to plain decoding when speculation does not pay (output unchanged).
    speculative=False: no draft at all; every request decodes plainly through the same engine.
    fuse: one product for q/k/v and one for gate/up (coral_fast.fusion; default: when not eager).
    """

    def __init__(self, model, draft=None, tree: TreeConfig | None = None, mode: str | None = None,
                 max_context: int | None = None, adaptive: bool = True, speculative: bool = True,
                 eos_token_id=None, impl: str | None = None, head_impl: str = "auto", fuse: bool | None = None,
                 chunk: int | None = None):
        from coral_fast.draft import DraftModel, _check_matches_target

        self.model = model
        self.device = model.get_output_embeddings().weight.device
        on_cuda = self.device.type == "cuda"
        self.mode = mode or default_mode(self.device)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "graphs" and not on_cuda:
            raise ValueError("mode 'graphs' needs the model on a CUDA device")
        limit = getattr(text_config(model.config), "max_position_embeddings", None) or 4096
        self.max_context = min(4096, limit) if max_context is None else max_context
        if not _is_int(self.max_context) or not 1 <= self.max_context <= limit:
            raise ValueError(f"max_context must be an integer in [1, {limit}] (the model's "
                             f"max_position_embeddings), got {max_context!r}")
        if chunk is not None and (not _is_int(chunk) or not 1 <= chunk <= MAX_TREE_TOKENS):
            raise ValueError(f"chunk (prompt rows a prefill step) must be an integer in [1, {MAX_TREE_TOKENS}] "
                             f"(the tree-attention kernel's rows), got {chunk!r}")
        self.speculative, self.adaptive = speculative, adaptive
        self.tree = tree or DEFAULT_TREE
        if speculative:
            if draft is None:
                draft = DraftModel.random_init(model)
            elif hasattr(draft, "config") and hasattr(draft.config, "hidden_size"):
                _check_matches_target(draft.config, model)
            self.draft = draft.eval()
        else:
            self.draft = None
        if eos_token_id is None:
            eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            if eos_token_id is None:
                eos_token_id = model.config.eos_token_id
        if isinstance(eos_token_id, int):
            eos_token_id = [eos_token_id]
        self.eos_token_ids = set(eos_token_id or [])
        self.fuse = self.mode != "eager" if fuse is None else fuse
        if self.fuse:
            from coral_fast.fusion import fuse_projections

            fuse_projections(self.model)
            if self.draft is not None:
                fuse_projections(self.draft)
        self.engine = Engine(model, self.draft, self.tree, self.max_context, self.mode,
                             impl or default_impl(self.device), head_impl, _feature_size(model, self.draft),
                             chunk)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.warmed = False
        self.round_time_s = self.plain_step_time_s = float("nan")
        self.refine_costs = True  # eager: update the policy's costs from the request's own step times
        self.policy_options: dict = {}  # SpeculationPolicy fields (margin, first_interval, ...) for every request
        self._policies: dict = {}  # one SpeculationPolicy per (greedy or sampling, costs, options), across requests
        self._dynamo_graphs = 0

    # --- one-time set-up ------------------------------------------------------------------------------
    @property
    def captures(self) -> int:
        """Steps captured or compiled so far (all at warm-up; sampling steps at the first sampling request)."""
        return self.engine.captures

    @property
    def compiles(self) -> int:
        """torch.compile graphs built since this generator's warm-up began (recompilations show here)."""
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"] - self._dynamo_graphs

    @torch.no_grad()
    def warmup(self) -> float:
        """Capture/compile every greedy step and measure a round's and a plain step's cost (idempotent).
        Returns the seconds it took (0.0 when already warm)."""
        if self.warmed:
            return 0.0
        from torch._dynamo.utils import counters

        self._dynamo_graphs = counters["stats"]["unique_graphs"]
        eng = self.engine
        _synchronize(self.device)
        t0 = time.perf_counter()
        P = min(eng.C, 2 * eng.A + 2, self.max_context)
        eng.reset(torch.arange(P, device=self.device) % self.vocab_size, 0.0, None)
        eng.prefill(P)
        if self.draft is not None:
            eng.catch_up()  # at most A rows left for the draft step
            if self.mode != "eager":
                for name in ("extend", "extend_scout"):  # (extend: not run above for a tiny max_context)
                    if (name, False) not in eng._prepared:
                        eng.chunk.count.fill_(0)  # nothing committed or counted: capture the step anyway
                        eng.run(name)
            self.plain_step_time_s, self.round_time_s = self._measure([["plain"], ["draft", "verify"]])
        else:
            (self.plain_step_time_s,) = self._measure([["plain"]])
        _synchronize(self.device)
        self.warmed = True
        return time.perf_counter() - t0

    def _measure(self, sequences: list[list[str]], reps: int = 5) -> list[float]:
        """Median seconds of each sequence of steps (after one untimed run that prepares them), the
        sequences interleaved so that a busy machine biases none of them; the state is restored."""
        eng = self.engine
        saved = eng.save_positions()
        times = [[] for _ in sequences]
        for _ in range(reps + 1):
            for steps, seen in zip(sequences, times):
                _synchronize(self.device)
                t = time.perf_counter()
                for name in steps:
                    eng.run(name)
                _synchronize(self.device)
                seen.append(time.perf_counter() - t)
                eng.restore_positions(saved)
        return [sorted(seen[1:])[reps // 2] for seen in times]

    # --- requests --------------------------------------------------------------------------------------
    def _policy(self, sampling: bool) -> SpeculationPolicy:
        """The policy that carries acceptance across requests (greedy and sampling accept differently)."""
        key = (sampling, self.round_time_s, self.plain_step_time_s, tuple(sorted(self.policy_options.items())))
        if key not in self._policies:
            # a fully accepted round: the chain's depth when it serves this kind of request, else the draft's
            levels = self.tree.levels if self.tree.chain_serves(sampling) else self.tree.depth
            self._policies[key] = SpeculationPolicy(self.round_time_s, self.plain_step_time_s, levels + 1,
                                                    **self.policy_options)
        return self._policies[key]

    def _check_request(self, input_ids, max_new_tokens, temperature) -> Tensor:
        """ValueError for a bad request, before the engine is touched. Returns the prompt [P] int64."""
        if isinstance(input_ids, Tensor):
            ids = input_ids
        else:
            try:
                ids = torch.as_tensor(input_ids)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"input_ids must be a tensor or a list of token ids: {e}") from None
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
        if ids.dim() == 2 and ids.shape[0] != 1:
            raise ValueError(f"batch size 1 only, got input_ids of shape {tuple(ids.shape)}")
        if ids.dim() not in (1, 2):
            raise ValueError(f"input_ids must be 1-D [P] or [1, P], got shape {tuple(ids.shape)}")
        ids = ids.reshape(-1)
        if ids.numel() == 0:
            raise ValueError("the prompt is empty: input_ids must hold at least one token")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"input_ids out of range [0, {self.vocab_size})")
        if not _is_int(max_new_tokens) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        P = ids.shape[0]
        if P + max_new_tokens > self.max_context:
            raise ValueError(f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) = {P + max_new_tokens} "
                             f"exceeds max_context {self.max_context}")
        if (not isinstance(temperature, numbers.Real) or isinstance(temperature, bool)
                or not math.isfinite(temperature) or temperature < 0 or 0 < temperature < MIN_TEMPERATURE):
            raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, "
                             f"got {temperature!r}")
        return ids.to(device=self.device, dtype=torch.int64)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 128, temperature: float = 0.0,
                 generator: torch.Generator | None = None, callback=None, plain: bool = False,
                 ignore_eos: bool = False) -> GenerationResult:
        """input_ids: [P] or [1, P] prompt ids. Returns a GenerationResult (new tokens + statistics).

        callback(list_of_new_token_ids) is called as tokens are accepted (streaming). plain=True: one
        token a step through the same engine. ignore_eos: always max_new_tokens tokens.
        Sampling (temperature > 0) is exact for any tree, so the same seed gives different (equally
        distributed) text for different trees or modes.
        """
        ids = self._check_request(input_ids, max_new_tokens, temperature)
        warmup_s = self.warmup()
        eng, P = self.engine, ids.shape[0]
        result = GenerationResult(token_ids=[], prompt_len=P, warmup_time_s=warmup_s)
        out = result.token_ids
        eos = set() if ignore_eos else self.eos_token_ids

        def emit(tokens: list[int]) -> bool:
            """Append up to the budget / first EOS; True when generation is finished."""
            take = []
            for t in tokens:
                take.append(t)
                if t in eos or len(out) + len(take) >= max_new_tokens:
                    break
            out.extend(take)
            if callback is not None and take:
                callback(take)
            return len(out) >= max_new_tokens or (bool(take) and take[-1] in eos)

        eager = self.mode == "eager"
        timer = HostTimer(self.device) if eager or self.device.type != "cuda" else EventTimer()
        _synchronize(self.device)
        t0 = time.perf_counter()
        eng.reset(ids, temperature, generator)
        done = emit([eng.prefill(P)])
        result.prefill_time_s = time.perf_counter() - t0
        speculate = self.speculative and not plain
        policy = self._policy(temperature > 0)
        if speculate:  # plain-mode requests leave the policy as it is
            policy.new_request()
        watches = (speculate and self.adaptive and self.tree.chain_serves(temperature > 0) and policy.can_pay
                   and policy.loop_streak > 0)
        watch = None  # LoopWatch, built when the request first decodes plainly
        while not done:
            round_now = speculate and (not self.adaptive or policy.speculate())
            looping = False
            if watches and not round_now:  # decoding plainly: does the text loop or copy?
                if watch is None:
                    watch = LoopWatch(ids[-LOOP_WATCH_PROMPT:].tolist())
                looping = round_now = watch.feed(out) >= policy.loop_streak
            # a greedy probe first looks at the draft's guesses over the stretch it catches up on, so it
            # waits until the answer holds enough tokens to judge them by (blind, a failed round costs more)
            scouting = (round_now and self.adaptive and temperature == 0 and policy.scout_fraction > 0
                        and not policy.pays() and not looping)
            if scouting and len(out) <= policy.min_scout_rows:
                round_now = False
            if round_now:
                t = time.perf_counter()
                timer.mark("draft")
                eng.catch_up(scout=scouting)
                if scouting and policy.scout_fails(*eng.take_scout()):
                    result.scouted += 1
                    round_now = False
            if round_now:
                tokens = eng.round(timer)
                if eager and self.refine_costs:  # the host timer synchronised: refine the estimate (the draft's catch-up included:
                    # it is what resuming speculation costs on top of a round)
                    policy.round_s = 0.8 * policy.round_s + 0.2 * (time.perf_counter() - t)
                result.rounds += 1
                result.accepted_lengths.append(len(tokens))
                policy.after_round(len(tokens), scheduled=not looping)
                if looping:
                    result.loop_probes += 1
                    watch.streak = 0  # a failed one waits for a fresh run of hits
            else:
                t = time.perf_counter()
                tokens = eng.plain(timer)
                if eager and self.refine_costs:
                    policy.plain_s = 0.8 * policy.plain_s + 0.2 * (time.perf_counter() - t)
                result.plain_steps += 1
                if speculate:
                    policy.after_plain()
            done = emit(tokens)
        result.total_time_s = time.perf_counter() - t0
        result.draft_time_s, result.verify_time_s = timer.split()
        return result
