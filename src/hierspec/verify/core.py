"""Shared contract of the verification rules: output type, input validation, the Rule wrapper.

Contract (functional core, batch-first, as vLLM's rejection sampler):

    rule(draft_tokens[B, K], draft_probs[B, K, V] | None, target_probs[B, K+1, V], generator=None)
        -> VerifyOutput(num_accepted[B], next_token[B])

* ``target_probs[:, t]`` is the target's processed distribution of the token after the first t
  draft tokens (t = 0..K); row K is the bonus distribution.
* ``draft_probs[:, t]`` is *exactly* the processed distribution draft token t was drawn from;
  ``None`` means a deterministic draft (q one-hot at the drafted token).
* The output is the accepted prefix ``draft_tokens[b, :num_accepted[b]]`` followed by
  ``next_token[b]`` (the correction or bonus token). Inputs are never modified in place.
* ``rule.law(draft_tokens[K], draft_probs[K, V] | None, target_probs[K+1, V])`` returns
  L[k, y] = P(num_accepted = k, next_token = y) for that one draft, exactly.

Validation (``validate=True``, the default for public calls; the engine passes ``False`` because
it builds the rows itself): shapes and dtypes agree, probabilities are finite and >= 0, every row
sums to 1 within ``PROB_SUM_TOL`` (absolute), draft tokens lie in [0, V), and q > 0 at every drafted
token. Violations raise ``ValueError`` naming the argument and what was expected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..sampling import check_generator

#: Absolute tolerance on |sum(row) - 1| for probability rows (float32 softmax over 49152 entries
#: sums to 1 within ~1e-5; 1e-3 also admits rows renormalised in bfloat16).
PROB_SUM_TOL = 1e-3


@dataclass
class VerifyOutput:
    """Outcome of one verification step for a batch.

    num_accepted: LongTensor [B], number of accepted draft tokens (0..K).
    next_token:   LongTensor [B], the token emitted after the accepted prefix.
    """

    num_accepted: torch.Tensor
    next_token: torch.Tensor

    def tokens(self, draft_tokens: torch.Tensor, pad: int = -1) -> torch.Tensor:
        """Emitted tokens [B, K+1]: accepted prefix, next token, then `pad`."""
        b, k = draft_tokens.shape
        out = torch.full((b, k + 1), pad, dtype=torch.long, device=draft_tokens.device)
        pos = torch.arange(k + 1, device=draft_tokens.device)[None, :]
        n = self.num_accepted[:, None]
        out[:, :k] = torch.where(pos[:, :k] < n, draft_tokens.long(), out[:, :k])
        out.scatter_(1, n, self.next_token[:, None])
        return out


def _fail(arg: str, expected: str, got: str) -> None:
    raise ValueError(f"{arg}: expected {expected}, got {got}")


def _check_prob_rows(name: str, probs: torch.Tensor) -> None:
    if not bool(torch.isfinite(probs).all()):
        _fail(name, "finite probabilities", "NaN or inf entries")
    if bool((probs < 0).any()):
        _fail(name, "probabilities >= 0", f"a negative entry ({float(probs.min()):.3g})")
    dev = (probs.sum(-1, dtype=torch.float64) - 1.0).abs()
    if bool((dev > PROB_SUM_TOL).any()):
        _fail(
            name,
            f"rows summing to 1 (tolerance {PROB_SUM_TOL:g})",
            f"a row summing to {1.0 + float(dev.max()):.6g} (pass processed probabilities, not logits)",
        )


def check_inputs(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    *,
    batched: bool = True,
    scores_only: bool = False,
) -> None:
    """Validate a rule's inputs (see module docstring); ``batched=False`` checks the law's
    single-draft shapes. ``scores_only`` (greedy) only requires finite target scores."""
    lead = 1 if batched else 0
    tshape = "[B, K+1, V]" if batched else "[K+1, V]"
    if not isinstance(draft_tokens, torch.Tensor) or draft_tokens.dtype not in (
        torch.int64,
        torch.int32,
    ):
        _fail(
            "draft_tokens",
            "an int64/int32 tensor",
            repr(type(draft_tokens).__name__)
            if not isinstance(draft_tokens, torch.Tensor)
            else str(draft_tokens.dtype),
        )
    if draft_tokens.dim() != 1 + lead:
        _fail(
            "draft_tokens",
            "shape [B, K]" if batched else "shape [K]",
            str(tuple(draft_tokens.shape)),
        )
    if not isinstance(target_probs, torch.Tensor) or not target_probs.is_floating_point():
        _fail(
            "target_probs",
            "a floating-point tensor",
            str(getattr(target_probs, "dtype", type(target_probs))),
        )
    if target_probs.dim() != 2 + lead:
        _fail("target_probs", f"shape {tshape}", str(tuple(target_probs.shape)))
    k = draft_tokens.shape[-1]
    v = target_probs.shape[-1]
    if target_probs.shape[:-1] != (*draft_tokens.shape[:-1], k + 1):
        _fail(
            "target_probs",
            f"shape {tshape} with K+1 = {k + 1} (draft_tokens has K = {k})"
            + (f" and B = {draft_tokens.shape[0]}" if batched else ""),
            str(tuple(target_probs.shape)),
        )
    if v < 1:
        _fail("target_probs", "a vocabulary of at least one token", f"V = {v}")
    if draft_tokens.device != target_probs.device:
        _fail(
            "draft_tokens",
            f"device {target_probs.device} (as target_probs)",
            str(draft_tokens.device),
        )
    if k and (bool((draft_tokens < 0).any()) or bool((draft_tokens >= v).any())):
        _fail(
            "draft_tokens",
            f"token ids in [0, {v})",
            f"ids in [{int(draft_tokens.min())}, {int(draft_tokens.max())}]",
        )
    if scores_only:
        if not bool(torch.isfinite(target_probs).all()):
            _fail("target_probs", "finite scores", "NaN or inf entries")
    else:
        _check_prob_rows("target_probs", target_probs)
    if draft_probs is None:
        return
    if not isinstance(draft_probs, torch.Tensor) or not draft_probs.is_floating_point():
        _fail("draft_probs", "None or a floating-point tensor", str(type(draft_probs)))
    if draft_probs.shape != (*draft_tokens.shape, v):
        _fail(
            "draft_probs",
            f"shape {'[B, K, V]' if batched else '[K, V]'} = {(*draft_tokens.shape, v)}",
            str(tuple(draft_probs.shape)),
        )
    if draft_probs.device != target_probs.device:
        _fail("draft_probs", f"device {target_probs.device}", str(draft_probs.device))
    if scores_only:
        return
    _check_prob_rows("draft_probs", draft_probs)
    if k:
        q_tok = draft_probs.gather(-1, draft_tokens.long()[..., None])
        if bool((q_tok <= 0).any()):
            _fail(
                "draft_probs",
                "q > 0 at every drafted token (draft_probs must be the distribution the draft "
                "tokens were sampled from)",
                "q = 0 at a drafted token",
            )


def token_probs(
    draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_t(X_t), q_t(X_t)) at the drafted tokens, shapes [..., K]; q = 1 for one-hot drafts."""
    k = draft_tokens.shape[-1]
    idx = draft_tokens.long()[..., None]
    p_tok = target_probs[..., :k, :].gather(-1, idx).squeeze(-1)
    if draft_probs is None:
        q_tok = torch.ones_like(p_tok)
    else:
        q_tok = draft_probs.gather(-1, idx).squeeze(-1)
    return p_tok, q_tok


