"""EAGLE's checkpoint formats, in and out.

EAGLE-1 / EAGLE-2 / HASS folder (what EAGLE's `ea_model.py`, SGLang's `LlamaForCausalLMEagle` and
vLLM's `EagleLlamaForCausalLM` load): `config.json`, Llama-style with `num_hidden_layers: 1`, and
`pytorch_model.bin` or `model.safetensors` holding

    fc.weight [H, 2H]  over cat(embedding, feature)     fc.bias unless config "bias" is false
    layers.0.self_attn.{q,k,v,o}_proj.weight            (+ q/k/v .bias with config "qkv_bias")
    layers.0.mlp.{gate,up,down}_proj.weight
    layers.0.post_attention_layernorm.weight            layer 0 has no input norm; no final norm,
    [embed_tokens.weight]                               no LM head: the target's is used

That is our `DraftModel` with input_norm=False, fc_input_order="embedding_first" and optional fc /
q-k-v biases, so it imports as one (dense head; a router can be retrofitted) and exports from one.

EAGLE-3 folder (`LlamaForCausalLMEagle3` / `Eagle3LlamaForCausalLM`): `config.json` with
`draft_vocab_size`, and

    fc.weight [H, 3H]            over the target's hidden states at three layers, concatenated
    midlayer.self_attn.{q,k,v}_proj.weight [*, 2H]  over cat(input_layernorm(embedding), hidden_norm(x))
    midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight, midlayer.mlp.*, o_proj
    norm.weight, lm_head.weight [Vd, H]   its own head over Vd draft ids
    d2t [Vd] int64 (target id = i + d2t[i]), t2d [V] bool

which imports as `Eagle3Draft` (below); the engine feeds it `draft.target_features(...)`.
"""
from __future__ import annotations

import json
import os

import torch
from torch import Tensor, nn

from coral_fast.draft import (
    ACTIVATIONS, CONFIG_NAME, WEIGHTS_NAME, DraftConfig, DraftDecoderLayer, DraftModel, RMSNorm,
    RotaryEmbedding, _check_matches_target, _fitting_num_groups, _lm_head_weight, _placement, load_weights,
)
from coral_fast.models import text_config

BIN_NAME = "pytorch_model.bin"
EAGLE_ARCHITECTURE = "LlamaForCausalLMEagle"  # SGLang's name; vLLM maps it to EagleLlamaForCausalLM
EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"

