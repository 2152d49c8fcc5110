"""CLI argument errors: one clear line on stderr, exit status 2, nothing on stdout (even with --json)."""

from __future__ import annotations

import pytest

from hierspec.cli import main


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--gamma", "0"], "--gamma must be >= 1"),
        (["--temperature", "-1"], "temperature must be"),
        (["--top-p", "1.5"], "top_p must be in"),
        (["--top-p", "0"], "top_p must be in"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ],
)
def test_generate_bad_arguments(capsys, extra, msg):
    assert main(["generate", "--prompt", "hi", "--json", *extra]) == 2
    out, err = capsys.readouterr()
    assert out == "" and msg in err and err.startswith("hierspec: error:")


def test_generate_empty_prompt(capsys):
    assert main(["generate", "--prompt", "  ", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--prompt is empty" in err


@pytest.mark.parametrize("extra", [["--method", "beam"], ["--rule", "nope"], ["--dtype", "int8"]])
def test_generate_unknown_choices(capsys, extra):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "hi", *extra])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
