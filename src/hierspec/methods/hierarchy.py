"""``hierarchy``: a stack of drafters (`hierspec.hierarchy`, Mohri et al.), given level by level
or planned from a calibration file (`hierspec.calibrate`, `hierspec.planner`).

    hierarchy:LEVEL+LEVEL+...     bottom first; LEVEL = ngram | suffix | MODEL[@GAMMA] (default 3)
    hierarchy:plan=CAL.json       the planner's fastest stack for that calibration
    hierarchy                     the planner's stack from the shipped SmolLM2 calibration

A planned stack runs the lengths its planner chose from the measured costs: the draft-length axis
(``--gamma``, also ``auto``) does not apply to it (`planned`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..hierarchy import build_hierarchy
from ..models.base import LanguageModel
from .lookup import lookup_drafter
from .modelset import ModelSet
from .parts import Parts
from .spec import AUTO_K_MAX, LOOKUP_LEVELS, MethodError, MethodSpec, check_model_ref, ints

__all__ = [
    "build_stack",
    "parse_hierarchy",
    "plan_as_method",
    "plan_levels",
    "planned",
    "planned_stack",
    "stack_from_flags",
]

Levels = tuple[tuple[str, int], ...]  # (ngram | suffix | model reference, gamma), bottom first


def parse_hierarchy(text: str, arg: str | None) -> MethodSpec:
    if not arg:
        return MethodSpec(text, "hierarchy")  # the planner's stack from the shipped calibration
    if arg.startswith("plan="):
        path = arg.removeprefix("plan=")
        if not os.path.isfile(path):
            raise MethodError(
                f"method {text!r}: calibration file {path!r} does not exist (write one with "
                "`hierspec calibrate --model ... --levels ... --out FILE`)"
            )
        return MethodSpec(text, "hierarchy", calibration=path)
    parts = [p.rpartition("@") if "@" in p else (p, "", "") for p in arg.split("+") if p]
    for ref, _, _ in parts[1:]:  # the shape first, then what each level names
        if ref in LOOKUP_LEVELS:
            raise MethodError(f"method {text!r}: {ref!r} can only be the bottom level")
    if all(ref in LOOKUP_LEVELS for ref, _, _ in parts):
        raise MethodError(f"method {text!r}: give at least one draft model level, e.g. hierarchy:ngram+small")
    levels = [
        (ref, 0) if ref in LOOKUP_LEVELS else (check_model_ref(text, ref), ints(text, g, (1,))[0] if g else 3)
        for ref, _, g in parts
    ]
    return MethodSpec(text, "hierarchy", levels=tuple(levels))


def planned(spec: MethodSpec) -> bool:
    """Whether the stack is the planner's (no levels given): its lengths are not an axis."""
    return not spec.levels


def plan_levels(names: Sequence[str], plan: Any) -> tuple[Levels, int]:
    """A plan (`hierspec.planner.Plan`) over the calibrated ``names`` as (levels bottom first with
    the gamma each level's own drafter proposes, the target's gamma); no levels: the target alone.

    A chain m_0 -> m_1 -> ... -> target with batch lengths n_0, n_1, ... becomes levels m_0,
    m_1, ... where level m_{i+1} drafts n_i tokens per step with level m_i (the bottom samples
    plainly: its gamma is unused) and the target verifies the last batch length."""
    if len(plan.chain) == 1:
        return (), 1
    levels = [names[i] for i in plan.chain[:-1]]
    gammas = [1, *plan.batches[:-1]]
    return tuple(zip(levels, gammas, strict=True)), plan.batches[-1]


def plan_as_method(names: Sequence[str], plan: Any) -> str:
    """The plan as explicit ``--method`` and ``--gamma`` flags (what ``hierarchy:plan=FILE``
    builds), or a line saying no draft pays."""
    levels, gamma = plan_levels(names, plan)
    if not levels:
        return "ar: no draft pays for its cost"
    if len(levels) == 1:
        name = levels[0][0]
        return f"--method {name if name in LOOKUP_LEVELS else f'draft:{name}'} --gamma {gamma}"
    stack = "+".join([levels[0][0], *(f"{n}@{g}" for n, g in levels[1:])])
    return f"--method hierarchy:{stack} --gamma {gamma}"


