"""Method specs: the one grammar that names a decoding method, shared by ``hierspec generate
--method``, ``hierspec bench --methods``, ``calibrate`` and the Python API.

    SPEC   = KIND [":" ARG]
    ar | ngram | suffix                          no argument
    draft:MODEL                                  MODEL = a catalogue or shipped name, or a path
    hierarchy[:LEVEL+LEVEL+...]                  bottom first; LEVEL = ngram | suffix | MODEL[@GAMMA]
    hierarchy:plan=FILE                          the planner's stack from a `hierspec calibrate` file
                                                 (no argument: from the shipped SmolLM2 calibration)
    early-exit[:EXIT]   hispec[:EXIT/EXIT[/Nd/Ni]]   EXIT = L | L=HEADFILE
    eagle[:HEAD]        eagle-tree[:D/K/B[:HEAD]]
    ssd:MODEL[/KEY=VALUE...]                     speculative speculative decoding options
    hf-ngram | hf-draft:MODEL | hf-early-exit[:L]    HF transformers peers (bench)
    llama-ar | llama-pld                         llama.cpp peers (bench)

A spec is parsed (`hierspec.methods.parse_method`) without loading any model: unknown kinds,
bad options and missing files are `MethodError` (a ValueError) with one line naming the method
and listing what is valid. The draft-length axis (``--gamma`` / ``--gammas``: an integer or
``auto``, the adaptive policy) is not part of the spec.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AUTO_K_MAX",
    "SSD_OPTIONS",
    "MethodError",
    "MethodSpec",
    "check_model_ref",
    "ints",
    "model_arg",
    "no_arg",
    "parse_gamma",
]


class MethodError(ValueError):
    """A method spec that cannot run: one line naming the method and what is valid."""


@dataclass(frozen=True)
class MethodSpec:
    """One parsed method: ``kind`` (a registry name) and its arguments; ``name`` is the text."""

    name: str
    kind: str
    path: str | None = None  # draft model (draft, hf-draft, ssd): a name or a path
    levels: tuple[tuple[str, int], ...] = ()  # hierarchy: (ngram | suffix | model, gamma), bottom first
    calibration: str | None = None  # hierarchy:plan=FILE: the planner's stack from this calibration
    exits: tuple[int, ...] = ()  # early-exit: (L_d,); hispec: (L_d, L_i); hf-early-exit: (L,)
    nd: int = 2  # hispec: draft tokens per draft step
    ni: int = 4  # hispec: buffered tokens per full pass (its gamma)
    ssd: tuple[tuple[str, Any], ...] = ()  # ssd: (option key, value), in given order
    tree: tuple[int, ...] = ()  # eagle-tree: (depth, topk, budget)
    head: str | None = None  # eagle / eagle-tree: head file (None = the shipped head)
    exit_heads: tuple[str | None, ...] = ()  # per exit: head file (None = the shipped head)

    @property
    def paths(self) -> list[str]:
        """Draft models this method needs loaded (names or paths)."""
        return [p for p, _ in self.levels if p not in LOOKUP_LEVELS] + ([self.path] if self.path else [])

    @property
    def hf(self) -> bool:
        """An HF transformers peer (the registry entry's ``runner`` is "hf": ask it first)."""
        return self.kind.startswith("hf-")

    @property
    def llama(self) -> bool:
        """A llama.cpp peer (the registry entry's ``runner`` is "llama": ask it first)."""
        return self.kind.startswith("llama-")

    @property
    def ssd_kwargs(self) -> dict[str, Any]:
        """The ssd options as keywords of SSDSession / SSDSession.generate."""
        return {SSD_OPTIONS[k][0]: v for k, v in self.ssd}


# ssd:NAME/KEY=VALUE -> (SSDSession.generate / SSDSession keyword, converter)
SSD_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "fanout": ("fanout", str),
    "budget": ("budget", int),
    "c": ("saguaro_c", float),
    "fallback": ("fallback", str),
    "backup": ("fast_backup", str),
    "emulate": ("emulate_verify_ms", float),
    "timeout": ("reply_timeout_s", float),
}


#: ``--gamma auto``: the adaptive policy (`hierspec.policy`) drafts 0..AUTO_K_MAX tokens per step;
#: a gamma of 0 stands for it wherever a draft length is an integer
AUTO_K_MAX = 8


def parse_gamma(text: str | int) -> int:
    """A draft length: an integer >= 1, or 'auto' (returned as 0). ValueError otherwise."""
    if str(text).strip().lower() == "auto":
        return 0
    value = int(text)
    if value < 1:
        raise ValueError(f"expected an integer >= 1 or auto, got {text!r}")
    return value


#: hierarchy levels that are model-free drafters (bottom level only)
LOOKUP_LEVELS = ("ngram", "suffix")


def ints(text: str, arg: str, n_allowed: tuple[int, ...], sep: str = "/") -> list[int]:
    """``arg`` as integers >= 1 separated by ``sep``, their count in ``n_allowed``."""
    try:
        vals = [int(x) for x in arg.split(sep)]
    except ValueError:
        raise MethodError(f"method {text!r}: expected integers separated by {sep!r}, got {arg!r}") from None
    if len(vals) not in n_allowed or any(v < 1 for v in vals):
        raise MethodError(f"method {text!r}: expected {' or '.join(map(str, n_allowed))} integers >= 1")
    return vals


def no_arg(text: str, arg: str | None) -> MethodSpec:
    """``KIND`` alone (``ar``, ``ngram``, ...): MethodError if an argument is given."""
    kind = text.partition(":")[0]
    if arg is not None:
        raise MethodError(f"method {text!r}: {kind} takes no argument")
    return MethodSpec(text, kind)


def model_arg(text: str, arg: str | None) -> MethodSpec:
    """``KIND:MODEL`` (``draft:small``, ``hf-draft:PATH``): the model reference, checked."""
    kind = text.partition(":")[0]
    if arg is None:
        raise MethodError(f"method {text!r} needs a draft model path or shipped name: {kind}:PATH")
    if not arg:
        raise MethodError(f"method {text!r}: give the draft model, e.g. {kind}:NAME or {kind}:PATH")
    return MethodSpec(text, kind, check_model_ref(text, arg))


def check_model_ref(text: str, ref: str, exists: Callable[[str], bool] = os.path.exists) -> str:
    """A draft/model reference of a spec: a shipped draft, a catalogue model or an existing path."""
    from ..models import shipped

    if ref in shipped.DRAFTS or ref in _catalogue_names():
        return ref
    if exists(ref):
        return ref
    names = ", ".join([*shipped.DRAFTS, *_catalogue_names()])
    raise MethodError(f"method {text!r}: draft path {ref!r} does not exist (known names: {names})")


def _catalogue_names() -> tuple[str, ...]:
    try:
        from ..models.catalog import CATALOG
    except ImportError:  # the catalogue is optional
        return ()
    return tuple(CATALOG)
