"""`DraftLM`: a small standalone Llama-style draft model for a target's tokenizer, with a reduced
draft vocabulary, a static position-addressed KV cache, and a one-file safetensors format.

Read top to bottom: model (training path, the `LanguageModel` path, batched branch decoding)
-> save/load. The file format is in `format.py`, the config and layers in `layers.py`.

Reduced vocabulary. The LM head has ``R`` rows, one per target token id in ``vocab_map[R]`` (the
R most frequent target tokens of the training data plus the special tokens). As a
`LanguageModel` the draft returns logits over the FULL target vocabulary, with ``-inf`` at every
id outside ``vocab_map``, so its proposal q is exactly 0 there: every verification rule stays
lossless (the target simply never accepts a token the draft cannot propose, and residual
sampling covers the missing mass).

Input embeddings are reduced too: ``R + 1`` rows, row ``R`` being UNK, and target ids outside
``vocab_map`` are mapped to UNK (``inv_map[V]``, rebuilt from ``vocab_map``). Why reduced: (1)
the committed file stays small (R=8192, d=256 in fp16 is 4 MB; a full 49152-row table would add
25 MB for rows that the training data hardly ever shows, so they would stay near their init
anyway); (2) the input table can be tied to the head (``tie_embeddings``, the default), which
halves the parameters of a model whose size is mostly embeddings; (3) tokens outside the top R
are a few percent of running text, and a draft only needs a rough idea of them.

Static KV cache invariant (gpt-fast style)::

    k_cache, v_cache: [n_layer, B, n_kv_head, capacity, head_dim], capacity <= max_length
    positions 0 .. cache_length-1 hold the committed keys/values; positions >= cache_length are
    garbage and never read; forward writes positions cache_length .. cache_length+T-1

so ``crop(n)`` is just ``cache_length = n`` and the state then equals a fresh prefill of the
first n tokens (up to float rounding of differently shaped matmuls). The capacity grows on demand
(doubling, at most ``max_length``), so a long ``max_length`` costs no memory up front.

File: `save_draft` / `load_draft` (format ``hierspec.draft`` of `hierspec.models.draft.format`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hierspec.models.base import ForwardOutput
from hierspec.models.branches import BranchState, prefix_mask
from hierspec.models.draft.format import (
    FORMAT_DRAFT,
    FORMAT_VERSION,
    HALF_DTYPES,
    DraftFileError,
    TargetIdentity,
    check_vocab_map,
    parse_json_meta,
    read_safetensors,
    storage_dtype,
    write_safetensors,
)
from hierspec.models.draft.layers import DraftBlock, DraftConfig, RMSNorm, rope_tables, rotate_half

__all__ = ["DraftLM", "load_draft", "read_draft_metadata", "save_draft"]


class DraftLM(nn.Module):
    """Standalone reduced-vocabulary draft (see module docstring); a `LanguageModel`.

    Two ways to run it:
      * ``train_logits(ids)`` -> [B, T, R] reduced logits with gradients, no cache (training);
      * ``forward(ids)`` (the `LanguageModel` protocol) -> full-vocabulary logits [B, T, V] with
        -inf outside ``vocab_map``, appending to the static KV cache, under ``no_grad``.

    Args:
        config: sizes; ``config.n_vocab`` must equal ``len(vocab_map)``.
        vocab_map: [R] target ids of the head rows (unique, in [0, vocab_size)).
        dtype / device: float32 (training), bfloat16 or float64.
        seed: weights are drawn from ``torch.Generator().manual_seed(seed)`` (Llama init, std
            0.02; residual output projections scaled by 1/sqrt(2 n_layer)).
    """

    def __init__(
        self,
        config: DraftConfig,
        vocab_map: torch.Tensor,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        vm = check_vocab_map(vocab_map, config.vocab_size)
        if vm.numel() != config.n_vocab:
            raise ValueError(f"config.n_vocab={config.n_vocab} but vocab_map has {vm.numel()} ids")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be floating point, got {dtype}")
        self.config = config
        self.vocab_size: int = config.vocab_size
        self.max_length: int = config.max_length
        c = config
        self.embed = nn.Embedding(c.n_vocab + 1, c.d_model)  # row R = UNK
        self.layers = nn.ModuleList(DraftBlock(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.d_model, c.n_vocab, bias=False)
        inv = torch.full((c.vocab_size,), c.n_vocab, dtype=torch.long)
        inv[vm] = torch.arange(c.n_vocab)
        self.register_buffer("vocab_map", vm, persistent=True)
        self.register_buffer("inv_map", inv, persistent=False)
        cos, sin = rope_tables(c.head_dim, c.max_length, c.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights(seed)
        self.to(device=device, dtype=dtype)
        self._length = 0
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def _init_weights(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                    continue
                std = resid_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def n_vocab(self) -> int:
        return self.config.n_vocab

    @property
    def cache_length(self) -> int:
        return self._length

    @property
    def head_weight(self) -> torch.Tensor:
        """[R, d] LM head (the first R rows of the input table when tied)."""
        return self.embed.weight[: self.config.n_vocab] if self.lm_head is None else self.lm_head.weight

    # ------------------------------------------------------------------ shared pieces
    def map_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Target ids -> rows of the input table (UNK row R for ids outside vocab_map)."""
        return self.inv_map[input_ids]

    def expand_logits(self, reduced: torch.Tensor) -> torch.Tensor:
        """[..., R] reduced logits -> [..., V] with -inf outside vocab_map."""
        out = reduced.new_full((*reduced.shape[:-1], self.vocab_size), float("-inf"))
        return out.index_copy_(-1, self.vocab_map, reduced)

    def _run(self, ids: torch.Tensor, start: int, use_cache: bool) -> torch.Tensor:
        t = ids.shape[1]
        x = self.embed(self.map_ids(ids))
        cos = self.rope_cos[start : start + t].to(x.dtype)
        sin = self.rope_sin[start : start + t].to(x.dtype)
        for i, layer in enumerate(self.layers):
            cache = (self.k_cache[i], self.v_cache[i]) if use_cache else None
            x = layer(x, cos, sin, cache, start)
        return self.norm(x)

    def reduced_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.head_weight)

    # ------------------------------------------------------------------ training path
    def train_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Reduced logits [B, T, R] at positions 0..T-1 (with autograd; the cache is untouched)."""
        if input_ids.shape[1] > self.max_length:
            raise ValueError(f"sequence of {input_ids.shape[1]} exceeds max_length {self.max_length}")
        return self.reduced_head(self._run(input_ids.to(self.device), 0, use_cache=False))

    # ------------------------------------------------------------------ LanguageModel path
    def _ensure_cache(self, batch: int, end: int) -> None:
        c = self.config
        k = self.k_cache
        if k is not None and k.shape[1] == batch and k.shape[3] >= end:
            return
        capacity = min(c.max_length, max(end, 256, 2 * (k.shape[3] if k is not None else 0)))
        shape = (c.n_layer, batch, c.kv_heads, capacity, c.head_dim)
        with torch.inference_mode(False):
            new_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            new_v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if k is not None and k.shape[1] == batch and self._length:
                n = self._length
                new_k[:, :, :, :n] = k[:, :, :, :n]
                new_v[:, :, :, :n] = self.v_cache[:, :, :, :n]
        self.k_cache, self.v_cache = new_k, new_v

    def _check_input(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
            raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [B, T], got shape {tuple(input_ids.shape)}")
        batch, new = input_ids.shape
        if self._length + new > self.max_length:
            raise ValueError(
                f"forward of {new} tokens at cache_length {self._length} exceeds max_length {self.max_length}"
            )
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.vocab_size}), got range [{lo}, {hi}]")
        if self._length > 0 and self.k_cache is not None and batch != self.k_cache.shape[1]:
            raise ValueError(f"batch size {batch} differs from the cached batch {self.k_cache.shape[1]}")
        return input_ids.to(device=self.device, dtype=torch.long)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, *, output_hidden: bool = False) -> ForwardOutput:
        """Run ``input_ids`` [B, T] at positions cache_length.. and append them to the cache.

        Returns full-vocabulary logits [B, T, V] (float32; float64 for float64), -inf outside
        ``vocab_map``; ``hidden`` [B, T, d_model] after the final norm if ``output_hidden``.
        """
        ids = self._check_input(input_ids)
        start, new = self._length, ids.shape[1]
        self._ensure_cache(ids.shape[0], start + new)
        hidden = self._run(ids, start, use_cache=True)
        reduced = self.reduced_head(hidden)
        if reduced.dtype in HALF_DTYPES:
            reduced = reduced.float()
        self._length = start + new
        return ForwardOutput(logits=self.expand_logits(reduced), hidden=hidden if output_hidden else None)

    def crop(self, length: int) -> None:
        """Drop every cached position >= length (0 <= length <= cache_length)."""
        if isinstance(length, bool) or not isinstance(length, int):
            raise ValueError(f"crop length must be an int, got {type(length).__name__}")
        if not 0 <= length <= self._length:
            raise ValueError(f"crop length must be in 0..{self._length}, got {length}")
        self._length = length

    def reset(self) -> None:
        self._length = 0

    def num_parameters(self, *, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def extra_repr(self) -> str:
        return f"R={self.config.n_vocab}/{self.vocab_size}, cache_length={self._length}"

    # ------------------------------------------------------------------ branch decoding
    def supports_branches(self) -> bool:
        """`hierspec.models.branches.BranchDecoder`: needs a batch-1 cache (or none yet)."""
        return self.k_cache is None or self.k_cache.shape[1] == 1

    def branch_state(self, branches: int, depth: int) -> BranchState:
        c = self.config
        return BranchState.zeros(self.embed.weight, c.n_layer, (branches, c.kv_heads, depth, c.head_dim))

    @torch.no_grad()
    def decode_branches(
        self, ids: torch.Tensor, pos: torch.Tensor, prefix_len: torch.Tensor, state: BranchState, depth: int
    ) -> torch.Tensor:
        """One step of every branch (see `hierspec.models.branches`; RoPE at each branch's logical
        position, GQA keys): full-vocabulary logits [B, V] (-inf outside vocab_map); the cache is
        only read."""
        if not self.supports_branches() or self.k_cache is None:
            raise ValueError("decode_branches needs a batch-1 cache holding the prefix (run forward first)")
        b, p = ids.shape[0], self._length
        x = self.embed(self.map_ids(ids))[:, None, :]  # [B, 1, d]
        cos = self.rope_cos[pos].to(x.dtype)[:, None, None, :]  # [B, 1, 1, hd]
        sin = self.rope_sin[pos].to(x.dtype)[:, None, None, :]
        mask = prefix_mask(p, prefix_len, depth)  # [B, 1, 1, P+depth+1]
        for i, blk in enumerate(self.layers):
            h = blk.attn_norm(x)
            q = blk.q_proj(h).view(b, 1, blk.n_head, blk.head_dim).transpose(1, 2)
            k = blk.k_proj(h).view(b, 1, blk.n_kv, blk.head_dim).transpose(1, 2)
            v = blk.v_proj(h).view(b, 1, blk.n_kv, blk.head_dim).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            state.k[i][:, :, depth] = k[:, :, 0]
            state.v[i][:, :, depth] = v[:, :, 0]
            prefix_k = self.k_cache[i, 0, :, :p].expand(b, -1, -1, -1)  # [B, H_kv, P, hd]
            prefix_v = self.v_cache[i, 0, :, :p].expand(b, -1, -1, -1)
            keys = torch.cat([prefix_k, state.k[i][:, :, : depth + 1]], 2)
            values = torch.cat([prefix_v, state.v[i][:, :, : depth + 1]], 2)
            att = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, enable_gqa=blk.n_kv != blk.n_head
            )
            x = x + blk.o_proj(att.transpose(1, 2).reshape(b, 1, -1))
            h = blk.mlp_norm(x)
            x = x + blk.down_proj(F.silu(blk.gate_proj(h)) * blk.up_proj(h))
        reduced = self.reduced_head(self.norm(x))[:, 0]
        return self.expand_logits(reduced.float() if reduced.dtype in HALF_DTYPES else reduced)

    # ------------------------------------------------------------------ save / load
    def save(
        self,
        path: str | os.PathLike[str],
        target: TargetIdentity,
        *,
        dtype: torch.dtype = torch.float16,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """`save_draft(self, path, target, dtype=dtype, extra=extra)`."""
        save_draft(self, path, target, dtype=dtype, extra=extra)


def save_draft(
    model: DraftLM,
    path: str | os.PathLike[str],
    target: TargetIdentity,
    *,
    dtype: torch.dtype = torch.float16,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model`` as one safetensors file (fp16/bf16 weights, vocab_map, config, target).

    ``extra`` (JSON-serialisable: training stats, data description) goes into the metadata as
    ``info``. The write is atomic.
    """
    if target.vocab_size != model.vocab_size:
        raise ValueError(f"target vocab_size {target.vocab_size} != the draft's {model.vocab_size}")
    weights = {k: v for k, v in model.state_dict().items() if k != "vocab_map"}
    sdt = storage_dtype(weights, dtype)
    tensors = {k: v.to(sdt) for k, v in weights.items()}
    tensors["vocab_map"] = model.vocab_map.to(torch.long)
    meta = {
        "format": FORMAT_DRAFT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(model.config.to_dict()),
        "target": json.dumps(target.to_dict()),
        "info": json.dumps(dict(extra or {})),
    }
    write_safetensors(path, tensors, meta)


