"""One registry for every decoding method: a method spec (``ngram``, ``draft:small``,
``hierarchy:ngram@2+small@3``, ...) -> what runs it. See `hierspec.methods.spec` for the grammar,
`hierspec.methods.registry` for the entries (the one table: parse, build and what callers ask of
each method) and one module per method family (`plain`, `lookup`, `draft`, `hierarchy`,
`self_speculation`, `eagle`, `ssd`, `peers`) for their parse and build functions."""

from .modelset import ModelSet, backend_of, hf_module, resolve_draft
from .registry import (
    ENTRIES,
    METHOD_SYNTAX,
    REFERENCE,
    SSD_OPTIONS,
    Built,
    Entry,
    build_method,
    check_gammas,
    check_runnable,
    check_ssd_gammas,
    entry_of,
    lookup_drafter,
    needs,
    parse_method,
    planned_stack,
)
from .spec import MethodError, MethodSpec

__all__ = [
    "ENTRIES",
    "METHOD_SYNTAX",
    "REFERENCE",
    "SSD_OPTIONS",
    "Built",
    "Entry",
    "MethodError",
    "MethodSpec",
    "ModelSet",
    "backend_of",
    "build_method",
    "check_gammas",
    "check_runnable",
    "check_ssd_gammas",
    "entry_of",
    "hf_module",
    "lookup_drafter",
    "needs",
    "parse_method",
    "planned_stack",
    "resolve_draft",
]
