"""HiSpec (Kumar et al., arXiv 2510.01336): early-exit intermediate verification inside one model,
and LayerSkip-style single-exit self-speculation (the baseline HiSpec is measured against).

Three roles, one model (`hierspec.models.layered.LayerStack` cut at L_d < L_i < L):

    draft         exit L_d (~L/8)   N_d tokens per draft step, autoregressive       layers [0, L_d)
    intermediate  exit L_i (~L/4)   verifies each draft step in ONE pass            layers [L_d, L_i)
    full model    L                 verifies the N_i buffered tokens in ONE pass     layers [L_i, L)

It is a three-level hierarchy (`hierspec.hierarchy`) whose levels are views of one model:

    engine(target = full view,
           drafter = SpeculativeDrafter(intermediate view, ModelDrafter(draft view), rule, N_d),
           gamma = N_i)

* One rule: ``build_hispec(rule=...)`` (token / block / hsd; greedy at T = 0) is used by both
  stages; `SelfSpeculator.generate` takes no other (a different ``rule`` there is an error).
* Stage 1 (intermediate verification): draft tokens X ~ q_d are verified against p_i (the exit-L_i
  distribution) with ``rule``. Accepted tokens and the
  correction/bonus token are distributed exactly as p_i's autoregressive law, and each is buffered
  with its FULL p_i row (the hierarchy contract, never the residual).
* Stage 2 (full verification): the full model verifies the N_i buffered tokens with ``rule`` and
  q := p_i, the distribution they were actually emitted under. Using q_d here instead is the classic HiSpec
  sampling trap: the buffered tokens are not distributed as q_d (stage 1 reshaped them); the tests
  keep that variant as the negative control.
* Exactness: the views change how each model's logits are computed (shared KV, buffered hidden
  states), never their values: every view's logits equal the exit's logits on a fresh prefill
  (the `LayerStack` invariant). So the output law is the hierarchy's: exactly the full model's
  (processed) distribution at T > 0, and token-identical to plain greedy decoding at T = 0 (fp32 /
  fp64; bf16 batch shapes can flip near-ties).
* Reuse: layers < L_d hold the draft tokens' KV as drafted; the intermediate pass continues from
  the buffered L_d hidden states and the full pass from the buffered L_i hidden states; only the
  newest token (the last level's correction/bonus, never seen by a lower range) goes through the
  early layers inside the deeper pass. Rejections prune every range that saw the tokens.
* Buffer length: the paper flushes once |V| >= N_i (|V| may overshoot to N_i + N_d). Here the last
  draft step of a cycle drafts min(N_d, N_i - |V| - 1) tokens, so the full model always verifies
  exactly N_i tokens (fewer only at the end of generation). A fixed block length is what the block
  and HSD rules' guarantee is proved for, and it bounds the unverified work.

Single-exit self-speculation (LayerSkip, `build_early_exit_spec`): ``engine(target = full view,
drafter = ModelDrafter(draft view), gamma, rule)``; the full pass continues from the L_d hidden
states and the layers < L_d keep the draft's KV.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .drafters.model import ModelDrafter
from .engine import GenerationResult, generate
from .hierarchy import SpeculativeDrafter
from .models.early_exit import EarlyExitHead
from .models.layered import ExitView, LayerStack, exit_views
from .verify import get_rule

__all__ = ["SelfSpeculator", "build_early_exit_spec", "build_hispec"]


@dataclass
class SelfSpeculator:
    """A self-speculative decoder over one `LayerStack`: ``generate`` runs the engine with the
    full view as target and ``drafter`` (a view-based drafter), verifying ``gamma`` tokens per
    full-model pass with ``rule`` (HiSpec: the same rule as its intermediate level, both set by
    `build_hispec`); ``stage_stats`` reports per-stage work after a generation."""

    method: str  # "hispec" | "early-exit"
    stack: LayerStack
    target: ExitView
    drafter: Any
    gamma: int
    level: SpeculativeDrafter | None = None  # the intermediate level (HiSpec only)
    rule: str = "token"  # the full model's verification rule (at T > 0)

    def generate(self, prompt_ids: torch.Tensor | Sequence[int], **kwargs: Any) -> GenerationResult:
        """`hierspec.engine.generate` with this system's target, drafter, gamma and rule (other
        keyword arguments: params, max_new_tokens, eos_token_id, stop_strings, tokenizer, seed,
        ...). ``rule`` is the system's: passing a different one is a ValueError."""
        rule = kwargs.pop("rule", self.rule)
        if rule != self.rule:
            built = "build_hispec" if self.method == "hispec" else "build_early_exit_spec"
            raise ValueError(
                f"rule: this {self.method} system verifies with {self.rule!r}, set once at "
                f"{built}(rule=...); got {rule!r}"
            )
        for st in self.stack.stats:
            st.__init__()
        return generate(
            self.target, prompt_ids, drafter=self.drafter, gamma=self.gamma, rule=self.rule, **kwargs
        )

    def stage_stats(self, result: GenerationResult) -> dict[str, Any]:
        """Per-stage statistics of the last generation.

        full_*: the full model's passes (``tokens_per_full_pass`` = committed tokens per pass);
        full_overturn_rate: fraction of buffered tokens the full model rejected;
        full_overturned_passes: fraction of full passes that rejected at least one buffered token;
        intermediate_*: the intermediate verifier's acceptance of draft tokens (HiSpec);
        ranges: passes, tokens and seconds per layer range.
        """
        s = result.stats
        hist = s.acceptance_histogram
        overturned = sum(c for j, c in enumerate(hist) if j < len(hist) - 1) if hist else 0
        out: dict[str, Any] = {
            "method": self.method,
            "exits": list(self.stack.exits),
            "gamma": self.gamma,
            "full_passes": s.num_target_forwards,
            "tokens_per_full_pass": s.num_generated_tokens / s.num_target_forwards
            if s.num_target_forwards
            else 0.0,
            "full_acceptance_rate": s.draft_acceptance_rate,
            "full_overturn_rate": 1.0 - s.draft_acceptance_rate if s.num_draft_tokens else 0.0,
            "full_overturned_passes": overturned / s.num_spec_steps if s.num_spec_steps else 0.0,
            "ranges": [
                {"layers": list(b), **st.as_dict()}
                for b, st in zip(self.stack.bounds, self.stack.stats, strict=True)
            ],
        }
        if self.level is not None:
            ls = self.level.stats
            out["intermediate_acceptance_rate"] = ls.draft_acceptance_rate
            out["intermediate_mean_acceptance_length"] = ls.mean_acceptance_length
            out["intermediate_passes"] = ls.num_target_forwards
            out["draft_tokens"] = ls.num_draft_tokens
        return out


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")