# our DraftModel state-dict names <-> EAGLE-1/2 names
_EAGLE_NAMES = {
    "fc.weight": "fc.weight",
    "fc.bias": "fc.bias",
    **{f"layer.{p}_proj.{t}": f"layers.0.self_attn.{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")},
    **{f"layer.{p}_proj.weight": f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
    "layer.post_attention_layernorm.weight": "layers.0.post_attention_layernorm.weight",
}
# our Eagle3Draft state-dict names <-> EAGLE-3 names
_EAGLE3_NAMES = {
    "fc.weight": "fc.weight",
    **{f"layer.{p}_proj.weight": f"midlayer.self_attn.{p}_proj.weight" for p in "qkvo"},
    **{f"layer.{p}_proj.weight": f"midlayer.mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
    **{f"layer.{n}.weight": f"midlayer.{n}.weight" for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm")},
    "norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "d2t": "d2t",
}
# tensors an EAGLE folder may hold that the draft's math does not read (EAGLE loads with strict=False)
_IGNORED = ("embed_tokens.weight", "t2d", "layers.0.input_layernorm.weight", "lm_head.weight")


def is_eagle_config(raw: dict) -> bool:
    """True for an EAGLE-style config.json (Llama-style; ours always says architecture: coral_fast.DraftModel)."""
    return "architecture" not in raw and ("num_hidden_layers" in raw or "architectures" in raw)


def _is_eagle3(raw: dict, tensors: dict) -> bool:
    archs = raw.get("architectures") or []
    return "draft_vocab_size" in raw or any("Eagle3" in a for a in archs) or any(k.startswith("midlayer.") for k in tensors)


def _weights_path(path) -> str:
    for name in (BIN_NAME, WEIGHTS_NAME):  # EAGLE's own loader tries the .bin first
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    if any(name.endswith(".index.json") for name in os.listdir(path)):
        raise ValueError(f"{path}: sharded checkpoints are not supported (EAGLE drafts are one file); merge the shards")
    raise ValueError(f"{path}: neither {BIN_NAME} nor {WEIGHTS_NAME} found (EAGLE draft weights)")


def _need(raw: dict, key: str, source: str):
    if key not in raw:
        raise ValueError(f"{source}: EAGLE config lacks {key!r}")
    return raw[key]


def _check_shapes(tensors: dict, expected: dict, source: str) -> None:
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"{source}: {name} missing (an EAGLE draft needs it)")
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, the config implies {tuple(shape)}")


def _check_embedding_copy(tensors: dict, target_model, source: str) -> None:
    """An embedding copy in the folder must be the target's: else the draft was made for another model."""
    copy = tensors.get("embed_tokens.weight")
    if copy is None:
        return
    mine = target_model.get_input_embeddings().weight.detach()
    if copy.shape != mine.shape:
        raise ValueError(f"{source}: embed_tokens.weight is {tuple(copy.shape)}, the target's embedding {tuple(mine.shape)}")
    rows = torch.linspace(0, copy.shape[0] - 1, min(copy.shape[0], 512)).long()
    a, b = copy[rows].float(), mine[rows.to(mine.device)].float().cpu()
    if not torch.allclose(a, b, rtol=1e-2, atol=1e-2 * float(b.abs().max())):
        raise ValueError(f"{source}: embed_tokens.weight differs from the target's embedding: a draft for another model?")


def _rope(raw: dict, source: str):
    scaling = raw.get("rope_scaling")
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported (default, linear, llama3)")
    return dict(scaling)


def _draft_config(raw: dict, target_model, source: str, head_rows: int, **extra) -> DraftConfig:
    H, heads = _need(raw, "hidden_size", source), _need(raw, "num_attention_heads", source)
    if raw.get("num_hidden_layers", 1) != 1:
        raise ValueError(f"{source}: num_hidden_layers is {raw['num_hidden_layers']}; coral-fast drafts have one layer")
    act = raw.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ValueError(f"{source}: hidden_act {act!r} is not supported ({', '.join(ACTIVATIONS)})")
    text = text_config(target_model.config)
    vocab = _need(raw, "vocab_size", source)
    config = DraftConfig(
        hidden_size=H, intermediate_size=_need(raw, "intermediate_size", source), num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads, head_dim=head_rows // heads,
        vocab_size=vocab, rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(raw.get("rope_theta", 10000.0)), hidden_act=act, rope_scaling=_rope(raw, source),
        num_groups=_fitting_num_groups(vocab, DraftConfig.num_groups), grouping="dense",
        target=getattr(text, "model_type", ""), **extra,
    )
    config.active_groups = min(config.active_groups, config.num_groups)
    _check_matches_target(config, target_model, source=source)
    return config


def load_eagle(path, target_model, raw: dict):
    """An EAGLE-1/2/HASS folder as a `DraftModel`, an EAGLE-3 folder as an `Eagle3Draft`."""
    source = os.path.join(str(path), CONFIG_NAME)
    tensors = load_weights(_weights_path(path))
    if _is_eagle3(raw, tensors):
        return _load_eagle3(path, target_model, raw, tensors)
    H = _need(raw, "hidden_size", source)
    if "fc.weight" not in tensors or "layers.0.self_attn.q_proj.weight" not in tensors:
        raise ValueError(f"{source}: the weights lack fc.weight / layers.0.* (not an EAGLE draft)")
    heads = _need(raw, "num_attention_heads", source)
    head_rows = tensors["layers.0.self_attn.q_proj.weight"].shape[0]
    # EAGLE's own layer makes head_dim = hidden_size / heads; SGLang and vLLM read head_dim
    if raw.get("head_dim", head_rows // heads) * heads != head_rows:
        raise ValueError(f"{source}: head_dim {raw['head_dim']} x {heads} heads != q_proj rows {head_rows}")
    fc_bias = raw.get("bias", True)  # EAGLE's default when "bias" is absent
    has_bias = "fc.bias" in tensors
    if fc_bias and not has_bias:
        fc_bias = False  # nothing to load: the bias is zero
    if not fc_bias and has_bias and bool(tensors["fc.bias"].any()):
        raise ValueError(f"{source}: config says bias false but fc.bias is non-zero (EAGLE ignores it, SGLang adds it)")
    qkv_bias = bool(raw.get("qkv_bias", False))
    config = _draft_config(raw, target_model, source, head_rows, input_norm=False,
                           fc_input_order="embedding_first", fc_bias=fc_bias, qkv_bias=qkv_bias)
    kv_rows, inter = config.num_key_value_heads * config.head_dim, config.intermediate_size
    expected = {
        "fc.weight": (H, 2 * H), "layers.0.self_attn.q_proj.weight": (head_rows, H),
        "layers.0.self_attn.k_proj.weight": (kv_rows, H), "layers.0.self_attn.v_proj.weight": (kv_rows, H),
        "layers.0.self_attn.o_proj.weight": (H, head_rows), "layers.0.mlp.gate_proj.weight": (inter, H),
        "layers.0.mlp.up_proj.weight": (inter, H), "layers.0.mlp.down_proj.weight": (H, inter),
        "layers.0.post_attention_layernorm.weight": (H,),
    }
    if fc_bias:
        expected["fc.bias"] = (H,)
    if qkv_bias:
        expected.update({f"layers.0.self_attn.{p}_proj.bias": (n,) for p, n in (("q", head_rows), ("k", kv_rows), ("v", kv_rows))})
    _check_shapes(tensors, expected, source)
    _check_unknown(tensors, set(_EAGLE_NAMES.values()), source)
    _check_embedding_copy(tensors, target_model, source)
    draft = DraftModel(config, target_model.get_input_embeddings(), _lm_head_weight(target_model))
    draft.reset_parameters()  # the dense head's unused router: small random weights, like a fresh draft
    ours = {mine: tensors[theirs] for mine, theirs in _EAGLE_NAMES.items() if theirs in expected}
    missing, _ = draft.load_state_dict(ours, strict=False)
    assert all(k.startswith("head.") for k in missing), missing
    return draft.to(**_placement(target_model))


def _check_unknown(tensors: dict, known: set, source: str) -> None:
    unknown = sorted(k for k in tensors if k not in known and k not in _IGNORED)
    if unknown:
        raise ValueError(f"{source}: unexpected tensors {unknown[:6]} (not an EAGLE draft this loader reads)")


# --- export ----------------------------------------------------------------------------------------
def _llama_layer_config(architecture: str, cfg: DraftConfig) -> dict:
    """The one-layer Llama fields both EAGLE formats' config.json share."""
    return {
        "architectures": [architecture], "model_type": "llama", "num_hidden_layers": 1,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim, "hidden_act": cfg.hidden_act, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling, "vocab_size": cfg.vocab_size,
    }


def eagle_state(draft: DraftModel) -> tuple[dict, dict[str, Tensor], list[str]]:
    """(config.json dict, EAGLE-named tensors, notes) of a DraftModel; ValueError if EAGLE cannot say it."""
    cfg = draft.config
    if cfg.feature_layers is not None:
        raise ValueError(f"this draft fuses the target's hidden states {list(cfg.feature_layers)} into its features; "
                         "EAGLE-1/2's format reads the last hidden state only (train without --feature-layers to export)")
    if cfg.input_norm:
        raise ValueError("this draft normalises its layer's input; EAGLE's layer 0 has no input norm "
                         "(train with input_norm=False to export)")
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        raise ValueError(f"head_dim {cfg.head_dim} x {cfg.num_attention_heads} heads != hidden size "
                         f"{cfg.hidden_size}; EAGLE's layer derives head_dim = hidden / heads")
    notes = []
    if cfg.grouping != "dense":
        notes.append(f"router and {cfg.grouping} grouping dropped: EAGLE's format has no grouped head (dense head on their side)")
    if cfg.hidden_act != "silu":
        notes.append(f"hidden_act {cfg.hidden_act}: EAGLE reads it, SGLang's and vLLM's Llama MLP accept only silu")
    if cfg.fc_bias:
        notes.append("fc bias: EAGLE and SGLang read it (config bias true, which SGLang also applies to q/k/v/o "
                     "without weights to load), vLLM builds fc without a bias")
    if cfg.qkv_bias:
        notes.append("q/k/v biases: EAGLE and vLLM read qkv_bias, SGLang reads attention_bias")
    kind = None if cfg.rope_scaling is None else cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type"))
    if kind == "llama3":
        notes.append("llama3 rope scaling: SGLang and vLLM read it, EAGLE's own layer knows only linear / dynamic")
    state = draft.state_dict()
    tensors = {}
    for mine, theirs in _EAGLE_NAMES.items():
        if mine in state:
            tensors[theirs] = state[mine].detach().contiguous().cpu()
    fc = tensors["fc.weight"]
    if cfg.fc_input_order == "feature_first":  # EAGLE reads cat(embedding, feature): swap the halves
        H = cfg.hidden_size
        tensors["fc.weight"] = torch.cat([fc[:, H:], fc[:, :H]], dim=1).contiguous()
    if "fc.bias" not in tensors:
        # SGLang always builds fc with a bias and keeps its random init unless one is loaded; EAGLE
        # (config bias false) and vLLM skip this tensor
        tensors["fc.bias"] = torch.zeros(cfg.hidden_size, dtype=fc.dtype)
    config = {
        **_llama_layer_config(EAGLE_ARCHITECTURE, cfg),
        "bias": bool(cfg.fc_bias), "qkv_bias": bool(cfg.qkv_bias), "tie_word_embeddings": False,
        "torch_dtype": str(fc.dtype).replace("torch.", ""),
    }
    return config, tensors, notes


def save_eagle(draft, path, embedding: Tensor | None = None, weights: str = "safetensors",
               architecture: str | None = None, max_position_embeddings: int = 8192) -> list[str]:
    """Write `draft` as an EAGLE folder at `path`; returns the notes on what the format drops or what
    an engine reads differently. embedding: the target's [V, H] embedding to copy in (EAGLE's loader
    reads it from the target otherwise); weights: "safetensors" | "bin"."""
    if isinstance(draft, Eagle3Draft):
        config, tensors, notes = draft.eagle3_state()
    else:
        config, tensors, notes = eagle_state(draft)
    if weights not in ("safetensors", "bin"):
        raise ValueError(f"weights must be 'safetensors' or 'bin', got {weights!r}")
    if architecture:
        config["architectures"] = [architecture]
    config["max_position_embeddings"] = int(max_position_embeddings)
    if embedding is not None:
        tensors["embed_tokens.weight"] = embedding.detach().to(tensors["fc.weight"].dtype).contiguous().cpu()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    if weights == "bin":
        torch.save(tensors, os.path.join(path, BIN_NAME))
    else:
        from safetensors.torch import save_file

        save_file(tensors, os.path.join(path, WEIGHTS_NAME))
    return notes


# --- EAGLE-3 ---------------------------------------------------------------------------------------
def eagle3_feature_layers(num_layers: int, aux_layer_ids=None) -> tuple[int, ...]:
    """Indices into HF's `output_hidden_states` tuple (0 = embeddings) of EAGLE-3's three features.

    EAGLE-3 (and SGLang, vLLM by default) take the inputs of target layers 2, L // 2 and L - 3, i.e.
    hidden_states[2], [L // 2], [L - 3]; a config's `eagle_aux_hidden_state_layer_ids` names layer
    outputs, i.e. hidden_states[i + 1]. Concatenated in layer order.
    """
    if aux_layer_ids:
        layers = sorted({int(i) + 1 for i in aux_layer_ids})
    else:
        layers = sorted({2, num_layers // 2, num_layers - 3})
    if len(layers) != 3 or layers[0] < 0 or layers[-1] > num_layers:
        raise ValueError(f"EAGLE-3 needs three distinct target layers in 0..{num_layers}, got {layers} "
                         f"(a target of {num_layers} layers)")
    return tuple(layers)


class Eagle3Layer(DraftDecoderLayer):
    """EAGLE-3's decoder layer: q/k/v read cat(input_layernorm(embedding), hidden_norm(x)) [2H]."""

    def __init__(self, config: DraftConfig):
        super().__init__(config)
        H, D = config.hidden_size, config.head_dim
        self.input_layernorm = RMSNorm(H, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(H, config.rms_norm_eps)
        self.q_proj = nn.Linear(2 * H, self.num_heads * D, bias=False)
        self.k_proj = nn.Linear(2 * H, self.num_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(2 * H, self.num_kv_heads * D, bias=False)

    def forward(self, x: Tensor, emb: Tensor, cos: Tensor, sin: Tensor, attn_fn=None) -> Tensor:
        h = torch.cat([self.input_layernorm(emb), self.hidden_norm(x)], dim=-1)
        return self.attend_and_mlp(x, h, cos, sin, attn_fn)


class Eagle3Draft(nn.Module):
    """An imported EAGLE-3 draft with the loop's draft interface.

    forward(features, input_ids, position_ids, attn_fn) reads features [B, T, 3H] (the target's,
    from `target_features`) or [B, T, H] (its own earlier outputs, before `norm`) and returns [B, T, H];
    topk(hidden [M, H], k) ranks its own head over the draft vocabulary and returns TARGET ids.
    """

    def __init__(self, config: DraftConfig, embed_tokens: nn.Module, draft_vocab_size: int, feature_layers: tuple):
        super().__init__()
        H = config.hidden_size
        self.config = config
        self.draft_vocab_size = int(draft_vocab_size)
        self.feature_layers = tuple(feature_layers)
        object.__setattr__(self, "_embed_tokens", embed_tokens)
        self.fc = nn.Linear(3 * H, H, bias=False)
        self.layer = Eagle3Layer(config)
        self.norm = RMSNorm(H, config.rms_norm_eps)
        self.lm_head = nn.Linear(H, self.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(self.draft_vocab_size, dtype=torch.int64))
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    @property
    def feature_size(self) -> int:
        return 3 * self.config.hidden_size

    @property
    def embed_tokens(self) -> nn.Module:
        return self._embed_tokens

    def embed(self, input_ids: Tensor) -> Tensor:
        with torch.no_grad():
            return self._embed_tokens(input_ids)

    def target_features(self, hidden_states, last_hidden: Tensor | None = None) -> Tensor:
        """hidden_states: HF's output_hidden_states tuple of [1, T, H] -> features [T, 3H]."""
        return torch.cat([hidden_states[i][0] for i in self.feature_layers], dim=-1)

    def forward(self, features: Tensor, input_ids: Tensor, position_ids: Tensor, attn_fn=None) -> Tensor:
        H = self.config.hidden_size
        if features.dim() != 3 or features.shape[-1] not in (H, 3 * H):
            raise ValueError(f"features must be [B, T, {3 * H}] (target) or [B, T, {H}] (draft), got {tuple(features.shape)}")
        if input_ids.shape != features.shape[:2] or position_ids.shape != features.shape[:2]:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and position_ids {tuple(position_ids.shape)} must "
                             f"both be [B, T] = {tuple(features.shape[:2])}")
        dtype = self.fc.weight.dtype
        x = features.to(dtype)
        if x.shape[-1] != H:
            x = self.fc(x)
        cos, sin = self.rotary(position_ids, dtype)
        return self.layer(x, self.embed(input_ids).to(dtype), cos, sin, attn_fn)

    def draft_logits(self, hidden: Tensor) -> Tensor:
        """[..., Vd] logits of the draft vocabulary."""
        return self.lm_head(self.norm(hidden.to(self.lm_head.weight.dtype)))

    def logits(self, hidden: Tensor) -> Tensor:
        """[..., V] logits over the target vocabulary (-inf for ids outside the draft vocabulary)."""
        small = self.draft_logits(hidden)
        full = small.new_full((*small.shape[:-1], self.config.vocab_size), float("-inf"))
        full[..., torch.arange(self.draft_vocab_size, device=small.device) + self.d2t] = small
        return full

    @torch.no_grad()
    def topk(self, hidden: Tensor, k: int, impl: str = "auto", check: bool = True):
        """hidden: [M, H] -> (ids [M, k] int64 target ids, logprobs [M, k] fp32 over the draft vocabulary)."""
        if check and not 1 <= k <= self.draft_vocab_size:
            raise ValueError(f"k must lie in 1..{self.draft_vocab_size} (the draft vocabulary), got {k}")
        logprobs = torch.log_softmax(self.draft_logits(hidden).float(), dim=-1)
        values, ids = logprobs.topk(k, dim=-1)
        return ids + self.d2t[ids], values

    def save_pretrained(self, path, format: str = "eagle", **options) -> list[str]:
        if format != "eagle":
            raise ValueError("an EAGLE-3 draft saves in EAGLE-3's format only (format='eagle')")
        return save_eagle(self, path, **options)

    def eagle3_state(self) -> tuple[dict, dict[str, Tensor], list[str]]:
        cfg = self.config
        state = self.state_dict()
        tensors = {theirs: state[mine].detach().contiguous().cpu() for mine, theirs in _EAGLE3_NAMES.items()}
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        t2d[torch.arange(self.draft_vocab_size) + tensors["d2t"]] = True
        tensors["t2d"] = t2d
        config = {
            **_llama_layer_config(EAGLE3_ARCHITECTURE, cfg),
            "draft_vocab_size": self.draft_vocab_size, "tie_word_embeddings": False,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in self.feature_layers]},
            "torch_dtype": str(tensors["fc.weight"].dtype).replace("torch.", ""),
        }
        return config, tensors, []


def _load_eagle3(path, target_model, raw: dict, tensors: dict) -> Eagle3Draft:
    source = os.path.join(str(path), CONFIG_NAME)
    text = text_config(target_model.config)
    H = _need(raw, "hidden_size", source)
    if raw.get("target_hidden_size", H) != H or H != text.hidden_size:
        raise ValueError(f"{source}: EAGLE-3 draft of hidden size {H} (target_hidden_size "
                         f"{raw.get('target_hidden_size', H)}) for a target of {text.hidden_size}: only equal sizes are supported")
    if raw.get("norm_before_residual", False):
        raise ValueError(f"{source}: norm_before_residual drafts are not supported")
    q = tensors.get("midlayer.self_attn.q_proj.weight")
    if q is None or "fc.weight" not in tensors:
        raise ValueError(f"{source}: the weights lack fc.weight / midlayer.* (not an EAGLE-3 draft)")
    heads = _need(raw, "num_attention_heads", source)
    config = _draft_config(raw, target_model, source, q.shape[0])
    V, Vd = config.vocab_size, int(raw.get("draft_vocab_size") or config.vocab_size)
    head_rows, kv_rows, inter = q.shape[0], config.num_key_value_heads * config.head_dim, config.intermediate_size
    aux = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    layers = eagle3_feature_layers(text.num_hidden_layers, aux)
    expected = {
        "fc.weight": (H, 3 * H), "midlayer.self_attn.q_proj.weight": (heads * config.head_dim, 2 * H),
        "midlayer.self_attn.k_proj.weight": (kv_rows, 2 * H), "midlayer.self_attn.v_proj.weight": (kv_rows, 2 * H),
        "midlayer.self_attn.o_proj.weight": (H, head_rows), "midlayer.mlp.gate_proj.weight": (inter, H),
        "midlayer.mlp.up_proj.weight": (inter, H), "midlayer.mlp.down_proj.weight": (H, inter),
        "midlayer.input_layernorm.weight": (H,), "midlayer.hidden_norm.weight": (H,),
        "midlayer.post_attention_layernorm.weight": (H,), "norm.weight": (H,), "lm_head.weight": (Vd, H),
    }
    _check_shapes(tensors, expected, source)
    _check_unknown(tensors, set(_EAGLE3_NAMES.values()) | {"t2d"}, source)
    _check_embedding_copy(tensors, target_model, source)
    d2t = tensors.get("d2t")
    if Vd != V:
        if d2t is None or tuple(d2t.shape) != (Vd,):
            raise ValueError(f"{source}: a draft vocabulary of {Vd} < {V} needs d2t [{Vd}], found "
                             f"{None if d2t is None else tuple(d2t.shape)}")
        d2t = d2t.long()
        target_ids = torch.arange(Vd) + d2t
        if int(target_ids.min()) < 0 or int(target_ids.max()) >= V:
            raise ValueError(f"{source}: d2t maps draft ids outside the target vocabulary [0, {V})")
    else:
        d2t = torch.zeros(Vd, dtype=torch.int64)  # EAGLE drops d2t / t2d when the vocabularies agree
    draft = Eagle3Draft(config, target_model.get_input_embeddings(), Vd, layers)
    ours = {mine: tensors[theirs] for mine, theirs in _EAGLE3_NAMES.items() if theirs != "d2t"}
    ours["d2t"] = d2t
    draft.load_state_dict(ours)
    placement = _placement(target_model)
    draft.to(device=placement["device"])
    for module in (draft.fc, draft.layer, draft.norm, draft.lm_head):
        module.to(dtype=placement["dtype"])
    return draft.eval()
