"""Command-line checks that run before any model loads: argparse `type=` functions and file checks.

    parser = ArgumentParser(prog="coral-fast train")   # one-line errors
    parser.add_argument("--num-groups", type=positive_int, default=32)
    parser.add_argument("--temperature", type=finite_nonneg_float, default=0.8)
    ...
    args = parser.parse_args(argv)
    with argument_errors(parser):           # ValueError -> "prog: error: <one line>", exit 2
        check_model_arg(args.model)
        check_draft_folder(args.draft)

With `cli_checks.ArgumentParser` a bad value exits 2 with one line that names the flag and the
accepted range (`prog: error: argument --num-groups: must be an integer >= 1, got '0'`); never a
traceback. The file checks raise ValueError with one line; `argument_errors` turns it into the same
exit 2 (with a plain argparse parser the type errors also print argparse's usage block).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import struct

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# ---------------------------------------------------------------- argparse types


def _int(text: str, accepted: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {accepted}, got {text!r}") from None


def _float(text: str, accepted: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {accepted}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {accepted}, got {text!r}")
    return value


def int_at_least(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high] (high=None: no upper bound)."""
    accepted = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def check(text: str) -> int:
        value = _int(text, accepted)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {accepted}, got {text!r}")
        return value

    check.__name__ = f"int_at_least_{low}"
    return check


def float_in(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite float in the interval (nan and inf are always refused)."""
    left, right = ("(" if low_open else "["), (")" if high_open or high == math.inf else "]")
    accepted = f"a finite number in {left}{low:g}, {high:g}{right}"

    def check(text: str) -> float:
        value = _float(text, accepted)
        if value < low or (low_open and value == low) or value > high or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"must be {accepted}, got {text!r}")
        return value

    check.__name__ = "float_in"
    return check


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)
finite_float = float_in(-math.inf)
finite_nonneg_float = float_in(0.0)
positive_float = float_in(0.0, low_open=True)
unit_float = float_in(0.0, 1.0)  # a probability or a fraction: [0, 1]


def boolean(text: str) -> bool:
    """An argparse type: 1/true/yes/on or 0/false/no/off (anything else is refused, not read as False)."""
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false (1/0, yes/no), got {text!r}")


# ---------------------------------------------------------------- file checks (ValueError, one line)


def read_json(path) -> dict:
    """A JSON object from `path`; ValueError naming the file when it is not one."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def check_json_file(path: str) -> dict:
    """The JSON object in `path`; ValueError naming the file when it is missing or malformed."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found")
    return read_json(path)


def check_safetensors(path: str) -> dict:
    """Read a .safetensors header without loading tensors: the file exists, its header is JSON and
    every tensor's bytes lie inside the file (a truncated copy is caught). -> {name: info}."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path} is not a safetensors file: {size} bytes, shorter than its header")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8 or header_len > 100_000_000:
                raise ValueError(f"{path} is truncated or corrupt: header of {header_len} bytes in a {size}-byte file")
            header = json.loads(f.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is corrupt: its header is not readable ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is corrupt: its header is not a JSON object")
    data_bytes = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{path} is corrupt: tensor {name!r} has no valid data_offsets")
        if offsets[1] > data_bytes:
            raise ValueError(f"{path} is truncated: tensor {name!r} ends at byte {offsets[1]} of {data_bytes} data bytes")
    return header


def check_draft_folder(path: str) -> None:
    """A draft folder: config.json (a JSON object) and its weights, either a readable model.safetensors
    (ours, or an EAGLE folder) or an EAGLE folder's pytorch_model.bin (read when the draft loads)."""
    if not path or not os.path.isdir(path):
        raise ValueError(f"draft folder {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise ValueError(f"draft folder {path} has no {CONFIG_NAME}")
    check_json_file(os.path.join(path, CONFIG_NAME))
    if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        check_safetensors(os.path.join(path, WEIGHTS_NAME))
    elif not os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        raise ValueError(f"draft folder {path} has no {WEIGHTS_NAME} (nor an EAGLE pytorch_model.bin)")


def check_model_arg(name_or_path: str, known: tuple[str, ...] | None = None) -> None:
    """`--model`: a known name, a .gguf file, or a folder with a config.json (a transformers
    checkpoint) or a single .gguf file. An empty or unrelated folder is named as such."""
    if known is None:
        from coral_fast.models import KNOWN_MODELS as known
    if name_or_path in known:
        return
    hint = f"use one of {', '.join(known)}, a .gguf file or a transformers checkpoint folder"
    if not name_or_path or not str(name_or_path).strip():
        raise ValueError(f"--model is empty: {hint}")
    if not os.path.exists(name_or_path):
        raise ValueError(f"unknown model {name_or_path!r} (no such name or path): {hint}")
    if os.path.isfile(name_or_path):
        if not name_or_path.endswith(".gguf"):
            raise ValueError(f"{name_or_path} is a file but not a .gguf: {hint}")
        with open(name_or_path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"{name_or_path} is not a GGUF file (its first bytes are not 'GGUF')")
        return
    entries = os.listdir(name_or_path)
    if not entries:
        raise ValueError(f"model folder {name_or_path} is empty: {hint}")
    if CONFIG_NAME in entries:
        check_json_file(os.path.join(name_or_path, CONFIG_NAME))
        if not any(name in entries for name in TOKENIZER_FILES):
            raise ValueError(f"model folder {name_or_path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
        return
    ggufs = [e for e in entries if e.endswith(".gguf")]
    if len(ggufs) == 1:
        return
    if len(ggufs) > 1:
        raise ValueError(f"model folder {name_or_path} holds {len(ggufs)} .gguf files: pass one of them")
    raise ValueError(f"model folder {name_or_path} has no {CONFIG_NAME} and no .gguf file: {hint}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `prog: error: argument --x: must be ... (--help lists the options)`
    on stderr and exit 2, without the multi-line usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (--help lists the options)\n")


def one_line(message) -> str:
    text = " ".join(str(message).split())
    return text or "invalid argument"


@contextlib.contextmanager
def argument_errors(parser: argparse.ArgumentParser):
    """Turn a ValueError from the checks inside into one line on stderr and exit 2."""
    try:
        yield
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {one_line(error) if str(error) else type(error).__name__}\n")
