"""Per-step draft length: draft k tokens (0 = a plain decoding step) to maximise expected committed
tokens per second, from the measured cost curve, the drafter's cost and its calibrated confidences.

Economics. With a_j the estimated probability that draft position j is accepted given positions
< j were, c(T) the target's seconds per forward of T tokens (`hierspec.costs`) and d the drafter's
seconds per drafted token, a step drafting k tokens commits in expectation

    E[tokens | k] = 1 + sum_{i <= k} prod_{j <= i} a_j      in   c(k + 1) + d k   seconds,

and the policy picks k* = argmax_k E[tokens | k] / (c(k + 1) + d k)  (ties: the shorter). k* = 0
whenever no draft can beat plain decoding at E = 1 token per c(1): "never slower than plain
decoding" up to the error of the estimates and the exploration below.

Calibration (`hierspec.acceptance.AcceptanceModel`): a_j is learned online from the drafter's raw
confidence c_j (`Draft.confidence`) and what the previous draft got accepted (see there).

Costs (`hierspec.curve.OnlineCostCurve`). c(k + 1) is the learned wall time of a step verifying
k + 1 tokens as the wrapper sees it, from the end of one `propose` call to the start of the next
(target forward + the engine's per-step work, so it counts for every k, 0 included), plus the
wrapper's own time per call. The measured curve (`hierspec.costs`) is only the prior; the closure
under sub-additivity and monotonicity carries what one T teaches to the others (after a few plain
steps c(T) <= T c(1) whatever the prior claims). A prior that calls a T dear is never refuted by
the steps it makes the policy choose, so an unproven T (< 3 observations) is explored when, at
the best acceptance seen and at the geometric mean of its lower bound and its estimate, it would
beat the current best (T = 1: a plain step, at its lower bound), within budget: spending (the
exploring steps' time minus what plain steps would take for their tokens: one that pays back is
free) <= `EXPLORE_COST` (2 %) of the time so far, `EXPLORE_COST_DOUBT` (10 %) while the prior is
in doubt (untrusted, implausible, or off by 1.5x where observed), + `EXPLORE_ALLOWANCE` plain
steps. The step then drafts T - 1 tokens: a deterministic draft is lengthened (D), a stoppable
drafter is told before drawing to draft at least that many, a stochastic one asked for them
(lengths fixed from the past: stopping times (S)). Exploration ends once every T worth it is
proven; a poisoned prior heals within one 128-token generation (tests/test_online_costs.py).
``learn_costs=False`` keeps the prior fixed (the old behaviour; a negative control).

Exploring acceptance. When the policy drafts nothing although a draft was available, that
bucket is never observed again and k = 0 could lock in after the drafter improved. So after
`explore_every` such steps in a row it drafts one token anyway; each exploration that is rejected
doubles the interval (up to 64x), an accepted one resets it. The cost is bounded by (c(2) - c(1)
+ d) / (interval c(1)) of plain decoding time: at most 5.6 % with the llama.cpp Q4_1 curve (c(2)
= 1.89 c(1)) and interval 16, shrinking geometrically while explorations fail; ~0 on flat curves.
A model drafter too costly to ask pays more per exploration: it first catches up on every token
since it was last asked (in a new generation: a prefill of the whole prompt). After such an
exploration the interval is at least its measured time / (`EXPLORE_BUDGET` c(1)) steps, so
exploring it costs at most ~2 % of plain decoding time.

Ramping up. Before anything was observed, the estimates are the drafter's own confidences: a
first draft of k_max tokens from a useless drafter would waste c(k_max + 1) - c(1). So a draft
is at most 1 + (positions ever observed) long (1, then 2, then ~4, ...): a good drafter reaches
its length in a few steps, a useless one costs one rejected token.

Falling back. When no draft can pay even at the best acceptance seen so far (and the cost of
consulting a model drafter), the drafter is not asked at all (no lookup, no forward) unless an
exploration is due: a plain step costs the wrapper only its bookkeeping, and the past-only part
of the decision (`PastPlan`) is cached until the curve, the acceptance or the drafter's cost change.
The drafter's own cost d is measured online (seconds of `inner.propose` per drafted token, an
exponential average) unless given.

Exactness: the choice of k depends on the past (tokens, earlier verifications, timings, learned
statistics) and on the draft side, never on the target's rows of the positions it decides. A
deterministic draft may be cut to any length; a stochastic one only at a stopping time (never
because of the value of a drafted token: that biases the output). Proofs, for every rule:
docs/exactness-adaptive.md. At temperature 0 the output is token-identical to greedy decoding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .acceptance import AcceptanceModel
from .costs import CostCurve
from .curve import OnlineCostCurve
from .draft_length import (
    Ask,
    PastPlan,
    StepView,
    ask_drafter,
    best_length,
    choose_length,
    continue_pays,
    expected_tokens,
    step_rates,
)
from .drafters.base import Draft, Drafter, is_stoppable
from .sampling import SamplingParams

__all__ = [
    "AcceptanceModel",
    "AdaptiveDrafter",
    "Ask",
    "StepView",
    "ask_drafter",
    "best_length",
    "choose_length",
    "continue_pays",
    "expected_tokens",
    "step_rates",
]

_MAX_EXPLORE_DOUBLINGS = 6
EXPLORE_BUDGET = 0.02  # exploring a drafter too costly to ask: at most this share of the time
EXPLORE_COST = 0.02  # exploring unproven step sizes T: share of the time, prior in no doubt
EXPLORE_COST_DOUBT = 0.10  # ... while the prior is in doubt (`hierspec.curve.OnlineCostCurve`)
EXPLORE_ALLOWANCE = 4.0  # ... plus this many plain steps' worth
_CHEAP_DRAFT = 0.02  # a drafter costing < 2 % of c(1) per token drafts k_max and is truncated


@dataclass(slots=True)
class _Last:
    """The previous step, to learn from at the next call."""

    length: int
    last_tok: int
    tokens: list[int]
    conf: list[float]
    explored: bool  # an acceptance exploration
    cost_explored: bool  # a step size explored to learn its cost


# ---------------------------------------------------------------------------------- the wrapper
class AdaptiveDrafter:
    """A `Drafter` that chooses each step's draft length for ``inner`` (see module docstring).

    ``generate(target, ids, drafter=AdaptiveDrafter(inner, curve), gamma=k_max)``: the engine's
    gamma and this ``k_max`` both cap the draft. ``costs``: the prior cost curve (`hierspec.costs`);
    ``learn_costs=False`` keeps it fixed (no online learning, no cost exploration). ``draft_cost``:
    seconds per drafted token, None = measured online. ``clock``: seconds (default
    `time.perf_counter`; tests inject one).
    `reset` (called by `generate`) forgets the current generation only; what was learned
    (acceptance, costs) carries over to the next prompt (`forget` clears it). `stats` returns the
    chosen-k histogram and the estimates.
    """

    def __init__(
        self,
        inner: Drafter,
        costs: CostCurve,
        draft_cost: float | None = None,
        k_max: int = 8,
        *,
        acceptance: AcceptanceModel | None = None,
        explore_every: int = 16,
        learn_costs: bool = True,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not isinstance(costs, CostCurve):
            raise ValueError(f"costs: expected a hierspec.costs.CostCurve, got {type(costs).__name__}")
        if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1:
            raise ValueError(f"k_max: expected an integer >= 1, got {k_max!r}")
        if draft_cost is not None and not (math.isfinite(draft_cost) and draft_cost >= 0):
            raise ValueError(f"draft_cost: expected seconds >= 0 or None (measure), got {draft_cost!r}")
        if isinstance(explore_every, bool) or not isinstance(explore_every, int) or explore_every < 1:
            raise ValueError(f"explore_every: expected an integer >= 1, got {explore_every!r}")
        self.inner = inner
        self.costs = costs  # the prior
        self.k_max = k_max
        self.explore_every = explore_every
        self.learn_costs = learn_costs
        self._clock = clock or time.perf_counter
        self._fixed_draft_cost = draft_cost
        self.acceptance = acceptance or AcceptanceModel()
        self._stoppable = is_stoppable(inner)
        if hasattr(inner, "observe_target"):  # a feature-level drafter (EAGLE): pass features on
            self.observe_target = inner.observe_target
        self._clear()
        self.reset()

    @property
    def vocab_size(self) -> int | None:
        return getattr(self.inner, "vocab_size", None)

    # ------------------------------------------------------------------ state
    def forget(self) -> None:
        """Forget everything learned (acceptance counts, costs, draft cost, histogram)."""
        self.acceptance = AcceptanceModel(self.acceptance.bins, self.acceptance.prior, self.acceptance.cap)
        self._clear()
        self.reset()

    def _clear(self) -> None:
        self.curve = OnlineCostCurve(self.costs, self.k_max + 1, trusted=self.costs.trusted)
        self._draft_cost = self._fixed_draft_cost
        self._consult: float | None = None  # seconds per consultation of a stoppable drafter
        self._cost_bound = False  # the last exploration was of a drafter too costly to ask
        self._wrapper = 0.0  # seconds of this wrapper's own work per step (an average)
        self._plan_key: tuple = ()
        self._plan_val: PastPlan | None = None
        self.k_hist: dict[int, int] = {}
        self._explore_interval = self.explore_every
        self._since_spec = 0
        self._explorations = self._cost_explorations = 0
        self._elapsed = self._explore_spent = 0.0
        self._time = {"spec": 0.0, "plain": 0.0}
        self._tokens = {"spec": 0, "plain": 0}
        self._drafted = self._accepted = 0

    def reset(self) -> None:
        """Start of a new generation: reset ``inner`` and the per-generation bookkeeping."""
        self.inner.reset()
        self._last: _Last | None = None
        self._t_exit: float | None = None
        self._last_draft_time = 0.0
        self._fresh = True  # inner has not been asked yet this generation (its cache is empty)

    # ------------------------------------------------------------------ learning from the past
    def _observe(self, context: torch.Tensor, now: float) -> int | None:
        """Count what the previous draft got accepted, and time the previous step. Returns the
        context's last token when it was read anyway (one host read per step)."""
        last, self._last = self._last, None
        if last is None or context.shape[1] <= last.length:
            return None
        tail = context[0, last.length - 1 :].tolist()
        if tail[0] != last.last_tok:
            return None  # not a continuation of the last step (another caller): learn nothing
        new = tail[1:]
        tokens, tau = last.tokens, 0
        while tau < min(len(tokens), len(new)) and tokens[tau] == new[tau]:
            tau += 1
        if tokens:
            self.acceptance.update(last.conf, tau)
            self._drafted += len(tokens)
            self._accepted += tau
            if last.explored:
                doubled = min(self._explore_interval * 2, self.explore_every << _MAX_EXPLORE_DOUBLINGS)
                self._explore_interval = self.explore_every if tau and not self._cost_bound else doubled
                if self._cost_bound:  # its catch-up made this exploration dear: space them out
                    budget = self._last_draft_time / (EXPLORE_BUDGET * self.curve(1))
                    self._explore_interval = max(self._explore_interval, math.ceil(budget))
        if self._t_exit is not None:
            gap = now - self._t_exit  # target forward + engine work of the last step
            step = gap + self._last_draft_time + self._wrapper
            kind = "spec" if tokens else "plain"
            self._time[kind] += step
            self._tokens[kind] += len(new)
            self._elapsed += step
            if last.cost_explored:  # its price: the time beyond plain steps for what it committed
                self._explore_spent += step - len(new) * (self.curve(1) + self._wrapper)
            if self.learn_costs:
                self.curve.observe(len(tokens) + 1, gap)
        return new[-1]

    def _plan(self, k_max: int) -> PastPlan:
        """The past-only part of the decision, recomputed when what it depends on changed."""
        acc, curve = self.acceptance, self.curve
        key = (curve.version, acc.version, k_max, self._draft_cost, self._consult)
        if key == self._plan_key and self._plan_val is not None:
            return self._plan_val
        d, w = self._cost_per_token(), self._wrapper
        steps = [s + w for s in curve.seconds[: k_max + 1]]
        rate = acc.rate
        ramp = min(k_max, 1 + int(acc.all_n))
        k_past = min(best_length([rate] * k_max, steps, d), ramp)
        consult = 0.0 if self._consult is None else self._consult
        best_seen = acc.best_seen()
        if best_seen is None and self._consult is None:  # nothing known: ask, to learn its worth
            can_pay = True
        else:  # even at the best acceptance seen, can some draft beat plain decoding?
            e = expected_tokens([acc.rate if best_seen is None else best_seen] * k_max)
            plain = 1.0 / steps[0]
            can_pay = any(e[k] / (steps[k] + consult + d * k) > plain for k in range(1, k_max + 1))
        explore_t = 0
        if self.learn_costs:  # at the best acceptance seen (the confidence-free rate before any)
            e = expected_tokens([rate if best_seen is None else best_seen] * k_max)
            top = max(e[k] / (steps[k] + (consult + d * k if k else 0.0)) for k in range(k_max + 1))
            if curve.unproven(1) and 1.0 / (curve.optimistic(1) + w) > top:  # plain may be cheaper
                top, explore_t = 1.0 / (curve.optimistic(1) + w), 1
            for k in range(1, ramp + 1):
                if curve.unproven(k + 1):
                    mid = math.sqrt(curve.optimistic(k + 1) * curve.seconds[k]) + w
                    r = e[k] / (mid + consult + d * k)
                    if r > top:
                        top, explore_t = r, k + 1
        self._plan_key, self._plan_val = key, PastPlan(steps, k_past, ramp, can_pay, explore_t)
        return self._plan_val

    def _explore_cost_due(self, plan: PastPlan) -> int:
        """The step size to explore now (0: none): an unproven T worth it, within the budget
        (`EXPLORE_COST` of the time, `EXPLORE_COST_DOUBT` while the prior is in doubt)."""
        if not plan.explore_t:
            return 0
        frac = EXPLORE_COST_DOUBT if self.curve.in_doubt else EXPLORE_COST
        allowed = frac * self._elapsed + EXPLORE_ALLOWANCE * plan.steps[0]
        return plan.explore_t if self._explore_spent < allowed else 0

    def _cost_per_token(self) -> float:
        return 0.0 if self._draft_cost is None else self._draft_cost

    def _record_draft_time(self, seconds: float, n: int) -> None:
        self._last_draft_time = seconds
        if self._fixed_draft_cost is None and n > 0:
            per = seconds / n
            self._draft_cost = per if self._draft_cost is None else 0.8 * self._draft_cost + 0.2 * per

    # ------------------------------------------------------------------ proposing
    def propose(
        self,
        context: torch.Tensor,
        num_tokens: int,
        params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> Draft:
        """Learn from the last step, decide (`ask_drafter`), draft, choose k (`choose_length`),
        and keep the books (histogram, explorations, timings)."""
        t_enter = self._clock()
        last_tok = self._observe(context, t_enter)
        k_max = min(num_tokens, self.k_max)
        plan = self._plan(max(k_max, 0))
        explore = self._since_spec >= self._explore_interval  # acceptance exploration
        explore_t = self._explore_cost_due(plan) if k_max > 0 else 0  # cost exploration
        cheap = self._draft_cost is None or self._draft_cost < _CHEAP_DRAFT * plan.steps[0]
        view = StepView(
            plan,
            k_max,
            self._cost_per_token(),
            explore,
            0 if explore_t == 1 else explore_t,
            explore_t == 1 and not explore,  # exploring T = 1: a plain step
            self._stoppable,
            cheap,
        )
        ask = ask_drafter(view)
        if ask.cost_bound is not None:
            self._cost_bound = ask.cost_bound
        draft: Draft | None = None
        t0 = self._clock()
        if ask.stop:
            stop = self._stop_rule(view, ask.least, not params.greedy)
            draft = self.inner.propose(context, ask.want, params, generator, stop=stop)
        elif ask.want:
            draft = self.inner.propose(context, ask.want, params, generator)
        dt = self._clock() - t0
        n = 0 if draft is None else draft.num_tokens
        if draft is not None and self._fresh:
            # the first consultation of a generation also feeds the whole prompt to a model
            # drafter (a prefill): not what asking it costs later, so it is not learned from
            self._fresh = False
            self._last_draft_time = dt
        else:
            self._record_draft_time(dt, n)
            if draft is not None and not cheap:
                self._consult = dt if self._consult is None else 0.8 * self._consult + 0.2 * dt
        a = None
        if n and draft.probs is None:  # deterministic: its calibrated estimates (one host read)
            a = [self.acceptance.estimate(c) for c in self._confidences(draft)]
        k, explored, cost_explored = choose_length(view, ask, n, a, self.curve.unproven)
        self._explorations += int(explored)
        self._cost_explorations += int(cost_explored)
        self._since_spec = self._since_spec + 1 if (k == 0 and (n > 0 or ask.skipped)) else 0
        self.k_hist[k] = self.k_hist.get(k, 0) + 1
        last_tok = int(context[0, -1]) if last_tok is None else last_tok
        if k == 0:
            out = Draft.empty(1, context.device)
            self._last = _Last(context.shape[1], last_tok, [], [], False, cost_explored)
        else:
            out = draft.prefix(k)
            toks = out.tokens[0].tolist()
            conf = self._confidences(out)
            self._last = _Last(context.shape[1], last_tok, toks, conf, explored, cost_explored)
        self._t_exit = self._clock()
        own = (self._t_exit - t_enter) - dt
        self._wrapper = own if self._wrapper == 0.0 else 0.9 * self._wrapper + 0.1 * own
        return out

    def _stop_rule(self, view: StepView, least: int, keep_all: bool) -> Callable[[Sequence[float]], bool]:
        """The stop rule a stoppable drafter calls after each drafted token with the confidences
        so far: stop at the ramp, never before ``least``, else once drafting on cannot pay
        (`continue_pays`; ``keep_all``: a stochastic draft cannot be cut afterwards)."""
        plan, k_max, d = view.plan, view.k_max, view.draft_cost

        def stop(conf: Sequence[float]) -> bool:
            if len(conf) < least:
                return False
            if len(conf) >= plan.ramp:
                return True
            a = [self.acceptance.estimate(c) for c in conf]
            return not continue_pays(a, self.acceptance.rate, k_max, plan.steps, d, keep_all)

        return stop

    def _confidences(self, draft: Draft) -> list[float]:
        n = draft.num_tokens
        if draft.confidence is None:  # no confidence: the bucket of the confidence-free rate
            return [self.acceptance.rate] * n
        return draft.confidence[:n].clamp(0.0, 1.0).tolist()  # one host read

    # ------------------------------------------------------------------ report
    def stats(self) -> dict:
        """Chosen-k histogram, acceptance estimates, costs and measured rates (for the bench)."""
        rates = {k: (self._tokens[k] / self._time[k] if self._time[k] > 0 else None) for k in self._time}
        return {
            "k_hist": dict(sorted(self.k_hist.items())),
            "acceptance": self.acceptance.snapshot(),
            "drafted": self._drafted,
            "accepted": self._accepted,
            "explorations": self._explorations,
            "cost_explorations": self._cost_explorations,
            "exploration_cost_s": self._explore_spent,
            "draft_cost_s": self._draft_cost,
            "wrapper_s_per_step": self._wrapper,
            "cost_curve": self.costs.to_dict() | {"trusted": self.costs.trusted},
            "learned_step_s": self.curve.snapshot(),
            "tokens_per_s": rates,
        }
