"""The grouped LM head (`GroupedLMHead`) and its drop-in form with a router (`RoutedLMHead`).

    head = GroupedLMHead(weight, grouping)             # weight [V, H]: the target's LM head
    ids, logprobs = head.topk(hidden, groups, k)       # hidden [M, H], groups [M, A] distinct ids

    lm = RoutedLMHead(weight, grouping, active_groups) # for an EAGLE-style draft's lm_head
    ids, logprobs = lm.topk(hidden, k)                 # the router picks the groups

`ids` are original token ids [M, k] int64, `logprobs` [M, k] fp32 are normalised over the union of
the row's active groups, sorted descending.

Checks. Shapes, dtypes and devices are always checked (ValueError). Values (group ids in [0, G) and
distinct per row, k within each row's active vocabulary, a finite hidden state) are checked with
`check=True` (the default) where that costs no device read-back: on CPU tensors, ValueError. On CUDA
no value is read back in either mode (a read-back would wait for the device on every eager call and
break CUDA-graph capture): there a row with a bad value comes out as ids -1 and log-probs NaN, from
the Triton kernel and the PyTorch reference alike (`coral_fast.kernels.grouped_head_topk`), so one bad
row neither hides among the good ones nor changes them. `check=False` skips the CPU value checks
too; the output is then the same invalid-row result.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from coral_fast.grouping import VocabGrouping
from coral_fast.kernels._dispatch import resolve_impl
from coral_fast.kernels.grouped_head_topk import MAX_K, grouped_head_topk
from coral_fast.router import GroupRouter

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _relay(weight: Tensor, grouping: VocabGrouping) -> Tensor:
    """weight [V, H] in the grouping's layout; the identity layout returns `weight` itself (no copy)."""
    if grouping.is_identity:
        return weight
    return weight.index_select(0, grouping.order.to(weight.device)).contiguous()


