"""Per-generation statistics, with vLLM's per-request speculative-decoding names.

    mean_acceptance_length = 1 + num_accepted_draft_tokens / num_spec_steps   (includes the bonus)
    draft_acceptance_rate  = num_accepted_draft_tokens / num_draft_tokens
    per_position_acceptance_rate[i] = accepted at draft position i / drafted at position i
    acceptance_histogram[j] = number of spec steps that accepted exactly j draft tokens

plus target forwards per generated token, tokens/s and a time breakdown. A "spec step" is a
target forward that verified at least one draft token; steps with an empty draft (no n-gram
match, plain decoding) count as target forwards but not as spec steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SpecStats:
    """Counters and timings of one generation (see module docstring)."""

    num_generated_tokens: int = 0
    num_target_forwards: int = 0
    num_spec_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    acceptance_histogram: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of those, positions reused from cells computed earlier (serving)
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_target_forward: float = 0.0
    time_logits_processing: float = 0.0
    time_verify_rule: float = 0.0
    time_rollback: float = 0.0
    time_decode: float = 0.0  # wall time after prefill, all steps

    def record_step(self, drafted: int, accepted: int) -> None:
        """Count one target forward that verified `drafted` tokens and accepted `accepted`."""
        self.num_target_forwards += 1
        if drafted == 0:
            return
        self.num_spec_steps += 1
        self.num_draft_tokens += drafted
        self.num_accepted_draft_tokens += accepted
        for lst, n in (
            (self.drafted_per_position, drafted),
            (self.accepted_per_position, accepted),
        ):
            if len(lst) < drafted:
                lst.extend([0] * (drafted - len(lst)))
            for i in range(n):
                lst[i] += 1
        if len(self.acceptance_histogram) <= drafted:
            self.acceptance_histogram.extend([0] * (drafted + 1 - len(self.acceptance_histogram)))
        self.acceptance_histogram[accepted] += 1

    @property
    def mean_acceptance_length(self) -> float:
        if not self.num_spec_steps:
            return 1.0
        return 1.0 + self.num_accepted_draft_tokens / self.num_spec_steps

    @property
    def draft_acceptance_rate(self) -> float:
        return self.num_accepted_draft_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def per_position_acceptance_rate(self) -> list[float]:
        return [
            a / d if d else 0.0
            for a, d in zip(self.accepted_per_position, self.drafted_per_position, strict=True)
        ]

    @property
    def target_forwards_per_token(self) -> float:
        n = self.num_generated_tokens
        return self.num_target_forwards / n if n else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of decoding (prefill excluded; see time_prefill)."""
        return self.num_generated_tokens / self.time_decode if self.time_decode > 0 else 0.0

    @property
    def time_overhead(self) -> float:
        """Decode time spent outside model forwards (drafting included separately)."""
        return max(0.0, self.time_decode - self.time_target_forward - self.time_draft)

    @property
    def overhead_per_step_ms(self) -> float:
        """Engine time per target forward outside model forwards and drafting, in ms."""
        n = self.num_target_forwards
        return 1e3 * self.time_overhead / n if n else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in (
            "mean_acceptance_length",
            "draft_acceptance_rate",
            "per_position_acceptance_rate",
            "target_forwards_per_token",
            "tokens_per_second",
            "time_overhead",
            "overhead_per_step_ms",
        ):
            d[name] = getattr(self, name)
        return d
