"""The method registry: every decoding method hierspec runs, each as ONE entry of `ENTRIES` (the
one place to look) that says how its spec is parsed and built and what callers may ask of it.

    entry   = Entry(kind, syntax, summary, parse, build, needs, runner, capabilities, flags)
    parse   : (text, arg) -> MethodSpec            no model loaded; MethodError on bad input
    build   : (spec, models, rule, gamma) -> Parts  the engine target view, drafter, loop options
    needs   : what the target must offer (``hf``: a transformers model, for its layers, hidden
              states or ``generate``; ``tree``: tree attention; ``llama``: a llama.cpp model)

Each family's parse and build functions live in a module of its own: `plain` (ar), `lookup`
(ngram, suffix), `draft`, `hierarchy`, `self_speculation` (early-exit, hispec), `eagle`, `ssd`
and `peers` (hf-*, llama-*). Adding a method = its functions in its family module, one `Entry`
below and its test. The CLI (``generate --method``), the bench (``--methods``), the server and
the Python API (`build_method`) all go through here, and ask the entry (`entry_of`) rather than
test a method's name.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..drafters.model import check_draft_sampling
from ..engine import GenerationResult, generate
from .draft import build_draft, draft_from_flags
from .eagle import build_eagle, eagle_from_flags, parse_eagle, tree_depth
from .hierarchy import build_stack, parse_hierarchy, planned, planned_stack, stack_from_flags
from .lookup import build_lookup, lookup_drafter
from .modelset import ModelSet
from .parts import Parts
from .peers import build_assisted, build_layerskip, build_own_loop, build_prompt_lookup, parse_hf_early_exit
from .plain import build_plain
from .self_speculation import (
    SELF_SPECULATION_GAMMA,
    build_early_exit,
    build_hispec,
    early_exit_from_flags,
    exit_heads,
    hispec_from_flags,
    hispec_gamma,
    parse_early_exit,
    parse_hispec,
)
from .spec import AUTO_K_MAX, SSD_OPTIONS, MethodError, MethodSpec, model_arg, no_arg
from .ssd import build_ssd, check_ssd_gammas, parse_ssd, ssd_from_flags

__all__ = [
    "ENTRIES",
    "METHOD_SYNTAX",
    "REFERENCE",
    "RUNNERS",
    "SSD_OPTIONS",
    "Built",
    "Entry",
    "build_method",
    "check_gammas",
    "check_runnable",
    "check_ssd_gammas",
    "entry_of",
    "lookup_drafter",
    "needs",
    "parse_method",
    "planned_stack",
]

#: who runs a built method: the engine's loop (`Built.generate`), an `SSDSession` (the drafter
#: in a second process), or the bench's peer runners (HF transformers, llama.cpp)
RUNNERS = ("engine", "ssd", "hf", "llama")
#: hierspec's plain decoding: the reference every speed-up and every greedy output is held against
REFERENCE = "ar"


@dataclass(kw_only=True)
class Built(Parts):
    """A method ready to run (`Parts`, see there) with its ``spec``.

    ``rule`` is the verification rule at temperature > 0 it was built with (`build_method`'s):
    the one source of truth, used by every level of a hierarchy, both HiSpec stages and the
    final verification of `generate`."""

    spec: MethodSpec
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


def _no_own_gamma(spec: MethodSpec) -> int | None:
    return None


def _not_planned(spec: MethodSpec) -> bool:
    return False


def _any_gammas(spec: MethodSpec, gammas: Sequence[int]) -> None:
    return None


def _no_heads(spec: MethodSpec) -> list[tuple[int, str | None]]:
    return []


@dataclass(frozen=True)
class Entry:
    """One decoding method: its name, grammar and help line (``kind``, ``syntax``, ``summary``),
    how its spec is parsed and built, and everything callers ask of it:

    ``needs``: what the target must offer (module docstring). ``runner``: who runs it (`RUNNERS`).
    ``plain``: it decodes without a drafter. ``fixed_gamma``: integer draft lengths only (peers,
    SSD: no adaptive length; ``auto`` is no bench cell of theirs). ``auto_gamma``: the fixed
    length ``gamma`` auto builds it with (self-speculators, SSD), None: the adaptive policy.
    ``own_gamma(spec)``: a draft length of the spec's own that replaces gamma (HiSpec's N_i, a
    tree's depth), or None. ``planned(spec)``: the lengths are a planner's (gamma is no axis).
    ``check_gammas(spec, lengths)``: MethodError unless it runs at each length. ``heads(spec)``:
    the early-exit heads it loads, [(layer, head file | None)]. ``flags``: ``generate``'s flags
    that belong to it, turned into its spec by ``from_flags(args)`` (None: the kind alone).
    ``compare_with``: the bench also reports its speed-up over this kind with the same draft.
    ``draft_sampling``: its build takes ``draft_sampling=`` ("sample" | "greedy", how its draft
    model picks tokens at T > 0; `build_method` refuses "greedy" for the other methods)."""

    kind: str
    syntax: str
    summary: str
    parse: Callable[[str, str | None], MethodSpec]
    build: Callable[[MethodSpec, ModelSet, str, int], Parts]
    needs: frozenset[str] = frozenset()
    runner: str = "engine"
    plain: bool = False
    fixed_gamma: bool = False
    auto_gamma: int | None = None
    own_gamma: Callable[[MethodSpec], int | None] = _no_own_gamma
    planned: Callable[[MethodSpec], bool] = _not_planned
    check_gammas: Callable[[MethodSpec, Sequence[int]], None] = _any_gammas
    heads: Callable[[MethodSpec], list[tuple[int, str | None]]] = _no_heads
    flags: tuple[str, ...] = ()
    from_flags: Callable[[argparse.Namespace], str] | None = None
    compare_with: str | None = None
    draft_sampling: bool = False  # its build takes ``draft_sampling=`` (a draft model's choice)
    batched: bool = False  # the server's batching worker runs it (no drafter, or a model-free one)

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"runner: expected one of {', '.join(RUNNERS)}, got {self.runner!r}")

    @property
    def peer(self) -> bool:
        """Run by the bench's peer runners (HF transformers, llama.cpp), not a hierspec method."""
        return self.runner in ("hf", "llama")

    @property
    def remote(self) -> bool:
        """Its drafter runs in a second process (a session per draft): not served, not batched."""
        return self.runner == "ssd"


ENTRIES: dict[str, Entry] = {
    e.kind: e
    for e in (
        Entry("ar", "ar", "plain decoding", no_arg, build_plain, plain=True, batched=True),
        Entry("ngram", "ngram", "prompt lookup (n = 3..1)", no_arg, build_lookup, batched=True),
        Entry(
            "suffix",
            "suffix",
            "suffix decoding over the prompt and earlier outputs",
            no_arg,
            build_lookup,
            batched=True,
        ),
        Entry(
            "draft",
            "draft:MODEL",
            "a draft model",
            model_arg,
            build_draft,
            flags=("draft",),
            draft_sampling=True,
            from_flags=draft_from_flags,
        ),
        Entry(
            "hierarchy",
            "hierarchy[:LEVEL+LEVEL+... | :plan=CAL.json] (bottom first; LEVEL = ngram|suffix|MODEL[@GAMMA])",
            "a stack of drafters (Mohri et al.); plan=FILE or no levels: the planner's stack",
            parse_hierarchy,
            build_stack,
            planned=planned,
            flags=("levels", "gammas"),
            from_flags=stack_from_flags,
        ),
        Entry(
            "early-exit",
            "early-exit[:L | :L=HEAD]",
            "self-speculation from an early exit",
            parse_early_exit,
            build_early_exit,
            frozenset({"hf"}),
            auto_gamma=SELF_SPECULATION_GAMMA,
            heads=exit_heads,
            flags=("exits",),
            from_flags=early_exit_from_flags,
        ),
        Entry(
            "hispec",
            "hispec[:Ld/Li[/Nd/Ni]]",
            "draft exit -> intermediate exit -> full model (HiSpec)",
            parse_hispec,
            build_hispec,
            frozenset({"hf"}),
            auto_gamma=SELF_SPECULATION_GAMMA,
            own_gamma=hispec_gamma,
            heads=exit_heads,
            flags=("exits",),
            from_flags=hispec_from_flags,
        ),
        Entry(
            "eagle",
            "eagle[:HEAD]",
            "EAGLE feature-level head, chain",
            parse_eagle,
            build_eagle,
            frozenset({"hf"}),
            flags=("eagle", "tree"),
            from_flags=eagle_from_flags,
        ),
        Entry(
            "eagle-tree",
            "eagle-tree[:D/K/B[:HEAD]]",
            "EAGLE-2 dynamic tree in one target forward",
            parse_eagle,
            build_eagle,
            frozenset({"hf", "tree"}),
            own_gamma=tree_depth,
        ),
        Entry(
            "ssd",
            "ssd:MODEL[/fanout=uniform|geometric][/budget=B][/c=C][/fallback=jit|fast][/backup=ngram|random]"
            "[/emulate=MS][/timeout=S]",
            "speculative speculative decoding (Saguaro), drafter in a second process",
            parse_ssd,
            build_ssd,
            runner="ssd",
            fixed_gamma=True,
            auto_gamma=AUTO_K_MAX,
            check_gammas=check_ssd_gammas,
            flags=("draft",),
            from_flags=ssd_from_flags,
            compare_with="draft",
        ),
        Entry(
            "hf-ngram",
            "hf-ngram",
            "HF transformers prompt lookup",
            no_arg,
            build_prompt_lookup,
            frozenset({"hf"}),
            "hf",
            fixed_gamma=True,
        ),
        Entry(
            "hf-draft",
            "hf-draft:MODEL",
            "HF transformers assisted generation",
            model_arg,
            build_assisted,
            frozenset({"hf"}),
            "hf",
        ),
        Entry(
            "hf-early-exit",
            "hf-early-exit[:L]",
            "HF transformers LayerSkip self-speculation",
            parse_hf_early_exit,
            build_layerskip,
            frozenset({"hf"}),
            "hf",
            fixed_gamma=True,
        ),
        Entry(
            "llama-ar",
            "llama-ar",
            "llama.cpp's own generate loop",
            no_arg,
            build_own_loop,
            frozenset({"llama"}),
            "llama",
            plain=True,
        ),
        Entry(
            "llama-pld",
            "llama-pld",
            "llama-cpp-python's prompt-lookup decoding",
            no_arg,
            build_prompt_lookup,
            frozenset({"llama"}),
            "llama",
            fixed_gamma=True,
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


def entry_of(spec: MethodSpec | str) -> Entry:
    """The registry entry of a method spec (or of a kind)."""
    return ENTRIES[spec if isinstance(spec, str) else spec.kind]


def check_gammas(spec: MethodSpec, gammas: Sequence[int]) -> None:
    """MethodError unless ``spec`` runs at every draft length in ``gammas`` (0 = auto, which is
    the entry's ``auto_gamma`` where it has one, else up to `AUTO_K_MAX`)."""
    e = entry_of(spec)
    e.check_gammas(spec, [g or e.auto_gamma or AUTO_K_MAX for g in gammas])


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


def build_method(
    spec: MethodSpec | str,
    models: ModelSet,
    *,
    rule: str = "block",
    gamma: int = 5,
    draft_sampling: str = "sample",
) -> Built:
    """Build ``spec`` on ``models``: ``rule`` verifies at temperature > 0 (every level of a
    hierarchy and both HiSpec stages), ``gamma`` draft tokens per step (methods with their own
    block size, e.g. HiSpec's N_i or a tree's depth, override it). ``gamma=0`` (``auto``) wraps
    the drafter in `hierspec.policy.AdaptiveDrafter` over the target's measured cost curve
    (`hierspec.costs.cost_curve`, cached per host), drafting 0..AUTO_K_MAX tokens per step; an
    entry with an ``auto_gamma`` (early exit, HiSpec, SSD) keeps that fixed length there, and a
    planned hierarchy the lengths its planner chose from the measured costs."""
    if isinstance(spec, str):
        spec = parse_method(spec)
    check_runnable(spec, models.backend)
    check_draft_sampling(draft_sampling, "draft_sampling")
    e = ENTRIES[spec.kind]
    if draft_sampling != "sample" and not e.draft_sampling:
        takes = ", ".join(k for k, x in ENTRIES.items() if x.draft_sampling)
        raise MethodError(
            f"method {spec.name!r}: draft sampling {draft_sampling!r} applies to methods with a draft "
            f"model that samples ({takes}); {spec.kind} has none"
        )
    kw = {"draft_sampling": draft_sampling} if e.draft_sampling else {}
    return Built(**vars(_build(spec, models, rule, gamma, **kw)), spec=spec, rule=rule)


def _build(spec: MethodSpec, models: ModelSet, rule: str, gamma: int, **kw: Any) -> Parts:
    """The entry's build at the draft length ``gamma`` means (see `build_method`)."""
    e = ENTRIES[spec.kind]
    if gamma:
        return e.build(spec, models, rule, gamma, **kw)
    if e.auto_gamma is not None:  # their own loop and block size: a fixed length
        return e.build(spec, models, rule, e.auto_gamma, **kw)
    parts = e.build(spec, models, rule, AUTO_K_MAX, **kw)
    if e.planned(spec):  # lengths already chosen from costs
        return parts
    if parts.drafter is not None and parts.tree is None and e.runner == "engine":
        from ..costs import cost_curve
        from ..policy import AdaptiveDrafter

        parts.drafter = AdaptiveDrafter(parts.drafter, cost_curve(parts.target), k_max=parts.gamma)
    return parts
