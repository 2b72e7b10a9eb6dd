"""The CORAL / EAGLE-style draft model: one decoder layer over the target's features.

    x_t = fc([f_t ; E(x_{t+1})])            f_t: the target's last hidden state at position t (after
                                            its final norm), E: the target's (frozen) token embedding
    h_t = DecoderLayer(x_t)                 one Llama-style layer: RMSNorm, RoPE attention with GQA,
                                            gated MLP; trained so that h_t predicts f_{t+1}
    p(x_{t+2} | ...) = head(h_t)            the target's LM head restricted to the groups a router picks

The target's embedding and LM-head weight are borrowed, frozen, and never saved: a draft folder holds
only `config.json` and `model.safetensors` with fc, the layer, the router and the vocabulary grouping.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coral_fast.cli_checks import read_json
from coral_fast.kernels._gqa import repeat_kv
from coral_fast.models import text_config

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
GROUPINGS = ("contiguous", "frequency", "embedding", "dense")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
FC_INPUT_ORDERS = ("feature_first", "embedding_first")
ROPE_SCALINGS = ("default", "linear", "llama3")

# state-dict prefixes of tensors that belong to the target (borrowed, frozen, never saved)
_TARGET_PREFIXES = ("head.weight", "head.lm_head_weight", "_embed_tokens.")


@dataclass
class DraftConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    hidden_act: str  # "silu" | "gelu_pytorch_tanh"
    num_groups: int = 32
    active_groups: int = 4
    grouping: str = "contiguous"  # "contiguous" | "frequency" | "embedding" (stored in the weights) | "dense"
    target: str = ""  # e.g. "smollm2", for error messages
    # architecture variants (defaults: coral-fast's own draft; EAGLE-1/2/HASS drafts import with
    # input_norm=False, fc_input_order="embedding_first" and, for some, fc / q-k-v biases)
    input_norm: bool = True  # RMSNorm on the layer's input (EAGLE-1/2: none on layer 0)
    fc_input_order: str = "feature_first"  # fc over cat(feature, embedding) | "embedding_first"
    fc_bias: bool = False
    qkv_bias: bool = False
    rope_scaling: dict | None = None  # None | {"rope_type": "linear" | "llama3", "factor": ..., ...}
    # EAGLE-3-style inputs: the target's hidden states of these layers (indices into HF's
    # output_hidden_states, 0 = embeddings) concatenated and fused by `fuse` [k H -> H] into the features
    # the draft reads from the target; None: the last hidden state (after the final norm) as it is
    feature_layers: tuple | None = None

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {self.grouping!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not 1 <= self.active_groups <= self.num_groups:
            raise ValueError(f"need 1 <= active_groups ({self.active_groups}) <= num_groups ({self.num_groups})")
        if self.fc_input_order not in FC_INPUT_ORDERS:
            raise ValueError(f"fc_input_order must be one of {FC_INPUT_ORDERS}, got {self.fc_input_order!r}")
        if self.feature_layers is not None:
            self.feature_layers = checked_feature_layers(self.feature_layers)
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ROPE_SCALINGS:
                raise ValueError(f"rope_scaling type must be one of {ROPE_SCALINGS} (or no scaling), got {kind!r}")

    @classmethod
    def from_target_config(cls, hf_config, **overrides) -> "DraftConfig":
        """Shapes of the target's own decoder layer (Llama / Qwen2 / Gemma3 text configs)."""
        text = text_config(hf_config)
        heads = text.num_attention_heads
        values = dict(
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            vocab_size=text.vocab_size,
            rms_norm_eps=float(text.rms_norm_eps),
            rope_theta=_rope_theta(text),
            hidden_act=getattr(text, "hidden_activation", None) or text.hidden_act,
            target=getattr(text, "model_type", ""),
        )
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown DraftConfig fields: {sorted(unknown)}")
        if "num_groups" not in overrides:  # small vocabularies (tests, toys): fewer, non-empty groups
            values["num_groups"] = _fitting_num_groups(values["vocab_size"], cls.num_groups)
            values["active_groups"] = min(overrides.get("active_groups", cls.active_groups), values["num_groups"])
        values.update(overrides)
        if values["hidden_act"] == "gelu":  # Gemma's configs sometimes say gelu and mean the tanh form
            values["hidden_act"] = "gelu_pytorch_tanh"
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_file_dict(cls, raw: dict, config_path) -> "DraftConfig":
        """from_dict for a config read from `config_path`: a bad field is a ValueError naming the file."""
        try:
            return cls.from_dict(raw)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{config_path}: {error}") from None

    @classmethod
    def from_dict(cls, d) -> "DraftConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def checked_feature_layers(layers) -> tuple[int, ...]:
    """DraftConfig.feature_layers as a sorted tuple; ValueError unless at least two distinct indices >= 0."""
    if (isinstance(layers, (str, bytes)) or not hasattr(layers, "__len__") or len(layers) < 2
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
            or len(set(layers)) != len(layers)):
        raise ValueError(f"feature_layers must be None or at least two distinct layer indices >= 0, got {layers!r}")
    return tuple(sorted(layers))


