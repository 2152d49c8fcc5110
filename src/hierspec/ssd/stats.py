"""SSD statistics: `SpecStats` (vLLM names) plus the speculation-cache counters and the
cost-model inputs, measured on the real timeline.

    hit_rate            hits / predicted rounds (rounds whose key could be looked up; the cold
                        first round of a generation and rounds after a fault are excluded)
    hit_rate_per_k[k]   hits / predicted rounds whose outcome had k accepted tokens
    bonus_accuracy      predicted rounds whose realised bonus token was among the top-F_k
                        candidates of its k (a hit unless the draft was bypassed, e.g. force_miss)
    bonus_top1_accuracy realised bonus == the draft's top candidate at its k
    e_hit, e_miss       tokens emitted per round (accepted + 1) when the round's draft came from
                        the cache / from the fallback (cold start included)
    t_v                 mean verification time per round (target forward + rule + emulated delay)
    t_p, t_b            mean pre-speculation (glue + branches) and fallback time, in seconds,
                        as measured by the speculator; t_p_over_t_v = t_p / t_v
    time_wait           verifier time spent waiting for the speculator's reply (critical path)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..stats import SpecStats
from .cost import CostPrediction, predict


def _bump(lst: list[int], i: int, n: int = 1) -> None:
    if len(lst) <= i:
        lst.extend([0] * (i + 1 - len(lst)))
    lst[i] += n


#: the derived SSD statistics (properties) that `SSDStats.to_dict` adds to SpecStats' fields
DERIVED_FIELDS = (
    "hit_rate",
    "hit_rate_per_k",
    "bonus_accuracy",
    "bonus_top1_accuracy",
    "e_hit",
    "e_miss",
    "t_v",
    "t_p",
    "t_b",
    "t_p_over_t_v",
)


@dataclass
class SSDStats(SpecStats):
    """`SpecStats` plus the SSD counters (see module docstring)."""

    num_rounds: int = 0
    num_predicted_rounds: int = 0
    num_hits: int = 0
    num_misses: int = 0
    num_cold_starts: int = 0
    num_fallback_jit: int = 0
    num_fallback_fast: int = 0
    num_local_rounds: int = 0  # rounds decoded by the verifier alone after a fault
    rounds_per_k: list[int] = field(default_factory=list)
    hits_per_k: list[int] = field(default_factory=list)
    bonus_in_candidates: int = 0
    bonus_top1: int = 0
    tokens_on_hit: int = 0
    tokens_on_miss: int = 0
    rounds_on_hit: int = 0
    rounds_on_miss: int = 0
    time_verify_rounds: float = 0.0
    time_wait: float = 0.0
    time_emulated: float = 0.0
    time_speculate: float = 0.0  # sum of speculator build times (T_p)
    num_builds: int = 0
    time_fallback: float = 0.0  # sum of speculator fallback times (T_b)
    fallback_events: list[str] = field(default_factory=list)
    mode: str = "process"  # "process" (two processes) or "local" (one process, sequential)

    def record_round(
        self, *, status: str, prev_k: int | None, fk: int, rank: int, emitted: int, t_verify: float
    ) -> None:
        """One verified round: status "hit" | "miss" | "cold" | "empty" | "local"."""
        self.num_rounds += 1
        self.time_verify_rounds += t_verify
        if status == "local":
            self.num_local_rounds += 1
            return
        if status in ("hit", "miss") and prev_k is not None:
            self.num_predicted_rounds += 1
            _bump(self.rounds_per_k, prev_k)
            _bump(self.hits_per_k, prev_k, int(status == "hit"))
            if fk > 0 and 0 < rank <= fk:
                self.bonus_in_candidates += 1
            if rank == 1:
                self.bonus_top1 += 1
        if status == "hit":
            self.num_hits += 1
            self.rounds_on_hit += 1
            self.tokens_on_hit += emitted
        elif status in ("miss", "cold"):
            self.num_misses += int(status == "miss")
            self.num_cold_starts += int(status == "cold")
            self.rounds_on_miss += 1
            self.tokens_on_miss += emitted

    # ------------------------------------------------------------------ derived
    @property
    def hit_rate(self) -> float:
        return self.num_hits / self.num_predicted_rounds if self.num_predicted_rounds else 0.0

    @property
    def hit_rate_per_k(self) -> list[float]:
        return [h / n if n else 0.0 for h, n in zip(self.hits_per_k, self.rounds_per_k, strict=False)]

    @property
    def bonus_accuracy(self) -> float:
        n = self.num_predicted_rounds
        return self.bonus_in_candidates / n if n else 0.0

    @property
    def bonus_top1_accuracy(self) -> float:
        n = self.num_predicted_rounds
        return self.bonus_top1 / n if n else 0.0

    @property
    def e_hit(self) -> float:
        return self.tokens_on_hit / self.rounds_on_hit if self.rounds_on_hit else 0.0

    @property
    def e_miss(self) -> float:
        return self.tokens_on_miss / self.rounds_on_miss if self.rounds_on_miss else 0.0

    @property
    def t_v(self) -> float:
        return self.time_verify_rounds / self.num_rounds if self.num_rounds else 0.0

    @property
    def t_p(self) -> float:
        return self.time_speculate / self.num_builds if self.num_builds else 0.0

    @property
    def t_b(self) -> float:
        n = self.num_fallback_jit + self.num_fallback_fast
        return self.time_fallback / n if n else 0.0

    @property
    def t_p_over_t_v(self) -> float:
        return self.t_p / self.t_v if self.t_v > 0 else 0.0

    def cost_prediction(self) -> CostPrediction | None:
        """Theorem-7 prediction from this run's measured p_hit, E_hit, E_miss, T_p, T_b, T_v."""
        if self.t_v <= 0 or not (self.rounds_on_hit or self.rounds_on_miss):
            return None
        p = self.num_hits / max(1, self.num_hits + self.num_misses)
        e_hit = self.e_hit if self.rounds_on_hit else self.e_miss
        e_miss = self.e_miss if self.rounds_on_miss else self.e_hit
        return predict(p, e_hit, e_miss, self.t_p, self.t_b, self.t_v)

    def to_dict(self) -> dict:
        d = super().to_dict()
        for name in DERIVED_FIELDS:
            d[name] = getattr(self, name)
        pred = self.cost_prediction()
        d["predicted_tokens_per_second"] = pred.tokens_per_second if pred else None
        d["predicted_speedup_vs_ar"] = pred.speedup_vs_ar if pred else None
        return d
