"""Per-generation SSD settings, validated once, and their fixed-size wire encoding.

The verifier validates everything *before* generation starts (bad input never reaches the
speculator process) and ships the settings with each START message as a float64 vector of
`VECTOR_LEN` entries (integers < 2^31 and the seed as two 31-bit halves, so every value is
exact in float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..sampling import SamplingParams
from .saguaro import FANOUTS, check_budget, check_saguaro_c

FALLBACKS = ("jit", "fast")
FAST_BACKUPS = ("ngram", "random")
VECTOR_LEN = 20


@dataclass(frozen=True)
class SSDOptions:
    """Settings of one SSD generation.

    gamma: draft tokens per round (K). budget: branches pre-speculated per round (sum of F_k,
    >= gamma + 1; default 3 (gamma + 1): F = 3 per position, the SSD authors' example setting).
    fanout: "uniform" | "geometric". saguaro_c: Saguaro sampling constant C in (0, 1] (1 = plain
    sampling). fallback on a miss: "jit" (the draft model drafts now) | "fast" (`fast_backup`:
    "ngram" prompt lookup padded with random tokens, or "random" tokens; verified as a one-hot
    proposal). max_new_tokens: the token budget of this generation (already capped by the target's
    context). force_miss (tests): never use the cache. _report_unmodified_q: a test hook (the
    negative control), NOT exact: report q instead of q' (set through
    `SSDSession._report_unmodified_q`, never by users).
    """

    gamma: int = 4
    budget: int | None = None
    fanout: str = "uniform"
    saguaro_c: float = 1.0
    fallback: str = "jit"
    fast_backup: str = "ngram"
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    max_new_tokens: int = 128
    force_miss: bool = False
    _report_unmodified_q: bool = False

    def __post_init__(self) -> None:
        g = self.gamma
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"gamma: expected an integer >= 1 (draft tokens per round), got {g!r}")
        if self.budget is None:
            object.__setattr__(self, "budget", 3 * (g + 1))
        check_budget(self.budget, g)
        if self.fanout not in FANOUTS:
            raise ValueError(f"fanout: expected one of {FANOUTS}, got {self.fanout!r}")
        object.__setattr__(self, "saguaro_c", check_saguaro_c(self.saguaro_c))
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback: expected one of {FALLBACKS}, got {self.fallback!r}")
        if self.fast_backup not in FAST_BACKUPS:
            raise ValueError(f"fast_backup: expected one of {FAST_BACKUPS}, got {self.fast_backup!r}")
        if not isinstance(self.params, SamplingParams):
            raise ValueError(f"params: expected a SamplingParams, got {type(self.params).__name__}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**62:
            raise ValueError(f"seed: expected an integer in [0, 2^62), got {self.seed!r}")
        m = self.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m < 2**31:
            raise ValueError(f"max_new_tokens: expected an integer >= 1, got {m!r}")

    def to_vector(self) -> torch.Tensor:
        p = self.params
        v = [
            self.gamma,
            self.budget,
            FANOUTS.index(self.fanout),
            self.saguaro_c,
            FALLBACKS.index(self.fallback),
            FAST_BACKUPS.index(self.fast_backup),
            p.temperature,
            p.top_k,
            p.top_p,
            p.min_p,
            self.seed >> 31,
            self.seed & (2**31 - 1),
            self.max_new_tokens,
            int(self.force_miss),
            int(self._report_unmodified_q),
        ]
        return torch.tensor(v + [0.0] * (VECTOR_LEN - len(v)), dtype=torch.float64)

    @staticmethod
    def from_vector(vec: torch.Tensor) -> SSDOptions:
        x = vec.tolist()
        if not all(math.isfinite(a) for a in x):
            raise ValueError("SSD options vector holds non-finite values")
        params = SamplingParams(temperature=x[6], top_k=int(x[7]), top_p=x[8], min_p=x[9])
        return SSDOptions(
            gamma=int(x[0]),
            budget=int(x[1]),
            fanout=FANOUTS[int(x[2])],
            saguaro_c=x[3],
            fallback=FALLBACKS[int(x[4])],
            fast_backup=FAST_BACKUPS[int(x[5])],
            params=params,
            seed=(int(x[10]) << 31) | int(x[11]),
            max_new_tokens=int(x[12]),
            force_miss=bool(x[13]),
            _report_unmodified_q=bool(x[14]),
        )
