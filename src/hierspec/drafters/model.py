"""Draft-model drafter: a smaller LanguageModel with the target's vocabulary samples K tokens
autoregressively, recording the processed rows q it sampled from.

Cache discipline: the draft's cache holds the tokens it has fed (`_fed`). Each `propose` crops the
cache to the longest common prefix of `_fed` and the committed context, feeds the rest of the
context (at least its last token, whose logits give q_1), then for t = 1..K samples X_t ~ q_t and
feeds X_t to get q_{t+1} (X_K is never fed). At temperature 0 the draft is greedy and
deterministic, so it returns probs=None (q one-hot), which every rule handles exactly.
"""

from __future__ import annotations

import torch

from ..models.base import LanguageModel
from ..sampling import SamplingParams, categorical, process_logits
from .base import Draft, draft_room, sync_cache


class ModelDrafter:
    """Speculative proposals from a draft `LanguageModel` (batch size 1)."""

    def __init__(self, model: LanguageModel) -> None:
        self.model = model
        self.vocab_size = model.vocab_size
        self.reset()

    def reset(self) -> None:
        self.model.reset()
        self._fed = torch.zeros(0, dtype=torch.long)

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
    ) -> Draft:
        num_tokens = draft_room(context, num_tokens, self.model.max_length)
        if num_tokens <= 0:
            return Draft.empty(1, context.device)
        ctx = context[0].cpu()
        logits = self._sync(ctx)
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        u = None
        if not params.greedy:
            u = torch.rand(num_tokens, generator=generator, dtype=torch.float64)
        for t in range(num_tokens):
            if params.greedy:
                x = int(logits.argmax())
            else:
                q = process_logits(logits[None], params)[0]
                x = int(categorical(q[None], u[t : t + 1])[0])
                rows.append(q)
            tokens.append(x)
            if t + 1 < num_tokens:
                logits = self.model.forward(torch.tensor([[x]], device=self.model.device)).logits[0, -1]
        self._fed = torch.cat([self._fed, torch.tensor(tokens[:-1], dtype=torch.long)])
        out_tokens = torch.tensor([tokens], dtype=torch.long, device=context.device)
        probs = torch.stack(rows)[None].to(context.device) if rows else None
        return Draft(out_tokens, probs)