def planned_stack(
    calibration: str | Path, models: Sequence[LanguageModel] | None = None
) -> tuple[Levels, int, Any]:
    """The planner's fastest configuration from a calibration file (`hierspec calibrate`):
    (levels and the target's gamma as `plan_levels` gives them, the Plan). With ``models`` (the
    calibrated models, target last) the file must have been made for exactly them. No levels
    means the target alone is fastest on the calibrating host."""
    from ..calibrate import Calibration
    from ..planner import plan

    cal = Calibration.load(calibration, models)
    lookups = [i for i, name in enumerate(cal.names) if name in LOOKUP_LEVELS]  # propose, never verify
    best = plan(cal.alpha_matrix(), cal.cost, n_max=AUTO_K_MAX, top=1, bottom_only=lookups)[0]
    levels, gamma = plan_levels(cal.names, best)
    return levels, gamma, best


def _planned_levels(spec: MethodSpec, models: ModelSet) -> tuple[Levels, int, str]:
    """The planned stack for ``spec`` (its calibration file, else the shipped SmolLM2 one) and
    the note that tells the user what the planner chose and predicts."""
    from ..calibrate import Calibration
    from ..models import shipped

    if spec.calibration is None:
        if models.name not in (None, "smollm2-135m"):
            raise MethodError(
                f"method {spec.name!r}: the shipped calibration is for the embedded SmolLM2 only; "
                "calibrate this family (`hierspec calibrate --model ... --levels DRAFT,... --out CAL.json`) "
                "and run hierarchy:plan=CAL.json, or give the levels (e.g. hierarchy:ngram+DRAFT@3)"
            )
        dtype = "bfloat16" if "bfloat16" in str(models.dtype) else "float32"
        path: str | Path = shipped.calibration_path(dtype)
        calibrated = None
    else:
        path = spec.calibration
        try:
            names = Calibration.load(path).names
            drafters = [lookup_drafter(n) if n in LOOKUP_LEVELS else models.draft(n) for n in names[:-1]]
            calibrated = [*drafters, models.target]
        except ValueError as err:
            raise MethodError(f"method {spec.name!r}: {err}") from None
    try:
        levels, gamma, best = planned_stack(path, calibrated)
    except ValueError as err:
        raise MethodError(f"method {spec.name!r}: {err}") from None
    if not levels:
        note = f"the planner ({path}) predicts the target alone is fastest (no draft pays); decoding plainly"
    else:
        note = (
            f"planned stack {' -> '.join(n for n, _ in levels)} -> target, batch lengths "
            f"{','.join(map(str, best.batches))}, predicted {1e3 * best.latency:.1f} ms/token = "
            f"{best.speedup:.2f}x ({path})"
        )
    return levels, gamma, f"hierarchy: {note}"


def build_stack(spec: MethodSpec, models: ModelSet, rule: str, gamma: int) -> Parts:
    """`hierspec.hierarchy.build_hierarchy` over the levels (a lookup drafter at the bottom, if
    any); every level verifies with the run's rule (greedy at temperature 0)."""
    levels, note = spec.levels, None
    if not levels:
        levels, gamma, note = _planned_levels(spec, models)
    bottom = lookup_drafter(levels[0][0]) if levels and levels[0][0] in LOOKUP_LEVELS else None
    stack = levels[1:] if bottom is not None else levels
    drafts = [models.draft(ref) for ref, _ in stack]
    drafter = build_hierarchy(drafts, bottom, rule, [g for _, g in stack])
    return Parts(models.target, drafter, gamma, note=note)


def stack_from_flags(args: argparse.Namespace) -> str:
    """``--method hierarchy [--levels A,B,... [--gammas 2,3,...]]`` as a spec (no --levels: the
    planner's stack); the levels themselves are checked by `parse_hierarchy`."""
    if not args.levels:
        if args.gammas:
            raise MethodError("--gammas needs --levels (without --levels the planner picks both)")
        return "hierarchy"
    specs = [x.strip() for x in args.levels.split(",") if x.strip()]
    if not specs:
        raise MethodError("--levels: give the draft levels, bottom first (e.g. ngram,PATH)")
    n_models = sum(s not in LOOKUP_LEVELS for s in specs)
    try:
        gs = [int(x) for x in args.gammas.split(",")] if args.gammas else [3] * n_models
    except ValueError:
        raise MethodError(f"--gammas: expected comma-separated integers, got {args.gammas!r}") from None
    if len(gs) != n_models or min(gs, default=1) < 1:
        raise MethodError(
            f"--gammas: expected {n_models} integers >= 1 (one per draft model), got {args.gammas!r}"
        )
    gammas = iter(gs)
    return "hierarchy:" + "+".join(s if s in LOOKUP_LEVELS else f"{s}@{next(gammas)}" for s in specs)