def build_hispec(
    model: Any,
    draft_head: EarlyExitHead,
    verify_head: EarlyExitHead,
    *,
    nd: int = 2,
    ni: int = 4,
    rule: str = "token",
    max_length: int | None = None,
) -> SelfSpeculator:
    """HiSpec on ``model`` with early-exit heads at L_d = draft_head's exit and L_i =
    verify_head's exit (L_d < L_i < L). ``rule`` (token / block / hsd) verifies both the draft
    steps against the intermediate exit (stage 1) and the buffered tokens against the full model
    (stage 2); at temperature 0 both stages are greedy."""
    _check_count("nd", nd)
    _check_count("ni", ni)
    ld, li = draft_head.config.exit_layer, verify_head.config.exit_layer
    if not ld < li:
        raise ValueError(f"exits: the draft exit ({ld}) must come before the intermediate exit ({li})")
    vd, vi, vf = exit_views(model, [draft_head, verify_head], max_length=max_length)
    get_rule(rule)
    vd, vi, vf = exit_views(model, [draft_head, verify_head], max_length=max_length)
    level = SpeculativeDrafter(vi, ModelDrafter(vd), rule=rule, gamma=nd)
    return SelfSpeculator("hispec", vf.stack, vf, level, ni, level, rule)


def build_early_exit_spec(
    model: Any,
    draft_head: EarlyExitHead,
    *,
    gamma: int = 4,
    rule: str = "token",
    max_length: int | None = None,
) -> SelfSpeculator:
    """LayerSkip-style self-speculation: draft at the head's exit, verify with the full model
    using ``rule`` (token / block / hsd; greedy at temperature 0)."""
    _check_count("gamma", gamma)
    get_rule(rule)
    vd, vf = exit_views(model, [draft_head], max_length=max_length)
    return SelfSpeculator("early-exit", vf.stack, vf, ModelDrafter(vd), gamma, rule=rule)
