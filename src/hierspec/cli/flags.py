"""`generate`'s method flags as one method spec of `hierspec.methods` (the grammar ``bench
--methods`` uses), so both commands build the same thing from the same string:

    --method draft --draft large                      -> draft:large
    --method hierarchy --levels ngram,small --gammas 2 -> hierarchy:ngram+small@2
    --method hispec --exits 4,8 --nd 2 --ni 4          -> hispec:4/8/2/4
    --method early-exit --exits 4:HEAD                 -> early-exit:4=HEAD
    --method eagle --tree --tree-depth 3 ...           -> eagle-tree:3/K/B[:HEAD]
    --method ssd --draft small --budget 16 ...         -> ssd:small/budget=16/...

``--method SPEC`` with a full spec is taken as is (its flags must then not be given). Every check
here runs before any model is loaded; errors name the flag.
"""

from __future__ import annotations

import argparse
import os

from ..methods import ENTRIES, METHOD_SYNTAX

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


def _levels(args: argparse.Namespace) -> str:
    """--levels/--gammas as the hierarchy spec argument ('' = the planner's stack)."""
    if not args.levels:
        if args.gammas:
            raise CliError("--gammas needs --levels (without --levels the planner picks both)")
        return ""
    specs = [x.strip() for x in args.levels.split(",") if x.strip()]
    lookup = ("ngram", "suffix")
    if any(s in lookup for s in specs[1:]):
        raise CliError("--levels: 'ngram' can only be the bottom level")
    n_models = len(specs) - (specs[0] in lookup)
    if n_models < 1:
        raise CliError("--levels: give at least one draft model (e.g. ngram,PATH)")
    try:
        gs = [int(x) for x in args.gammas.split(",")] if args.gammas else [3] * n_models
    except ValueError:
        raise CliError(f"--gammas: expected comma-separated integers, got {args.gammas!r}") from None
    if len(gs) != n_models or min(gs) < 1:
        raise CliError(
            f"--gammas: expected {n_models} integers >= 1 (one per draft model), got {args.gammas!r}"
        )
    gammas = iter(gs)
    return "+".join(s if s in lookup else f"{s}@{next(gammas)}" for s in specs)


def _exits(args: argparse.Namespace) -> str:
    """--exits (L or L:PATH, comma-separated) and --nd/--ni as the spec argument."""
    from ..models import shipped

    n = 2 if args.method == "hispec" else 1
    if args.nd < 1 or args.ni < 1:
        raise CliError(f"--nd and --ni must be >= 1, got {args.nd} and {args.ni}")
    raw = args.exits.split(",") if args.exits else [str(e) for e in shipped.DEFAULT_EXITS[:n]]
    out = []
    for part in raw:
        layer, _, path = part.strip().partition(":")
        try:
            e = int(layer)
        except ValueError:
            raise CliError(f"--exits: expected layer numbers (L or L:PATH), got {part!r}") from None
        if not path and e not in shipped.EXIT_HEADS:
            raise CliError(
                f"--exits: no shipped head at layer {e} (shipped: {sorted(shipped.EXIT_HEADS)}); "
                "give L:PATH for a head of your own"
            )
        out.append((e, path))
    if len(out) != n:
        raise CliError(f"--exits: --method {args.method} takes {n} exit layer(s), got {args.exits!r}")
    if n == 2 and not out[0][0] < out[1][0]:
        raise CliError(f"--exits: the draft exit must come before the intermediate exit, got {args.exits!r}")
    exits = "/".join(f"{e}={p}" if p else str(e) for e, p in out)
    return f"{exits}/{args.nd}/{args.ni}" if n == 2 else exits


def _ssd(args: argparse.Namespace) -> str:
    from ..models import shipped

    opts = [f"fanout={args.fanout}", f"c={args.saguaro_c:g}", f"fallback={args.fallback}"]
    opts += [f"backup={args.fast_backup}", f"emulate={args.emulate_verify_ms:g}"]
    opts += [f"timeout={args.ssd_reply_timeout:g}"]
    if args.budget is not None:
        opts.append(f"budget={args.budget}")
    return "/".join([args.draft or shipped.DEFAULT_DRAFT, *opts])


#: the flags that belong to one method kind each (checked: not given with another method)
METHOD_FLAGS = {
    "draft": ("draft", "ssd"),
    "levels": ("hierarchy",),
    "gammas": ("hierarchy",),
    "exits": ("hispec", "early-exit"),
    "eagle": ("eagle",),
    "tree": ("eagle",),
}


def spec_from_flags(args: argparse.Namespace) -> str:
    """The method spec that ``--method`` and its flags describe (see module docstring)."""
    from ..models import shipped

    kind, sep, _ = args.method.partition(":")
    given = [f for f, kinds in METHOD_FLAGS.items() if getattr(args, f, None)]
    if args.tree and kind != "eagle":
        raise CliError(f"--tree drafts trees with an EAGLE head: use --method eagle, not {args.method}")
    for flag in given:
        if kind not in METHOD_FLAGS[flag] or sep:
            where = "inside the spec" if sep else f"for --method {'/'.join(METHOD_FLAGS[flag])}"
            raise CliError(f"--{flag} is not used with --method {args.method} (give it {where})")
    if sep:
        return args.method
    if kind == "draft":
        return f"draft:{args.draft or shipped.DEFAULT_DRAFT}"
    if kind == "hierarchy":
        levels = _levels(args)
        return f"hierarchy:{levels}" if levels else "hierarchy"
    if kind in ("hispec", "early-exit"):
        return f"{kind}:{_exits(args)}"
    if kind == "eagle":
        head = f":{args.eagle}" if args.eagle else ""
        if not args.tree:
            return f"eagle{head}"
        for name in ("depth", "topk", "budget"):
            v = getattr(args, f"tree_{name}")
            if v < 1:
                raise CliError(f"--tree-{name}: tree {name}: expected an integer >= 1, got {v}")
        return f"eagle-tree:{args.tree_depth}/{args.tree_topk}/{args.tree_budget}{head}"
    if kind == "ssd":
        return f"ssd:{_ssd(args)}"
    return kind
