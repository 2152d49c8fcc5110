"""Greedy verification (temperature 0): accept draft tokens while they equal the target argmax.

    a_t = argmax target_probs[t]      (the FIRST index among exact ties, as plain decoding takes)
    tau = number of leading t < K with X_{t+1} = a_t,
    Y   = a_tau.

The output equals plain greedy decoding of the target token for token (up to floating-point
differences between a multi-token forward and a one-token forward). Only the argmax matters, so
``target_probs`` may hold any finite scores (logits or probabilities); ``draft_probs`` is ignored.
The law is a point mass: L[tau, a_tau] = 1.

Ties: a drafted token that attains the row maximum while a lower index ties with it is REJECTED
(Y is then the lower index), exactly as plain greedy decoding would continue. Comparing with the
row maximum alone would accept it and change the output (e.g. a model with two identical lm_head
rows gives bitwise-equal logits to two tokens, and a drafter proposing the higher one).

Hot path: one argmax over [B, K+1, V] gives every a_t (match test and Y). On CPU it is numpy's
(`_argmax`; bfloat16 / float16 rows are widened to float32 first, which is exact and keeps the
order): as fast as torch's `amax` here, while torch's CPU `argmax` over V is ~10x slower.
`verify_host` is the same rule for one sequence whose scores are a numpy array on the host (the
engine's CPU path: llama.cpp, torch on the CPU), with the validity check folded in: a few
microseconds of numpy instead of a dozen small torch ops (~0.5 ms per step on a 2-core CPU).
"""

from __future__ import annotations

import numpy as np
import torch

from ..sampling import invalid_logits_error
from .core import Rule, VerifyOutput


def verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> VerifyOutput:
    """Greedy verification for a batch (see module docstring); `generator` is unused."""
    del draft_probs, generator
    k = draft_tokens.shape[1]
    a = _argmax(target_probs[:, : k + 1])  # [B, K+1]
    tau = (a[:, :k] == draft_tokens.long()).long().cumprod(-1).sum(-1)
    y = a.gather(1, tau[:, None]).squeeze(1)
    return VerifyOutput(num_accepted=tau, next_token=y)


def verify_host(draft: list[int], scores: np.ndarray) -> tuple[int, int]:
    """`verify` for one sequence on the host: (tau, Y) from its draft and scores [K+1, V].

    Raises `hierspec.sampling.invalid_logits_error` if a row holds NaN or +inf or is all -inf
    (numpy's argmax returns the first NaN, else the first +inf: the row's top is then not finite,
    exactly when `hierspec.sampling.check_logits` would refuse the row)."""
    a = scores.argmax(-1)  # [K+1], the first index among ties
    if not np.isfinite(scores[np.arange(a.shape[0]), a]).all():
        raise invalid_logits_error()
    tau = 0
    while tau < len(draft) and draft[tau] == a[tau]:
        tau += 1
    return tau, int(a[tau])


def _argmax(rows: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim, the first index among exact ties (as torch and numpy both do).

    On CPU numpy's (~4 µs against ~65 µs for torch's on a 49,152-wide float32 row here);
    bfloat16 / float16 rows are widened to float32 first (exact, order-preserving)."""
    if rows.device.type == "cpu" and not rows.requires_grad:
        if rows.dtype in (torch.bfloat16, torch.float16):
            rows = rows.float()
        if rows.dtype in (torch.float32, torch.float64):
            return torch.as_tensor(rows.numpy().argmax(-1))
    return rows.argmax(-1)


def law(
    draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor
) -> torch.Tensor:
    """Point mass L[tau, a_tau] = 1 for one draft (a_t = first argmax of row t)."""
    k = draft_tokens.shape[0]
    a = _argmax(target_probs)
    tau = int((a[:k] == draft_tokens.long()).long().cumprod(0).sum())
    out = torch.zeros_like(
        target_probs, dtype=torch.float64 if target_probs.dtype == torch.float64 else torch.float32
    )
    out[tau, a[tau]] = 1.0
    return out


rule = Rule("greedy", verify, law, scores_only=True, doc=__doc__)
