"""Cost as a function of tokens per forward: the one interpolation the cost curves
(`hierspec.costs`) and the planner's calibrations (`hierspec.calibrate`) share, the physical
sanity check of a curve, and the curve learned online from the steps a policy actually runs.

Online curve (`OnlineCostCurve`). s(T), T = 1..t_max, is the wall time of one decoding step that
verifies T tokens (target forward + the engine's per-step work), as the policy sees it between
its calls. For each T it keeps the last ``window`` observations; with m_T their median and n_T
their number, and p_T the prior (the measured or cached curve),

    own(T) = exp( (w log p_T + n_T log m_T) / (w + n_T) ),   w = w0 / (1 + z^2),
    z = log(m_T / p_T) / log(CONTRADICTION)                  (w0: the prior's pseudo-count)

a geometric blend whose prior is heavy-tailed: near the data it counts as w0 observations, far
from it (a 20x error) as ~w0 / 55, so one observation outvotes a poisoned prior.
The estimate the policy reads is the closure of own under what physics guarantees (noise only
adds time): sub-additivity, s(a + b) <= s(a) + s(b) (one step of a + b tokens is no dearer than
two steps), and monotonicity, s(T) <= s(T') for T <= T'. So after a few plain steps s(T) <=
T s(1) whatever the prior claims, and one observed long step caps every shorter one.

A prior is in doubt when it was not trusted (noisy measurement), when it is not plausible on
the integer grid (`shape_flaws`), or when at some T with >= 3 observations it is off by more
than a factor `CONTRADICTION`. A T with fewer than `PROVEN` observations is unproven; its cost is
known to lie in [``optimistic(T)``, ``seconds[T-1]``], the lower end being the largest of the
medians observed at T' <= T (monotonicity), of m_T' / ceil(T' / T) for T' > T (sub-additivity)
and, for a prior in no doubt, of p_T / `TRUSTED_SLACK`. The policy (`hierspec.policy`) explores
unproven T when they might pay.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence

__all__ = ["OnlineCostCurve", "interpolate", "shape_flaws", "subadditive_closure"]

PRIOR_WEIGHT = 1.0  # a trusted prior counts as one observation
UNTRUSTED_PRIOR_WEIGHT = 0.25
WINDOW = 9
PROVEN = 3
CONTRADICTION = 1.5
TRUSTED_SLACK = 1.5
REFRESH = 0.02  # the estimate of a T is updated when its blend moves by more than 2 %
_LOG_CONTRADICTION = math.log(CONTRADICTION)
SHAPE_TOL = 0.5  # sub-additivity and monotonicity may be broken by at most 50 %
_EPS = 1e-9


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


def shape_flaws(sizes: Sequence[int], seconds: Sequence[float], tol: float = SHAPE_TOL) -> list[int]:
    """Indices of the sizes whose cost is physically implausible (noise only ever adds time):
    n = a + b with c(n) > (1 + tol) (c(a) + c(b)) for measured a, b (n is too dear), and m < n
    with c(m) > (1 + tol) c(n) (m is too dear)."""
    at = dict(zip(sizes, seconds, strict=True))
    bad = set()
    for i, n in enumerate(sizes):
        if any(a in at and n - a in at and at[n] > (1 + tol) * (at[a] + at[n - a]) for a in range(1, n)):
            bad.add(i)
        if any(seconds[i] > (1 + tol) * seconds[j] for j in range(i + 1, len(sizes))):
            bad.add(i)
    return sorted(bad)


def subadditive_closure(s: Sequence[float]) -> list[float]:
    """The largest curve below ``s`` (s[i] = cost of T = i + 1) that is sub-additive,
    out(a + b) <= out(a) + out(b), then made non-decreasing by its running minimum from the right."""
    out = list(s)
    for t in range(1, len(out)):
        for a in range(t):
            v = out[a] + out[t - a - 1]
            if v < out[t]:
                out[t] = v
    for t in range(len(out) - 2, -1, -1):
        if out[t + 1] < out[t]:
            out[t] = out[t + 1]
    return out


class OnlineCostCurve:
    """s(T) for T = 1..``t_max`` learned from observed step times over a prior (module docstring).

    ``seconds[T - 1]``: the estimate; ``count[T - 1]``: observations of T; ``version``: bumped
    whenever the estimate changes (callers cache what they derive from it)."""

    def __init__(
        self, prior: Callable[[int], float], t_max: int, *, trusted: bool = True, window: int = WINDOW
    ) -> None:
        if isinstance(t_max, bool) or not isinstance(t_max, int) or t_max < 1:
            raise ValueError(f"t_max: expected an integer >= 1, got {t_max!r}")
        if window < 1:
            raise ValueError(f"window: expected an integer >= 1, got {window!r}")
        self.t_max = t_max
        self.prior = [max(float(prior(t)), _EPS) for t in range(1, t_max + 1)]
        self.flawed = bool(shape_flaws(range(1, t_max + 1), self.prior))
        self.trusted = bool(trusted) and not self.flawed
        self.contradicted = False
        self._w0 = PRIOR_WEIGHT if self.trusted else UNTRUSTED_PRIOR_WEIGHT
        self._obs: list[deque[float]] = [deque(maxlen=window) for _ in range(t_max)]
        self._med = [0.0] * t_max  # median of each window (0: none yet)
        self.count = [0] * t_max
        self._own = list(self.prior)
        self.version = 0
        self._refresh()

    @property
    def in_doubt(self) -> bool:
        """The prior cannot be relied on where it was not observed (see module docstring)."""
        return not self.trusted or self.contradicted

    def unproven(self, t: int) -> bool:
        return self.count[t - 1] < PROVEN

    def __call__(self, t: int) -> float:
        """s(t) for 1 <= t <= t_max (beyond: linear from the last two points)."""
        if t <= self.t_max:
            return self.seconds[max(t, 1) - 1]
        return interpolate(range(1, self.t_max + 1), self.seconds, t)

    def observe(self, t: int, seconds: float) -> None:
        """One step of t tokens took ``seconds`` (ignored outside 1..t_max or if not > 0). The
        estimate is refreshed (and ``version`` bumped) when it moves by more than `REFRESH`."""
        if not (1 <= t <= self.t_max and seconds > 0 and math.isfinite(seconds)):
            return
        i = t - 1
        obs = self._obs[i]
        obs.append(seconds)
        self.count[i] += 1
        n = len(obs)
        srt = sorted(obs)
        med = srt[n // 2] if n % 2 else 0.5 * (srt[n // 2 - 1] + srt[n // 2])
        self._med[i] = med
        p = self.prior[i]
        z = math.log(med / p) / _LOG_CONTRADICTION
        w = self._w0 / (1.0 + z * z)  # heavy-tailed prior: far from the data, it stops voting
        own = p * math.exp(n * z * _LOG_CONTRADICTION / (w + n))
        doubt = self.in_doubt
        if n >= PROVEN and abs(z) > 1.0:
            self.contradicted = True
        if n == 1 or abs(own - self._own[i]) > REFRESH * self._own[i] or self.in_doubt != doubt:
            self._own[i] = own
            self._refresh()

    def _refresh(self) -> None:
        self.seconds = subadditive_closure(self._own)
        med = self._med
        lower, best = [], 0.0
        for i in range(self.t_max):
            best = max(best, med[i])  # monotone: s(T) >= s(T') for T' <= T
            # sub-additive: s(T') <= ceil(T' / T) s(T) for T' > T
            lo = max([best] + [med[j] / -(-(j + 1) // (i + 1)) for j in range(i + 1, self.t_max)])
            lo = lo or self.seconds[0]  # nothing observed: the cheapest estimate
            if not self.in_doubt:
                lo = max(lo, self.prior[i] / TRUSTED_SLACK)
            lower.append(min(lo, self.seconds[i]))
        self.lower = lower
        self.version += 1

    def optimistic(self, t: int) -> float:
        """A lower bound on s(t) (module docstring)."""
        return self.lower[t - 1]

    def snapshot(self) -> dict:
        return {
            "seconds": [round(s, 6) for s in self.seconds],
            "prior": [round(s, 6) for s in self.prior],
            "observations": list(self.count),
            "trusted": self.trusted,
            "in_doubt": self.in_doubt,
        }
