"""The method registry: one grammar for `generate --method` and `bench --methods`, one place that
builds each method, clear errors listing what is available, and the adaptive draft length."""

from __future__ import annotations

import argparse

import pytest
import torch

from hierspec.cli import _build_parser
from hierspec.cli.flags import CliError, spec_from_flags
from hierspec.engine import generate
from hierspec.hierarchy import SpeculativeDrafter
from hierspec.methods import ENTRIES, MethodError, ModelSet, build_method, check_runnable, parse_method
from hierspec.models import make_tiny_pair
from hierspec.policy import AdaptiveDrafter
from hierspec.sampling import SamplingParams


def _generate_args(*extra: str) -> argparse.Namespace:
    return _build_parser().parse_args(["generate", "--prompt", "hi", *extra])


@pytest.fixture
def pair(tmp_path):
    target, draft = make_tiny_pair(vocab_size=32, seed=3, dtype=torch.float64, max_length=256)
    return ModelSet(target, drafts={str(tmp_path): draft}), str(tmp_path)


def _levels(drafter) -> list[tuple[str, object]]:
    """The stack under a hierarchy drafter, top first: (class name, model / None)."""
    out = []
    while drafter is not None:
        rule = getattr(drafter, "rule", None)
        out.append((type(drafter).__name__, getattr(rule, "name", rule), getattr(drafter, "gamma", None)))
        drafter = getattr(drafter, "inner", None)
    return out


def test_generate_flags_and_bench_string_build_the_same_stack(pair):
    models, path = pair
    text = f"hierarchy:ngram+{path}@2+{path}@3"
    flags = spec_from_flags(
        _generate_args("--method", "hierarchy", "--levels", f"ngram,{path},{path}", "--gammas", "2,3")
    )
    as_spec = spec_from_flags(_generate_args("--method", text))
    assert parse_method(flags) == parse_method(as_spec) == parse_method(text)
    a = build_method(flags, models, rule="hsd", gamma=4)
    b = build_method(text, models, rule="hsd", gamma=4)
    assert _levels(a.drafter) == _levels(b.drafter)
    # every level verifies with the run's rule (the CLI and the bench used to disagree)
    assert [r for name, r, _ in _levels(a.drafter) if name == "SpeculativeDrafter"] == ["hsd", "hsd"]
    assert isinstance(a.drafter, SpeculativeDrafter) and a.gamma == 4


@pytest.mark.parametrize(
    "argv,spec",
    [
        (["--method", "draft", "--draft", "large"], "draft:large"),
        (["--method", "hispec", "--exits", "4,8", "--nd", "3", "--ni", "6"], "hispec:4/8/3/6"),
        (["--method", "early-exit"], "early-exit:4"),
        (
            ["--method", "eagle", "--tree", "--tree-depth", "3", "--tree-topk", "2", "--tree-budget", "6"],
            "eagle-tree:3/2/6",
        ),
        (["--method", "ngram"], "ngram"),
        (["--method", "suffix"], "suffix"),
        (["--method", "hierarchy"], "hierarchy"),
    ],
)
def test_flags_map_onto_specs(argv, spec):
    assert spec_from_flags(_generate_args(*argv)) == spec
    parse_method(spec)


def test_flags_with_a_full_spec_or_another_method_are_refused():
    with pytest.raises(CliError, match=r"--draft is not used with --method draft:small"):
        spec_from_flags(_generate_args("--method", "draft:small", "--draft", "large"))
    with pytest.raises(CliError, match="--levels is not used with --method ngram"):
        spec_from_flags(_generate_args("--method", "ngram", "--levels", "small"))


def test_unknown_method_lists_every_registered_one():
    with pytest.raises(MethodError) as err:
        parse_method("beam:4")
    for kind in ENTRIES:
        assert kind in str(err.value)


def test_method_that_needs_another_backend():
    with pytest.raises(MethodError, match="needs a transformers model") as err:
        check_runnable(parse_method("hispec"), "llama.cpp")
    assert "ngram" in str(err.value) and "hispec," not in str(err.value)  # lists what runs there
    with pytest.raises(MethodError, match=r"llama\.cpp model"):
        check_runnable(parse_method("llama-pld"), "torch")
    check_runnable(parse_method("ngram"), "llama.cpp")


def test_draft_with_another_vocabulary_is_refused(tmp_path):
    target, _ = make_tiny_pair(vocab_size=32, seed=3, max_length=64)
    _, other = make_tiny_pair(vocab_size=40, seed=3, max_length=64)
    models = ModelSet(target, drafts={str(tmp_path): other})
    with pytest.raises(MethodError, match="vocabulary has 40 tokens but the target's has 32"):
        build_method(f"draft:{tmp_path}", models)


