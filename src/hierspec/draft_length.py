"""The choice of the draft length k, as pure functions of a snapshot (`hierspec.policy` keeps the
books and the timings; its docstring derives the economics and why every choice stays exact):

    expected_tokens, step_rates, best_length, continue_pays    the economics of one step
    ask_drafter(view) -> Ask                                    before drafting: ask, how, how many
    choose_length(view, ask, n, a, unproven) -> k, flags       after drafting: how many to verify
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .costs import CostCurve

__all__ = [
    "Ask",
    "Costs",
    "PastPlan",
    "StepView",
    "ask_drafter",
    "best_length",
    "choose_length",
    "continue_pays",
    "expected_tokens",
    "step_rates",
]

Costs = CostCurve | Sequence[float]  # a curve c(T), or step seconds c[k] of drafting k tokens


# ---------------------------------------------------------------------------------- economics
def expected_tokens(a: Sequence[float]) -> list[float]:
    """E[committed tokens | k] for k = 0..len(a): 1 + sum_{i <= k} prod_{j <= i} a_j."""
    out, run, total = [1.0], 1.0, 1.0
    for aj in a:
        run *= aj
        total += run
        out.append(total)
    return out


def _steps(costs: Costs, n: int) -> Sequence[float]:
    """Seconds of a step drafting k = 0..n - 1 tokens: c(k + 1) of a curve, or the sequence."""
    return [costs(k + 1) for k in range(n)] if isinstance(costs, CostCurve) else costs


def step_rates(a: Sequence[float], costs: Costs, draft_cost: float = 0.0) -> list[float]:
    """Expected tokens per second of drafting k = 0..len(a) tokens (the economics of `hierspec.policy`)."""
    e = expected_tokens(a)
    c = _steps(costs, len(e))
    return [e[k] / (c[k] + draft_cost * k) for k in range(len(e))]


def best_length(a: Sequence[float], costs: Costs, draft_cost: float = 0.0) -> int:
    """argmax_k of `step_rates` (the shortest on ties)."""
    rates = step_rates(a, costs, draft_cost)
    best = 0
    for k in range(1, len(rates)):
        if rates[k] > rates[best]:
            best = k
    return best


def continue_pays(
    a: Sequence[float], a_next: float, k_max: int, costs: Costs, draft_cost: float, keep_all: bool
) -> bool:
    """After drafting len(a) tokens: can drafting more (future positions estimated at ``a_next``)
    beat stopping now? ``keep_all``: the drafted tokens cannot be dropped (stochastic draft), so
    "now" is rate(len(a)); otherwise the best prefix so far."""
    t = len(a)
    rates = step_rates([*a, *[a_next] * (k_max - t)], costs, draft_cost)
    now = rates[t] if keep_all else max(rates[: t + 1])
    return max(rates[t + 1 :], default=-math.inf) > now


@dataclass(frozen=True, slots=True)
class PastPlan:
    """What the past alone decides (cached until the curve, acceptance or k_max change)."""

    steps: list[float]  # seconds of a step drafting k = 0..k_max tokens (without the drafter)
    k_past: int  # best length at the confidence-free rate
    ramp: int  # the longest draft worth its risk yet: 1 + positions ever observed (<= k_max)
    can_pay: bool  # some draft could beat plain decoding at the best acceptance seen
    explore_t: int  # an unproven step size T worth exploring (1: a plain step), else 0


@dataclass(frozen=True, slots=True)
class StepView:
    """What one step's choice of k reads: a snapshot, nothing in it changes while deciding."""

    plan: PastPlan  # the past-only part (`AdaptiveDrafter._plan`)
    k_max: int  # the cap of this step (the engine's gamma and the wrapper's k_max)
    draft_cost: float  # d: the drafter's seconds per drafted token
    explore: bool  # an acceptance exploration is due
    explore_t: int  # a step size T >= 2 whose cost is explored now, else 0
    plain: bool  # exploring T = 1: a plain step
    stoppable: bool  # the drafter takes a stop rule (`hierspec.drafters.base.is_stoppable`)
    cheap: bool  # asking it costs little (`hierspec.policy`: < 2 % of c(1) per token, or unmeasured)


