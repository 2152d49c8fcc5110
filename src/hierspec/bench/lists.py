"""Comma-separated values on the benchmarks' command lines (``--gammas auto,4``, ``--sets code,chat``).

One reader for every bench script, so each flag fails the same way: ``--FLAG: cannot read 'x'``,
``--FLAG: empty list`` or ``--FLAG: expected ..., got ...``, raised as the caller's error type;
the ``type=`` helpers raise ``argparse.ArgumentTypeError`` without the flag (argparse prints
``argument --FLAG: ...`` itself).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def split(text: str) -> list[str]:
    """``" a, b,,c "`` -> ["a", "b", "c"]."""
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_list(
    text: str,
    conv: Callable[[str], T],
    flag: str,
    *,
    valid: Callable[[T], bool] | None = None,
    expected: str = "",
    error: type[Exception] = argparse.ArgumentTypeError,
) -> list[T]:
    """The items of ``text`` converted by ``conv``, duplicates dropped (first kept), in order.
    ``valid`` rejects items (the message says ``expected``); ``error`` is the exception raised."""
    hint = f" (expected {expected})" if expected else ""
    head = f"{flag}: " if flag else ""
    out: list[T] = []
    for item in split(text):
        try:
            value = conv(item)
        except ValueError:
            raise error(f"{head}cannot read {item!r}{hint}") from None
        if valid is not None and not valid(value):
            raise error(f"{head}expected {expected or 'other values'}, got {text!r}")
        out.append(value)
    if not out:
        raise error(f"{head}empty list{hint}")
    return list(dict.fromkeys(out))


def positive_ints() -> Callable[[str], list[int]]:
    """An argparse ``type=``: integers >= 1 (``4,8``)."""
    return lambda text: parse_list(text, int, "", valid=lambda v: v >= 1, expected="integers >= 1")


def gammas() -> Callable[[str], list[int]]:
    """An argparse ``type=``: draft lengths, integers >= 1 or ``auto`` (read as 0)."""
    from ..methods.spec import parse_gamma  # the registry imports torch: not at import time

    return lambda text: parse_list(text, parse_gamma, "", expected="integers >= 1 or auto")


def temperatures(*, zero: bool = True) -> Callable[[str], list[float]]:
    """An argparse ``type=``: finite temperatures >= 0 (> 0 when ``zero`` is False)."""

    def ok(t: float) -> bool:
        return math.isfinite(t) and (t >= 0 if zero else t > 0)

    expected = "finite numbers >= 0" if zero else "finite numbers > 0"
    return lambda text: parse_list(text, float, "", valid=ok, expected=expected)


def names(allowed: Sequence[str] | None = None) -> Callable[[str], list[str]]:
    """An argparse ``type=``: a non-empty list of names (of ``allowed``, if given)."""
    if allowed is None:
        return lambda text: parse_list(text, str, "")
    return lambda text: parse_list(text, str, "", valid=lambda x: x in allowed, expected=", ".join(allowed))
