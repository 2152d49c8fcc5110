"""Calibration of a draft's acceptance for the adaptive policy (`hierspec.policy`): a_j, the
probability that draft position j is accepted given positions < j were, is learned online from
the drafter's raw confidence c_j (`Draft.confidence`): 10 buckets of c, each a Beta prior of
strength 2 centred on the bucket (the raw confidence is the prior guess) plus the counts
observed: position j of a past draft counts as accepted if j <= tau, rejected if j = tau + 1,
and is not observed beyond (a_j is conditional on the earlier positions). Counts are capped (old
observations decay), so a drafter that improves is noticed. tau is read from the next `propose`
call: the committed context then extends the previous one by the emitted tokens, and tau = the
longest common prefix of the draft and those tokens. That is exact for the token and greedy
rules (a correction token never equals the rejected draft token) and an over-estimate by one at
most for block verification, which may emit a token equal to a rejected draft token; it only
affects efficiency, never exactness. The last step of a generation is never seen (no next call;
the engine has no commit hook for drafters): a bias towards rejections that matters only for
very short generations (a step that accepts everything is more often the last one).
"""

from __future__ import annotations

from collections.abc import Sequence


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
        self.version = 0  # bumped by every update (callers cache what they derive)

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

    def best_seen(self) -> float | None:
        """The highest estimate among buckets observed so far (None before any observation)."""
        seen = [self.estimate((b + 0.5) / self.bins) for b in range(self.bins) if self.n[b] > 0]
        return max(seen, default=None)

    def update(self, confidences: Sequence[float], accepted: int) -> None:
        """Record one verified draft: positions < ``accepted`` accepted, the next one rejected."""
        self.version += 1
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


class SequenceAcceptance:
    """One sequence's acceptance: the shared calibration `AcceptanceModel` scaled by how this
    sequence fared against it. With E = sum of the shared estimates a(c_j) over the positions
    observed in this sequence's drafts and A = those accepted (observed as in `AcceptanceModel`),

        a_s(c) = min(1, a(c) r),    r = (w + A) / (w + E)      (w: pseudo-counts of "as predicted")

    A and E decay together once E exceeds ``cap``, so recent drafts weigh most. A sequence whose
    drafts keep failing where the shared model expects them to pass (a lookup drafter stuck on a
    pattern its text no longer follows) stops drafting after a few rejections, while the others
    keep the shared estimate. Read by the batch scheduler (`hierspec.serve.batch`); it depends on
    the past only, so the lengths it chooses keep every rule exact."""

    def __init__(self, shared: AcceptanceModel, strength: float = 2.0, cap: float = 16.0) -> None:
        if strength <= 0 or cap <= 0:
            raise ValueError(f"sequence acceptance: expected strength > 0, cap > 0; got {strength}, {cap}")
        self.shared, self.w, self.cap = shared, strength, cap
        self.accepted = 0.0  # A
        self.expected = 0.0  # E

    @property
    def ratio(self) -> float:
        return (self.w + self.accepted) / (self.w + self.expected)

    def estimate(self, c: float) -> float:
        return min(1.0, self.shared.estimate(c) * self.ratio)

    def update(self, confidences: Sequence[float], accepted: int) -> None:
        """Record one verified draft of this sequence (before the shared model learns from it)."""
        for i, c in enumerate(confidences[: accepted + 1]):
            self.expected += self.shared.estimate(c)
            self.accepted += float(i < accepted)
        if self.expected > self.cap:
            scale = self.cap / self.expected
            self.accepted, self.expected = self.accepted * scale, self.cap
