"""`DraftConfig` and the Llama layers of a `DraftLM`.

Architecture (Llama): token embedding -> ``n_layer`` x [RMSNorm -> GQA attention with RoPE
(``rope_theta`` 1e5 like SmolLM2) -> residual; RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm ->
LM head. `DraftBlock` is also the decoder block of an EAGLE head (`hierspec.models.eagle`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hierspec.models.draft.format import HALF_DTYPES

__all__ = ["DraftBlock", "DraftConfig", "RMSNorm", "rope_tables", "rotate_half"]


@dataclass(frozen=True)
class DraftConfig:
    """Size of a `DraftLM`.

    vocab_size: the TARGET's vocabulary (logits width of the LanguageModel view).
    n_vocab: R, rows of the LM head (= len(vocab_map)); the input table has R + 1 rows (UNK).
    n_kv_head: key/value heads (GQA); None means n_head. Must divide n_head.
    d_ff: SwiGLU width; None means 8/3 * d_model rounded up to a multiple of 64.
    """

    vocab_size: int
    n_vocab: int
    n_layer: int = 2
    d_model: int = 256
    n_head: int = 4
    n_kv_head: int | None = None
    d_ff: int | None = None
    rope_theta: float = 1.0e5
    norm_eps: float = 1.0e-5
    max_length: int = 8192
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_vocab", "n_layer", "d_model", "n_head", "max_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DraftConfig.{name} must be a positive int, got {v!r}")
        if self.n_vocab > self.vocab_size:
            raise ValueError(f"n_vocab {self.n_vocab} exceeds the target vocabulary {self.vocab_size}")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"d_model {self.d_model} / n_head {self.n_head} must be an even integer")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_kv_head {self.n_kv_head} must divide n_head {self.n_head}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        return 64 * math.ceil(8 * self.d_model / 3 / 64)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DraftConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DraftConfig fields: {sorted(unknown)}")
        return cls(**d)


# ============================================================================ modules
class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (float64 for float64), like transformers' Llama."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float() if dtype in HALF_DTYPES else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim] in float64 (HF Llama layout: the two halves repeat)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.arange(length, dtype=torch.float64)[:, None] * inv[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class DraftBlock(nn.Module):
    """Pre-norm Llama block: GQA attention with RoPE, SwiGLU MLP."""

    def __init__(self, c: DraftConfig) -> None:
        super().__init__()
        d, hd = c.d_model, c.head_dim
        self.n_head, self.n_kv, self.head_dim = c.n_head, c.kv_heads, hd
        self.attn_norm = RMSNorm(d, c.norm_eps)
        self.q_proj = nn.Linear(d, c.n_head * hd, bias=False)
        self.k_proj = nn.Linear(d, c.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, c.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(c.n_head * hd, d, bias=False)
        self.mlp_norm = RMSNorm(d, c.norm_eps)
        self.gate_proj = nn.Linear(d, c.ff_dim, bias=False)
        self.up_proj = nn.Linear(d, c.ff_dim, bias=False)
        self.down_proj = nn.Linear(c.ff_dim, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, d] at cache slots start..start+T-1; cos/sin [T, hd] (their rotary positions).

        cache: (k [B, Hkv, capacity, hd], v) of this layer, written at start..start+T-1 and read
        over 0..start+T-1; None = no cache (training: positions 0..T-1, plain causal attention).
        mask: bool [T, start+T], True where a query may read a slot (tree drafting); default with a
        cache: query start+i reads slots 0..start+i.
        """
        t = x.shape[1]
        q, k, v = self.project(x, cos, sin)
        gqa = self.n_kv != self.n_head
        if cache is None:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=gqa)
        else:
            k_cache, v_cache = cache
            end = start + t
            k_cache[:, :, start:end] = k
            v_cache[:, :, start:end] = v
            keys, values = k_cache[:, :, :end], v_cache[:, :, :end]
            if mask is None and t > 1:  # query start+i sees keys 0..start+i
                qpos = torch.arange(start, end, device=x.device)
                mask = qpos[:, None] >= torch.arange(end, device=x.device)[None, :]
            att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
        return self.output(x, att)

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries [B, H, T, hd], keys and values [B, Hkv, T, hd] of x [B, T, d]."""
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def output(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """Residual attention output (att [B, H, T, hd]) then the residual SwiGLU MLP."""
        b, _, t, _ = att.shape
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, t, -1))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