def _fitting_num_groups(vocab_size: int, wanted: int) -> int:
    """The largest G <= wanted (at least 8 tokens a group) whose contiguous grouping has no empty group."""
    for groups in range(min(wanted, max(1, vocab_size // 8)), 0, -1):
        size = -(-vocab_size // groups)
        if (groups - 1) * size < vocab_size:
            return groups
    return 1


def _rope_theta(text_config) -> float:
    theta = getattr(text_config, "rope_theta", None)
    if theta is not None:
        return float(theta)
    params = getattr(text_config, "rope_parameters", None) or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    # Gemma 3: one entry per layer type; the draft layer attends globally like the full layers
    for key in ("full_attention", "sliding_attention"):
        if key in params and "rope_theta" in params[key]:
            return float(params[key]["rope_theta"])
    return 10000.0


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE, cos/sin computed from position ids on the fly (graph-capturable).

    scaling: None (plain), {"rope_type": "linear", "factor": f} or Llama 3.1's "llama3" frequency
    scaling (the forms imported EAGLE drafts carry; both only rescale inv_freq).
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", _scaled_inv_freq(inv_freq, scaling), persistent=False)

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """position_ids: [B, T] -> cos, sin: [B, 1, T, D]"""
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _scaled_inv_freq(inv_freq: Tensor, scaling: dict | None) -> Tensor:
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    # llama3: long wavelengths divided by factor, short ones kept, a smooth blend between
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * torch.pi / inv_freq
    smooth = ((old_context / wavelen - low) / (high - low)).clamp(0, 1)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > old_context / low, inv_freq / factor,
                       torch.where(wavelen < old_context / high, inv_freq, blended))


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Plain causal attention over the T inputs. q: [B, Hq, T, D], k, v: [B, Hkv, T, D] -> [B, Hq, T, D]."""
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), is_causal=True, scale=scale)


class DraftDecoderLayer(nn.Module):
    def __init__(self, config: DraftConfig):
        super().__init__()
        H, D = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, D
        self.scaling = D**-0.5
        # EAGLE-1/2 layer 0 has no input norm: its input is fc's output
        self.input_layernorm = RMSNorm(H, config.rms_norm_eps) if config.input_norm else None
        self.q_proj = nn.Linear(H, self.num_heads * D, bias=config.qkv_bias)
        self.k_proj = nn.Linear(H, self.num_kv_heads * D, bias=config.qkv_bias)
        self.v_proj = nn.Linear(H, self.num_kv_heads * D, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * D, H, bias=False)
        self.post_attention_layernorm = RMSNorm(H, config.rms_norm_eps)
        self.gate_proj = nn.Linear(H, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, H, bias=False)
        self.act = (
            F.silu if config.hidden_act == "silu" else (lambda x: F.gelu(x, approximate="tanh"))
        )

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_fn=None) -> Tensor:
        h = x if self.input_layernorm is None else self.input_layernorm(x)
        return self.attend_and_mlp(x, h, cos, sin, attn_fn)

    def attend_and_mlp(self, residual: Tensor, h: Tensor, cos: Tensor, sin: Tensor, attn_fn=None) -> Tensor:
        """residual: [B, T, H] (added back after attention); h: [B, T, I] the q/k/v input -> [B, T, H]."""
        x = residual
        B, T = h.shape[:2]
        q = self.q_proj(h).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if attn_fn is None:
            a = causal_attention(q, k, v, scale=self.scaling)
        else:
            a = attn_fn(q, k, v)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(self.act(self.gate_proj(h)) * self.up_proj(h))


class _DenseHead(nn.Module):
    """Full-vocabulary head with the RoutedLMHead method names (grouping="dense").

    The router is kept (trainable, G outputs) so that training code runs unchanged; the top-k ignores
    it and ranks the whole vocabulary.
    """

    def __init__(self, weight: Tensor, num_groups: int, active_groups: int):
        super().__init__()
        object.__setattr__(self, "weight", weight)  # the target's: not a parameter, not saved
        self.router = nn.Linear(weight.shape[1], num_groups, bias=False)
        self.active_groups = active_groups

    def dense_logits(self, hidden: Tensor) -> Tensor:
        return hidden.to(self.weight.dtype) @ self.weight.T

    def router_logits(self, hidden: Tensor) -> Tensor:
        return self.router(hidden.to(self.router.weight.dtype))

    def select_groups(self, hidden: Tensor) -> Tensor:
        return self.router_logits(hidden).topk(self.active_groups, dim=-1).indices

    def topk(self, hidden: Tensor, k: int, impl: str = "auto", check: bool = True):
        logprobs = torch.log_softmax(self.dense_logits(hidden).float(), dim=-1)
        values, ids = logprobs.topk(k, dim=-1)
        return ids, values


def _routed_head_available() -> bool:
    try:
        from coral_fast.head import RoutedLMHead  # noqa: F401
        from coral_fast.grouping import VocabGrouping  # noqa: F401
    except ImportError:
        return False
    return True


class DraftModel(nn.Module):
    """EAGLE-style draft over a target's features; see the module docstring.

    embed_tokens and lm_head_weight are the target's: they stay frozen and out of `state_dict`.
    """

    def __init__(self, config: DraftConfig, embed_tokens: nn.Module, lm_head_weight: Tensor, grouping=None):
        super().__init__()
        H, V = config.hidden_size, config.vocab_size
        if lm_head_weight.shape != (V, H):
            raise ValueError(
                f"lm_head_weight has shape {tuple(lm_head_weight.shape)}, the draft config "
                f"expects ({V}, {H}) (vocab_size, hidden_size)"
            )
        self.config = config
        # borrowed modules/tensors are kept out of the module registry: no parameters(), no state_dict
        object.__setattr__(self, "_embed_tokens", embed_tokens)
        self.fc = nn.Linear(2 * H, H, bias=config.fc_bias)
        if config.feature_layers is not None:
            self.feature_layers = config.feature_layers  # the loop then asks the target for these states
            self.fuse = nn.Linear(len(config.feature_layers) * H, H, bias=False)
        self.layer = DraftDecoderLayer(config)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.head = self._build_head(config, lm_head_weight.detach(), grouping)
        self.grouping = getattr(self.head, "grouping", grouping)

    @staticmethod
    def _build_head(config: DraftConfig, weight: Tensor, grouping):
        if config.grouping == "dense" or not _routed_head_available():
            return _DenseHead(weight, config.num_groups, config.active_groups)
        from coral_fast.grouping import VocabGrouping
        from coral_fast.head import RoutedLMHead

        if grouping is None:
            if config.grouping != "contiguous":
                raise ValueError(f"grouping={config.grouping!r} needs its VocabGrouping (token counts or LM-head clusters; "
                                 f"a saved draft stores it in model.safetensors)")
            grouping = VocabGrouping.contiguous(config.vocab_size, config.num_groups)
        head = RoutedLMHead(weight, grouping, config.active_groups)
        for name, p in list(head.named_parameters()):
            if p is weight or name in ("weight", "lm_head_weight"):
                p.requires_grad_(False)
        return head

    # --- properties of the borrowed target pieces -------------------------------------------------
    @property
    def embed_tokens(self) -> nn.Module:
        return self._embed_tokens

    @property
    def lm_head_weight(self) -> Tensor:
        return self.head.weight

    # --- what the loop asks of any draft (EAGLE-3 drafts answer differently: coral_fast.eagle) ------
    feature_layers = None  # target layers whose hidden states make the features; None: the last, normed

    @property
    def feature_size(self) -> int:
        """F, the size of one feature row the draft reads from the target (H; k H with k feature_layers)."""
        return self.config.hidden_size * len(self.feature_layers or (None,))

    def target_features(self, hidden_states, last_hidden: Tensor) -> Tensor:
        """The draft's features from one target forward: last_hidden [T, H] (after the final norm), or
        with feature_layers the concatenation of those hidden states (HF's tuple of [1, T, H]) [T, k H]."""
        if self.feature_layers is None:
            return last_hidden
        return torch.cat([hidden_states[i][0] for i in self.feature_layers], dim=-1)

    def input_features(self, features: Tensor) -> Tensor:
        """[..., F] target features or [..., H] draft outputs -> [..., H] what the fc reads."""
        if self.feature_layers is not None and features.shape[-1] != self.config.hidden_size:
            return self.fuse(features.to(self.fuse.weight.dtype))
        return features

    def embed(self, input_ids: Tensor) -> Tensor:
        """input_ids: [B, T] -> [B, T, H] through the target's embedding (Gemma's scaling included)."""
        with torch.no_grad():
            return self._embed_tokens(input_ids)

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, features: Tensor, input_ids: Tensor, position_ids: Tensor, attn_fn=None) -> Tensor:
        """One draft step over T positions.

        features: [B, T, H] target (or draft) features f_t (from the target [B, T, k H] with k
        feature_layers: fused first); input_ids: [B, T] the tokens x_{t+1} that
        follow each feature; position_ids: [B, T]. attn_fn(q, k, v) with q: [B, Hq, T, D] and
        k, v: [B, Hkv, T, D] (RoPE applied) returns [B, Hq, T, D]; None = causal over the T inputs.
        Returns hidden: [B, T, H], the predicted next features f_{t+1}.
        """
        H = self.config.hidden_size
        if features.dim() != 3 or features.shape[-1] not in (H, self.feature_size):
            widths = f"[B, T, {H}]" if self.feature_size == H else f"[B, T, {self.feature_size}] (target) or [B, T, {H}] (draft)"
            raise ValueError(f"features must be {widths}, got {tuple(features.shape)}")
        if input_ids.shape != features.shape[:2] or position_ids.shape != features.shape[:2]:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and position_ids {tuple(position_ids.shape)} must "
                f"both be [B, T] = {tuple(features.shape[:2])}"
            )
        dtype = self.fc.weight.dtype
        pair = [self.input_features(features).to(dtype), self.embed(input_ids).to(dtype)]
        if self.config.fc_input_order == "embedding_first":
            pair.reverse()
        x = self.fc(torch.cat(pair, dim=-1))
        cos, sin = self.rotary(position_ids, dtype)
        return self.layer(x, cos, sin, attn_fn)

    def logits(self, hidden: Tensor) -> Tensor:
        """Dense logits over the full vocabulary through the target's head: [..., V] (training)."""
        return self.head.dense_logits(hidden)

    def router_logits(self, hidden: Tensor) -> Tensor:
        """[..., G] router scores."""
        return self.head.router_logits(hidden)

    def topk(self, hidden: Tensor, k: int, impl: str = "auto", check: bool = True):
        """hidden: [M, H] -> (ids [M, k] int64, logprobs [M, k] fp32) of the routed grouped head."""
        return self.head.topk(hidden, k, impl=impl, check=check)

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for key in list(state):
            if key[len(prefix):].startswith(_TARGET_PREFIXES):
                del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        missing, unexpected = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in missing if not k.startswith(_TARGET_PREFIXES)]
        if strict and (missing or unexpected):
            raise RuntimeError(f"draft state mismatch: missing {missing}, unexpected {unexpected}")
        return missing, unexpected

    def save_pretrained(self, path, format: str = "coral", **eagle_options) -> None:
        """Write `config.json` and `model.safetensors` (fc, layer, router, grouping tensors).

        format="eagle" writes EAGLE's checkpoint format instead (coral_fast.eagle.save_eagle: the
        router and grouping are dropped; ValueError if EAGLE cannot express the architecture).
        """
        from safetensors.torch import save_file

        if format == "eagle":
            from coral_fast.eagle import save_eagle

            return save_eagle(self, path, **eagle_options)
        if format != "coral" or eagle_options:
            raise ValueError(f"format must be 'coral' or 'eagle' (options only with 'eagle'), got {format!r}")
        os.makedirs(path, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.grouping is not None and hasattr(self.grouping, "state_dict"):
            for k, v in self.grouping.state_dict().items():
                if isinstance(v, Tensor):
                    tensors[f"grouping.{k}"] = v.detach().contiguous().cpu()
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump({"architecture": "coral_fast.DraftModel", **self.config.to_dict()}, f, indent=2)
        save_file(tensors, os.path.join(path, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path, target_model):
        """Load a draft folder for `target_model` (an HF causal LM); ValueError if they do not match.

        Reads coral-fast folders and EAGLE / EAGLE-2 / HASS / EAGLE-3 checkpoint folders
        (coral_fast.eagle; an EAGLE-3 folder gives an `Eagle3Draft`).
        """
        config_path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise ValueError(f"no draft at {path!r}: {CONFIG_NAME} not found")
        raw = read_json(config_path)
        from coral_fast import eagle

        if eagle.is_eagle_config(raw):
            return eagle.load_eagle(path, target_model, raw)
        if raw.get("architecture") != "coral_fast.DraftModel":
            raise ValueError(
                f"{config_path} is neither a coral-fast draft config (architecture "
                f"'coral_fast.DraftModel') nor an EAGLE one (Llama-style, num_hidden_layers 1)"
            )
        config = DraftConfig.from_file_dict(raw, config_path)
        _check_matches_target(config, target_model, source=str(path))
        tensors = load_weights(os.path.join(path, WEIGHTS_NAME))
        grouping_state = {k[len("grouping."):]: v for k, v in tensors.items() if k.startswith("grouping.")}
        grouping = None
        if grouping_state and config.grouping != "dense" and _routed_head_available():
            from coral_fast.grouping import VocabGrouping

            grouping = VocabGrouping.from_state_dict(grouping_state)
        model = cls(config, target_model.get_input_embeddings(), _lm_head_weight(target_model), grouping)
        model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("grouping.")})
        return model.to(**_placement(target_model))

    @classmethod
    def random_init(cls, target_model, **config_overrides) -> "DraftModel":
        """An untrained draft for `target_model`: small random weights (std 0.02), fp of the target."""
        config = DraftConfig.from_target_config(target_model.config, **config_overrides)
        _check_matches_target(config, target_model)
        model = cls(config, target_model.get_input_embeddings(), _lm_head_weight(target_model))
        model.reset_parameters()
        return model.to(**_placement(target_model))

    def reset_parameters(self, std: float = 0.02) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.weight.requires_grad:
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)


