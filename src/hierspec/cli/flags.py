"""`generate`'s method flags as one method spec of `hierspec.methods` (the grammar ``bench
--methods`` uses), so both commands build the same thing from the same string:

    --method draft --draft large                      -> draft:large
    --method hierarchy --levels ngram,small --gammas 2 -> hierarchy:ngram+small@2
    --method hispec --exits 4,8 --nd 2 --ni 4          -> hispec:4/8/2/4
    --method early-exit --exits 4:HEAD                 -> early-exit:4=HEAD
    --method eagle --tree --tree-depth 3 ...           -> eagle-tree:3/K/B[:HEAD]
    --method ssd --draft small --budget 16 ...         -> ssd:small/budget=16/...

``--method SPEC`` with a full spec is taken as is (its flags must then not be given). Which flags
belong to which method, and how they become its spec, is the registry's (``Entry.flags``,
``Entry.from_flags`` in each family module); what the spec names is checked once, by its parser.
Every check runs before any model is loaded.
"""

from __future__ import annotations

import argparse
import os

from ..methods import ENTRIES, METHOD_SYNTAX, MethodError

__all__ = ["SEED_LIMIT", "CliError", "check_prompt", "check_seed", "method_type", "spec_from_flags"]

#: seeds are 0 <= seed < SEED_LIMIT: every stream seed is then a non-negative int64 (torch's
#: ``Generator.manual_seed`` takes [-2^63, 2^64) and silently remaps negative ones)
SEED_LIMIT = 2**63


class CliError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


def check_seed(seed: int, flag: str = "--seed") -> int:
    """``seed`` if 0 <= seed < 2^63 (`SEED_LIMIT`); CliError naming ``flag`` otherwise."""
    if not 0 <= seed < SEED_LIMIT:
        raise CliError(f"{flag}: expected an integer in [0, 2^63), got {seed}")
    return seed


def check_prompt(text: str, flag: str = "--prompt") -> str:
    """``text`` as valid Unicode; CliError naming ``flag`` if it is not UTF-8. Python hands argv
    bytes that are not UTF-8 over as surrogate escapes (U+DC80..U+DCFF): `os.fsencode` recovers
    the bytes, so the error shows them (a prompt is never decoded with replacement characters)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError as err:
        where = f"character {err.start}"
    try:
        return os.fsencode(text).decode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate that no byte gave (from Python, not argv)
        raise CliError(f"{flag}: not valid Unicode text (a lone surrogate at {where})") from None
    except UnicodeDecodeError as err:
        bad = err.object[err.start : err.end].hex(" ")
        raise CliError(
            f"{flag}: not valid UTF-8 (byte {bad} at byte offset {err.start}); give UTF-8 text"
        ) from None


def method_type(text: str) -> str:
    """argparse ``type`` of ``--method``: a known method kind (its spec is parsed later)."""
    if text.partition(":")[0] not in ENTRIES:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (methods: {METHOD_SYNTAX})")
    return text


def _owners(flag: str) -> list[str]:
    """The method kinds that take ``flag`` (the registry's ``Entry.flags``)."""
    return [k for k, e in ENTRIES.items() if flag in e.flags]


#: generate's flags that belong to some method kinds only (checked: not given with another method)
METHOD_FLAGS = tuple(dict.fromkeys(f for e in ENTRIES.values() for f in e.flags))


def spec_from_flags(args: argparse.Namespace) -> str:
    """The method spec that ``--method`` and its flags describe (see module docstring): the
    entry's ``from_flags`` checks the flags' shape, the spec's parser what they name."""
    kind, sep, _ = args.method.partition(":")
    entry = ENTRIES[kind]
    if args.tree and "tree" not in entry.flags:
        use = "/".join(_owners("tree"))
        raise CliError(f"--tree drafts trees with an EAGLE head: use --method {use}, not {args.method}")
    for flag in (f for f in METHOD_FLAGS if getattr(args, f, None)):
        if flag not in entry.flags or sep:
            where = "inside the spec" if sep else f"for --method {'/'.join(_owners(flag))}"
            raise CliError(f"--{flag} is not used with --method {args.method} (give it {where})")
    if sep or entry.from_flags is None:
        return args.method
    try:
        return entry.from_flags(args)
    except MethodError as err:
        raise CliError(str(err)) from None
