"""Draft-model drafter: a smaller LanguageModel with the target's vocabulary samples K tokens
autoregressively, recording the processed rows q it sampled from.

Cache discipline: the draft's cache holds the tokens it has fed (`_fed`). Each `propose` crops the
cache to the longest common prefix of `_fed` and the committed context, feeds the rest of the
context (at least its last token, whose logits give q_1), then for t = 1..K samples X_t ~ q_t and
feeds X_t to get q_{t+1} (X_K is never fed). At temperature 0 the draft is greedy and
deterministic, so it returns probs=None (q one-hot), which every rule handles exactly.

Draft sampling at temperature > 0 (``sampling``, `DRAFT_SAMPLINGS`):

    "sample"  X_t = F_{q_t}^{-1}(u_t), u_t from the draft stream; returns the rows q_t (what the
              seeds' rules assume: token-wise, block and HSD verification read q).
    "greedy"  X_t = argmax_x q_t(x) (the first on ties), the engines' practice (llama.cpp, SGLang
              draft greedily and verify by exact match); returns probs=None: the draft is a
              deterministic function of the context, q one-hot at X_t. Temperature, top-k, top-p
              and min-p never move the maximum, so X_t is the raw logits' argmax up to ties that
              rounding of the processed row creates; the row is still processed, for c_t.

Both are exact under every rule: a sampled draft is verified with its rows, a greedy one by the
coupled sampler of deterministic drafts (`hierspec.verify.coupled`, `Rule(deterministic=...)`),
whose law for one draft is, for token / block / hsd / match alike,
P(accept X_t | X_<t accepted) = p_t(X_t). Reporting the full row q_t for a greedy X_t would be
wrong (X_t was not drawn from it): tests/test_draft_sampling.py keeps that as a negative control.
Other model-based drafters: an EAGLE chain (`hierspec.drafters.eagle`) drafts as "sample" and an
EAGLE tree is deterministic already; a hierarchy level (`hierspec.hierarchy`) emits tokens
distributed exactly as its own model, so it has no greedy variant short of greedy-decoding that
model (not offered).

Confidence (`Draft.confidence`): c_t = q_t(X_t), the probability the draft gave its own token (at
temperature 0: the softmax maximum of the raw draft logits; greedy at T > 0: the maximum of q_t).
Early stop: ``stop(confidences)``, if given, is called after each drafted token X_t (t < K)
with c_1..c_t, BEFORE the forward that would give q_{t+1}; True ends the draft at X_t (no wasted
forward). The decision to draft X_{t+1} then depends only on X_1..X_t and the draft's rows: a
stopping time of the draft, which keeps every verification rule exact (`hierspec.policy`); X_t
itself is always returned.

Device: tokens, rows, confidences and uniforms (`hierspec.sampling.uniforms`, from the draft
stream) stay on the draft model's device; each drafted token is fed back as a [1, 1] device tensor,
so a draft without ``stop`` never waits on the device per drafted token (at temperature 0: not at
all; at T > 0 `process_logits` checks each row for NaN). With ``stop`` the callback reads c_t on
the host: one sync per drafted token, the price of deciding from the values. `_fed` is a CPU
tensor; the copy of the drafted tokens it needs is deferred to its next read (the next `propose`,
after the step's commit has synced), so `propose` itself adds no transfer from the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..models.base import LanguageModel
from ..sampling import SamplingParams, categorical, process_logits, uniforms
from .base import Draft, draft_room, sync_cache

StopFn = Callable[[Sequence[float]], bool]

#: how a model drafter picks its tokens at temperature > 0 (see the module docstring)
DRAFT_SAMPLINGS = ("sample", "greedy")


def check_draft_sampling(sampling: object, arg: str = "sampling") -> str:
    """``sampling`` if it is one of `DRAFT_SAMPLINGS`; else one ValueError naming ``arg``."""
    if not isinstance(sampling, str) or sampling not in DRAFT_SAMPLINGS:
        raise ValueError(f"{arg}: expected one of {', '.join(map(repr, DRAFT_SAMPLINGS))}, got {sampling!r}")
    return sampling


class ModelDrafter:
    """Speculative proposals from a draft `LanguageModel` (batch size 1); ``sampling`` "sample"
    (draw from q) or "greedy" (its argmax, probs=None) at temperature > 0."""

    stoppable = True  # `propose` takes ``stop`` (`hierspec.drafters.base.StoppableDrafter`)

    def __init__(self, model: LanguageModel, sampling: str = "sample") -> None:
        self.model = model
        self.sampling = check_draft_sampling(sampling)
        self.vocab_size = model.vocab_size
        self.reset()

    def reset(self) -> None:
        self.model.reset()
        self._fed = torch.zeros(0, dtype=torch.long)

    @property
    def _fed(self) -> torch.Tensor:
        """The tokens the draft's cache holds [n] (CPU); appends the drafted tokens still on the
        device (one transfer)."""
        if self._pending is not None:
            self._fed_host = torch.cat([self._fed_host, self._pending.cpu()])
            self._pending = None
        return self._fed_host

    @_fed.setter
    def _fed(self, fed: torch.Tensor) -> None:
        self._fed_host = fed
        self._pending: torch.Tensor | None = None

    def _sync(self, ctx: torch.Tensor) -> torch.Tensor:
        """Crop the cache to the common prefix with ctx [L]; return the logits row after ctx."""
        out = sync_cache(self.model, self._fed, ctx, ctx.numel())
        self._fed = ctx.clone()
        return out.logits[0, -1]

    def propose(
        self,
        context: torch.Tensor,
        num_tokens: int,
        params: SamplingParams,
        generator: torch.Generator | None = None,
        *,
        stop: StopFn | None = None,
    ) -> Draft:
        dev = self.model.device
        num_tokens = draft_room(context, num_tokens, self.model.max_length)
        if num_tokens <= 0:
            return Draft.empty(1, dev)
        logits = self._sync(context[0].cpu())  # [V]
        greedy_t = not params.greedy and self.sampling == "greedy"  # argmax of q at T > 0
        u = None if params.greedy or greedy_t else uniforms(num_tokens, generator, dev)  # [K]
        tokens: list[torch.Tensor] = []  # X_t, 0-dim on dev
        rows: list[torch.Tensor] = []  # q_t [V]
        conf: list[torch.Tensor] = []  # c_t, 0-dim on dev
        seen: list[float] = []  # c_1..c_t on the host, for `stop` only
        for t in range(num_tokens):
            if params.greedy:
                x = logits.argmax()
                c = torch.softmax(logits.double(), -1).gather(0, x.view(1))[0]
            elif greedy_t:  # q one-hot at X_t: no row handed on
                q = process_logits(logits[None], params)[0]
                x = q.argmax()  # the first maximum
                c = q.gather(0, x.view(1))[0]
            else:
                q = process_logits(logits[None], params)[0]
                x = categorical(q[None], u[t : t + 1])[0]
                c = q.gather(0, x.view(1))[0]
                rows.append(q)
            tokens.append(x)
            conf.append(c)
            if t + 1 < num_tokens:
                if stop is not None:
                    seen.append(float(c))  # the one host sync per token, only with a stop rule
                    if stop(seen):
                        break
                logits = self.model.forward(x.view(1, 1)).logits[0, -1]
        out = torch.stack(tokens)[None]  # [1, k]
        self._pending = out[0, :-1]  # X_1..X_{k-1} were fed; copied to `_fed` when next read
        probs = torch.stack(rows)[None] if rows else None  # [1, k, V]
        return Draft(out, probs, torch.stack(conf).float().clamp(0.0, 1.0))
