"""GQA for PyTorch code (torch only, so the draft and the trainer use it without importing Triton)."""
import torch


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv * group, S, D], each KV head repeated for the `group` query heads that
    share it (q head h reads kv head h // group)."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)
