"""Per-step draft length: draft k tokens (0 = a plain decoding step) to maximise expected committed
tokens per second, from the measured cost curve, the drafter's cost and its calibrated confidences.

Economics. With a_j the estimated probability that draft position j is accepted given positions
< j were, c(T) the target's seconds per forward of T tokens (`hierspec.costs`) and d the drafter's
seconds per drafted token, a step drafting k tokens commits in expectation

    E[tokens | k] = 1 + sum_{i <= k} prod_{j <= i} a_j      in   c(k + 1) + d k   seconds,

and the policy picks k* = argmax_k E[tokens | k] / (c(k + 1) + d k)  (ties: the shorter). k* = 0
whenever no draft can beat plain decoding at E = 1 token per c(1): "never slower than plain
decoding" up to the error of the estimates and the exploration below.

Calibration (`AcceptanceModel`). a_j is learned online from the drafter's raw confidence c_j
(`Draft.confidence`): 10 buckets of c, each a Beta prior of strength 2 centred on the bucket
(the raw confidence is the prior guess) plus the counts observed: position j of a past draft
counts as accepted if j <= tau, rejected if j = tau + 1, and is not observed beyond (a_j is
conditional on the earlier positions). Counts are capped (old observations decay), so a drafter
that improves is noticed. tau is read from the next `propose` call: the committed context then
extends the previous one by the emitted tokens, and tau = the longest common prefix of the draft
and those tokens. That is exact for the token and greedy rules (a correction token never equals
the rejected draft token) and an over-estimate by one at most for block verification, which may
emit a token equal to a rejected draft token; it only affects efficiency, never exactness. The
last step of a generation is never seen (no next call; the engine has no commit hook for
drafters): a bias towards rejections that matters only for very short generations (a step that
accepts everything is more often the last one).

Exploration. When the policy drafts nothing although a draft was available, that bucket is never
observed again and k = 0 could lock in after the drafter improved. So after `explore_every` such
steps in a row it drafts one token anyway; each exploration that is rejected doubles the interval
(up to 64x), an accepted one resets it. The cost is bounded by (c(2) - c(1) + d) / (interval c(1))
of plain decoding time: at most 5.6 % with the llama.cpp Q4_1 curve (c(2) = 1.89 c(1)) and
interval 16, shrinking geometrically while explorations fail; ~0 on flat curves (torch bf16).
A model drafter too costly to ask pays more per exploration: it first catches up on every token
since it was last asked (in a new generation: a prefill of the whole prompt). After such an
exploration the interval is at least its measured time / (`EXPLORE_BUDGET` c(1)) steps, so
exploring it costs at most ~2 % of plain decoding time.

Drift. The wrapper sees the time between its `propose` calls: the target's forward plus the
engine's per-step work. `hierspec.costs.DriftTracker` compares it with c(k + 1) and re-scales the
curve when the running ratio leaves 1 +- 25 %. The drafter's own cost d is measured the same way
(seconds of `inner.propose` per drafted token, an exponential average) unless given.

Exactness (the choice never looks at the target's rows of the positions it decides about).
Let F be the past (committed tokens, earlier drafts, verifications, timings, learned statistics)
and G the draft-side randomness of this step (independent of the verifier's RNG). The target's
rows p_1..p_{k+1} are computed AFTER the draft is fixed, from the context and the draft.

 (D) Deterministic draft (``probs`` None: q one-hot; n-gram, suffix, greedy drafts). Given F and
     G the draft x and the chosen k are constants; the step is the rule applied to a fixed one-hot
     draft x_{1:k}, whose output law is the target's for EVERY x and k (each rule is exact for any
     one-hot q: `hierspec.verify.law.output_joint(..., deterministic_draft=True)`). So any k that
     is a function of (F, G, x) -- including truncation by the draft's own confidences -- gives
     a mixture over (F, G) of exact laws, which is the exact law.
 (S) Stochastic draft (``probs`` given: X_i ~ q_i(. | X_<i) with fresh randomness). Here k must be
     a STOPPING TIME of the draft: the decision to draft position i may depend on (F, G, X_<i) and
     the rows q_<=i, never on X_i itself; a drafted token is never dropped because of its value.
     Token rule, by induction over positions: position i matters only if X_<i were accepted, so
     the output prefix is context + X_<i and {k >= i} is a function of it; if k >= i, X_i ~ q_i
     and the token-wise kernel emits a token ~ p_i, otherwise the bonus token ~ p_i; either way
     the i-th output token is ~ p_i given the prefix. Block and HSD verification look ahead, so
     that induction does not carry over; their exactness under stopping-time drafts is checked by
     exact enumeration over all drafts (tests/test_policy.py, error < 1e-12), not proved here.
     The brief's "any draft-side choice is a mixture of exact kernels" is FALSE for stochastic
     drafts: dropping X_i because q_i(X_i) is low conditions X on k and biases the output (two
     tokens, q = (.5, .5), p = (.9, .1), keep X only if it is token 0: P(out = 0) = .5 + .5 * .9
     = .95 != .9). The wrapper therefore truncates a stochastic draft only to a length decided
     before it was drawn (from F alone), and a stoppable drafter (``propose(..., stop=fn)``,
     `hierspec.drafters.model`) decides after X_i whether to draft X_{i+1}.
Timings are part of F (earlier steps) or of the drafter's own work; the verifier's randomness and
the target's rows of this step never enter the choice. At temperature 0 every draft is
deterministic, so the output is token-identical to plain greedy decoding.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence

import torch

from .costs import CostCurve, DriftTracker
from .drafters.base import Draft, Drafter
from .sampling import SamplingParams

_MAX_EXPLORE_DOUBLINGS = 6
EXPLORE_BUDGET = 0.02  # exploring a drafter too costly to ask: at most this share of the time
_CHEAP_DRAFT = 0.02  # a drafter costing < 2 % of c(1) per token drafts k_max and is truncated


# ---------------------------------------------------------------------------------- economics
def expected_tokens(a: Sequence[float]) -> list[float]:
    """E[committed tokens | k] for k = 0..len(a): 1 + sum_{i <= k} prod_{j <= i} a_j."""
    out, run, total = [1.0], 1.0, 1.0
    for aj in a:
        run *= aj
        total += run
        out.append(total)
    return out


def step_rates(a: Sequence[float], costs: CostCurve, draft_cost: float = 0.0) -> list[float]:
    """Expected tokens per second of drafting k = 0..len(a) tokens (see module docstring)."""
    e = expected_tokens(a)
    return [e[k] / (costs(k + 1) + draft_cost * k) for k in range(len(e))]


def best_length(a: Sequence[float], costs: CostCurve, draft_cost: float = 0.0) -> int:
    """argmax_k of `step_rates` (the shortest on ties)."""
    rates = step_rates(a, costs, draft_cost)
    return max(range(len(rates)), key=lambda k: (rates[k], -k))


def continue_pays(
    a: Sequence[float], a_next: float, k_max: int, costs: CostCurve, draft_cost: float, keep_all: bool
) -> bool:
    """After drafting len(a) tokens: can drafting more (future positions estimated at ``a_next``)
    beat stopping now? ``keep_all``: the drafted tokens cannot be dropped (stochastic draft), so
    "now" is rate(len(a)); otherwise the best prefix so far."""
    t = len(a)
    rates = step_rates([*a, *[a_next] * (k_max - t)], costs, draft_cost)
    now = rates[t] if keep_all else max(rates[: t + 1])
    return max(rates[t + 1 :], default=-math.inf) > now


# ---------------------------------------------------------------------------------- calibration
class AcceptanceModel:
    """Online map raw confidence -> acceptance probability (Beta-smoothed counts per bucket)."""

    def __init__(self, bins: int = 10, prior_strength: float = 2.0, max_count: float = 256.0) -> None:
        if bins < 1 or prior_strength <= 0 or max_count <= 0:
            raise ValueError(f"acceptance model: expected bins >= 1, prior > 0, cap > 0; got {bins}, "
                             f"{prior_strength}, {max_count}")  # fmt: skip
        self.bins, self.prior, self.cap = bins, prior_strength, max_count
        self.acc = [0.0] * bins
        self.n = [0.0] * bins
        self.all_acc, self.all_n = 0.0, 0.0  # every observed position: the confidence-free rate

    def bucket(self, c: float) -> int:
        return min(max(int(c * self.bins), 0), self.bins - 1)

    def estimate(self, c: float) -> float:
        """Calibrated P(accept) for raw confidence c."""
        b = self.bucket(c)
        centre = (b + 0.5) / self.bins
        return (self.prior * centre + self.acc[b]) / (self.prior + self.n[b])

    @property
    def rate(self) -> float:
        """Acceptance of a position whose confidence is not known yet (prior centred on 0.5)."""
        return (0.5 * self.prior + self.all_acc) / (self.prior + self.all_n)

    def update(self, confidences: Sequence[float], accepted: int) -> None:
        """Record one verified draft: positions < ``accepted`` accepted, the next one rejected."""
        for i, c in enumerate(confidences[: accepted + 1]):
            b, hit = self.bucket(c), float(i < accepted)
            self.acc[b] += hit
            self.n[b] += 1.0
            if self.n[b] > self.cap:
                self.acc[b] *= self.cap / self.n[b]
                self.n[b] = self.cap
            self.all_acc, self.all_n = self.all_acc + hit, self.all_n + 1.0
            if self.all_n > self.cap:
                self.all_acc, self.all_n = self.all_acc * self.cap / self.all_n, self.cap

    def snapshot(self) -> dict:
        return {
            "rate": self.rate,
            "buckets": {
                f"{b / self.bins:.1f}-{(b + 1) / self.bins:.1f}": {
                    "estimate": round(self.estimate((b + 0.5) / self.bins), 4),
                    "accepted": round(self.acc[b], 2),
                    "observed": round(self.n[b], 2),
                }
                for b in range(self.bins)
                if self.n[b] > 0
            },
        }


# ---------------------------------------------------------------------------------- the wrapper
class AdaptiveDrafter:
    """A `Drafter` that chooses each step's draft length for ``inner`` (see module docstring).

    ``generate(target, ids, drafter=AdaptiveDrafter(inner, curve), gamma=k_max)``: the engine's
    gamma and this ``k_max`` both cap the draft. ``draft_cost``: seconds per drafted token, None =
    measured online. ``drift``: None turns curve re-scaling off. `reset` (called by `generate`)
    forgets the current generation only; what was learned (acceptance, costs) carries over to the
    next prompt (`forget` clears it). `stats` returns the chosen-k histogram and the estimates.
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
        drift: DriftTracker | None = DriftTracker(),  # noqa: B008 (copied below)
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
        self.costs = costs
        self.k_max = k_max
        self.explore_every = explore_every
        self._fixed_draft_cost = draft_cost
        self._drift = None if drift is None else DriftTracker(drift.tol, drift.min_obs, drift.weight)
        self.acceptance = acceptance or AcceptanceModel()
        try:
            self._stoppable = "stop" in inspect.signature(inner.propose).parameters
        except (TypeError, ValueError):
            self._stoppable = False
        self.wants_target_hidden = bool(getattr(inner, "wants_target_hidden", False))
        if hasattr(inner, "observe_target"):  # a feature-level drafter (EAGLE): pass features on
            self.observe_target = inner.observe_target
        self._clear()
        self.reset()

    @property
    def vocab_size(self) -> int | None:
        return getattr(self.inner, "vocab_size", None)

    # ------------------------------------------------------------------ state
    def forget(self) -> None:
        """Forget everything learned (acceptance counts, draft cost, histogram)."""
        self.acceptance = AcceptanceModel(self.acceptance.bins, self.acceptance.prior, self.acceptance.cap)
        self._clear()
        self.reset()

    def _clear(self) -> None:
        self._draft_cost = self._fixed_draft_cost
        self._consult: float | None = None  # seconds per consultation of a stoppable drafter
        self._cost_bound = False  # the last exploration was of a drafter too costly to ask
        self.k_hist: dict[int, int] = {}
        self._explore_interval = self.explore_every
        self._since_spec = 0
        self._explorations = 0
        self._rescales: list[float] = []
        self._time = {"spec": 0.0, "plain": 0.0}
        self._tokens = {"spec": 0, "plain": 0}
        self._drafted = self._accepted = 0

    def reset(self) -> None:
        """Start of a new generation: reset ``inner`` and the per-generation bookkeeping."""
        self.inner.reset()
        self._last: tuple[int, int, list[int], list[float], bool] | None = None
        self._t_exit: float | None = None
        self._last_draft_time = 0.0
        self._fresh = True  # inner has not been asked yet this generation (its cache is empty)

    # ------------------------------------------------------------------ learning from the past
    def _observe(self, context: torch.Tensor, now: float) -> None:
        """Count what the previous draft got accepted, and time the previous step."""
        last, self._last = self._last, None
        if last is None:
            return
        length, last_tok, tokens, conf, explored = last
        ctx = context[0]
        if ctx.numel() <= length or int(ctx[length - 1]) != last_tok:
            return  # not a continuation of the last step (another caller): learn nothing
        new = ctx[length:].tolist()
        tau = 0
        while tau < min(len(tokens), len(new)) and tokens[tau] == new[tau]:
            tau += 1
        if tokens:
            self.acceptance.update(conf, tau)
            self._drafted += len(tokens)
            self._accepted += tau
            if explored:
                doubled = min(self._explore_interval * 2, self.explore_every << _MAX_EXPLORE_DOUBLINGS)
                self._explore_interval = self.explore_every if tau and not self._cost_bound else doubled
                if self._cost_bound:  # its catch-up made this exploration dear: space them out
                    budget = self._last_draft_time / (EXPLORE_BUDGET * self.costs.decode)
                    self._explore_interval = max(self._explore_interval, math.ceil(budget))
        if self._t_exit is not None:
            gap = now - self._t_exit  # target forward + engine work of the last step
            kind = "spec" if tokens else "plain"
            self._time[kind] += gap + self._last_draft_time
            self._tokens[kind] += len(new)
            if self._drift is not None:
                r = self._drift.observe(self.costs(len(tokens) + 1), gap)
                if r is not None:
                    self.costs = self.costs.scaled(r)
                    self._rescales.append(r)

    def _consulting_can_pay(self, k_max: int, d: float) -> bool:
        """Whether asking a stoppable (model) drafter can beat plain decoding even if every
        position were accepted at the best rate learned so far: a consultation costs its measured
        time (the draft catching up on the committed tokens and its first forward) whether or
        not it drafts, so a draft that costs about as much as the target is not even asked
        (until exploration asks it again).
        Decided from the past only (exact)."""
        if self._consult is None:
            return True
        acc = self.acceptance
        seen = [acc.estimate((b + 0.5) / acc.bins) for b in range(acc.bins) if acc.n[b] > 0]
        a = max(seen, default=acc.rate)  # the best acceptance seen so far, not the priors' 0.95
        e = expected_tokens([a] * k_max)
        best = max(e[k] / (self.costs(k + 1) + self._consult + d * (k - 1)) for k in range(1, k_max + 1))
        return best > 1.0 / self.costs(1)

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
        self._observe(context, time.perf_counter())
        k_max = min(num_tokens, self.k_max)
        d = self._cost_per_token()
        explore = self._since_spec >= self._explore_interval
        # a length decided from the past alone (safe for any draft): the confidence-free rate
        k_past = best_length([self.acceptance.rate] * max(k_max, 0), self.costs, d)
        cheap = self._draft_cost is None or self._draft_cost < _CHEAP_DRAFT * self.costs.decode
        skipped = explored = False  # skipped: a draft was possible but not worth starting
        draft = Draft.empty(1, context.device)
        t0 = time.perf_counter()
        if k_max <= 0:
            pass
        elif self._stoppable:
            pays = (k_past > 0 or explore) and self._consulting_can_pay(k_max, d)
            if pays or explore:
                # exploring a drafter that costs more to ask than it can win back: back off
                # however the draft fares (asking it again means catching up on every token since)
                explored, self._cost_bound = k_past == 0 or not pays, not pays

                def stop(conf: Sequence[float]) -> bool:
                    a = [self.acceptance.estimate(c) for c in conf]
                    keep_all = not params.greedy
                    return not continue_pays(a, self.acceptance.rate, k_max, self.costs, d, keep_all)

                draft = self.inner.propose(context, k_max, params, generator, stop=stop)
            else:
                skipped = True
        elif cheap or ((k_past > 0 or explore) and (explore or self._consulting_can_pay(k_max, d))):
            explored = not cheap and (k_past == 0 or explore)
            self._cost_bound = not cheap and explore
            draft = self.inner.propose(context, k_max if cheap else max(k_past, 1), params, generator)
        else:
            skipped = True
        dt = time.perf_counter() - t0
        if self._fresh and not skipped and k_max > 0:
            # the first consultation of a generation also feeds the whole prompt to a model
            # drafter (a prefill): not what asking it costs later, so it is not learned from
            self._fresh = False
            self._last_draft_time = dt
        else:
            self._record_draft_time(dt, draft.num_tokens)
            if not cheap and not skipped and k_max > 0:
                self._consult = dt if self._consult is None else 0.8 * self._consult + 0.2 * dt
        n = draft.num_tokens
        if n == 0:
            k = 0
        elif draft.probs is None:  # deterministic: any prefix, chosen from the confidences (D)
            conf = self._confidences(draft)
            k = best_length([self.acceptance.estimate(c) for c in conf], self.costs, d)
        elif self._stoppable:  # stochastic, already a stopping time (S): keep it whole
            k = n
        else:  # stochastic, not stoppable: a length fixed from the past only (S)
            k = min(n, max(k_past, int(explored)))
        if k == 0 and n > 0 and explore:
            k, explored = 1, True
        explored = explored and k > 0
        self._explorations += int(explored)
        draft = _truncate(draft, k)
        self._since_spec = self._since_spec + 1 if (k == 0 and (n > 0 or skipped)) else 0
        self.k_hist[k] = self.k_hist.get(k, 0) + 1
        ctx_len = context.shape[1]
        conf = self._confidences(draft) if k else []
        self._last = (ctx_len, int(context[0, -1]), draft.tokens[0].tolist(), conf, explored)
        self._t_exit = time.perf_counter()
        return draft

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
            "draft_cost_s": self._draft_cost,
            "cost_curve": self.costs.to_dict(),
            "rescales": list(self._rescales),
            "tokens_per_s": rates,
        }


def _truncate(draft: Draft, k: int) -> Draft:
    """The first k positions of ``draft``."""
    if k >= draft.num_tokens:
        return draft
    probs = None if draft.probs is None else draft.probs[:, :k]
    conf = None if draft.confidence is None else draft.confidence[:k]
    return Draft(draft.tokens[:, :k], probs, conf)
