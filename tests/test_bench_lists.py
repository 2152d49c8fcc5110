"""`hierspec.bench.lists`: the bench scripts' comma lists fail the same way, naming the flag."""

from __future__ import annotations

import argparse

import pytest

from hierspec.bench.lists import gammas, names, parse_list, positive_ints, split, temperatures


def test_parse_list_reads_dedups_and_names_the_flag():
    assert split(" a, b,,c ") == ["a", "b", "c"]
    assert parse_list("3,1,3", int, "--n") == [3, 1]
    with pytest.raises(SystemExit, match="--n: cannot read 'x' \\(expected integers\\)"):
        parse_list("1,x", int, "--n", expected="integers", error=SystemExit)
    with pytest.raises(argparse.ArgumentTypeError, match=r"^--n: empty list$"):
        parse_list(" , ", int, "--n")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^--n: expected >= 1, got '0,2'$"):
        parse_list("0,2", int, "--n", valid=lambda v: v >= 1, expected=">= 1")


def test_argparse_types():
    ap = argparse.ArgumentParser()
    ap.add_argument("--g", type=gammas())
    ap.add_argument("--c", type=positive_ints())
    ap.add_argument("--t", type=temperatures(zero=False))
    ap.add_argument("--s", type=names(("a", "b")))
    args = ap.parse_args(["--g", "auto,4", "--c", "1,2", "--t", "0.5,1", "--s", "b"])
    assert (args.g, args.c, args.t, args.s) == ([0, 4], [1, 2], [0.5, 1.0], ["b"])
    for bad in (["--g", "0"], ["--c", "x"], ["--t", "0"], ["--t", "nan"], ["--s", "z"]):
        with pytest.raises(SystemExit):
            ap.parse_args(bad)
