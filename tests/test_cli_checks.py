"""Command-line checks: argparse types refuse out-of-range values in one line; file checks name the
file and what is wrong with it, before any model loads."""
import json
import math

import pytest
import torch

from coral_fast import cli_checks as C


def _parse(type_, text):
    parser = C.ArgumentParser(prog="prog")
    parser.add_argument("--x", type=type_)
    return parser.parse_args([f"--x={text}"]).x


@pytest.mark.parametrize("type_, good, bad", [
    (C.positive_int, ["1", "17", "1000000"], ["0", "-1", "2.5", "x", "", "nan"]),
    (C.nonnegative_int, ["0", "5"], ["-1", "1e3", "inf"]),
    (C.finite_nonneg_float, ["0", "0.8", "1e-30", "3"], ["nan", "inf", "-inf", "-0.1", "x"]),
    (C.positive_float, ["1e-3", "2"], ["0", "-1", "nan", "inf"]),
    (C.unit_float, ["0", "0.5", "1"], ["1.0001", "-0.0001", "nan"]),
    (C.int_at_least(3, 9), ["3", "9"], ["2", "10"]),
    (C.float_in(0.0, 1.0, high_open=True), ["0", "0.999"], ["1", "1.5"]),
    (C.boolean, ["true", "0", "Yes", "off"], ["maybe", "2", ""]),
])
def test_types_accept_the_range_and_refuse_the_rest_in_one_line(capsys, type_, good, bad):
    for text in good:
        value = _parse(type_, text)
        assert not isinstance(value, float) or math.isfinite(value)
    for text in bad:
        with pytest.raises(SystemExit) as exit:
            _parse(type_, text)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit.value.code == 2 and len(err) == 1 and err[0].startswith("prog: error: argument --x: must be"), (text, err)


def test_argument_errors_exit_2_with_one_line(capsys):
    parser = C.ArgumentParser(prog="prog")
    with pytest.raises(SystemExit) as exit, C.argument_errors(parser):
        raise ValueError("first line\nsecond line")
    assert exit.value.code == 2 and capsys.readouterr().err == "prog: error: first line second line\n"


def _draft_folder(path, tensors=None):
    from safetensors.torch import save_file

    path.mkdir()
    (path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    save_file(tensors or {"w": torch.randn(13, 7), "b": torch.randn(5)}, str(path / "model.safetensors"))
    return path


def test_draft_folder_checks(tmp_path):
    good = _draft_folder(tmp_path / "good")
    C.check_draft_folder(str(good))
    with pytest.raises(ValueError, match="does not exist"):
        C.check_draft_folder(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        C.check_draft_folder(str(tmp_path / "empty"))
    weights = good / "model.safetensors"
    whole = weights.read_bytes()
    for cut in (len(whole) - 1, len(whole) // 2, 40, 5, 0):
        weights.write_bytes(whole[:cut])
        with pytest.raises(ValueError) as error:
            C.check_draft_folder(str(good))
        assert str(weights) in str(error.value) and "\n" not in str(error.value)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + whole[100:])
    with pytest.raises(ValueError, match="header is not readable"):
        C.check_draft_folder(str(good))
    weights.write_bytes(whole)
    (good / "config.json").write_text('{"hidden_size": 8')
    with pytest.raises(ValueError, match=f"{good / 'config.json'} is not valid JSON"):
        C.check_draft_folder(str(good))
    (good / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        C.check_draft_folder(str(good))


def test_model_arg_checks(tmp_path):
    C.check_model_arg("smollm2")
    with pytest.raises(ValueError, match="unknown model 'llama-9000'"):
        C.check_model_arg("llama-9000")
    with pytest.raises(ValueError, match="--model is empty"):
        C.check_model_arg(" ")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"model folder {empty} is empty"):
        C.check_model_arg(str(empty))
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="has no config.json and no .gguf file"):
        C.check_model_arg(str(empty))
    (empty / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no tokenizer"):
        C.check_model_arg(str(empty))
    (empty / "tokenizer.json").write_text("{}")
    C.check_model_arg(str(empty))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(20))
    C.check_model_arg(str(gguf))
    (tmp_path / "bad.gguf").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        C.check_model_arg(str(tmp_path / "bad.gguf"))
    with pytest.raises(ValueError, match="is a file but not a .gguf"):
        C.check_model_arg(str(empty / "notes.txt"))


def test_draft_folder_eagle_bin_weights(tmp_path):
    """An EAGLE folder with pytorch_model.bin passes the early check; no weights file at all does not."""
    folder = _draft_folder(tmp_path / "eagle")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    C.check_draft_folder(str(folder))
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(ValueError, match="has no model.safetensors"):
        C.check_draft_folder(str(folder))
