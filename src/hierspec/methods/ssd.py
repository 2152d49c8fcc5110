"""``ssd:MODEL[/KEY=VALUE...]``: speculative speculative decoding (`hierspec.ssd`, Saguaro), the
draft MODEL in a speculator process. The trailing parts holding '=' are options
(`hierspec.methods.spec.SSD_OPTIONS`), each checked here once, when the spec is parsed:

    fanout=uniform|geometric  budget=B (>= gamma + 1)  c=C (in (0, 1])  fallback=jit|fast
    backup=ngram|random  emulate=MS (>= 0)  timeout=S (> 0)

The budget's bound depends on the draft length: `check_ssd_gammas` checks it with the lengths a
run uses. ``gamma`` auto is `AUTO_K_MAX` tokens per round (SSD has no adaptive length).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any

from .modelset import ModelSet, resolve_draft
from .parts import Parts
from .spec import SSD_OPTIONS, MethodError, MethodSpec, check_model_ref

__all__ = [
    "REPLY_TIMEOUT_S",
    "build_ssd",
    "check_ssd_gammas",
    "draft_spec",
    "parse_ssd",
    "ssd_from_flags",
    "ssd_options",
]

#: seconds the verifier waits for the speculator's reply (``timeout=S``) unless given
REPLY_TIMEOUT_S = 60.0


def _choice(*choices: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")

    return check


def _finite(strict: bool) -> Callable[[float], None]:
    def check(value: float) -> None:
        if not math.isfinite(value) or value < 0 or (strict and value == 0):
            raise ValueError("expected a finite number " + ("> 0" if strict else ">= 0"))

    return check


def _checks() -> dict[str, Callable[[Any], Any]]:
    """The check of each option's value (ValueError saying what is expected)."""
    from ..ssd.options import FALLBACKS, FAST_BACKUPS
    from ..ssd.saguaro import FANOUTS, check_budget, check_saguaro_c

    def budget(value: int) -> None:
        try:
            check_budget(value, 1)
        except ValueError:
            raise ValueError("expected an integer >= gamma + 1") from None

    def saguaro_c(value: float) -> None:
        try:
            check_saguaro_c(value)
        except ValueError:
            raise ValueError("expected a number in (0, 1]") from None

    return {
        "fanout": _choice(*FANOUTS),
        "budget": budget,
        "c": saguaro_c,
        "fallback": _choice(*FALLBACKS),
        "backup": _choice(*FAST_BACKUPS),
        "emulate": _finite(strict=False),
        "timeout": _finite(strict=True),
    }


def parse_ssd(text: str, arg: str | None) -> MethodSpec:
    """``ssd:NAME[/KEY=VALUE...]``: the trailing parts holding '=' are options, the rest the draft."""
    parts = (arg or "").split("/")
    opts: list[tuple[str, Any]] = []
    checks = _checks()
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
        try:
            checks[key](value)
        except ValueError as err:
            raise MethodError(f"method {text!r}: SSD option {key}={val}: {err}") from None
        opts.insert(0, (key, value))
    name = "/".join(parts)
    if arg is None:
        raise MethodError(f"method {text!r} needs a draft model path or shipped name: ssd:PATH")
    if not name:
        raise MethodError(f"method {text!r}: give the draft model, e.g. ssd:small or ssd:PATH/budget=16")
    return MethodSpec(text, "ssd", check_model_ref(text, name), ssd=tuple(opts))


def ssd_options(spec: MethodSpec) -> tuple[dict[str, Any], float]:
    """(the keywords of `SSDSession.generate`, the session's reply timeout in seconds)."""
    kw = dict(spec.ssd_kwargs)
    return kw, float(kw.pop("reply_timeout_s", REPLY_TIMEOUT_S))


def check_ssd_gammas(m: MethodSpec, gammas: Sequence[int]) -> None:
    """MethodError unless the budget of ``m`` covers every draft length γ in ``gammas`` (>= γ + 1)."""
    from ..ssd.saguaro import check_budget

    budget = dict(m.ssd).get("budget")
    for g in gammas:
        try:
            if budget is not None:
                check_budget(budget, g)
        except ValueError as err:
            raise MethodError(f"method {m.name!r} with γ = {g}: {err}") from None


def draft_spec(spec: MethodSpec, dtype: Any) -> Any:
    """What the speculator process re-creates the draft from, with the one loader."""
    from ..ssd.draft_spec import DraftSpec

    return DraftSpec(resolve_draft(spec.path), dtype)


def build_ssd(spec: MethodSpec, models: ModelSet, rule: str, gamma: int) -> Parts:
    """The verifier side: the runner starts an `SSDSession` on ``options``' draft and timeout."""
    kw, timeout = ssd_options(spec)
    options = {"draft": draft_spec(spec, models.dtype), "generate": kw, "timeout": timeout}
    return Parts(models.target, None, gamma, options=options)


def ssd_from_flags(args: argparse.Namespace) -> str:
    """``--method ssd [--draft MODEL] [--fanout ...] [--budget B] ...`` (the SSD flags of
    `hierspec.ssd.arguments`) as a spec."""
    from ..models import shipped

    opts = [f"fanout={args.fanout}", f"c={args.saguaro_c:g}", f"fallback={args.fallback}"]
    opts += [f"backup={args.fast_backup}", f"emulate={args.emulate_verify_ms:g}"]
    opts += [f"timeout={args.ssd_reply_timeout:g}"]
    if args.budget is not None:
        opts.append(f"budget={args.budget}")
    return "ssd:" + "/".join([args.draft or shipped.DEFAULT_DRAFT, *opts])