@dataclass(frozen=True, slots=True)
class Ask:
    """Whether and how to ask the drafter this step (`ask_drafter`)."""

    want: int = 0  # tokens to ask for; 0: do not ask
    stop: bool = False  # hand it the stop rule (a stoppable drafter)
    least: int = 0  # with ``stop``: draft at least this many first (fixed before drawing)
    explored: bool = False  # an exploration (of the acceptance, or of a drafter too dear to ask)
    cost_bound: bool | None = None  # a drafter too costly to ask is explored (None: as it was)
    skipped: bool = False  # a draft was possible but not worth starting


def ask_drafter(v: StepView) -> Ask:
    """Before drafting: ask the drafter or not, for how many tokens and with which stop rule.

    Not at all when nothing may be drafted or a plain step's cost is explored. A stoppable
    drafter is asked for up to k_max when a draft can pay (k_past > 0 or an exploration is due,
    and some draft beats plain decoding at the best acceptance seen) or an acceptance exploration
    is due; it stops itself (`continue_pays`), after at least T - 1 tokens when a step size T is
    explored. Another drafter is asked when a draft can pay and it is cheap or k_past > 0, or an
    exploration is due: a cheap one for k_max (then truncated), a dear one for the length the past
    chose (at least 1, at least T - 1). Asking a dear drafter that cannot pay is an exploration
    of it (``cost_bound``: the next one is spaced by its measured cost)."""
    p = v.plan
    if v.k_max <= 0:
        return Ask()
    if v.plain:
        return Ask(skipped=True)
    if v.stoppable:
        pays = (p.k_past > 0 or v.explore or v.explore_t > 0) and p.can_pay
        if not (pays or v.explore):
            return Ask(skipped=True)
        # exploring a drafter that costs more to ask than it can win back: back off however the
        # draft fares (asking it again means catching up on every token since)
        least = max(v.explore_t - 1, 0)  # fixed before drafting: still a stopping time (S)
        return Ask(v.k_max, True, least, p.k_past == 0 or not pays, not pays)
    if (p.can_pay and (v.cheap or p.k_past > 0)) or v.explore or v.explore_t:
        want = v.k_max if v.cheap else max(p.k_past, 1, v.explore_t - 1)
        dear = not v.cheap
        return Ask(want, explored=dear and (p.k_past == 0 or v.explore), cost_bound=dear and v.explore)
    return Ask(skipped=True)


def choose_length(
    v: StepView, ask: Ask, n: int, a: Sequence[float] | None, unproven: Callable[[int], bool]
) -> tuple[int, bool, bool]:
    """After drafting ``n`` tokens: (k, explored, cost_explored), k of them verified this step.

    ``a``: the calibrated acceptance estimates of the n positions of a deterministic draft, None
    for a stochastic one; ``unproven(T)``: the learned curve has too few observations of T.

    A deterministic draft is cut at the best length for its estimates (D), at most the ramp; a
    stochastic draft of a stoppable drafter is a stopping time already and is kept whole; one of
    another drafter is cut at a length fixed from the past only (S), k_past (1 when exploring).
    A cost exploration of T lengthens the cut to T - 1 where the draft allows (``cost_explored``
    when that makes k longer than chosen and T + 1 is unproven, or a plain step is explored). An
    acceptance exploration due drafts one token rather than none (``explored``)."""
    p = v.plan
    k_x = min(n, v.explore_t - 1) if v.explore_t else 0  # the length a cost exploration wants
    if n == 0:
        k = k_nat = 0
    elif a is not None:  # deterministic: any prefix, chosen from the confidences (D)
        k_nat = min(best_length(a, p.steps, v.draft_cost), p.ramp)
        k = max(k_nat, k_x)
    elif v.stoppable:  # stochastic, already a stopping time (S): keep it whole
        k, k_nat = n, (n if v.explore_t == 0 else 0)
    else:  # stochastic, not stoppable: a length fixed from the past only (S)
        k_nat = min(n, max(p.k_past, int(ask.explored)))
        k = max(k_nat, k_x)
    explored = ask.explored
    cost_explored = v.plain or (k > k_nat and unproven(k + 1))
    if k == 0 and n > 0 and v.explore:
        k, explored = 1, True
    return k, explored and k > 0, cost_explored
