"""Layer-range execution of one Llama-layout model: a token-addressed KV cache per layer range,
buffered hidden states at the exits, and `LanguageModel` views at each exit.

The target's decoder layers are cut at exits ``e_1 < e_2 < ... < e_m = L`` into ranges
``R_j = [e_{j-1}, e_j)`` (``e_0 = 0``). Range j records

    T_j   the token ids whose keys/values its layers hold, at absolute positions 0..|T_j|-1
    H_j   its output hidden states: the residual stream after layer e_j at each of those positions

Invariant: the KV cache of R_j's layers and H_j equal those of a fresh prefill of T_j (range j's
input at position t is H_{j-1}[t], a function of T[:t+1] only, so every range is a deterministic
function of its token prefix). Ranges may hold different lengths: in HiSpec the draft range sees
drafts, the intermediate range tentatively accepted tokens, the last range committed tokens.

`LayerStack.hidden(j, seq, start, end)` returns H_j[start:end] for the token sequence ``seq``::

    keep = lcp(T_j, seq[:end]);   if T_j disagrees with seq before end: truncate R_j to keep
    if keep < end:  x = embed(seq[keep:end])            if j == 0
                    x = hidden(j - 1, seq, keep, end)   otherwise (recursion: lower ranges first)
                    run R_j's layers on x at positions keep..end-1; append to T_j, H_j
    return H_j[start:end]

So nothing a range holds is ever recomputed: a deeper range continues from the buffered hidden
states of the range below (LayerSkip's "exit query cache", HiSpec's hidden-state reuse), and
only tokens no range has seen go through the early layers.

`ExitView(stack, j, head)` is a `LanguageModel` at exit e_j: ``forward(ids)`` appends ids to the
view's own sequence and returns head_j(H_j) logits over the full vocabulary (-inf outside a
reduced head's vocab_map); the last view uses the model's own final norm and LM head. A view's
``crop(n)`` means "my tokens after n are rejected": it truncates its own range and every range
below it to n (they hold those tokens too, as drafts). Tokens a range holds beyond a view's
sequence (computed for a deeper view) are kept when the view is not really cropped. Built on
`EarlyExitHead` (`hierspec.models.early_exit`) for the early exits.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import torch

from hierspec.models.base import ForwardOutput
from hierspec.models.early_exit import EarlyExitHead, _llama_parts, exit_logits

__all__ = ["ExitView", "LayerStack", "RangeStats", "exit_views"]

_HALF = (torch.float16, torch.bfloat16)


class RangeStats:
    """Per-range work: forwards (passes), tokens processed, seconds."""

    def __init__(self) -> None:
        self.passes = 0
        self.tokens = 0
        self.seconds = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"passes": self.passes, "tokens": self.tokens, "seconds": self.seconds}


class LayerStack:
    """One Llama-layout causal LM cut into layer ranges at ``exits`` (see module docstring).

    Args:
        model: a transformers Llama-layout causal LM (or an HFModel wrapping one); batch size 1.
        exits: increasing layer counts ``e_1 < ... < e_{m-1}``, each in 1..L-1; the full depth L is
            appended (it may also be given as the last element).
        max_length: cap on positions (default: the model's max_position_embeddings).
    """

    def __init__(self, model: Any, exits: Sequence[int], *, max_length: int | None = None) -> None:
        from transformers import DynamicCache

        hf, base = _llama_parts(model)
        hf.eval()
        tc = hf.config.get_text_config(decoder=True)
        depth = int(tc.num_hidden_layers)
        ex = [int(e) for e in exits]
        if ex and ex[-1] == depth:
            ex = ex[:-1]
        if any(not 1 <= e < depth for e in ex) or any(b <= a for a, b in itertools.pairwise(ex)):
            raise ValueError(
                f"exits: expected strictly increasing exit layers in 1..{depth - 1} (the model has "
                f"{depth} layers), got {list(exits)}"
            )
        self.hf, self.base, self.text_config = hf, base, tc
        self.num_layers = depth
        self.exits = [*ex, depth]
        self.bounds = list(zip([0, *ex], self.exits, strict=True))
        cap = int(tc.max_position_embeddings)
        self.max_length = cap if max_length is None else min(int(max_length), cap)
        self.vocab_size = int(hf.get_output_embeddings().weight.shape[0])
        self._cache_cls = DynamicCache
        self.stats = [RangeStats() for _ in self.bounds]
        self.reset()

    # ------------------------------------------------------------------ state
    @property
    def device(self) -> torch.device:
        return self.hf.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.dtype

    def reset(self) -> None:
        """Empty every range (and the statistics)."""
        self.cache = self._cache_cls()
        hidden = int(self.text_config.hidden_size)
        self._tokens = [torch.zeros(0, dtype=torch.long) for _ in self.bounds]
        self._hidden = [torch.empty(0, hidden, dtype=self.dtype, device=self.device) for _ in self.bounds]
        self._len = [0 for _ in self.bounds]
        self.stats = [RangeStats() for _ in self.bounds]

    def length(self, j: int) -> int:
        """Number of positions range j holds."""
        return self._len[j]

    def tokens(self, j: int) -> list[int]:
        """The token ids range j holds (T_j)."""
        return self._tokens[j][: self._len[j]].tolist()

    def layer_length(self, layer: int) -> int:
        """Positions held by decoder layer ``layer``'s KV cache (equals its range's length)."""
        if layer >= len(self.cache.layers):
            return 0
        return int(self.cache.layers[layer].get_seq_length())

    def truncate(self, j: int, length: int) -> None:
        """Drop every position >= length from range j (KV, tokens, hidden states)."""
        extra = self._len[j] - length
        if extra <= 0:
            return
        a, b = self.bounds[j]
        with torch.inference_mode():
            for i in range(a, min(b, len(self.cache.layers))):
                n = int(self.cache.layers[i].get_seq_length())
                if n > length:
                    self.cache.layers[i].crop(-(n - length))
        self._len[j] = length

    # ------------------------------------------------------------------ compute
    def _append(self, j: int, ids: torch.Tensor, h: torch.Tensor) -> None:
        n, new = self._len[j], ids.numel()
        if self._tokens[j].numel() < n + new:
            grow = max(n + new, 2 * self._tokens[j].numel(), 64)
            t = torch.zeros(grow, dtype=torch.long)
            t[:n] = self._tokens[j][:n]
            hb = torch.empty(grow, h.shape[-1], dtype=h.dtype, device=h.device)
            hb[:n] = self._hidden[j][:n]
            self._tokens[j], self._hidden[j] = t, hb
        self._tokens[j][n : n + new] = ids
        self._hidden[j][n : n + new] = h
        self._len[j] = n + new

    def _run_range(self, j: int, x: torch.Tensor, start: int) -> torch.Tensor:
        """R_j's layers on x [T, H] at positions start..start+T-1 (the range holds exactly start)."""
        from transformers.masking_utils import create_causal_mask

        a, b = self.bounds[j]
        x = x[None]
        positions = torch.arange(start, start + x.shape[1], device=x.device)[None]
        pos_emb = self.base.rotary_emb(x, position_ids=positions)
        mask = create_causal_mask(
            config=self.text_config,
            inputs_embeds=x,
            attention_mask=None,
            past_key_values=self.cache,
            position_ids=positions,
            layer_idx=a,
        )
        for layer in self.base.layers[a:b]:
            x = layer(
                x,
                attention_mask=mask,
                position_embeddings=pos_emb,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
            )
        return x[0]

    def hidden(self, j: int, seq: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """H_j[start:end] for the token sequence ``seq`` [>= end] (see module docstring)."""
        if end > self.max_length:
            raise ValueError(f"position {end - 1} exceeds max_length {self.max_length}")
        n = min(self._len[j], end)
        held = self._tokens[j][:n]
        keep = int((held == seq[:n]).long().cumprod(0).sum()) if n else 0
        if keep < n:
            self.truncate(j, keep)
        if keep < end:
            with torch.inference_mode():
                if j == 0:
                    x = self.base.embed_tokens(seq[keep:end].to(self.device))
                else:
                    x = self.hidden(j - 1, seq, keep, end)
                t0 = time.perf_counter()
                h = self._run_range(j, x, keep)
                st = self.stats[j]
                st.seconds += time.perf_counter() - t0
                st.passes += 1
                st.tokens += end - keep
            self._append(j, seq[keep:end], h)
        return self._hidden[j][start:end]

    def final_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The model's own final norm + LM head on a layer-L residual stream."""
        return self.hf.get_output_embeddings()(self.base.norm(h))


class ExitView:
    """`LanguageModel` view of a `LayerStack` at exit ``e_j`` (see module docstring).

    head: the early-exit head for e_j < L (its ``config.exit_layer`` must equal e_j); None for the
    last exit (the model's own norm + LM head).
    """

    def __init__(self, stack: LayerStack, j: int, head: EarlyExitHead | None = None) -> None:
        if not 0 <= j < len(stack.bounds):
            raise ValueError(f"exit index must be in 0..{len(stack.bounds) - 1}, got {j}")
        last = j == len(stack.bounds) - 1
        if last and head is not None:
            raise ValueError("the last exit uses the model's own LM head; pass head=None")
        if not last:
            if head is None:
                raise ValueError(f"exit {stack.exits[j]} needs an early-exit head")
            c = head.config
            if c.exit_layer != stack.exits[j]:
                raise ValueError(f"head trained for exit layer {c.exit_layer}, used at exit {stack.exits[j]}")
            if c.num_layers != stack.num_layers or c.vocab_size != stack.vocab_size:
                raise ValueError(
                    f"head made for a {c.num_layers}-layer model with vocabulary {c.vocab_size}; this "
                    f"model has {stack.num_layers} layers and vocabulary {stack.vocab_size}"
                )
            head = head.to(device=stack.device, dtype=stack.dtype)
        self.stack, self.j, self.head = stack, j, head
        self.exit_layer = stack.exits[j]
        self.vocab_size = stack.vocab_size
        self.max_length = stack.max_length
        self._seq = torch.zeros(0, dtype=torch.long)

    @property
    def device(self) -> torch.device:
        return self.stack.device

    @property
    def dtype(self) -> torch.dtype:
        return self.stack.dtype

    @property
    def cache_length(self) -> int:
        return int(self._seq.numel())

    def forward(self, input_ids: torch.Tensor, *, output_hidden: bool = False) -> ForwardOutput:
        """Logits [1, T, V] at exit e_j for ``input_ids`` [1, T] at positions cache_length.."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(
                f"input_ids: expected a [1, T] tensor, got {getattr(input_ids, 'shape', input_ids)}"
            )
        if input_ids.shape[1] == 0 or input_ids.is_floating_point():
            raise ValueError("input_ids: expected a non-empty integer tensor")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.vocab_size}), got range [{lo}, {hi}]")
        start = self.cache_length
        if start + input_ids.shape[1] > self.max_length:
            raise ValueError(
                f"forward of {input_ids.shape[1]} tokens at cache_length {start} exceeds "
                f"max_length {self.max_length}"
            )
        seq = torch.cat([self._seq, input_ids[0].cpu().long()])
        with torch.inference_mode():
            h = self.stack.hidden(self.j, seq, start, seq.numel())
            if self.head is None:
                logits = self.stack.final_logits(h)
            else:
                logits = exit_logits(self.head, h, self.stack.hf.get_output_embeddings().weight)
        self._seq = seq
        logits = logits.float() if logits.dtype in _HALF else logits.clone()
        return ForwardOutput(logits=logits[None], hidden=h[None].clone() if output_hidden else None)

    __call__ = forward

    def crop(self, length: int) -> None:
        """Reject this view's tokens after ``length``: prune them from its range and those below."""
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self.cache_length:
            raise ValueError(f"crop length must be an int in 0..{self.cache_length}, got {length!r}")
        if length == self.cache_length:
            return
        self._seq = self._seq[:length]
        for i in range(self.j + 1):
            self.stack.truncate(i, length)

    def reset(self) -> None:
        self._seq = torch.zeros(0, dtype=torch.long)
        for i in range(self.j + 1):
            self.stack.truncate(i, 0)

    def __repr__(self) -> str:
        return f"ExitView(exit={self.exit_layer}/{self.stack.num_layers}, cache_length={self.cache_length})"


def exit_views(
    model: Any, heads: Sequence[EarlyExitHead], *, max_length: int | None = None
) -> list[ExitView]:
    """Views at each head's exit layer (increasing) plus the full model, over one new `LayerStack`."""
    exits = [h.config.exit_layer for h in heads]
    stack = LayerStack(model, exits, max_length=max_length)
    views = [ExitView(stack, j, h) for j, h in enumerate(heads)]
    return [*views, ExitView(stack, len(heads))]
