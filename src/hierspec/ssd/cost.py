"""The SSD cost model (Kumar, Dao, May, Theorem 7 and Corollaries 8-9), as pure functions.

Times are normalised to one target verification, T_v = 1 (~ one autoregressive step when
verification is memory-bound). T_p: the speculator's pre-speculation time per round (glue decode
+ all branches); T_b: the backup's time on a miss; E_hit, E_miss: expected tokens per round when
the round's draft came from the speculation cache / from the backup; p_hit: hit probability.

    speedup_SSD (vs AR) = [p E_hit + (1 - p) E_miss] / [p^b max(1, T_p) + (1 - p^b)(1 + T_b)]
    speedup_SD  (vs AR) = E_SD / (1 + T_SD)

For batch size b a round hits only if all b sequences hit, so p_hit is raised to b in the
denominator (b = 1: the paper's formula). On a hit the next draft is ready when the verifier is
done (if T_p <= 1) -- drafting is off the critical path; on a miss the verifier waits T_b.
Corollary 9 (same-model backup, T_p <= 1) bounds the speed-up over SD:

    (1 + T_SD) / (1 + T_SD (1 - p)) * E_hit / E_SD  <=  SSD / SD  <=  (1 + T_SD) E_hit / E_SD
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _check(name: str, x: float, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not lo <= x <= hi:
        raise ValueError(f"{name}: expected a finite number in [{lo:g}, {hi:g}], got {x!r}")
    return float(x)


def ssd_speedup(
    p_hit: float, e_hit: float, e_miss: float, t_p: float, t_b: float, *, batch_size: int = 1
) -> float:
    """Theorem 7: SSD's expected speed-up over autoregressive decoding (see module docstring)."""
    p = _check("p_hit", p_hit, 0.0, 1.0)
    e_hit, e_miss = _check("e_hit", e_hit), _check("e_miss", e_miss)
    t_p, t_b = _check("t_p", t_p), _check("t_b", t_b)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    pb = p**batch_size
    return (p * e_hit + (1 - p) * e_miss) / (pb * max(1.0, t_p) + (1 - pb) * (1 + t_b))


def sd_speedup(e_sd: float, t_sd: float) -> float:
    """Synchronous speculative decoding: E_SD tokens per round of cost 1 + T_SD."""
    return _check("e_sd", e_sd) / (1 + _check("t_sd", t_sd))


def ssd_over_sd_bounds(p_hit: float, e_hit: float, e_sd: float, t_sd: float) -> tuple[float, float]:
    """Corollary 9: (lower, upper) bound on SSD / SD with the SD draft as backup and T_p <= 1."""
    p = _check("p_hit", p_hit, 0.0, 1.0)
    e_hit, e_sd, t_sd = _check("e_hit", e_hit), _check("e_sd", e_sd, 1e-12), _check("t_sd", t_sd)
    ratio = e_hit / e_sd
    return (1 + t_sd) / (1 + t_sd * (1 - p)) * ratio, (1 + t_sd) * ratio


@dataclass
class CostPrediction:
    """Cost-model prediction from measured quantities (seconds per verification `t_v_s`)."""

    p_hit: float
    e_hit: float
    e_miss: float
    t_p: float  # normalised by T_v
    t_b: float  # normalised by T_v
    t_v_s: float
    speedup_vs_ar: float  # with T_v as the AR step

    @property
    def tokens_per_second(self) -> float:
        """Predicted throughput: speed-up / T_v (the cost model's bound, communication excluded)."""
        return self.speedup_vs_ar / self.t_v_s if self.t_v_s > 0 else 0.0


def predict(
    p_hit: float, e_hit: float, e_miss: float, t_p_s: float, t_b_s: float, t_v_s: float
) -> CostPrediction:
    """Theorem 7 from times in seconds (normalised here by `t_v_s`, which must be > 0)."""
    t_v = _check("t_v_s", t_v_s, 1e-12)
    t_p, t_b = _check("t_p_s", t_p_s) / t_v, _check("t_b_s", t_b_s) / t_v
    s = ssd_speedup(p_hit, e_hit, e_miss, t_p, t_b)
    return CostPrediction(p_hit, e_hit, e_miss, t_p, t_b, t_v, s)
