"""Tree verification inside a Hugging Face model: an attention function registered with transformers.

The target runs with `use_cache=False` and no HF cache object: the registered function "coral_tree"
writes each layer's new keys/values into the loop's own static buffers (`TreeKVCache`) at slots
[length, length + T) and attends over prefix + new tokens with a tree mask (causal = a chain). HF builds
no masks for an implementation it does not know, so nothing else is computed. Gemma 3's sliding layers
pass `sliding_window`; the window is applied with the real positions (prefix slot j is position j, the
new tokens sit at `length + depth`).

    cache = TreeKVCache.for_model(model, max_len=4096)
    hidden, logits = tree_forward(model, cache, tokens [T], mask [T, T], depth [T])   # prefix + tree
    cache.commit(rows [a])       # keep rows (indices into the T tokens) as slots length .. length+a-1

The accepted rows are copied to contiguous slots (EAGLE's compaction): the cache never holds a
rejected token, which is what lets the loop run Gemma 3's sliding layers without HF's crop.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

ATTN_NAME = "coral_tree"
_registered = False


class TreeKVCache:
    """Static KV buffers of all layers: k, v [L, B, Hkv, S, D]; the first `length` slots are committed."""

    def __init__(self, num_layers, num_kv_heads, head_dim, max_len, dtype, device, batch_size=1):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, max_len: int, batch_size: int = 1) -> "TreeKVCache":
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        weight = model.get_output_embeddings().weight
        return cls(config.num_hidden_layers, kv_heads, head_dim, max_len, weight.dtype, weight.device, batch_size)

    def reset(self, length: int = 0) -> None:
        self.length = length

    def commit(self, rows: Tensor) -> None:
        """Keep the new tokens at `rows` ([a] int64, ascending, indices into the last forward's T tokens)
        as slots [length, length + a) and advance length by a."""
        a = int(rows.shape[0])
        src = self.length + rows.to(self.k.device)
        # gather first (a copy), then write: rows[i] >= i so the ranges may overlap
        self.k[:, :, :, self.length : self.length + a] = self.k[:, :, :, src]
        self.v[:, :, :, self.length : self.length + a] = self.v[:, :, :, src]
        self.length += a


class _TreeCall:
    """What one forward needs inside the attention function (passed through HF's **kwargs).

    Eager mode: the prefix length is the Python int `cache.length`. Static mode (`slots`/`kv_len`
    device tensors): no host value is read, so the forward can be captured in a CUDA graph.
    """

    def __init__(self, cache: TreeKVCache, mask: Tensor, positions: Tensor, impl: str,
                 slots: Tensor | None = None, kv_len: Tensor | None = None, tree=None):
        self.cache, self.mask, self.positions, self.impl = cache, mask, positions, impl
        self.slots, self.kv_len, self.tree = slots, kv_len, tree


def tree_attention_sdpa(q, k, v, tree_mask, scale, window=None, query_positions=None):
    """Reference: q [B, Hq, T, D]; k, v [B, Hkv, S, D] whose last T slots are the tree tokens and the first
    S - T the prefix (slot j = position j); tree_mask [T, T] bool. -> [B, Hq, T, D]."""
    T, S = q.shape[2], k.shape[2]
    prefix = S - T
    allowed = torch.cat([torch.ones(T, prefix, dtype=torch.bool, device=q.device), tree_mask], dim=1)
    if window is not None:
        key_positions = torch.cat([torch.arange(prefix, device=q.device), query_positions])
        allowed = allowed & (query_positions[:, None] - key_positions[None, :] < window)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=allowed, scale=scale)


def _coral_tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                          sliding_window=None, coral_tree=None, **kwargs):
    if coral_tree is None:
        raise RuntimeError(
            f"attention '{ATTN_NAME}' is only for coral_fast.hf_attention.tree_forward; this model was left "
            "switched to it (use tree_forward, which switches back)"
        )
    if getattr(module, "attn_logit_softcapping", None):
        raise ValueError("attention logit soft-capping (Gemma 2) is not supported by the tree attention")
    cache = coral_tree.cache
    layer = module.layer_idx
    window = sliding_window or None
    if coral_tree.slots is not None:
        return _static_attention(coral_tree, layer, query, key, value, scaling, window), None
    T = query.shape[2]
    start = cache.length
    cache.k[layer, :, :, start : start + T] = key
    cache.v[layer, :, :, start : start + T] = value
    k = cache.k[layer, :, :, : start + T]
    v = cache.v[layer, :, :, : start + T]
    if coral_tree.impl == "sdpa":
        out = tree_attention_sdpa(query, k, v, coral_tree.mask, scaling, window, coral_tree.positions)
    else:
        from coral_fast.kernels.tree_attention import tree_attention

        mask = coral_tree.mask
        if window is not None and window <= T:  # the kernel exempts tree keys from the window (see above)
            mask = mask & (coral_tree.positions[:, None] - coral_tree.positions[None, :] < window)
        out = tree_attention(query, k, v, mask, impl=coral_tree.impl, scale=scaling, window=window,
                             query_positions=coral_tree.positions if window else None)
    return out.transpose(1, 2).contiguous(), None


def _static_attention(call: _TreeCall, layer, query, key, value, scaling, window):
    """Graph-capturable: write at device `slots`, attend over the whole static buffer up to `kv_len`."""
    cache = call.cache
    k_layer, v_layer = cache.k[layer], cache.v[layer]
    k_layer.index_copy_(2, call.slots, key.to(k_layer.dtype))
    v_layer.index_copy_(2, call.slots, value.to(v_layer.dtype))
    from coral_fast.kernels.tree_attention import SUPPORTED_HEAD_DIMS

    mask, tree = call.mask, call.tree
    if window is not None and window <= query.shape[2]:
        # the kernel exempts tree keys from the window; a window shorter than the tree must cut them too
        mask = mask & (call.positions[:, None] - call.positions[None, :] < window)
        tree = _MaskAndBits(mask) if tree is not None else None
    if call.impl in ("sdpa", "reference") or query.shape[-1] not in SUPPORTED_HEAD_DIMS:
        from coral_fast.kernels.tree_attention import tree_attention_reference

        out = tree_attention_reference(query, k_layer, v_layer, mask, scaling, call.kv_len, window,
                                       call.positions if window else None)
    else:
        from coral_fast.kernels.tree_attention import tree_attention

        out = tree_attention(query, k_layer, v_layer, tree, impl=call.impl, scale=scaling, kv_len=call.kv_len,
                             window=window, query_positions=call.positions if window else None, check=False)
    return out.transpose(1, 2).contiguous()


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
    cap = getattr(model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config,
                  "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def tree_forward(model, cache: TreeKVCache, tokens: Tensor, mask: Tensor, depth: Tensor, impl: str | None = None,
                 logits_rows: Tensor | None = None):
    """Run `tokens` [T] (mask [T, T] bool, depth [T]: position = cache.length + depth) after the cached prefix.

    Writes their keys/values at slots [length, length + T) (not committed: call `cache.commit`).
    Returns (hidden [T, H]: the last hidden states after the final norm, logits [T or len(logits_rows), V]).
    """
    register()
    T = tokens.shape[0]
    if cache.length + T > cache.max_len:
        raise ValueError(f"KV cache full: {cache.length} + {T} tokens > max_len {cache.max_len}")
    if mask.shape != (T, T) or depth.shape != (T,):
        raise ValueError(f"mask must be [{T}, {T}] and depth [{T}], got {tuple(mask.shape)}, {tuple(depth.shape)}")
    positions = cache.length + depth
    call = _TreeCall(cache, mask, positions, impl or default_impl(tokens.device))
    with attention_implementation(model, ATTN_NAME):
        out = model.model(input_ids=tokens[None], position_ids=positions[None], use_cache=False, coral_tree=call)
    hidden = out.last_hidden_state[0]
    rows = hidden if logits_rows is None else hidden[logits_rows]
    return hidden, final_logits(model, rows)


class _MaskAndBits:
    """What tree_attention accepts in place of a DraftTree: the bool mask and its packed bits."""

    def __init__(self, mask: Tensor):
        from coral_fast.tree import pack_mask_bits

        self.mask = mask
        self.mask_bits = pack_mask_bits(mask)  # [T, W], like DraftTree.mask_bits (tree_attention adds the batch)


def static_tree_forward(model, cache: TreeKVCache, tokens: Tensor, mask: Tensor, depth: Tensor, length: Tensor,
                        impl: str = "auto", switch_attention: bool = True, logits: bool = True):
    """Like tree_forward with the prefix length a device tensor `length` [1] (no host sync: capturable).

    Writes the T tokens' keys/values at slots [length, length + T). Returns (hidden [T, H], logits [T, V]).
    switch_attention=False: the caller has already switched the model to "coral_tree" (torch.compile
    traces no context manager).
    """
    if switch_attention:
        register()
        with attention_implementation(model, ATTN_NAME):
            return static_tree_forward(model, cache, tokens, mask, depth, length, impl, False, logits)
    T = tokens.shape[0]
    positions = length + depth
    slots = length + torch.arange(T, device=tokens.device)
    kv_len = (length + T).to(torch.int64)
    head_dim = cache.k.shape[-1]
    from coral_fast.kernels.tree_attention import SUPPORTED_HEAD_DIMS

    tree = None if impl in ("sdpa", "reference") or head_dim not in SUPPORTED_HEAD_DIMS else _MaskAndBits(mask)
    call = _TreeCall(cache, mask, positions, impl, slots=slots, kv_len=kv_len, tree=tree)
    out = model.model(input_ids=tokens[None], position_ids=positions[None], use_cache=False, coral_tree=call)
    hidden = out.last_hidden_state[0]
    return hidden, (final_logits(model, hidden) if logits else None)


def causal_forward(model, cache: TreeKVCache, tokens: Tensor, impl: str | None = None, logits_rows=None):
    """Prefill: `tokens` [T] as a causal chain after the cached prefix (keys/values written, not committed)."""
    T = tokens.shape[0]
    mask = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
    depth = torch.arange(T, device=tokens.device)
    return tree_forward(model, cache, tokens, mask, depth, impl, logits_rows)