def test_every_engine_method_is_greedy_identical_to_plain_decoding(pair):
    """ar, ngram, suffix, draft and a hierarchy, at fixed and adaptive gamma, through the registry."""
    models, path = pair
    ids = [1, 5, 7, 5, 7, 5, 2, 9, 5, 7]
    kw = dict(params=SamplingParams(temperature=0.0), max_new_tokens=24, seed=0)
    ref = build_method("ar", models).generate(ids, **kw).token_ids
    for text in ("ngram", "suffix", f"draft:{path}", f"hierarchy:ngram+{path}@2"):
        for gamma in (3, 0):
            built = build_method(text, models, gamma=gamma)
            assert isinstance(built.drafter, AdaptiveDrafter) == (gamma == 0), text
            assert built.generate(ids, **kw).token_ids == ref, (text, gamma)


def test_built_generate_is_the_engine(pair):
    """`Built.generate` is exactly `engine.generate` with the built target, drafter and gamma."""
    models, path = pair
    built = build_method(f"draft:{path}", models, rule="block", gamma=3)
    kw = dict(params=SamplingParams(temperature=1.0), max_new_tokens=20, seed=7, rule="block")
    a = built.generate([1, 2, 3], **kw).token_ids
    b = generate(models.target, [1, 2, 3], drafter=built.drafter, gamma=3, **kw).token_ids
    assert a == b


def _calibration_file(tmp_path, models, path, draft_cost: float, alpha: float, fps=None):
    """A calibration of (draft, target) with the given draft cost (target: 1.0 s per decode,
    +0.05 s per extra token) and acceptance, for the models' real fingerprints."""
    from hierspec.calibrate import Calibration, fingerprint

    sizes = [1, 2, 4, 8, 9]
    cal = Calibration(
        names=[path, "target"],
        fingerprints=fps or [fingerprint(models.draft(path)), fingerprint(models.target)],
        sizes=sizes,
        costs=[[draft_cost] * len(sizes), [1.0 + 0.05 * (n - 1) for n in sizes]],
        alpha=[[1.0, alpha], [alpha, 1.0]],
        alpha_lo=[[1.0, alpha], [alpha, 1.0]],
        alpha_hi=[[1.0, alpha], [alpha, 1.0]],
        sampling="greedy",
        context=64,
        num_prompts=2,
    )
    out = tmp_path / f"cal-{draft_cost}.json"
    cal.save(out)
    return str(out)


def test_planned_hierarchy_from_a_calibration_file(pair, tmp_path, capsys):
    """hierarchy:plan=FILE builds the planner's choice for the calibrated models: a cheap, well
    aligned draft gets a drafted stack; a draft as costly as the target gets plain decoding; a
    file made for other models or a missing file is a one-line MethodError. All stay greedy
    identical to plain decoding."""
    from hierspec.cli import main

    models, path = pair
    ids = [1, 5, 7, 5, 7, 5, 2, 9, 5, 7]
    kw = dict(params=SamplingParams(temperature=0.0), max_new_tokens=24, seed=0)
    ref = build_method("ar", models).generate(ids, **kw).token_ids

    cheap = _calibration_file(tmp_path, models, path, draft_cost=0.05, alpha=0.8)
    built = build_method(f"hierarchy:plan={cheap}", models, gamma=3)
    assert isinstance(built.drafter, SpeculativeDrafter) and built.drafter.model is models.draft(path)
    assert built.gamma > 1 and "planned stack" in built.note
    assert built.generate(ids, **kw).token_ids == ref
    auto = build_method(f"hierarchy:plan={cheap}", models, gamma=0)  # auto: the planner's lengths
    assert isinstance(auto.drafter, SpeculativeDrafter) and auto.gamma == built.gamma
    assert main(["plan", "--calibration", cheap]) == 0
    assert f"--method draft:{path} --gamma {built.gamma}" in capsys.readouterr().out

    costly = _calibration_file(tmp_path, models, path, draft_cost=0.9, alpha=0.3)
    built = build_method(f"hierarchy:plan={costly}", models, gamma=0)
    assert built.drafter is None and "target alone" in built.note
    assert built.generate(ids, **kw).token_ids == ref
    assert main(["plan", "--calibration", costly]) == 0
    assert "(= ar: no draft pays for its cost)" in capsys.readouterr().out

    (tmp_path / "other").mkdir()
    other = _calibration_file(tmp_path / "other", models, path, 0.05, 0.8, fps=["0" * 16, "1" * 16])
    with pytest.raises(MethodError, match="made for other models"):
        build_method(f"hierarchy:plan={other}", models)
    with pytest.raises(MethodError, match="does not exist"):
        parse_method(f"hierarchy:plan={tmp_path / 'missing.json'}")


def test_drafts_load_in_the_targets_dtype_by_default():
    """A ModelSet without a dtype loads drafts in the target's dtype (a bf16 target gets a bf16
    draft, as `generate` and the bench do), float32 beside a llama.cpp target."""
    target, _ = make_tiny_pair(vocab_size=32, seed=3, dtype=torch.float64, max_length=64)
    assert ModelSet(target).dtype == torch.float64
    assert ModelSet(target, backend="llama.cpp").dtype == torch.float32
    assert ModelSet(target, dtype=torch.bfloat16).dtype == torch.bfloat16
