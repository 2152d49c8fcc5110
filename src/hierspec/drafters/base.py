"""The `Drafter` protocol: something that proposes tokens together with the distribution q they
were drawn from.

A drafter is stateless from the engine's point of view: `propose(context, k, ...)` receives the
whole committed context [B, L] every step, and a drafter with a KV cache rolls its own cache back
to the longest common prefix of what it had fed and the new context (the engine never has to
tell it what was accepted; block verification may even emit a token equal to a rejected draft).

Contract of the returned `Draft`: ``tokens`` [B, k] with 0 <= k <= num_tokens, and ``probs``
[B, k, V] holding *exactly* the processed rows the tokens were sampled from, or None for a
deterministic draft (q one-hot at the drafted token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from ..models.base import ForwardOutput, LanguageModel
from ..sampling import SamplingParams

_EMPTY: dict[tuple[int, torch.device], Draft] = {}


@dataclass
class Draft:
    """Proposed tokens [B, k] and their proposal rows [B, k, V] (None = deterministic).

    ``confidence`` [k] (optional, float in [0, 1]): the drafter's own raw, uncalibrated estimate
    that position i is accepted given positions < i were (q of the drafted token for a draft
    model, a function of the match length for lookup drafters). Read by `hierspec.policy`; it
    never affects what the verifier emits."""

    tokens: torch.Tensor
    probs: torch.Tensor | None = None
    confidence: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[-1])

    @staticmethod
    def empty(batch: int = 1, device: torch.device | str = "cpu") -> Draft:
        """A draft of no tokens, shared per (batch, device): never modify it (nothing does:
        drafts are read, and cut by `prefix` into new ones)."""
        key = (batch, torch.device(device))
        out = _EMPTY.get(key)
        if out is None:
            out = _EMPTY[key] = Draft(torch.zeros(batch, 0, dtype=torch.long, device=key[1]), None)
        return out

    def prefix(self, k: int) -> Draft:
        """The first k positions (tokens, rows, confidences); itself if it has no more."""
        if k >= self.num_tokens:
            return self
        probs = None if self.probs is None else self.probs[:, :k]
        conf = None if self.confidence is None else self.confidence[:k]
        return Draft(self.tokens[:, :k], probs, conf)


@dataclass
class DraftTree:
    """A draft tree (see `hierspec.verify.tree`): node 0 is the root (the last committed token);
    ``parents`` [N] with parents[0] = -1 < parents[i] < i; ``tokens`` [N]; ``probs`` None
    (deterministic children)."""

    tokens: torch.Tensor
    parents: torch.Tensor
    probs: torch.Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return int(self.tokens.numel()) - 1


@dataclass(frozen=True)
class TreeSpec:
    """Dynamic tree shape: ``depth`` levels, ``topk`` children per expanded node and expanded
    nodes per level, ``budget`` drafted nodes kept (root excluded)."""

    depth: int = 5
    topk: int = 4
    budget: int = 16

    def __post_init__(self) -> None:
        for name in ("depth", "topk", "budget"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"tree {name}: expected an integer >= 1, got {v!r}")


@runtime_checkable
class Drafter(Protocol):
    """Proposes up to `num_tokens` tokens after `context` (see module docstring)."""

    #: vocabulary the draft's token ids and rows live in; None = any (e.g. prompt lookup)
    vocab_size: int | None

    def propose(
        self,
        context: torch.Tensor,
        num_tokens: int,
        params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> Draft: ...

    def reset(self) -> None:
        """Forget all state (start of a new generation)."""
        ...


#: a stop rule: called with the confidences c_1..c_t after each drafted token; True ends the draft
StopFn = Callable[[Sequence[float]], bool]


@runtime_checkable
class StoppableDrafter(Drafter, Protocol):
    """A drafter whose `propose` also takes ``stop`` (a `StopFn`): called after each drafted
    token X_t with c_1..c_t, before the work that would draft X_{t+1}; True ends the draft at X_t.
    The draft is then a stopping time, which keeps every rule exact (`hierspec.policy`).

    Declared, not inferred: such a drafter sets the class attribute ``stoppable = True``
    (`is_stoppable`); a wrapper passing ``stop`` on is stoppable only if what it wraps is."""

    stoppable: bool

    def propose(
        self,
        context: torch.Tensor,
        num_tokens: int,
        params: SamplingParams,
        generator: torch.Generator | None = None,
        *,
        stop: StopFn | None = None,
    ) -> Draft: ...


def is_stoppable(drafter: Any) -> bool:
    """Whether ``drafter`` declares itself a `StoppableDrafter` (``stoppable = True``)."""
    return isinstance(drafter, StoppableDrafter) and drafter.stoppable is True


@runtime_checkable
class TreeDrafter(Protocol):
    """Proposes a draft tree after `context` (see `DraftTree`); used by `hierspec.step.tree_step`."""

    vocab_size: int | None

    def propose_tree(self, context: torch.Tensor, spec: TreeSpec, params: SamplingParams) -> DraftTree: ...

    def reset(self) -> None: ...


@runtime_checkable
class FeatureDrafter(Protocol):
    """A drafter that reads the target's features (EAGLE): the decode loop asks the target for its
    last hidden states (``output_hidden=True``) and reports those of every committed position,
    in order, through ``observe_target`` -- the prefill (positions 0..L-2) and, after each
    verification, the root and the accepted tokens. ``hidden`` lives on the target's device."""

    def observe_target(self, start: int, hidden: torch.Tensor) -> None:
        """Record the target's features ``hidden`` [T, H] of positions start..start+T-1 (any
        later ones are stale and dropped)."""
        ...


@runtime_checkable
class StepObserver(Protocol):
    """A drafter told each step's outcome by the engine, after verification and before the
    commit: ``drafted`` tokens were verified, ``accepted`` of them kept, ``tokens`` emitted."""

    def observe_step(self, drafted: int, accepted: int, tokens: list[int]) -> None: ...


def check_context(context: torch.Tensor) -> None:
    """Drafters work at batch size 1: `context` must be [1, L]."""
    if context.dim() != 2 or context.shape[0] != 1:
        raise ValueError(f"context: expected shape [1, L], got {tuple(context.shape)}")


def draft_room(context: torch.Tensor, num_tokens: int, max_length: int) -> int:
    """How many tokens a model drafter may propose after ``context`` [1, L] (checked): at most
    ``num_tokens`` and at most ``max_length - L``, the room left in its context window. A
    result <= 0 means it proposes nothing (`Draft.empty`)."""
    check_context(context)
    return min(num_tokens, max_length - context.shape[1])


def sync_cache(model: LanguageModel, fed: torch.Tensor, ctx: torch.Tensor, upto: int) -> ForwardOutput | None:
    """Bring a cache that holds the tokens `fed` [n] to hold ctx[:upto] (ctx [L], upto <= L).

    Crops to the longest common prefix of `fed` and ctx (never past L - 1, so the last context
    token is always re-fed when upto = L) and forwards ctx[lcp:upto]; returns that forward's
    output, or None if nothing was fed. The caller records ctx[:upto] as its new `fed`.
    """
    n = min(fed.numel(), upto, ctx.numel() - 1)
    lcp = int((fed[:n] == ctx[:n]).long().cumprod(0).sum()) if n > 0 else 0
    model.crop(lcp)
    if upto > lcp:
        return model.forward(ctx[None, lcp:upto].to(model.device))
    return None