def dense_draft_probs(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    vocab_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """q [..., K, V] as a dense tensor (one-hot rows for a deterministic draft); analysis paths."""
    if draft_probs is not None:
        return draft_probs
    return torch.nn.functional.one_hot(draft_tokens.long(), vocab_size).to(dtype)


VerifyFn = Callable[..., VerifyOutput]
LawFn = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]


class Rule:
    """A named verification rule: ``rule(...)`` verifies a batch, ``rule.law(...)`` is its law."""

    def __init__(
        self,
        name: str,
        verify: VerifyFn,
        law: LawFn,
        *,
        scores_only: bool = False,
        uses_uniforms: bool = False,
        deterministic: VerifyFn | None = None,
        doc: str = "",
    ) -> None:
        """``uses_uniforms``: ``verify`` takes the rows' uniforms (``uniforms=`` [B, K+1]).
        ``deterministic``: the sampler for one-hot drafts (``draft_probs`` None), same law as
        ``verify``'s, taking ``uniforms=`` (`hierspec.verify.coupled`)."""
        self.name = name
        self._verify = verify
        self._law = law
        self._scores_only = scores_only
        self._uses_uniforms = uses_uniforms
        self._deterministic = deterministic
        self.__doc__ = doc or verify.__doc__

    def __repr__(self) -> str:
        return f"Rule({self.name!r})"

    def __call__(
        self,
        draft_tokens: torch.Tensor,
        draft_probs: torch.Tensor | None,
        target_probs: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        validate: bool = True,
        uniforms: torch.Tensor | None = None,
    ) -> VerifyOutput:
        """Verify a batch. ``uniforms`` [B, K+1] (float64 in [0, 1)): the rows' uniforms for the
        coupled sampler of one-hot drafts and the match rule, keyed by position in the engine
        (`hierspec.rng`); rules and paths that do not read them draw from ``generator``."""
        if validate:
            check_inputs(draft_tokens, draft_probs, target_probs, scores_only=self._scores_only)
        check_generator(generator, target_probs.device)
        if draft_probs is None and self._deterministic is not None:
            return self._deterministic(draft_tokens, None, target_probs, generator, uniforms=uniforms)
        if self._uses_uniforms:
            return self._verify(draft_tokens, draft_probs, target_probs, generator, uniforms=uniforms)
        return self._verify(draft_tokens, draft_probs, target_probs, generator)

    def law(
        self,
        draft_tokens: torch.Tensor,
        draft_probs: torch.Tensor | None,
        target_probs: torch.Tensor,
        *,
        validate: bool = True,
    ) -> torch.Tensor:
        """L[k, y] = P(num_accepted = k, next_token = y) for one draft.

        Shapes: draft_tokens [K], draft_probs [K, V] or None, target_probs [K+1, V]."""
        if validate:
            check_inputs(
                draft_tokens,
                draft_probs,
                target_probs,
                batched=False,
                scores_only=self._scores_only,
            )
        return self._law(draft_tokens, draft_probs, target_probs)
