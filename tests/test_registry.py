"""The registry is the one place that knows a method by its name: every capability a caller needs
is on the entry (runner, plain, draft lengths, heads, generate's flags), the entries are
consistent, each input is checked once, and no code outside `hierspec.methods` tests a method's
name (an AST scan, with a planted comparison as its negative control)."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest
import torch

from hierspec.bench.config import BenchConfig, Cell, method_gammas, plan_cells
from hierspec.bench.harness import check_methods
from hierspec.cli import _build_parser
from hierspec.cli.flags import METHOD_FLAGS, spec_from_flags
from hierspec.drafters import ModelDrafter, NgramDrafter
from hierspec.drafters.base import Draft, is_stoppable
from hierspec.methods import (
    ENTRIES,
    REFERENCE,
    MethodError,
    ModelSet,
    build_method,
    check_gammas,
    entry_of,
    parse_method,
)
from hierspec.methods.registry import RUNNERS
from hierspec.models import make_tiny_pair
from hierspec.sampling import SamplingParams

SRC = Path(__file__).resolve().parent.parent / "src" / "hierspec"


@pytest.fixture
def pair(tmp_path):
    target, draft = make_tiny_pair(vocab_size=32, seed=3, dtype=torch.float64, max_length=256)
    return ModelSet(target, drafts={str(tmp_path): draft}), str(tmp_path)


# ------------------------------------------------------------------------------ the entries
def test_entries_are_consistent():
    """Runners are known, peers are what MethodSpec's shorthands say, plain methods draft nothing
    at any length, and every flag of an entry has a translator."""
    for kind, e in ENTRIES.items():
        assert e.kind == kind and e.runner in RUNNERS
        spec = parse_method(kind) if kind not in ("draft", "hf-draft", "ssd") else None
        if spec is not None:
            assert spec.kind == kind
            assert e.peer == (spec.hf or spec.llama)
        assert not (e.plain and (e.own_gamma is not ENTRIES[REFERENCE].own_gamma or e.auto_gamma))
        assert bool(e.flags) == (e.from_flags is not None), kind
        if e.compare_with is not None:
            assert e.compare_with in ENTRIES
    assert ENTRIES[REFERENCE].plain and ENTRIES[REFERENCE].runner == "engine"
    with pytest.raises(ValueError, match="runner"):
        type(ENTRIES["ar"])("x", "x", "x", ENTRIES["ar"].parse, ENTRIES["ar"].build, runner="gpu")


def test_entry_capabilities_of_the_families():
    assert entry_of("ssd").remote and entry_of("ssd").fixed_gamma and not entry_of("ssd").peer
    assert all(entry_of(k).peer for k in ("hf-ngram", "hf-draft", "hf-early-exit", "llama-ar", "llama-pld"))
    assert not entry_of("hf-draft").fixed_gamma  # HF assisted generation: auto = HF's own schedule
    assert entry_of("llama-ar").plain and not entry_of("llama-pld").plain
    hierarchy = entry_of("hierarchy")
    assert hierarchy.planned(parse_method("hierarchy"))
    assert not hierarchy.planned(parse_method("hierarchy:ngram+small@2"))
    hispec = parse_method("hispec:4/8/3/6")
    assert entry_of(hispec).own_gamma(hispec) == 6
    assert entry_of(hispec).heads(hispec) == [(4, None), (8, None)]
    tree = parse_method("eagle-tree:3/2/6")
    assert entry_of(tree).own_gamma(tree) == 3
    assert entry_of("hf-early-exit").heads(parse_method("hf-early-exit:8")) == []  # HF's own layers


# ------------------------------------------------------------------------------ draft lengths
def test_ssd_budget_is_checked_at_the_lengths_that_run():
    """γ auto is the entry's fixed length for SSD in `generate` (AUTO_K_MAX: budget >= 9), and no
    bench cell of SSD runs at auto: a bench with --gammas auto,3 needs a budget >= 4 only (it
    used to be refused at γ = 0 by run_bench although no such cell existed)."""
    m = parse_method("ssd:small/budget=6")
    with pytest.raises(MethodError, match="with γ = 8: budget"):
        check_gammas(m, [0])
    check_gammas(m, [3])
    assert method_gammas(m, [0, 3]) == [3]
    check_gammas(m, method_gammas(m, [0, 3]))
    with pytest.raises(MethodError, match="with γ = 6: budget"):
        check_gammas(m, method_gammas(m, [0, 6]))


def test_run_bench_checks_ssd_with_auto_in_the_gammas(tmp_path):
    target, draft = make_tiny_pair(vocab_size=32, seed=3, dtype=torch.float32, max_length=64)
    m = parse_method(f"ssd:{tmp_path}")
    cfg = BenchConfig(out=tmp_path / "o", methods=[parse_method("ar"), m], gammas=[0, 3])
    check_methods(cfg, target, {str(tmp_path): draft}, {})  # no error: SSD runs at γ = 3 only
    assert {c.gamma for c in plan_cells(cfg) if c.method == m} == {3}


def test_cells_follow_the_entries():
    cfg = BenchConfig(
        out=Path("unused"),
        methods=[parse_method(t) for t in ("ar", "ngram", "hispec", "hierarchy", "hf-ngram", "llama-ar")],
        temperatures=[0.0, 1.0],
        gammas=[0, 5],
        rules=["block"],
    )
    cells = {(c.method.kind, c.temperature, c.gamma, c.rule) for c in plan_cells(cfg)}
    assert ("ar", 1.0, None, "-") in cells and ("llama-ar", 1.0, None, "-") in cells
    assert {g for k, t, g, r in cells if k == "ngram"} == {0, 5}
    assert {g for k, t, g, r in cells if k == "hispec"} == {4}  # its N_i
    assert {g for k, t, g, r in cells if k == "hierarchy"} == {5}  # planned: one cell
    assert {(g, r) for k, t, g, r in cells if k == "hf-ngram" and t > 0} == {(5, "hf")}
    assert Cell(parse_method("hierarchy"), 1.0, 5, "block").label == "hierarchy:plan/block/γplan"


def test_auto_gamma_builds_the_entrys_length(pair):
    models, path = pair
    assert build_method("ssd:" + path, models, gamma=0).gamma == 8
    assert build_method(f"draft:{path}", models, gamma=0).gamma == 8  # adaptive, up to AUTO_K_MAX


# ------------------------------------------------------------------------------ flags
def _generate_args(*extra: str) -> argparse.Namespace:
    return _build_parser().parse_args(["generate", "--prompt", "hi", *extra])


def test_every_flag_belongs_to_an_entry_and_maps_onto_its_spec(tmp_path):
    assert set(METHOD_FLAGS) == {f for e in ENTRIES.values() for f in e.flags}
    for kind, e in ENTRIES.items():
        if e.from_flags is None:
            continue
        text = spec_from_flags(_generate_args("--method", kind))
        assert parse_method(text).kind in (kind, f"{kind}-tree"), text


def test_flag_values_are_checked_by_the_spec_parser():
    """The flags only build the spec; what it names (shipped heads, exit order, level order) is
    checked once, by the parser, with the same message as a spec written out."""
    for argv, text in (
        (["--method", "hispec", "--exits", "8,4"], "hispec:8/4"),
        (["--method", "hierarchy", "--levels", "small,ngram"], "hierarchy:small+ngram"),
    ):
        with pytest.raises(MethodError) as by_flags:
            parse_method(spec_from_flags(_generate_args(*argv)))
        with pytest.raises(MethodError) as by_spec:
            parse_method(text)
        assert str(by_flags.value).split(": ", 1)[1] == str(by_spec.value).split(": ", 1)[1]


# ------------------------------------------------------------------------------ stoppable
def test_stoppable_is_declared_not_inferred():
    _, draft = make_tiny_pair(vocab_size=32, seed=3, max_length=64)

    class TakesStop:  # the signature alone does not make a drafter stoppable
        vocab_size = 32

        def propose(self, context, num_tokens, params, generator=None, *, stop=None) -> Draft:
            return Draft.empty()

        def reset(self) -> None: ...

    class Declared(TakesStop):
        stoppable = True

    assert is_stoppable(ModelDrafter(draft)) and is_stoppable(Declared())
    assert not is_stoppable(TakesStop()) and not is_stoppable(NgramDrafter())
    ModelDrafter(draft).propose(torch.tensor([[1, 2]]), 2, SamplingParams(), stop=lambda c: True)


# ------------------------------------------------------------------------------ no name tests
def _name_tests(tree: ast.AST, kinds: set[str]) -> list[int]:
    """Lines comparing a ``.kind`` / ``["kind"]`` with a method's name (or a tuple of names)."""

    def is_kind(node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute):
            return node.attr == "kind"
        return isinstance(node, ast.Subscript) and getattr(node.slice, "value", None) == "kind"

    def names(node: ast.AST) -> bool:
        items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
        return any(isinstance(x, ast.Constant) and x.value in kinds for x in items)

    return [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Compare)
        and any(is_kind(x) for x in [n.left, *n.comparators])
        and any(names(x) for x in [n.left, *n.comparators])
    ]


def test_no_method_name_tests_outside_the_registry():
    kinds = set(ENTRIES)
    planted = ast.parse('if spec.kind == "ssd" or row["kind"] in ("ar", "x"):\n    pass\n')
    assert _name_tests(planted, kinds) == [1, 1]  # negative control: the scan finds both
    found = {}
    for path in sorted((SRC / "cli").rglob("*.py")) + sorted((SRC / "bench").rglob("*.py")):
        lines = _name_tests(ast.parse(path.read_text(encoding="utf-8")), kinds)
        if lines:
            found[str(path.relative_to(SRC))] = lines
    assert found == {}
