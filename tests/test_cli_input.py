"""CLI input defects of issue #27: a prompt that is not UTF-8, seeds out of range (both one line on
stderr, exit status 2, before any model is loaded) and progress bars on stderr under --json."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from hierspec.cli import main
from hierspec.cli.flags import CliError, check_prompt, check_seed
from hierspec.models import open as open_mod
from hierspec.models.loading import quiet_progress

BAD_PROMPT = os.fsdecode(b"abc\xff\xfe\xc3(")  # as Python hands over such argv bytes


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a model fails the test: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the argument check")

    monkeypatch.setattr(open_mod, "open_target", refuse)


def _one_error_line(err: str, flag: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hierspec: error: {flag}"), err


def test_prompt_not_utf8_is_one_line_naming_prompt(capsys, no_model):
    assert main(["generate", "--prompt", BAD_PROMPT, "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    _one_error_line(err, "--prompt")
    assert "not valid UTF-8" in err and "ff" in err


def test_check_prompt_accepts_unicode_and_names_bad_bytes():
    assert check_prompt("héllo ✓") == "héllo ✓"
    with pytest.raises(CliError, match=r"^--prompt: not valid UTF-8 \(byte ff at byte offset 3\)"):
        check_prompt(BAD_PROMPT)
    with pytest.raises(CliError, match=r"^--prompt: not valid Unicode text"):
        check_prompt("abc\ud800")  # a lone surrogate no argv byte can give
    assert check_prompt(os.fsdecode("é".encode())) == "é"


def test_prompt_not_utf8_from_the_real_command_line():
    """The bytes as a shell passes them ($'abc\\xff\\xfe\\xc3('): exit 2, one line, no traceback."""
    code = "import sys; from hierspec.cli import main; sys.exit(main())"
    argv = [sys.executable, "-c", code, "generate", "--prompt", b"abc\xff\xfe\xc3("]
    argv += ["--model", "/nonexistent"]  # fails fast (naming --model) if --prompt is not checked
    proc = subprocess.run(argv, capture_output=True, timeout=300, env={**os.environ, "PYTHONUTF8": "1"})
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr.decode(), "--prompt")


@pytest.mark.parametrize("seed", [str(2**70), "-1", str(2**63)])
def test_seed_out_of_range_names_seed_before_loading(capsys, no_model, seed):
    assert main(["generate", "--prompt", "hi", "--json", "--seed", seed]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    _one_error_line(err, "--seed")
    assert "[0, 2^63)" in err


def test_seed_range_is_documented_and_its_ends_accepted(capsys):
    assert check_seed(0) == 0 and check_seed(2**63 - 1) == 2**63 - 1
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "[0, 2^63)" in text and "UTF-8" in text


def _bar(file: io.StringIO) -> None:
    from tqdm.auto import tqdm  # as transformers' GGUF converter imports it

    for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...", file=file):
        pass


def test_quiet_progress_silences_tqdm_under_json(monkeypatch):
    """`quiet_progress` (around every model load) disables tqdm bars when --json set
    HF_HUB_DISABLE_PROGRESS_BARS, and leaves tqdm as it was afterwards."""
    from tqdm import std

    init = std.tqdm.__dict__["__init__"]
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    loud = io.StringIO()
    with quiet_progress():
        _bar(loud)
    assert "Converting" in loud.getvalue()
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    quiet = io.StringIO()
    with quiet_progress():
        _bar(quiet)
    assert quiet.getvalue() == ""
    assert std.tqdm.__dict__["__init__"] is init
    after = io.StringIO()
    _bar(after)  # outside the block bars are back
    assert "Converting" in after.getvalue()


@pytest.mark.smollm
def test_json_run_with_torch_conversion_keeps_stderr_empty(tmp_path):
    """A --json run that converts the embedded GGUF (fresh cache) writes nothing on stderr."""
    pytest.importorskip("gguf")
    from hierspec.models import smollm2

    try:
        smollm2.smollm2_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    code = "import sys; from hierspec.cli import main; sys.exit(main())"
    argv = [sys.executable, "-c", code, "generate", "--prompt", "Hi", "--json", "--backend", "torch"]
    argv += ["--method", "ar", "--max-new-tokens", "2"]
    env = {**os.environ, "HIERSPEC_CACHE": str(tmp_path / "cache")}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["backend"] == "torch"
    assert proc.stderr == ""