def _check_weight(weight: Tensor, grouping: VocabGrouping) -> None:
    if not isinstance(grouping, VocabGrouping):
        raise ValueError(f"grouping must be a VocabGrouping, got {type(grouping).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[0] != grouping.vocab_size:
        raise ValueError(f"weight has {weight.shape[0]} rows, the grouping covers V={grouping.vocab_size}")
    if weight.dtype not in _FLOATS:
        raise ValueError(f"weight dtype must be one of {_FLOATS}, got {weight.dtype}")


def grouped_topk(
    hidden: Tensor, groups: Tensor, k: int, *, relaid_weight: Tensor, offsets: Tensor, order: Tensor,
    group_sizes: Tensor, max_group_size: int, impl: str = "auto", check: bool = True, out=None,
    desc_cache: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """Validate, then run the grouped head (shared by GroupedLMHead and RoutedLMHead).

    Shape, dtype and device checks read only metadata; value checks run with check=True on CPU tensors
    (module docstring: on CUDA, bad rows come out as ids -1, NaN). An eager call that a replayed graph
    serves (`kernels/_replay.py`) makes the metadata checks once per replay key: the key fixes them.
    """
    def validate(replaying: bool) -> None:
        if not replaying:
            _check_layout(hidden, groups, k, relaid_weight, offsets, impl)
        if out is not None:
            _check_out(out, hidden.shape[0], k, relaid_weight.device)
        if check and hidden.device.type == "cpu":
            _check_values(hidden, groups, k, offsets.numel() - 1, group_sizes)

    rows, checks = hidden, validate  # no conversion needed: the dispatch validates (once per replay key)
    if not (isinstance(hidden, Tensor) and isinstance(groups, Tensor) and hidden.dtype is relaid_weight.dtype):
        validate(False)  # before the conversion, which needs a valid tensor
        rows, checks = hidden.to(relaid_weight.dtype), None
    return grouped_head_topk(rows.contiguous(), relaid_weight, offsets, order, groups.contiguous(), k,
                             max_group_size, impl=impl, out=out, desc_cache=desc_cache, validate=checks)


def _check_layout(hidden, groups, k, relaid_weight, offsets, impl) -> None:
    H = relaid_weight.shape[1]
    G = offsets.numel() - 1
    if not isinstance(hidden, Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be a [M, H] tensor, got {getattr(hidden, 'shape', type(hidden))}")
    if hidden.shape[1] != H:
        raise ValueError(f"hidden size mismatch: hidden is [M, {hidden.shape[1]}], the head's weight is [V, {H}]")
    if hidden.dtype not in _FLOATS:
        raise ValueError(f"hidden dtype must be one of {_FLOATS}, got {hidden.dtype}")
    if not isinstance(groups, Tensor) or groups.dim() != 2 or groups.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"groups must be [M, A] with M={hidden.shape[0]}, got {tuple(getattr(groups, 'shape', ()))}"
        )
    if groups.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"groups must be int32 or int64, got {groups.dtype}")
    if hidden.device != relaid_weight.device or groups.device != relaid_weight.device:
        raise ValueError(
            f"device mismatch: weight on {relaid_weight.device}, hidden on {hidden.device}, groups on {groups.device}"
        )
    M, A = groups.shape
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if A < 1 or A > G:
        raise ValueError(f"each row needs between 1 and G={G} active groups, got A={A}")
    if M == 0:
        raise ValueError("hidden has no rows")
    if resolve_impl(impl, hidden.device) == "triton" and k > MAX_K:
        raise ValueError(f"k={k} is above the Triton path's limit of {MAX_K}; use impl='reference'")


def _check_out(out, rows: int, k: int, device) -> None:
    """out: (ids [M, k] int64, logprobs [M, k] fp32), contiguous, on the weight's device: the kernels
    write them row-major, so any other shape would be written out of bounds."""
    want = ((torch.int64, "ids"), (torch.float32, "logprobs"))
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError(f"out must be a pair (ids [M, k] int64, logprobs [M, k] float32), got {type(out)}")
    for t, (dtype, name) in zip(out, want):
        if (not isinstance(t, Tensor) or t.shape != (rows, k) or t.dtype != dtype or t.device != device
                or not t.is_contiguous()):
            raise ValueError(f"out {name} must be a contiguous [{rows}, {k}] {dtype} tensor on {device}, got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")


def _check_values(hidden, groups, k, G, group_sizes) -> None:
    """Group ids in range and distinct per row, k within every row's active vocabulary, finite rows
    (read-backs: CPU tensors only)."""
    lo, hi = int(groups.min()), int(groups.max())
    if lo < 0 or hi >= G:
        raise ValueError(f"group ids must lie in [0, {G}), found [{lo}, {hi}]")
    if groups.shape[1] > 1:
        sorted_groups = groups.sort(dim=1).values
        dup = (sorted_groups[:, 1:] == sorted_groups[:, :-1]).any(dim=1)
        if bool(dup.any()):
            row = int(torch.nonzero(dup)[0, 0])
            raise ValueError(f"duplicate group ids in row {row}: {groups[row].tolist()}")
    smallest = int(group_sizes[groups.long()].sum(dim=1).min())
    if k > smallest:
        raise ValueError(f"k={k} is larger than the active vocabulary of some row ({smallest} tokens)")
    finite = torch.isfinite(hidden).all(dim=1)
    if not bool(finite.all()):
        row = int(torch.nonzero(~finite)[0, 0])
        raise ValueError(f"hidden row {row} holds NaN or inf (rows must be finite)")


class GroupedLMHead(nn.Module):
    """The target's LM head, laid out by vocabulary group, with a fused grouped top-k.

    weight: [V, H] bf16/fp16/fp32 (an LM head or a tied embedding). With a contiguous grouping the
    tensor is used as is (no copy); otherwise a re-laid copy is kept. Frozen, never saved.
    """

    def __init__(self, weight: Tensor, grouping: VocabGrouping):
        super().__init__()
        _check_weight(weight, grouping)
        self.grouping = grouping
        self.max_group_size = grouping.max_group_size
        self.register_buffer("weight", _relay(weight.detach(), grouping), persistent=False)
        device = weight.device
        self.register_buffer("offsets", grouping.offsets.to(device), persistent=False)
        self.register_buffer("order", grouping.order.to(device), persistent=False)
        self.register_buffer("group_sizes", grouping.group_sizes.to(device), persistent=False)
        self._descriptors = {}  # the weight's TMA descriptors, built on the first call

    def topk(self, hidden: Tensor, groups: Tensor, k: int, impl: str = "auto", check: bool = True, out=None):
        """hidden: [M, H]; groups: [M, A] int (distinct per row) -> ids [M, k] int64, logprobs [M, k] fp32.

        Bad values: module docstring (CPU: ValueError with check=True; CUDA: that row as ids -1, NaN)."""
        if torch.is_grad_enabled():  # (no @torch.no_grad(): its per-call object costs an eager call ~2 us)
            with torch.no_grad():
                return self.topk(hidden, groups, k, impl, check, out)
        buffers = self._buffers  # (nn.Module.__getattr__ costs as much again, four times)
        return grouped_topk(
            hidden, groups, k, relaid_weight=buffers["weight"], offsets=buffers["offsets"], order=buffers["order"],
            group_sizes=buffers["group_sizes"], max_group_size=self.max_group_size, impl=impl, check=check, out=out,
            desc_cache=self._descriptors,
        )


class RoutedLMHead(nn.Module):
    """Router + grouped head: a drop-in for an EAGLE-style draft's `lm_head`.

    weight: [V, H] the target's head (frozen, a non-persistent buffer). `state_dict()` holds the
    router only: save `grouping.state_dict()` beside it (DraftModel does, as `grouping.*`) and pass
    `VocabGrouping.from_state_dict(...)` back in when loading. `forward(hidden)` returns full logits
    [..., V] like the `nn.Linear` it replaces; the fast path is `topk(hidden, k)`.
    """

    def __init__(self, weight: Tensor, grouping: VocabGrouping, active_groups: int, router: GroupRouter | None = None):
        super().__init__()
        _check_weight(weight, grouping)
        if not 1 <= active_groups <= grouping.num_groups:
            raise ValueError(f"need 1 <= active_groups <= {grouping.num_groups}, got {active_groups}")
        self.active_groups = int(active_groups)
        self.register_buffer("weight", weight.detach(), persistent=False)
        self.router = router if router is not None else GroupRouter(
            weight.shape[1], grouping.num_groups, device=weight.device
        )
        if self.router.num_groups != grouping.num_groups or self.router.hidden_size != weight.shape[1]:
            raise ValueError("router's (hidden_size, num_groups) must match the weight and the grouping")
        self.set_grouping(grouping)

    def set_grouping(self, grouping: VocabGrouping) -> None:
        """Switch to another grouping of the same vocabulary (re-lays the weight if needed)."""
        if grouping.vocab_size != self.weight.shape[0] or grouping.num_groups != self.router.num_groups:
            raise ValueError("the new grouping must cover the same vocabulary with the router's number of groups")
        self.grouping = grouping
        self.max_group_size = grouping.max_group_size
        device = self.weight.device
        relaid = None if grouping.is_identity else _relay(self.weight, grouping)
        self.register_buffer("relaid_weight", relaid, persistent=False)
        self.register_buffer("offsets", grouping.offsets.to(device), persistent=False)
        self.register_buffer("order", grouping.order.to(device), persistent=False)
        self.register_buffer("group_sizes", grouping.group_sizes.to(device), persistent=False)
        self._descriptors = {}  # the weight's TMA descriptors, built on the first call

    # --- the draft's API ---------------------------------------------------------------------------
    def router_logits(self, hidden: Tensor) -> Tensor:
        """hidden: [..., H] -> group scores [..., G] (train with cross-entropy toward the next token's group)."""
        return self.router(hidden)

    def select_groups(self, hidden: Tensor) -> Tensor:
        """hidden: [M, H] -> the router's top-`active_groups` group ids [M, a] int64."""
        return self.router.select(hidden, self.active_groups)

    def dense_logits(self, hidden: Tensor) -> Tensor:
        """hidden: [..., H] -> full-vocabulary logits [..., V] in the weight's dtype (training, reference)."""
        return hidden.to(self.weight.dtype) @ self.weight.T

    def forward(self, hidden: Tensor) -> Tensor:
        return self.dense_logits(hidden)

    @torch.no_grad()
    def topk(self, hidden: Tensor, k: int, impl: str = "auto", check: bool = True, groups: Tensor | None = None):
        """hidden: [M, H] -> (ids [M, k] int64 original ids, logprobs [M, k] fp32 over the active vocabulary).

        groups: [M, a] to override the router's choice (e.g. siblings sharing their parent's groups).
        Bad values: module docstring (a non-finite hidden row: ValueError on the CPU with check=True;
        on CUDA ids -1, log-probs NaN).
        """
        if groups is None:
            groups = self.select_groups(hidden)
        relaid = self.weight if self.relaid_weight is None else self.relaid_weight
        return grouped_topk(
            hidden, groups, k, relaid_weight=relaid, offsets=self.offsets, order=self.order,
            group_sizes=self.group_sizes, max_group_size=self.max_group_size, impl=impl, check=check,
            desc_cache=self._descriptors,
        )