def read_draft_metadata(path: str | os.PathLike[str]) -> tuple[DraftConfig, TargetIdentity, dict[str, Any]]:
    """(config, target identity, info) of a draft file, with its full integrity check."""
    _, meta = read_safetensors(path, what="draft file", expect_format=FORMAT_DRAFT)
    return _parse_draft_meta(meta, str(path))


def _parse_draft_meta(meta: Mapping[str, str], where: str) -> tuple[DraftConfig, TargetIdentity, dict]:
    what = f"draft file {where!r}"
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise DraftFileError(f"{what} has format_version {meta.get('format_version')!r}, expected 1")
    try:
        config = DraftConfig.from_dict(parse_json_meta(meta, "config", what))
    except (TypeError, ValueError) as err:
        raise DraftFileError(f"{what} has an invalid config: {err}") from err
    target = TargetIdentity.from_dict(parse_json_meta(meta, "target", what))
    info = json.loads(meta.get("info", "{}") or "{}")
    return config, target, info


def load_draft(
    path: str | os.PathLike[str],
    target: TargetIdentity | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    max_length: int | None = None,
) -> DraftLM:
    """Load a `DraftLM` written by `save_draft`.

    Args:
        target: identity of the target it will draft for (`target_identity(model, tokenizer)`);
            when given, a file made for a different vocabulary size or tokenizer fingerprint is
            refused. None skips that check (the vocab_map is still validated).
        dtype: compute dtype (float32, bfloat16, float64). max_length: override the cache cap.

    Raises:
        DraftFileError: missing / truncated / corrupt file, another target, or a vocab_map with
            ids outside the target vocabulary (or duplicates).
    """
    tensors, meta = read_safetensors(path, what="draft file", expect_format=FORMAT_DRAFT)
    config, recorded, _ = _parse_draft_meta(meta, str(path))
    what = f"draft file {str(path)!r}"
    if config.vocab_size != recorded.vocab_size:
        raise DraftFileError(f"{what}: config vocab_size {config.vocab_size} != target {recorded.vocab_size}")
    if target is not None:
        recorded.check(target, what=what)
    if "vocab_map" not in tensors:
        raise DraftFileError(f"{what} has no vocab_map tensor")
    vocab_map = check_vocab_map(tensors.pop("vocab_map"), config.vocab_size, what=f"{what}: vocab_map")
    if max_length is not None:
        config = DraftConfig.from_dict({**config.to_dict(), "max_length": max_length})
    try:
        model = DraftLM(config, vocab_map, dtype=dtype, device=device)
    except ValueError as err:
        raise DraftFileError(f"{what}: {err}") from err
    expected = {k for k in model.state_dict() if k != "vocab_map"}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise DraftFileError(
            f"{what}: weights do not match its config (missing {missing}, unexpected {unexpected})"
        )
    state = {k: v.to(dtype) for k, v in tensors.items()}
    state["vocab_map"] = vocab_map
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DraftFileError(f"{what}: weights do not match its config: {err}") from err
    return model
