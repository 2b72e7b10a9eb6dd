"""Tree verification inside a Hugging Face model: an attention function registered with transformers.

The target runs with `use_cache=False` and no HF cache object: the registered function "coral_tree"
writes each layer's new keys/values into the loop's own static buffers (`TreeKVCache`) at slots
[n, n + T) (n: a device tensor) and attends over prefix + new tokens with a tree mask (causal = a chain).
HF builds no masks for an implementation it does not know, so nothing else is computed. Gemma 3's
sliding layers pass `sliding_window`; the window is applied with the real positions (prefix slot j is
position j, the new tokens sit at n + depth).

    cache = TreeKVCache.for_model(model, max_len=4096)
    hidden, logits, _ = tree_forward(model, cache, tokens [T], mask [T, T], depth [T], n [1])

Nothing reads a device value back, so the forward can be captured in a CUDA graph; `host_len` (eager
runs) limits attention to the first host_len slots so that a large cache costs nothing on small prompts.
The caller keeps accepted rows by copying them to contiguous slots (engine.commit): the cache never
holds a rejected token, which is what lets the loop run Gemma 3's sliding layers without HF's crop.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from coral_fast.models import text_config

ATTN_NAME = "coral_tree"
_registered = False


class TreeKVCache:
    """Static KV buffers, one tensor per layer: k[layer], v[layer] [B, Hkv, S, D].

    One tensor per layer, not one [L, ...] tensor indexed by layer: a compiled step writes its rows with
    `index_copy_` on the buffer itself, which Inductor turns back into an in-place `index_put_`. A write
    into a view of a larger buffer (`k[layer].index_copy_`) is functionalized into a copy of the whole
    buffer and a copy back, every step (gpt-fast keeps one buffer per layer for the same reason).
    """

    def __init__(self, num_layers, num_kv_heads, head_dim, max_len, dtype, device, batch_size=1):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len

    def move_rows(self, src: Tensor, dst: Tensor) -> None:
        """Copy slots `src` [M] to slots `dst` [M] in every layer (only those rows are read and written)."""
        for buf in self.k + self.v:
            buf.index_copy_(2, dst, buf.index_select(2, src))

    @classmethod
    def for_model(cls, model, max_len: int, batch_size: int = 1) -> "TreeKVCache":
        config = text_config(model.config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        weight = model.get_output_embeddings().weight
        return cls(config.num_hidden_layers, kv_heads, head_dim, max_len, weight.dtype, weight.device, batch_size)


class _TreeCall:
    """What one forward needs inside the attention function (passed through HF's **kwargs): the cache,
    mask [T, T], positions [T], slots [T] and kv_len [1] (device), `tree` (mask + packed bits for the
    kernel, or None), host_len (eager: attend over the first host_len slots only)."""

    def __init__(self, cache, mask, positions, impl, slots, kv_len, tree=None, host_len=None):
        self.cache, self.mask, self.positions, self.impl = cache, mask, positions, impl
        self.slots, self.kv_len, self.tree, self.host_len = slots, kv_len, tree, host_len
        self._allowed: dict = {}
        self._windowed: dict = {}

    def windowed(self, window: int):
        """(mask [T, T], tree) with tree keys farther back than `window` cut too (the kernel exempts tree
        keys from the window, so a window no longer than the tree must cut them); built once per forward."""
        if window not in self._windowed:
            mask = self.mask & (self.positions[:, None] - self.positions[None, :] < window)
            self._windowed[window] = (mask, _MaskAndBits(mask) if self.tree is not None else None)
        return self._windowed[window]

    def allowed(self, window: int | None) -> Tensor | None:
        """Eager: [T, host_len] bool over the used slots (prefix, then the T new rows), built once per
        forward and window size; None when every slot is visible (one new row, no window)."""
        if window not in self._allowed:
            T = self.mask.shape[0]
            prefix = self.host_len - T
            if T == 1 and window is None:
                self._allowed[window] = None
            else:
                cols = torch.arange(prefix, device=self.mask.device)
                seen = torch.ones(T, prefix, dtype=torch.bool, device=self.mask.device)
                mask = self.mask
                if window is not None:
                    seen = cols[None, :] > self.positions[:, None] - window
                    if window <= T:
                        mask = mask & (self.positions[:, None] - self.positions[None, :] < window)
                self._allowed[window] = torch.cat([seen, mask], dim=1)
        return self._allowed[window]


def _coral_tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                          sliding_window=None, coral_tree=None, **kwargs):
    """Write key/value at the call's slots, attend over the static buffer up to kv_len."""
    if coral_tree is None:
        raise RuntimeError(
            f"attention '{ATTN_NAME}' is only for coral_fast.hf_attention.tree_forward; this model was left "
            "switched to it (use tree_forward, which switches back)"
        )
    if getattr(module, "attn_logit_softcapping", None):
        raise ValueError("attention logit soft-capping (Gemma 2) is not supported by the tree attention")
    if hasattr(coral_tree, "attend"):  # a call that does its own writes and attention (training/batched.py)
        return coral_tree.attend(module, query, key, value, scaling, sliding_window)
    call, layer, window = coral_tree, module.layer_idx, sliding_window or None
    k_layer, v_layer = call.cache.k[layer], call.cache.v[layer]
    k_layer.index_copy_(2, call.slots, key.to(k_layer.dtype))
    v_layer.index_copy_(2, call.slots, value.to(v_layer.dtype))
    if call.host_len is not None:
        k_layer, v_layer = k_layer[:, :, : call.host_len], v_layer[:, :, : call.host_len]
        if call.impl == "sdpa":  # eager on the used slots: one mask a forward, torch's SDPA
            out = F.scaled_dot_product_attention(query, k_layer.to(query.dtype), v_layer.to(query.dtype),
                                                 attn_mask=call.allowed(window), scale=scaling,
                                                 enable_gqa=query.shape[1] != k_layer.shape[1])
            return out.transpose(1, 2).contiguous(), None
    from coral_fast.kernels.tree_attention import SUPPORTED_HEAD_DIMS

    mask, tree = call.windowed(window) if window is not None and window <= query.shape[2] else (call.mask, call.tree)
    positions = call.positions if window else None
    if call.impl in ("sdpa", "reference") or query.shape[-1] not in SUPPORTED_HEAD_DIMS:
        from coral_fast.kernels.tree_attention import tree_attention_reference

        out = tree_attention_reference(query, k_layer, v_layer, mask, scaling, call.kv_len, window, positions)
    else:
        from coral_fast.kernels.tree_attention import tree_attention

        out = tree_attention(query, k_layer, v_layer, tree, impl=call.impl, scale=scaling, kv_len=call.kv_len,
                             window=window, query_positions=positions, check=False)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register "coral_tree" with transformers' AttentionInterface (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _coral_tree_attention)
    _registered = True


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Switch every config of `model` to attention `name` for the duration (HF reads it per forward)."""
    configs = {id(c): c for c in (model.config, getattr(model.model, "config", model.config))}.values()
    saved = [(c, c._attn_implementation) for c in configs]
    try:
        for c in configs:
            c._attn_implementation_internal = name
        yield
    finally:
        for c, value in saved:
            c._attn_implementation_internal = value


def default_impl(device) -> str:
    """'sdpa' reference on the CPU; the Triton kernel on CUDA when it is present."""
    if torch.device(device).type == "cuda":
        try:
            import coral_fast.kernels.tree_attention  # noqa: F401
            return "auto"
        except ImportError:
            return "sdpa"
    return "sdpa"


def final_logits(model, hidden: Tensor) -> Tensor:
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(text_config(model.config), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


class _MaskAndBits:
    """What tree_attention accepts in place of a DraftTree: the bool mask and its packed bits."""

    def __init__(self, mask: Tensor):
        from coral_fast.tree import pack_mask_bits

        self.mask = mask
        self.mask_bits = pack_mask_bits(mask)  # [T, W], like DraftTree.mask_bits (tree_attention adds the batch)


def tree_forward(model, cache: TreeKVCache, tokens: Tensor, mask: Tensor, depth: Tensor, length: Tensor,
                 impl: str = "auto", switch_attention: bool = True, logits: bool = True, host_len: int | None = None,
                 hidden_states: bool = False):
    """Run `tokens` [T] (mask [T, T] bool ancestor-or-self, depth [T]: position = length + depth) after the
    `length` [1] (device int64) cached slots; their keys/values are written at slots [length, length + T).

    Returns (hidden [T, H]: the last hidden states after the final norm, logits [T, V] or None, the HF
    hidden-states tuple or None). switch_attention=False: the caller has already switched the model to
    "coral_tree" (torch.compile traces no context manager). host_len: attend over that many slots only.
    """
    if switch_attention:
        register()
        with attention_implementation(model, ATTN_NAME):
            return tree_forward(model, cache, tokens, mask, depth, length, impl, False, logits, host_len,
                                hidden_states)
    T = tokens.shape[0]
    positions = length + depth
    slots = length + torch.arange(T, device=tokens.device)
    kv_len = (length + T).to(torch.int64)
    head_dim = cache.k[0].shape[-1]
    from coral_fast.kernels.tree_attention import SUPPORTED_HEAD_DIMS

    tree = None if impl in ("sdpa", "reference") or head_dim not in SUPPORTED_HEAD_DIMS else _MaskAndBits(mask)
    call = _TreeCall(cache, mask, positions, impl, slots, kv_len, tree, host_len)
    out = model.model(input_ids=tokens[None], position_ids=positions[None], use_cache=False, coral_tree=call,
                      output_hidden_states=hidden_states)
    hidden = out.last_hidden_state[0]
    return hidden, (final_logits(model, hidden) if logits else None), (out.hidden_states if hidden_states else None)
