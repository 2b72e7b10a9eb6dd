"""Router of the grouped LM head: the draft's hidden state -> a score per vocabulary group."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class GroupRouter(nn.Module):
    """A small MLP, hidden [..., H] -> group scores [..., G]; `select` keeps the top-a groups.

    intermediate_size=0 gives a single linear layer. Trained (coral_fast.training) with cross-entropy
    toward the group of the target's next token; at inference `select(hidden, a)` picks the groups.
    """

    def __init__(self, hidden_size: int, num_groups: int, intermediate_size: int = 256,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if hidden_size < 1 or num_groups < 1 or intermediate_size < 0:
            raise ValueError(
                f"need hidden_size >= 1, num_groups >= 1, intermediate_size >= 0; got "
                f"{hidden_size}, {num_groups}, {intermediate_size}"
            )
        self.hidden_size = hidden_size
        self.num_groups = num_groups
        factory = {"dtype": dtype, "device": device}
        if intermediate_size == 0:
            self.net = nn.Linear(hidden_size, num_groups, bias=True, **factory)
        else:
            self.net = nn.Sequential(
                nn.Linear(hidden_size, intermediate_size, bias=False, **factory),
                nn.SiLU(),
                nn.Linear(intermediate_size, num_groups, bias=True, **factory),
            )

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden: [..., H] -> scores [..., G] in the router's dtype."""
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden size {hidden.shape[-1]} does not match the router's {self.hidden_size}")
        weight = next(self.parameters())
        return self.net(hidden.to(weight.dtype))

    @torch.no_grad()
    def select(self, hidden: Tensor, a: int) -> Tensor:
        """hidden: [..., H] -> the a highest-scoring group ids [..., a] int64 (distinct, best first)."""
        if not 1 <= a <= self.num_groups:
            raise ValueError(f"need 1 <= a <= num_groups ({self.num_groups}), got a={a}")
        return self(hidden).topk(a, dim=-1).indices
