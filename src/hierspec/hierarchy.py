"""Draft hierarchies (Mohri et al., arXiv 2510.19705): a speculative sampler of M_i that uses the
level below as its drafter *is* a drafter for M_{i+1}.

    M_0 (any drafter: n-gram, small model) -> M_1 -> ... -> M_{n-1} -> target

`SpeculativeDrafter(model, inner, rule, gamma)` proposes k tokens for the level above by running
speculative steps of `model` with `inner` as drafter until exactly k tokens are emitted (each
step drafts at most min(gamma, remaining - 1), so a step never overshoots). It returns those
tokens with **model's full processed row** at each position as q:

    X_1..X_k ~ prod_t p_i(X_t | X_<t)       (speculative sampling is exact for M_i)
    q_t := p_i(. | X_<t)                    the conditional law X_t was emitted under

so the level above sees a proposal drawn exactly from the q it is told, and every rule stays
lossless. Handing up the residual a correction token was drawn from (instead of the full row)
is biased: the tests keep that variant as a negative control. At temperature 0 every level is
greedy and returns q one-hot (probs None).

Randomness: each level uses two independent streams, one for its drafter below and one for its own
verification (the engine's convention, which the losslessness proofs assume). Both are derived
at the first `propose` after `reset` from the generator the level above passes (one draw from
it seeds the level's `hierspec.rng.Streams`; torch's default generator if None), so a seeded generation is
reproducible and the level's coins are independent of the level above's verification stream.

Device: the level's streams, the rows it hands up and its tokens live on its model's device (the
rows are never copied to the host); its context stays on the CPU, where it appends each step's
committed tokens (host values already: the step's one sync). A level syncs once per inner step.

Caches: `model` keeps "context minus its last token" between steps (as the engine's target);
on each `propose` it is rolled back to the longest common prefix with the new context (the
level above may reject any suffix), and the level below re-syncs itself the same way, so caches
at every level stay consistent without being told what was accepted.
"""

from __future__ import annotations

import torch

from .drafters.base import Draft, Drafter, draft_room, sync_cache
from .models.base import LanguageModel
from .rng import Streams
from .sampling import SamplingParams
from .stats import SpecStats
from .step import StepContext, StepResult, speculative_step
from .verify import get_rule


class SpeculativeDrafter:
    """One level of a hierarchy: speculative sampling of `model` with drafter `inner`."""

    def __init__(
        self, model: LanguageModel, inner: Drafter | None, rule: str = "block", gamma: int = 4
    ) -> None:
        if not isinstance(gamma, int) or gamma < 1:
            raise ValueError(f"gamma: expected an integer >= 1 for this level, got {gamma!r}")
        iv = getattr(inner, "vocab_size", None)
        if inner is not None and iv is not None and iv != model.vocab_size:
            raise ValueError(
                f"levels' vocabularies differ: the drafter below has {iv} tokens, this level's "
                f"model has {model.vocab_size}"
            )
        self.model = model
        self.inner = inner
        self.rule = get_rule(rule)
        self.gamma = gamma
        self.vocab_size = model.vocab_size
        self.reset()

    def reset(self) -> None:
        self.model.reset()
        if self.inner is not None:
            self.inner.reset()
        self._fed = torch.zeros(0, dtype=torch.long)
        self.stats = SpecStats()
        self._parent: torch.Generator | None = None
        self._streams: Streams | None = None

    def _generators(self, generator: torch.Generator | None) -> Streams:
        """This level's streams, seeded from ``generator`` once per generation (re-derived if the
        level above passes another generator); keyed by this level's positions per step."""
        g = generator if generator is not None else torch.default_generator
        if self._streams is None or g is not self._parent:
            seed = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device))
            self._parent, self._streams = g, Streams(seed, self.model.device)
        return self._streams

    def _step(
        self, local: torch.Tensor, k_max: int, params: SamplingParams, generator: torch.Generator | None
    ) -> StepResult:
        rule = get_rule("greedy") if params.greedy else self.rule
        ctx = StepContext(self.model, self.inner, rule, params, self._generators(generator), self.stats)
        return speculative_step(ctx, local, k_max)

    def propose(
        self,
        context: torch.Tensor,
        num_tokens: int,
        params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> Draft:
        dev = self.model.device
        num_tokens = draft_room(context, num_tokens, self.model.max_length)
        if num_tokens <= 0:
            return Draft.empty(1, dev)
        local = context.cpu()
        sync_cache(self.model, self._fed, local[0], local.shape[1] - 1)
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        while len(tokens) < num_tokens:
            k_max = min(self.gamma, num_tokens - len(tokens) - 1)
            res = self._step(local, k_max, params, generator)
            tokens += res.tokens
            if res.rows is not None:
                rows.append(res.rows)
            local = torch.cat([local, torch.tensor([res.tokens], dtype=torch.long)], 1)
        self._fed = local[0, :-1].clone()
        self.stats.num_generated_tokens += len(tokens)
        probs = None if params.greedy else torch.cat(rows)[None]  # [1, k, V], on dev: no copy
        return Draft(torch.tensor([tokens], dtype=torch.long, device=dev), probs)


def build_hierarchy(
    models: list[LanguageModel],
    bottom: Drafter | None,
    rules: list[str] | str = "block",
    gammas: list[int] | int = 4,
) -> Drafter | None:
    """The drafter for the target from draft models ordered smallest -> largest (the target
    itself excluded) with `bottom` (n-gram, or None) below the smallest. `rules`/`gammas` are per
    level, bottom first (a single value applies to all)."""
    n = len(models)
    rules = [rules] * n if isinstance(rules, str) else list(rules)
    gammas = [gammas] * n if isinstance(gammas, int) else list(gammas)
    if len(rules) != n or len(gammas) != n:
        raise ValueError(
            f"expected {n} rules and gammas (one per draft level), got {len(rules)} and {len(gammas)}"
        )
    drafter = bottom
    for model, rule, gamma in zip(models, rules, gammas, strict=True):
        drafter = SpeculativeDrafter(model, drafter, rule=rule, gamma=gamma)
    return drafter
