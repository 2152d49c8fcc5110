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


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--gammas", "3"], "--gammas needs --levels"),
        (["--levels", "a,ngram"], "'ngram' can only be the bottom level"),
        (["--levels", "ngram"], "at least one draft model"),
        (["--levels", "ngram,a,b", "--gammas", "3"], "expected 2 integers >= 1"),
        (["--levels", "a", "--gammas", "x"], "expected comma-separated integers"),
    ],
)
def test_hierarchy_level_errors(capsys, extra, msg):
    assert main(["generate", "--prompt", "hi", "--method", "hierarchy", "--json", *extra]) == 2
    out, err = capsys.readouterr()
    assert out == "" and msg in err


@pytest.mark.parametrize(
    "method,extra,msg",
    [
        ("hispec", ["--exits", "8,4"], "draft exit must come before"),
        ("hispec", ["--exits", "4"], "takes 2 exit layer(s)"),
        ("hispec", ["--exits", "4,x"], "expected layer numbers"),
        ("hispec", ["--exits", "3,8"], "no shipped early-exit head at layer 3"),
        ("hispec", ["--exits", "4:/nonexistent.safetensors,8"], "does not exist"),
        ("hispec", ["--nd", "0"], "--nd and --ni must be >= 1"),
        ("hispec", ["--ni", "0"], "--nd and --ni must be >= 1"),
        ("early-exit", ["--exits", "4,8"], "takes 1 exit layer(s)"),
    ],
)
def test_self_speculation_argument_errors(capsys, method, extra, msg):
    assert main(["generate", "--prompt", "hi", "--method", method, "--json", *extra]) == 2
    out, err = capsys.readouterr()
    assert out == "" and msg in err


@pytest.mark.parametrize(
    "method,extra,msg",
    [
        ("draft", ["--tree"], "--tree drafts trees with an EAGLE head"),
        ("eagle", ["--tree", "--tree-budget", "0"], "--tree-budget: tree budget: expected an integer >= 1"),
        ("eagle", ["--tree", "--tree-depth", "0"], "--tree-depth"),
        ("eagle", ["--eagle", "/nonexistent.safetensors"], "/nonexistent.safetensors does not exist"),
    ],
)
def test_eagle_argument_errors(capsys, method, extra, msg):
    assert main(["generate", "--prompt", "hi", "--method", method, "--json", *extra]) == 2
    out, err = capsys.readouterr()
    assert out == "" and msg in err


def test_plan_from_calibration_file(tmp_path, capsys):
    from hierspec.calibrate import Calibration

    cal = Calibration(
        names=["small", "mid", "target"],
        fingerprints=["a", "b", "c"],
        sizes=[1, 8],
        costs=[[0.002, 0.003], [0.01, 0.02], [0.1, 0.2]],
        alpha=[[1, 0.7, 0.5], [0.7, 1, 0.8], [0.5, 0.8, 1]],
        alpha_lo=[[1, 0.6, 0.4], [0.6, 1, 0.7], [0.4, 0.7, 1]],
        alpha_hi=[[1, 0.8, 0.6], [0.8, 1, 0.9], [0.6, 0.9, 1]],
        sampling="T=1",
        context=256,
        num_prompts=8,
    )
    path = tmp_path / "cal.json"
    cal.save(path)
    assert main(["plan", "--calibration", str(path), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "| 1 |" in out and "-> target" in out and "predicted speed-up" in out
    path.write_text("{")
    assert main(["plan", "--calibration", str(path)]) == 2
    assert "unreadable or malformed" in capsys.readouterr().err


def test_calibrate_lookup_levels_come_first(tmp_path, capsys):
    out = str(tmp_path / "cal.json")
    assert main(["calibrate", "--levels", "small,ngram", "--out", out]) == 2
    assert "lookup drafters (ngram) are the cheapest: list them first" in capsys.readouterr().err
    assert main(["calibrate", "--levels", ",", "--out", out]) == 2
    assert "--levels: give the draft levels" in capsys.readouterr().err
