"""One registry for every decoding method: a method spec (``ngram``, ``draft:small``,
``hierarchy:ngram@2+small@3``, ...) -> what runs it. See `hierspec.methods.spec` for the grammar
and `hierspec.methods.registry` for the entries (one per method: parse + build)."""

from .modelset import ModelSet, backend_of, hf_module, resolve_draft
from .registry import (
    ENTRIES,
    METHOD_SYNTAX,
    SSD_OPTIONS,
    Built,
    Entry,
    build_method,
    check_runnable,
    check_ssd_gammas,
    lookup_drafter,
    needs,
    parse_method,
    planned_stack,
)
from .spec import MethodError, MethodSpec

__all__ = [
    "ENTRIES",
    "METHOD_SYNTAX",
    "SSD_OPTIONS",
    "Built",
    "Entry",
    "MethodError",
    "MethodSpec",
    "ModelSet",
    "backend_of",
    "build_method",
    "check_runnable",
    "check_ssd_gammas",
    "hf_module",
    "lookup_drafter",
    "needs",
    "parse_method",
    "planned_stack",
    "resolve_draft",
]
