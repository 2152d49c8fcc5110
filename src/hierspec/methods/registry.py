"""The method registry: every decoding method hierspec runs, each as ONE entry here that says how
its spec is parsed and how it is built on a loaded `ModelSet`.

    entry   = Entry(kind, syntax, summary, parse, build, needs)
    parse   : (text, arg) -> MethodSpec            no model loaded; MethodError on bad input
    build   : (spec, models, rule, gamma) -> Built  the engine target view, drafter, loop options
    needs   : what the target must offer (``hf``: a transformers model, for its layers, hidden
              states or ``generate``; ``tree``: tree attention)

Adding a method = writing its parse and build functions and one `Entry` in `ENTRIES` below. The
CLI (``generate --method``), the bench (``--methods``) and the Python API (`build_method`) all go
through here. Peers (``hf-*``, ``llama-*``) are built here too but run by the bench's peer runners.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..drafters import NgramDrafter
from ..drafters.model import ModelDrafter
from ..engine import GenerationResult, generate
from ..models.base import LanguageModel
from .modelset import ModelSet
from .spec import AUTO_K_MAX, LOOKUP_LEVELS, SSD_OPTIONS, MethodError, MethodSpec, check_model_ref, ints

__all__ = [
    "ENTRIES",
    "METHOD_SYNTAX",
    "SSD_OPTIONS",
    "Built",
    "Entry",
    "build_method",
    "lookup_drafter",
    "needs",
    "parse_method",
]


@dataclass
class Built:
    """A method ready to run: the engine's ``target`` view and ``drafter`` with ``gamma`` draft
    tokens per step (a ``tree`` shape for tree methods), or a self-speculative ``system`` with
    its own loop; ``options`` hold what peer / SSD runners need; ``note`` is shown to the user.

    ``rule`` is the verification rule at temperature > 0 it was built with (`build_method`'s):
    the one source of truth, used by every level of a hierarchy, both HiSpec stages and the
    final verification of `generate`."""

    spec: MethodSpec
    target: Any
    drafter: Any = None
    gamma: int = 1
    tree: Any = None
    system: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    note: str | None = None
    rule: str = "block"

    def generate(self, prompt_ids: Sequence[int], **kwargs: Any) -> GenerationResult:
        """`hierspec.engine.generate` (or the system's own loop) with this method and its
        ``rule``; ``kwargs`` are generate's (params, max_new_tokens, eos_token_id, stop_strings,
        tokenizer, seed, ...). A ``rule=`` other than the built one is a ValueError (rebuild with
        ``build_method(..., rule=...)``): the drafter's own levels were built with it."""
        rule = kwargs.pop("rule", self.rule)
        if rule != self.rule:
            raise ValueError(
                f"rule: method {self.spec.name!r} was built to verify with {self.rule!r} "
                f"(build_method(..., rule=...)); got {rule!r}"
            )
        if self.system is not None:
            return self.system.generate(prompt_ids, rule=rule, **kwargs)
        kw = dict(drafter=self.drafter, gamma=self.gamma, tree=self.tree, rule=rule)
        return generate(self.target, prompt_ids, **kw, **kwargs)


@dataclass(frozen=True)
class Entry:
    kind: str
    syntax: str
    summary: str
    parse: Callable[[str, str | None], MethodSpec]
    build: Callable[[MethodSpec, ModelSet, str, int], Built]
    needs: frozenset[str] = frozenset()
    runner: str = "engine"  # engine | ssd | hf | llama


# ----------------------------------------------------------------------------- parse helpers
def _no_arg(text: str, arg: str | None, kind: str) -> MethodSpec:
    if arg is not None:
        raise MethodError(f"method {text!r}: {kind} takes no argument")
    return MethodSpec(text, kind)


def _model_arg(text: str, arg: str | None, kind: str) -> MethodSpec:
    if arg is None:
        raise MethodError(f"method {text!r} needs a draft model path or shipped name: {kind}:PATH")
    if not arg:
        raise MethodError(f"method {text!r}: give the draft model, e.g. {kind}:NAME or {kind}:PATH")
    return MethodSpec(text, kind, check_model_ref(text, arg))


def _exit(text: str, part: str) -> tuple[int, str | None]:
    """``L`` or ``L=HEADFILE``: a shipped head at layer L, or a head file of one's own."""
    from ..models import shipped

    layer, _, path = part.partition("=")
    e = ints(text, layer, (1,))[0]
    if path and not os.path.isfile(path):
        raise MethodError(f"method {text!r}: head file {path!r} does not exist")
    if not path and e not in shipped.EXIT_HEADS:
        raise MethodError(
            f"method {text!r}: no shipped early-exit head at layer {e} (shipped: "
            f"{', '.join(map(str, shipped.EXIT_HEADS))}); give L=HEADFILE for a head of your own"
        )
    return e, path or None


# ----------------------------------------------------------------------------- plain, lookup
def _build_plain(spec: MethodSpec, models: ModelSet, rule: str, gamma: int) -> Built:
    return Built(spec, models.target, None, 1)


def lookup_drafter(kind: str) -> Any:
    """A fresh model-free drafter: ``suffix`` (suffix decoding) or ``ngram`` (prompt lookup)."""
    if kind == "suffix":
        from ..drafters.suffix import SuffixDrafter

        return SuffixDrafter()
    return NgramDrafter()


def _build_lookup(spec: MethodSpec, models: ModelSet, rule: str, gamma: int) -> Built:
    return Built(spec, models.target, lookup_drafter(spec.kind), gamma)


# ----------------------------------------------------------------------------- draft models
def _build_draft(spec: MethodSpec, models: ModelSet, rule: str, gamma: int) -> Built:
    return Built(spec, models.target, ModelDrafter(models.draft(spec.path)), gamma)


def _parse_hierarchy(text: str, arg: str | None) -> MethodSpec:
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
    levels = []
    for i, part in enumerate(x for x in arg.split("+") if x):
        ref, _, g = part.rpartition("@") if "@" in part else (part, "", "")
        if ref in LOOKUP_LEVELS:
            if i:
                raise MethodError(f"method {text!r}: {ref!r} can only be the bottom level")
            levels.append((ref, 0))
        else:
            levels.append((check_model_ref(text, ref), ints(text, g, (1,))[0] if g else 3))
    if not any(p not in LOOKUP_LEVELS for p, _ in levels):
        raise MethodError(f"method {text!r}: give at least one draft model level, e.g. hierarchy:ngram+small")
    return MethodSpec(text, "hierarchy", levels=tuple(levels))


def planned_stack(
    calibration: str | Path, models: Sequence[LanguageModel] | None = None
) -> tuple[tuple[tuple[str, int], ...], int, Any]:
    """The planner's fastest configuration from a calibration file (`hierspec calibrate`):
    (levels bottom first with the gamma each level's own drafter proposes, the target's gamma,
    the Plan). With ``models`` (the calibrated models, target last) the file must have been made
    for exactly them. No levels means the target alone is fastest on the calibrating host.

    A chain m_0 -> m_1 -> ... -> target with batch lengths n_0, n_1, ... becomes levels m_0,
    m_1, ... where level m_{i+1} drafts n_i tokens per step with level m_i (the bottom samples
    plainly) and the target verifies the last batch length."""
    from ..calibrate import Calibration
    from ..planner import plan

    cal = Calibration.load(calibration, models)
    lookups = [i for i, name in enumerate(cal.names) if name in LOOKUP_LEVELS]  # propose, never verify
    best = plan(cal.alpha_matrix(), cal.cost, n_max=AUTO_K_MAX, top=1, bottom_only=lookups)[0]
    if len(best.chain) == 1:
        return (), 1, best
    names = [cal.names[i] for i in best.chain[:-1]]
    gammas = [1, *best.batches[:-1]]  # the bottom level has no drafter: its gamma is unused
    return tuple(zip(names, gammas, strict=True)), best.batches[-1], best


def _planned_levels(spec: MethodSpec, models: ModelSet) -> tuple[tuple[tuple[str, int], ...], int, str]:
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


def _build_hierarchy(spec: MethodSpec, models: ModelSet, rule: str, gamma: int) -> Built:
    from ..hierarchy import SpeculativeDrafter

    levels, note = spec.levels, None
    if not levels:
        levels, gamma, note = _planned_levels(spec, models)
    drafter = None
    for ref, g in levels:
        if ref in LOOKUP_LEVELS:
            drafter = lookup_drafter(ref)
        else:  # every level verifies with the run's rule (greedy at temperature 0)
            drafter = SpeculativeDrafter(models.draft(ref), drafter, rule=rule, gamma=g)
    return Built(spec, models.target, drafter, gamma, note=note)


# ----------------------------------------------------------------------------- self-speculation
def _parse_early_exit(text: str, arg: str | None) -> MethodSpec:
    from ..models import shipped

    e, path = _exit(text, arg) if arg else (shipped.DEFAULT_EXITS[0], None)
    return MethodSpec(text, "early-exit", exits=(e,), exit_heads=(path,))


def _parse_hispec(text: str, arg: str | None) -> MethodSpec:
    from ..models import shipped

    # split at '/' before a number, so a head file path (L=PATH) may hold '/' itself
    parts = re.split(r"/(?=\d+(?:=|/|$))", arg) if arg else [str(e) for e in shipped.DEFAULT_EXITS]
    if len(parts) not in (2, 4):
        raise MethodError(f"method {text!r}: expected 2 or 4 integers (L_d/L_i[/N_d/N_i])")
    (ld, pd), (li, pi) = _exit(text, parts[0]), _exit(text, parts[1])
    nd, ni = ints(text, "/".join(parts[2:]), (2,)) if len(parts) == 4 else (2, 4)
    if not ld < li:
        raise MethodError(f"method {text!r}: the draft exit must come before the intermediate exit")
    return MethodSpec(text, "hispec", exits=(ld, li), nd=nd, ni=ni, exit_heads=(pd, pi))


def _heads(spec: MethodSpec, models: ModelSet) -> list[Any]:
    paths = spec.exit_heads or (None,) * len(spec.exits)
    return [models.exit_head(e, p) for e, p in zip(spec.exits, paths, strict=True)]


def _build_early_exit(spec: MethodSpec, models: ModelSet, rule: str, gamma: int) -> Built:
    from ..hispec import build_early_exit_spec

    system = build_early_exit_spec(models.hf, _heads(spec, models)[0], gamma=gamma, rule=rule)
    return Built(spec, system.target, system.drafter, system.gamma, system=system)


def _build_hispec(spec: MethodSpec, models: ModelSet, rule: str, gamma: int) -> Built:
    from ..hispec import build_hispec

    d, i = _heads(spec, models)
    system = build_hispec(models.hf, d, i, nd=spec.nd, ni=spec.ni, rule=rule)
    return Built(spec, system.target, system.drafter, system.gamma, system=system)


# ----------------------------------------------------------------------------- EAGLE
def _parse_eagle(text: str, arg: str | None) -> MethodSpec:
    kind, tree = "eagle", ()
    if text.startswith("eagle-tree"):
        kind = "eagle-tree"
        shape, _, arg = arg.partition(":") if arg and arg[0].isdigit() else ("", "", arg)
        tree = tuple(ints(text, shape, (3,))) if shape else (5, 4, 16)
    if arg and not os.path.isfile(arg):
        raise MethodError(f"method {text!r}: EAGLE head file {arg} does not exist")
    return MethodSpec(text, kind, tree=tree, head=arg or None)


def _build_eagle(spec: MethodSpec, models: ModelSet, rule: str, gamma: int) -> Built:
    from ..drafters.base import TreeSpec
    from ..drafters.eagle import EagleDrafter

    drafter = EagleDrafter(models.eagle(spec.head))
    if spec.tree:
        tree = TreeSpec(*spec.tree)
        return Built(spec, models.target, drafter, tree.depth, tree=tree)
    return Built(spec, models.target, drafter, gamma)


# ----------------------------------------------------------------------------- SSD
def _parse_ssd(text: str, arg: str | None) -> MethodSpec:
    """``ssd:NAME[/KEY=VALUE...]``: the trailing parts holding '=' are options, the rest the draft."""
    from ..ssd.options import FALLBACKS, FAST_BACKUPS
    from ..ssd.saguaro import FANOUTS, check_saguaro_c

    parts = (arg or "").split("/")
    opts: list[tuple[str, Any]] = []
    while len(parts) > 1 and "=" in parts[-1]:
        key, _, val = parts.pop().partition("=")
        if key not in SSD_OPTIONS:
            raise MethodError(f"method {text!r}: unknown SSD option {key!r}; valid: {', '.join(SSD_OPTIONS)}")
        if any(k == key for k, _ in opts):
            raise MethodError(f"method {text!r}: SSD option {key!r} given twice")
        try:
            value = SSD_OPTIONS[key][1](val)
        except ValueError:
            raise MethodError(f"method {text!r}: SSD option {key}={val!r} is not a valid number") from None
        choices = {"fanout": FANOUTS, "fallback": FALLBACKS, "backup": FAST_BACKUPS}.get(key)
        problem = None
        if choices is not None and value not in choices:
            problem = f"expected one of {', '.join(choices)}"
        elif key == "budget" and value < 2:
            problem = "expected an integer >= gamma + 1"
        elif key in ("emulate", "timeout") and (
            not math.isfinite(value) or value < 0 or (key == "timeout" and value == 0)
        ):
            problem = "expected a finite number " + (">= 0" if key == "emulate" else "> 0")
        elif key == "c":
            try:
                check_saguaro_c(value)
            except ValueError:
                problem = "expected a number in (0, 1]"
        if problem:
            raise MethodError(f"method {text!r}: SSD option {key}={val}: {problem}")
        opts.insert(0, (key, value))
    name = "/".join(parts)
    if arg is None:
        raise MethodError(f"method {text!r} needs a draft model path or shipped name: ssd:PATH")
    if not name:
        raise MethodError(f"method {text!r}: give the draft model, e.g. ssd:small or ssd:PATH/budget=16")
    return MethodSpec(text, "ssd", check_model_ref(text, name), ssd=tuple(opts))


def check_ssd_gammas(m: MethodSpec, gammas: Sequence[int]) -> None:
    """MethodError unless the SSD options of ``m`` are valid with every γ (budget >= γ + 1)."""
    from ..ssd.options import SSDOptions

    gen = {k: v for k, v in m.ssd_kwargs.items() if k not in ("emulate_verify_ms", "reply_timeout_s")}
    for g in gammas:
        try:
            SSDOptions(gamma=g, **gen)
        except ValueError as err:
            raise MethodError(f"method {m.name!r} with γ = {g}: {err}") from None


def _build_ssd(spec: MethodSpec, models: ModelSet, rule: str, gamma: int) -> Built:
    """The verifier side; the speculator process re-creates the draft with the one loader."""
    from ..ssd.draft_spec import DraftSpec
    from .modelset import resolve_draft

    kw = {k: v for k, v in spec.ssd_kwargs.items() if k != "reply_timeout_s"}
    timeout = spec.ssd_kwargs.get("reply_timeout_s", 60.0)
    draft = DraftSpec(resolve_draft(spec.path), models.dtype)
    return Built(
        spec, models.target, None, gamma, options={"draft": draft, "generate": kw, "timeout": timeout}
    )


# ----------------------------------------------------------------------------- peers
def _parse_hf_early_exit(text: str, arg: str | None) -> MethodSpec:
    from ..models import shipped

    return MethodSpec(
        text, "hf-early-exit", exits=tuple(ints(text, arg, (1,)) if arg else [shipped.DEFAULT_EXITS[0]])
    )


def _build_peer(spec: MethodSpec, models: ModelSet, rule: str, gamma: int) -> Built:
    """HF / llama.cpp peers: the bench's peer runners read ``options``."""
    options: dict[str, Any] = {}
    if spec.kind == "hf-draft":
        options["assistant"] = models.draft(spec.path)
    return Built(spec, models.target, None, gamma, options=options)


ENTRIES: dict[str, Entry] = {
    e.kind: e
    for e in (
        Entry("ar", "ar", "plain decoding", lambda t, a: _no_arg(t, a, "ar"), _build_plain),
        Entry(
            "ngram", "ngram", "prompt lookup (n = 3..1)", lambda t, a: _no_arg(t, a, "ngram"), _build_lookup
        ),
        Entry(
            "suffix",
            "suffix",
            "suffix decoding over the prompt and earlier outputs",
            lambda t, a: _no_arg(t, a, "suffix"),
            _build_lookup,
        ),
        Entry("draft", "draft:MODEL", "a draft model", lambda t, a: _model_arg(t, a, "draft"), _build_draft),
        Entry(
            "hierarchy",
            "hierarchy[:LEVEL+LEVEL+... | :plan=CAL.json] (bottom first; LEVEL = ngram|suffix|MODEL[@GAMMA])",
            "a stack of drafters (Mohri et al.); plan=FILE or no levels: the planner's stack",
            _parse_hierarchy,
            _build_hierarchy,
        ),
        Entry(
            "early-exit",
            "early-exit[:L | :L=HEAD]",
            "self-speculation from an early exit",
            _parse_early_exit,
            _build_early_exit,
            frozenset({"hf"}),
        ),
        Entry(
            "hispec",
            "hispec[:Ld/Li[/Nd/Ni]]",
            "draft exit -> intermediate exit -> full model (HiSpec)",
            _parse_hispec,
            _build_hispec,
            frozenset({"hf"}),
        ),
        Entry(
            "eagle",
            "eagle[:HEAD]",
            "EAGLE feature-level head, chain",
            _parse_eagle,
            _build_eagle,
            frozenset({"hf"}),
        ),
        Entry(
            "eagle-tree",
            "eagle-tree[:D/K/B[:HEAD]]",
            "EAGLE-2 dynamic tree in one target forward",
            _parse_eagle,
            _build_eagle,
            frozenset({"hf", "tree"}),
        ),
        Entry(
            "ssd",
            "ssd:MODEL[/fanout=uniform|geometric][/budget=B][/c=C][/fallback=jit|fast][/backup=ngram|random]"
            "[/emulate=MS][/timeout=S]",
            "speculative speculative decoding (Saguaro), drafter in a second process",
            _parse_ssd,
            _build_ssd,
            runner="ssd",
        ),
        Entry(
            "hf-ngram",
            "hf-ngram",
            "HF transformers prompt lookup",
            lambda t, a: _no_arg(t, a, "hf-ngram"),
            _build_peer,
            frozenset({"hf"}),
            "hf",
        ),
        Entry(
            "hf-draft",
            "hf-draft:MODEL",
            "HF transformers assisted generation",
            lambda t, a: _model_arg(t, a, "hf-draft"),
            _build_peer,
            frozenset({"hf"}),
            "hf",
        ),
        Entry(
            "hf-early-exit",
            "hf-early-exit[:L]",
            "HF transformers LayerSkip self-speculation",
            _parse_hf_early_exit,
            _build_peer,
            frozenset({"hf"}),
            "hf",
        ),
        Entry(
            "llama-ar",
            "llama-ar",
            "llama.cpp's own generate loop",
            lambda t, a: _no_arg(t, a, "llama-ar"),
            _build_peer,
            frozenset({"llama"}),
            "llama",
        ),
        Entry(
            "llama-pld",
            "llama-pld",
            "llama-cpp-python's prompt-lookup decoding",
            lambda t, a: _no_arg(t, a, "llama-pld"),
            _build_peer,
            frozenset({"llama"}),
            "llama",
        ),
    )
}
METHOD_SYNTAX = ", ".join(e.syntax for e in ENTRIES.values())


def parse_method(text: str) -> MethodSpec:
    """One method spec (see `hierspec.methods.spec`) -> MethodSpec; MethodError on bad input."""
    text = text.strip()
    kind, sep, arg = text.partition(":")
    entry = ENTRIES.get(kind)
    if entry is None:
        raise MethodError(f"unknown method {text!r}; valid methods: {METHOD_SYNTAX}")
    return entry.parse(text, arg if sep else None)


CAPABILITY_HINTS = {
    "hf": "a transformers model (--backend torch)",
    "tree": "tree attention (--backend torch)",
    "llama": "a llama.cpp model (--backend llama.cpp)",
}


def needs(specs: Sequence[MethodSpec]) -> dict[str, frozenset[str]]:
    """What each method needs of the target (for `hierspec.models.open.open_target`)."""
    return {s.name: ENTRIES[s.kind].needs for s in specs}


def check_runnable(spec: MethodSpec, backend: str) -> None:
    """MethodError if ``spec`` needs what the ``backend`` ('torch' | 'llama.cpp') cannot give."""
    have = {"hf", "tree"} if backend == "torch" else {"llama"}
    missing = sorted(ENTRIES[spec.kind].needs - have)
    if missing:
        runs = [k for k, e in ENTRIES.items() if e.needs <= have]
        raise MethodError(
            f"method {spec.name!r} needs {' and '.join(CAPABILITY_HINTS[m] for m in missing)}, "
            f"which the {backend} backend does not have; on {backend}: {', '.join(runs)}"
        )


#: methods that run their own loop over views of one model (HiSpec, early exit): ``gamma=0``
#: (auto) gives them this fixed draft length (HiSpec uses its N_i either way)
SELF_SPECULATORS = ("early-exit", "hispec")
SELF_SPECULATION_GAMMA = 4


def build_method(spec: MethodSpec | str, models: ModelSet, *, rule: str = "block", gamma: int = 5) -> Built:
    """Build ``spec`` on ``models``: ``rule`` verifies at temperature > 0 (every level of a
    hierarchy and both HiSpec stages), ``gamma`` draft tokens per step (methods with their own
    block size, e.g. HiSpec's N_i or a tree's depth, override it). ``gamma=0`` (``auto``) wraps
    the drafter in `hierspec.policy.AdaptiveDrafter` over the target's measured cost curve
    (`hierspec.costs.cost_curve`, cached per host), drafting 0..AUTO_K_MAX tokens per step; the
    self-speculators (early exit, HiSpec) keep a fixed length there (`SELF_SPECULATION_GAMMA`),
    and a planned hierarchy the lengths its planner chose from the measured costs."""
    if isinstance(spec, str):
        spec = parse_method(spec)
    check_runnable(spec, models.backend)
    built = _build(spec, models, rule, gamma)
    built.rule = rule
    return built


def _build(spec: MethodSpec, models: ModelSet, rule: str, gamma: int) -> Built:
    """The entry's build at the draft length ``gamma`` means (see `build_method`)."""
    if gamma:
        return ENTRIES[spec.kind].build(spec, models, rule, gamma)
    if spec.kind in SELF_SPECULATORS:  # their own loop and block size: a fixed length
        return ENTRIES[spec.kind].build(spec, models, rule, SELF_SPECULATION_GAMMA)
    if spec.kind == "hierarchy" and not spec.levels:  # planned: lengths already chosen from costs
        return ENTRIES[spec.kind].build(spec, models, rule, AUTO_K_MAX)
    built = ENTRIES[spec.kind].build(spec, models, rule, AUTO_K_MAX)
    if built.drafter is not None and built.tree is None and ENTRIES[spec.kind].runner == "engine":
        from ..costs import cost_curve
        from ..policy import AdaptiveDrafter

        built.drafter = AdaptiveDrafter(built.drafter, cost_curve(built.target), k_max=built.gamma)
    return built
