"""TinyGPT: a small, self-contained, randomly initialised GPT for tests (gpt-fast style).

Read top to bottom: config -> weights -> static KV cache -> forward -> crop/reset -> helpers.

Architecture: token + learned absolute position embeddings, ``n_layer`` pre-LayerNorm blocks
(multi-head causal self-attention, GELU MLP), final LayerNorm, untied ``lm_head``; the logits are
multiplied by ``config.logit_scale``. Weights are drawn from ``config.seed`` in float64 and then
cast, so the float32 and float64 models of one config hold the same (rounded) weights.

KV cache invariant (static, pre-allocated, written by position)::

    self.k_cache, self.v_cache: [n_layer, B, n_head, max_length, head_dim]
    positions 0 .. cache_length-1 hold the keys/values of the committed tokens; positions
    >= cache_length are garbage and are never read (forward attends over [:cache_length+T]
    with a causal mask on the new block).

Positions are absolute (learned table), so ``crop(n)`` is just ``cache_length = n``, and the
state after it equals a fresh prefill of the first n tokens up to float rounding.
Init scale: embeddings and residual branches have unit-ish scale and ``lm_head`` rows have norm ~1
per feature, so logits have std ~ ``logit_scale`` (default 2): over a vocab of 8-32 the
next-token distributions are neither uniform nor one-hot and depend on the context. Raise
``logit_scale`` for sharper distributions.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from hierspec.models.base import ForwardOutput
from hierspec.models.branches import BranchState, prefix_mask
from hierspec.models.treemask import check_compact, check_parents, tree_attention_mask, tree_depths


@dataclass(frozen=True)
class TinyGPTConfig:
    """Size and seed of a TinyGPT. ``d_model`` must be divisible by ``n_head``."""

    vocab_size: int = 16
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 32
    max_length: int = 128
    seed: int = 0
    logit_scale: float = 2.0
    d_ff: int | None = None  # MLP width; default 4 * d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


def _param_seed(seed: int, name: str) -> int:
    """Seed of one parameter: depends on the model seed and the parameter name only."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        d, f = config.d_model, config.d_ff or 4 * config.d_model
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, f)
        self.out = nn.Linear(f, d)
        self.n_head, self.head_dim = config.n_head, config.head_dim

    def forward(
        self,
        x: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        start: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """x: [B, T, d] at positions start..start+T-1; k/v_cache: [B, H, max_length, hd] (written).

        mask: [T, start+T] bool, True where query t may attend to key position j (j <= start+t).
        """
        batch, new, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        shape = (batch, new, self.n_head, self.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # [B, H, T, hd]
        end = start + new
        k_cache[:, :, start:end] = k
        v_cache[:, :, start:end] = v
        keys, values = k_cache[:, :, :end], v_cache[:, :, :end]
        scores = (q @ keys.transpose(-1, -2)) / math.sqrt(self.head_dim)  # [B, H, T, end]
        scores = scores.masked_fill(~mask, float("-inf"))
        att = torch.softmax(scores, dim=-1) @ values  # [B, H, T, hd]
        x = x + self.proj(att.transpose(1, 2).reshape(batch, new, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """A tiny GPT implementing the `LanguageModel` protocol (static KV cache, batch B >= 1).

    All rows of a batch share ``cache_length``. The batch size is fixed by the first forward after
    a reset (the cache is re-allocated when it changes). Forward runs under ``torch.no_grad``.
    """

    def __init__(
        self,
        config: TinyGPTConfig | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        config = config or TinyGPTConfig()
        if config.d_model % config.n_head:
            raise ValueError(f"d_model {config.d_model} not divisible by n_head {config.n_head}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be floating point, got {dtype}")
        self.config = config
        self.vocab_size: int = config.vocab_size
        self.max_length: int = config.max_length
        d = config.d_model
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.pos_emb = nn.Embedding(config.max_length, d)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self._init_weights()
        self.requires_grad_(False)
        self.to(device=device, dtype=dtype)
        self._length = 0
        self._alloc_cache(1)

    # ------------------------------------------------------------------ weights
    def _init_weights(self) -> None:
        """Deterministic init: parameter ``name`` is drawn (float64) from seed (config.seed, name).

        Seeding per name means two configs that differ only in ``n_layer`` share embeddings, the
        common blocks, the final norm and ``lm_head`` (used by ``make_tiny_pair``).
        """
        n_layer = self.config.n_layer
        for name, p in self.named_parameters():
            gen = torch.Generator().manual_seed(_param_seed(self.config.seed, name))
            if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")):
                # LayerNorm gains around 1 (not exactly 1, so blocks differ from each other).
                w = 1.0 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            elif name.endswith("bias"):
                w = 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            elif name == "tok_emb.weight":
                w = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            elif name == "pos_emb.weight":
                w = 0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            else:  # Linear weights [out, in]: unit-variance outputs; residual branches shrunk
                std = 1.0 / math.sqrt(p.shape[1])
                if name.endswith(("proj.weight", "out.weight")):
                    std /= math.sqrt(n_layer)
                w = std * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            with torch.no_grad():
                p.copy_(w)

    # ------------------------------------------------------------------ KV cache
    def _alloc_cache(self, batch: int) -> None:
        """Allocate k/v caches [n_layer, batch, n_head, max_length, head_dim] (zeros)."""
        c = self.config
        shape = (c.n_layer, batch, c.n_head, c.max_length, c.head_dim)
        w = self.lm_head.weight
        with torch.inference_mode(False):  # ordinary tensors even if called in inference mode
            self.register_buffer("k_cache", w.new_zeros(shape), persistent=False)
            self.register_buffer("v_cache", w.new_zeros(shape), persistent=False)

    # ------------------------------------------------------------------ protocol properties
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def cache_length(self) -> int:
        """Number of positions currently held in the KV cache."""
        return self._length

    @property
    def batch_size(self) -> int:
        """Batch size the KV cache is allocated for."""
        return self.k_cache.shape[1]

    # ------------------------------------------------------------------ forward
    def _check_input(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
            raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        batch, new = input_ids.shape
        if batch == 0 or new == 0:
            raise ValueError(f"input_ids must be non-empty, got shape {tuple(input_ids.shape)}")
        if self._length + new > self.max_length:
            raise ValueError(
                f"forward of {new} tokens at cache_length {self._length} exceeds max_length {self.max_length}"
            )
        if input_ids.device.type == "cpu":  # device ids come from our own argmax / sampling (no sync)
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {self.vocab_size}), got range [{lo}, {hi}]")
        if batch != self.batch_size:
            if self._length > 0:
                raise ValueError(
                    f"batch size {batch} differs from the cached batch {self.batch_size}; reset() first"
                )
            self._alloc_cache(batch)
        return input_ids.to(device=self.device, dtype=torch.long)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, *, output_hidden: bool = False) -> ForwardOutput:
        """Run ``input_ids`` [B, T] at positions cache_length.. and append them to the cache.

        Returns logits [B, T, V] in the model dtype and, if ``output_hidden``, the final-norm
        hidden states [B, T, d_model].
        """
        ids = self._check_input(input_ids)
        start, new = self._length, ids.shape[1]
        end = start + new
        pos = torch.arange(start, end, device=ids.device)
        x = self.tok_emb(ids) + self.pos_emb(pos)
        # Query at absolute position start+t sees keys at positions 0..start+t.
        mask = pos.unsqueeze(1) >= torch.arange(end, device=ids.device).unsqueeze(0)
        for i, block in enumerate(self.blocks):
            x = block(x, self.k_cache[i], self.v_cache[i], start, mask)
        hidden = self.ln_f(x)
        logits = self.lm_head(hidden) * self.config.logit_scale
        self._length = end
        return ForwardOutput(logits=logits, hidden=hidden if output_hidden else None)

    @torch.no_grad()
    def forward_tree(
        self, input_ids: torch.Tensor, parents: torch.Tensor | Sequence[int], *, output_hidden: bool = False
    ) -> ForwardOutput:
        """Run the N nodes of a draft tree in one forward (see `hierspec.models.treemask`).

        input_ids [1, N] (node 0 = the root); node i runs at position cache_length + depth(i),
        attends to the cache and to its ancestors including itself, and its K/V is written at
        cache position cache_length + i (cache_length += N). Returns logits [1, N, V] and, if
        ``output_hidden``, the final-norm hidden states [1, N, d_model].
        """
        if isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2 and input_ids.shape[0] != 1:
            shape = tuple(input_ids.shape)
            raise ValueError(f"forward_tree needs input_ids of batch size 1, got shape {shape}")
        ids = self._check_input(input_ids)
        start, new = self._length, ids.shape[1]
        p = check_parents(parents, new)
        pos = start + tree_depths(p).to(ids.device)
        x = self.tok_emb(ids) + self.pos_emb(pos)
        mask = tree_attention_mask(p, start).to(ids.device)
        for i, block in enumerate(self.blocks):
            x = block(x, self.k_cache[i], self.v_cache[i], start, mask)
        hidden = self.ln_f(x)
        logits = self.lm_head(hidden) * self.config.logit_scale
        self._length = start + new
        return ForwardOutput(logits=logits, hidden=hidden if output_hidden else None)

    # ------------------------------------------------------------------ branch decoding
    def supports_branches(self) -> bool:
        """`hierspec.models.branches.BranchDecoder`: needs a batch-1 cache."""
        return self.batch_size == 1

    def branch_state(self, branches: int, depth: int) -> BranchState:
        c = self.config
        return BranchState.zeros(self.lm_head.weight, c.n_layer, (branches, c.n_head, depth, c.head_dim))

    @torch.no_grad()
    def decode_branches(
        self, ids: torch.Tensor, pos: torch.Tensor, prefix_len: torch.Tensor, state: BranchState, depth: int
    ) -> torch.Tensor:
        """One step of every branch (see `hierspec.models.branches`): logits [B, V]; the cache is
        only read."""
        if self.batch_size != 1:
            raise ValueError(f"decode_branches needs a batch-1 cache, got batch {self.batch_size}")
        b, p = ids.shape[0], self._length
        x = (self.tok_emb(ids) + self.pos_emb(pos))[:, None, :]  # [B, 1, d]
        mask = prefix_mask(p, prefix_len, depth)  # [B, 1, 1, P+depth+1]
        for i, blk in enumerate(self.blocks):
            dm = x.shape[-1]
            q, k, v = blk.qkv(blk.ln1(x)).split(dm, dim=-1)
            shape = (b, 1, blk.n_head, blk.head_dim)
            q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # [B, H, 1, hd]
            state.k[i][:, :, depth] = k[:, :, 0]
            state.v[i][:, :, depth] = v[:, :, 0]
            prefix_k = self.k_cache[i][0, :, :p].expand(b, -1, -1, -1)  # [B, H_kv, P, hd]
            prefix_v = self.v_cache[i][0, :, :p].expand(b, -1, -1, -1)
            keys = torch.cat([prefix_k, state.k[i][:, :, : depth + 1]], 2)
            values = torch.cat([prefix_v, state.v[i][:, :, : depth + 1]], 2)
            scores = (q @ keys.transpose(-1, -2)) / math.sqrt(blk.head_dim)
            att = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ values
            x = x + blk.proj(att.transpose(1, 2).reshape(b, 1, dm))
            x = x + blk.out(F.gelu(blk.fc(blk.ln2(x))))
        return (self.lm_head(self.ln_f(x)) * self.config.logit_scale)[:, 0]

    # ------------------------------------------------------------------ rollback
    @torch.no_grad()
    def compact(self, start: int, keep: Sequence[int] | torch.Tensor) -> None:
        """Keep cache positions 0..start-1 followed by those at ``start + keep[j]``.

        ``keep``: strictly increasing offsets with ``start + keep[-1] < cache_length``, typically
        ``[0] + accepted path`` after `forward_tree` at cache_length ``start``; afterwards
        cache_length == start + len(keep) and the state equals a fresh prefill of the committed
        tokens (each kept path node ran at position start + its depth = its new position).
        """
        k = check_compact(start, keep, self._length)
        src = (start + k).to(self.device)
        end = start + k.numel()
        # Advanced indexing copies first, so overlapping source/destination ranges are safe.
        self.k_cache[:, :, :, start:end] = self.k_cache[:, :, :, src]
        self.v_cache[:, :, :, start:end] = self.v_cache[:, :, :, src]
        self._length = end

    def crop(self, length: int) -> None:
        """Drop every cached position >= length (0 <= length <= cache_length)."""
        if isinstance(length, bool) or not isinstance(length, int):
            raise ValueError(f"crop length must be an int, got {type(length).__name__}")
        if length < 0:
            raise ValueError(f"crop length must be >= 0, got {length}")
        if length > self._length:
            raise ValueError(f"cannot crop to {length}: cache holds only {self._length} positions")
        self._length = length

    def reset(self) -> None:
        """Empty the cache (equivalent to ``crop(0)``)."""
        self._length = 0

    def extra_repr(self) -> str:
        return f"config={self.config}, cache_length={self._length}"


def make_tiny_pair(
    vocab_size: int = 16,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    *,
    max_length: int = 128,
    logit_scale: float = 2.0,
    related: bool = True,
) -> tuple[TinyGPT, TinyGPT]:
    """(target, draft) TinyGPTs over the same vocabulary, for speculative-decoding tests.

    target: 2 layers, d_model 32, seed ``seed``.
    draft, ``related=True`` (default): 1 layer, same seed, so it shares the target's embeddings,
        first block, final norm and lm_head; its next-token distributions overlap the target's
        by ~0.65 (sum of min(p, q)), so drafts are often but not always accepted.
    draft, ``related=False``: 1 layer, d_model 16, seed ``seed + 1``: unrelated weights, overlap
        ~0.25 (mostly rejections).
    """
    base = TinyGPTConfig(vocab_size=vocab_size, max_length=max_length, seed=seed, logit_scale=logit_scale)
    target = TinyGPT(base, dtype=dtype)
    if related:
        draft_config = replace(base, n_layer=1)
    else:
        draft_config = replace(base, n_layer=1, d_model=16, seed=seed + 1)
    return target, TinyGPT(draft_config, dtype=dtype)
