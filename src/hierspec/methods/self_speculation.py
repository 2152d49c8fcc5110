"""Self-speculation from early exits of the target (`hierspec.hispec`): ``early-exit[:EXIT]``
(the first layers + an exit head draft, the full model verifies: LayerSkip-style) and
``hispec[:EXIT/EXIT[/Nd/Ni]]`` (draft exit -> intermediate exit -> full model, HiSpec).

    EXIT = L | L=HEADFILE      a shipped head at layer L, or a head file of one's own

Both run their own loop with their own block size: ``gamma`` auto gives them the fixed length
`SELF_SPECULATION_GAMMA` (HiSpec drafts its N_i either way, `own_gamma`).
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

from .modelset import ModelSet
from .parts import Parts
from .spec import MethodError, MethodSpec, ints

__all__ = [
    "SELF_SPECULATION_GAMMA",
    "build_early_exit",
    "build_hispec",
    "early_exit_from_flags",
    "exit_heads",
    "hispec_from_flags",
    "hispec_gamma",
    "parse_early_exit",
    "parse_hispec",
]

#: ``gamma=0`` (auto) gives the self-speculators this fixed draft length
SELF_SPECULATION_GAMMA = 4


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


def parse_early_exit(text: str, arg: str | None) -> MethodSpec:
    from ..models import shipped

    e, path = _exit(text, arg) if arg else (shipped.DEFAULT_EXITS[0], None)
    return MethodSpec(text, "early-exit", exits=(e,), exit_heads=(path,))


def parse_hispec(text: str, arg: str | None) -> MethodSpec:
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


def exit_heads(spec: MethodSpec) -> list[tuple[int, str | None]]:
    """The early-exit heads the method loads: (exit layer, head file or None = the shipped one)."""
    return list(zip(spec.exits, spec.exit_heads or (None,) * len(spec.exits), strict=True))


def hispec_gamma(spec: MethodSpec) -> int:
    """HiSpec's block size: N_i buffered tokens per full pass, whatever ``gamma`` says."""
    return spec.ni


def _heads(spec: MethodSpec, models: ModelSet) -> list[Any]:
    return [models.exit_head(e, p) for e, p in exit_heads(spec)]


def build_early_exit(spec: MethodSpec, models: ModelSet, rule: str, gamma: int) -> Parts:
    from ..hispec import build_early_exit_spec

    system = build_early_exit_spec(models.hf, _heads(spec, models)[0], gamma=gamma, rule=rule)
    return Parts(system.target, system.drafter, system.gamma, system=system)


def build_hispec(spec: MethodSpec, models: ModelSet, rule: str, gamma: int) -> Parts:
    from ..hispec import build_hispec as build

    d, i = _heads(spec, models)
    system = build(models.hf, d, i, nd=spec.nd, ni=spec.ni, rule=rule)
    return Parts(system.target, system.drafter, system.gamma, system=system)


def _exits_arg(args: argparse.Namespace, n: int) -> str:
    """--exits (L or L:PATH, comma-separated; default the shipped exits) as ``n`` spec exits;
    which heads exist and their order are checked by the spec's parser."""
    from ..models import shipped

    if args.nd < 1 or args.ni < 1:
        raise MethodError(f"--nd and --ni must be >= 1, got {args.nd} and {args.ni}")
    raw = args.exits.split(",") if args.exits else [str(e) for e in shipped.DEFAULT_EXITS[:n]]
    out = []
    for part in raw:
        layer, _, path = part.strip().partition(":")
        try:
            e = int(layer)
        except ValueError:
            raise MethodError(f"--exits: expected layer numbers (L or L:PATH), got {part!r}") from None
        out.append(f"{e}={path}" if path else str(e))
    if len(out) != n:
        raise MethodError(f"--exits: --method {args.method} takes {n} exit layer(s), got {args.exits!r}")
    return "/".join(out)


def early_exit_from_flags(args: argparse.Namespace) -> str:
    """``--method early-exit [--exits L[:HEAD]]`` as a spec."""
    return f"early-exit:{_exits_arg(args, 1)}"


def hispec_from_flags(args: argparse.Namespace) -> str:
    """``--method hispec [--exits Ld,Li] [--nd N] [--ni N]`` as a spec."""
    return f"hispec:{_exits_arg(args, 2)}/{args.nd}/{args.ni}"
