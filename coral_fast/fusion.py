"""Fused projections: q/k/v as one matrix product, gate/up as another.

A verify or draft step of a small model is bound by the number of kernel launches, not by bytes: on
the H100 every projection of SmolLM2 over 61 tree tokens is a ~3.6 us cuBLAS launch whatever its size
(bench/results/e2e_h100_compile.md). Seven products a layer become four.

How, without touching the models' own forward code (transformers' Llama / Qwen2 / Gemma 3 attention
and MLP, our draft layer): sibling `nn.Linear`s that read the same input (`q_proj`, `k_proj`,
`v_proj`; `gate_proj`, `up_proj`) get one concatenated weight; their `weight`s become views of it (no
extra memory, `state_dict` unchanged). The first of them computes the product for all and keeps the
other slices; the others hand out their slice only when called on the very same input tensor, and
otherwise compute their own product, so an unexpected call order is slower, never wrong.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _FusedLinears:
    """One product for several nn.Linear that share their input; installed as their `forward`s."""

    def __init__(self, linears: list[nn.Linear]):
        self.linears = linears
        self.sizes = [lin.out_features for lin in linears]
        self.has_bias = any(lin.bias is not None for lin in linears)
        self._fuse()
        for i, lin in enumerate(linears):
            lin.forward = self._forward_fn(i)
            lin._coral_fused = self

    def _fuse(self) -> None:
        """Concatenate the modules' current weights (and biases: zeros where one has none, which keeps
        the product exact) and point the modules at slices of the result. Run again after .to()."""
        linears = self.linears
        self.weight = torch.cat([lin.weight.detach() for lin in linears])
        self.bias = None
        if self.has_bias:
            self.bias = torch.cat([lin.bias.detach() if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                                   for lin in linears])
        self.input: Tensor | None = None
        self.parts: tuple[Tensor, ...] | None = None
        self._point_linears_at_fused()

    def _point_linears_at_fused(self) -> None:
        first = self.linears[0].weight
        start = 0
        for lin, size in zip(self.linears, self.sizes):  # re-point the modules at slices of the fused tensors
            lin.weight = nn.Parameter(self.weight[start : start + size], requires_grad=first.requires_grad)
            if lin.bias is not None:
                lin.bias = nn.Parameter(self.bias[start : start + size], requires_grad=first.requires_grad)
            start += size

    def _forward_fn(self, i: int):
        lin = self.linears[i]
        last = len(self.linears) - 1

        def forward(x: Tensor) -> Tensor:
            if lin.weight.device != self.weight.device or lin.weight.dtype != self.weight.dtype:
                self._fuse()  # the model was moved or cast (module.to() replaces each weight apart)
            if i == 0:
                out = F.linear(x, self.weight, self.bias)
                self.input, self.parts = x, out.split(self.sizes, dim=-1)
                return self.parts[0]
            if self.parts is not None and self.input is x:
                part = self.parts[i]
                if i == last:
                    self.input = self.parts = None  # nothing outlives the step
                return part
            return F.linear(x, lin.weight, lin.bias)

        return forward


def fuse_projections(model: nn.Module) -> int:
    """Fuse q/k/v and gate/up of every layer of `model` in place (idempotent). Returns how many groups."""
    count = 0
    for module in model.modules():
        for names in GROUPS:
            linears = [getattr(module, name, None) for name in names]
            if not all(isinstance(lin, nn.Linear) for lin in linears):
                continue
            if any(hasattr(lin, "_coral_fused") for lin in linears):
                continue
            w = linears[0].weight
            if any(lin.in_features != linears[0].in_features or lin.weight.dtype != w.dtype
                   or lin.weight.device != w.device for lin in linears):
                continue
            _FusedLinears(linears)
            count += 1
    return count


def unfuse_projections(model: nn.Module) -> int:
    """Give the fused linears their own forward back (their weights stay views: same values)."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and hasattr(module, "_coral_fused"):
            del module.forward
            del module._coral_fused
            count += 1
    return count
