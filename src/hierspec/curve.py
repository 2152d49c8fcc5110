"""Cost as a function of tokens per forward, from a few measured points: the one interpolation
the cost curves (`hierspec.costs`) and the planner's calibrations (`hierspec.calibrate`) share."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["interpolate"]


def interpolate(xs: Sequence[int], ys: Sequence[float], n: float) -> float:
    """y at ``n`` from points (xs increasing): linear between them, linear beyond the last two,
    flat below xs[0]; a single point extends proportionally above it. Never below 1e-9."""
    if n <= xs[0]:
        return ys[0]
    if len(xs) == 1:
        return ys[0] * n / xs[0]
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:], strict=False):
        if n <= x1:
            return y0 + (y1 - y0) * (n - x0) / (x1 - x0)
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return max(ys[-1] + slope * (n - xs[-1]), 1e-9)