def load_weights(path) -> dict[str, Tensor]:
    """All tensors of a `.safetensors` file or a torch `.bin`; ValueError naming a missing or broken file."""
    path = str(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found (the draft's weights)")
    try:
        if path.endswith(".bin"):
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
                raise ValueError("not a flat state dict of tensors")
            return state
        from safetensors.torch import load_file

        return load_file(path)
    except Exception as error:  # SafetensorError, pickle / zip errors: all one message
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path} is truncated or corrupt ({reason})") from None


def _lm_head_weight(target_model) -> Tensor:
    head = target_model.get_output_embeddings()
    if head is None:
        raise ValueError("the target model has no output embeddings (LM head)")
    return head.weight


def _placement(target_model) -> dict:
    w = _lm_head_weight(target_model)
    return {"device": w.device, "dtype": w.dtype}


def _check_matches_target(config: DraftConfig, target_model, source: str = "the draft") -> None:
    text = text_config(target_model.config)
    name = getattr(text, "model_type", "target")
    if config.hidden_size != text.hidden_size:
        raise ValueError(
            f"draft {source} was built for hidden size {config.hidden_size} ({config.target or '?'}), "
            f"the target ({name}) has {text.hidden_size}"
        )
    if config.vocab_size != text.vocab_size:
        raise ValueError(
            f"draft {source} was built for vocabulary {config.vocab_size} ({config.target or '?'}), "
            f"the target ({name}) has {text.vocab_size}"
        )
    if config.feature_layers is not None and max(config.feature_layers) > text.num_hidden_layers:
        raise ValueError(
            f"draft {source} reads the target's hidden states {list(config.feature_layers)}, the target "
            f"({name}) has {text.num_hidden_layers} layers (states 0..{text.num_hidden_layers})"
        )
