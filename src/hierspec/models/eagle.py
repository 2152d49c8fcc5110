"""`EagleHead`: an EAGLE-style feature-level draft head on a frozen target.

The target's last hidden state ``f_t`` (after its final norm, what its LM head reads) at position
t and the embedding of the next token ``x_{t+1}`` are fused and run through ONE Llama decoder
block to predict the next feature; a (reduced-vocabulary) LM head reads the prediction::

    u_t        = W_fc [e(x_{t+1}); f_t] + b                  pair t, rotary position t
    f^_{t+1}   = Block(u_0..u_t)                             causal over the pairs
    q(x_{t+2}) = softmax(W_head f^_{t+1})                    R rows at vocab_map, -inf elsewhere

``e`` is the target's own (frozen) input embedding, so the file holds only W_fc, the block and
W_head (initialised from the target's LM-head rows). Drafting k tokens after a context of length L
whose features f_0..f_{L-2} came out of the target's forwards (the engine passes them, nothing is
recomputed): the pairs t <= L-2 use true features; step j feeds the pair (f^_{L-2+j}, X_j) at
position L-2+j, exactly the unrolled computation `EagleHead.unroll` trains and evaluates.

KV cache: static and addressed by slot (gpt-fast style), ``k_cache, v_cache [B, Hkv, cap, hd]``;
slots 0..cache_length-1 are valid. Chain drafting uses slot = position; tree drafting writes the
nodes of one depth into the next slots with their own rotary positions and a mask (a node reads
the true pairs and its ancestors), see `EagleHead.step`.

File: one safetensors file (format ``hierspec.eagle``) with the weights (fp16/bf16), vocab_map,
the config, the target identity and a signature of the target's input embedding; a head made for
another target (hidden size, vocabulary, tokenizer or embedding weights) is refused at load.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hierspec.models.draft import (
    DraftBlock,
    DraftConfig,
    DraftFileError,
    check_vocab_map,
    load_head_state,
    read_head_file,
    rope_tables,
    target_identity,
    write_head_file,
)
from hierspec.models.early_exit import _SIGNATURE_RTOL

__all__ = ["FORMAT_EAGLE", "EagleConfig", "EagleHead", "build_eagle_head", "load_eagle", "save_eagle"]

FORMAT_EAGLE = "hierspec.eagle"
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class EagleConfig:
    """Shape of an EAGLE head. vocab_size / hidden_size / num_layers are the target's; n_vocab is
    R (rows of the reduced head); n_head / n_kv_head / d_ff size the one decoder block."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    n_vocab: int
    n_head: int
    n_kv_head: int
    d_ff: int
    rope_theta: float = 1.0e5
    norm_eps: float = 1.0e-5
    max_length: int = 8192

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "n_vocab", "n_head", "n_kv_head", "d_ff"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EagleConfig.{name} must be a positive int, got {v!r}")
        if self.n_vocab > self.vocab_size:
            raise ValueError(f"n_vocab {self.n_vocab} exceeds the target vocabulary {self.vocab_size}")

    def block_config(self) -> DraftConfig:
        return DraftConfig(
            vocab_size=self.vocab_size,
            n_vocab=self.n_vocab,
            n_layer=1,
            d_model=self.hidden_size,
            n_head=self.n_head,
            n_kv_head=self.n_kv_head,
            d_ff=self.d_ff,
            rope_theta=self.rope_theta,
            norm_eps=self.norm_eps,
            max_length=self.max_length,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EagleConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown EagleConfig fields: {sorted(unknown)}")
        return cls(**d)


class EagleHead(nn.Module):
    """The head (see module docstring). ``embed`` is the target's input embedding module; it is
    used, never trained or stored."""

    def __init__(self, config: EagleConfig, vocab_map: torch.Tensor, embed: nn.Module | None = None) -> None:
        super().__init__()
        vm = check_vocab_map(vocab_map, config.vocab_size)
        if vm.numel() != config.n_vocab:
            raise ValueError(f"config.n_vocab={config.n_vocab} but vocab_map has {vm.numel()} ids")
        self.config = config
        self.vocab_size = config.vocab_size
        h = config.hidden_size
        bc = config.block_config()
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.block = DraftBlock(bc)
        self.lm_head = nn.Linear(h, config.n_vocab, bias=False)
        self.register_buffer("vocab_map", vm, persistent=True)
        cos, sin = rope_tables(bc.head_dim, config.max_length, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._embed = [embed]  # a list: not a submodule (not trained, not saved)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self._length = 0

    # ------------------------------------------------------------------ pieces
    @property
    def embed(self) -> nn.Module:
        if self._embed[0] is None:
            raise ValueError("this EAGLE head is not attached to a target: call attach(target) first")
        return self._embed[0]

    def attach(self, embed: nn.Module) -> None:
        self._embed[0] = embed

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    @property
    def cache_length(self) -> int:
        return self._length

    def fuse(self, feats: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """u = W_fc [e(next_ids); feats]: [B, T, H] from feats [B, T, H] and next_ids [B, T]."""
        e = self.embed(next_ids.to(self.device)).to(self.dtype)
        return self.fc(torch.cat([e, feats.to(self.dtype)], -1))

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope_cos[positions].to(self.dtype), self.rope_sin[positions].to(self.dtype)

    def logits(self, feats: torch.Tensor, *, full: bool = True) -> torch.Tensor:
        """Head logits of predicted features: [.., R] reduced, or [.., V] float with -inf outside
        vocab_map (full=True)."""
        reduced = self.lm_head(feats)
        if not full:
            return reduced
        if reduced.dtype in _HALF:
            reduced = reduced.float()
        out = reduced.new_full((*reduced.shape[:-1], self.vocab_size), float("-inf"))
        return out.index_copy_(-1, self.vocab_map, reduced)

    # ------------------------------------------------------------------ training / evaluation
    def unroll(self, feats: torch.Tensor, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Predicted features of ``steps`` drafting steps from every start, with autograd.

        feats [B, T, H] true features f_0..f_{T-1}, ids [B, T] tokens x_0..x_{T-1}. Returns a list
        of [B, T-1, H]: element j-1 (step j), column i is the feature f^_{i+j} that the head
        predicts after the true pairs 0..i and j-1 pairs of its own predictions
        (f^_{i+1}, x_{i+2}), ..., (f^_{i+j-1}, x_{i+j}) -- fed the TRUE next tokens, the case in
        which draft position j is reached at all. Column i of step j is valid for i + j <= T-1.
        Step 1 is plain teacher forcing; steps >= 2 are the chains drafting runs ("training-time
        test"): query i of step j reads the true keys 0..i and the j-1 keys of its own chain.
        """
        b, t, _ = feats.shape
        n = t - 1
        pos = torch.arange(n, device=self.device)
        u = self.fuse(feats[:, :-1], ids[:, 1:])
        cos, sin = self.rope(pos)
        q, k, v = self.block.project(u, cos, sin)  # [B, H, n, hd], [B, Hkv, n, hd]
        rep = self.block.n_head // self.block.n_kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scale = self.block.head_dim**-0.5
        causal = pos[:, None] >= pos[None, :]
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        out = [self.block.output(u, att)]
        chain_k: list[torch.Tensor] = []
        chain_v: list[torch.Tensor] = []
        for j in range(2, steps + 1):
            # pair (f^_{i+j-1}, x_{i+j}) at position i+j-1; x beyond the row is padded (invalid)
            nxt = torch.cat([ids[:, j:], ids.new_zeros(b, j - 1)], 1)
            uj = self.fuse(out[-1], nxt)
            pj = (pos + j - 1).clamp_max(self.config.max_length - 1)
            cj, sj = self.rope(pj)
            qj, kj, vj = self.block.project(uj, cj, sj)
            chain_k.append(kj.repeat_interleave(rep, 1))
            chain_v.append(vj.repeat_interleave(rep, 1))
            s_true = (qj @ k.transpose(-1, -2)) * scale  # [B, H, n, n]
            s_true = s_true.masked_fill(~causal, float("-inf"))
            s_chain = torch.stack([(qj * kc).sum(-1) * scale for kc in chain_k], -1)  # [B, H, n, j-1]
            scores = torch.cat([s_true, s_chain], -1)
            w = torch.softmax(scores.float() if scores.dtype in _HALF else scores, -1).to(qj.dtype)
            att_j = w[..., :n] @ v + (w[..., n:, None] * torch.stack(chain_v, -2)).sum(-2)
            out.append(self.block.output(uj, att_j))
        return out

    # ------------------------------------------------------------------ drafting (cached)
    def _ensure_cache(self, end: int) -> None:
        k = self.k_cache
        if k is not None and k.shape[2] >= end:
            return
        c = self.config.block_config()
        cap = min(c.max_length, max(end, 256, 2 * (k.shape[2] if k is not None else 0)))
        shape = (1, c.kv_heads, cap, c.head_dim)
        new_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        new_v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if k is not None and self._length:
            new_k[:, :, : self._length] = k[:, :, : self._length]
            new_v[:, :, : self._length] = self.v_cache[:, :, : self._length]
        self.k_cache, self.v_cache = new_k, new_v

    @torch.no_grad()
    def step(
        self,
        feats: torch.Tensor,
        next_ids: torch.Tensor,
        positions: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Feed pairs (feats [1, T, H], next_ids [1, T]) at rotary ``positions`` [T] into cache
        slots cache_length..cache_length+T-1; returns the predicted features [1, T, H].

        mask: bool [T, cache_length+T] (True = may read that slot); default causal by slot.
        """
        start, t = self._length, feats.shape[1]
        if start + t > self.config.max_length:
            raise ValueError(f"EAGLE head: {start + t} slots exceed max_length {self.config.max_length}")
        if mask is not None and tuple(mask.shape) != (t, start + t):
            raise ValueError(f"mask: expected shape {(t, start + t)}, got {tuple(mask.shape)}")
        self._ensure_cache(start + t)
        u = self.fuse(feats, next_ids)
        cos, sin = self.rope(positions.to(self.device))
        out = self.block(u, cos, sin, (self.k_cache, self.v_cache), start, mask)
        self._length = start + t
        return out

    def crop(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise ValueError(f"crop length must be in 0..{self._length}, got {length}")
        self._length = length

    def reset(self) -> None:
        self._length = 0

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ============================================================================ build / save / load
def _target_parts(target: Any) -> tuple[Any, Any]:
    """(transformers causal LM, its text config) of an HFModel or a transformers model."""
    hf = target.model if hasattr(target, "cache_length") and hasattr(target, "model") else target
    if not hasattr(hf, "get_input_embeddings"):
        raise ValueError(f"EAGLE needs a transformers causal LM target, got {type(target).__name__}")
    return hf, hf.config.get_text_config(decoder=True)


def build_eagle_head(
    target: Any,
    vocab_map: torch.Tensor,
    *,
    n_head: int | None = None,
    n_kv_head: int | None = None,
    d_ff: int | None = None,
    seed: int = 0,
) -> EagleHead:
    """A fresh head for ``target`` (float32): block sized like one target layer by default, LM-head
    rows copied from the target's output embedding at vocab_map, other weights N(0, 0.02).
    (An identity start, f^_{t+1} = f_t, was tried: it predicts the CURRENT token and training
    spends its first hundreds of steps unlearning that.)"""
    hf, tc = _target_parts(target)
    h = int(tc.hidden_size)
    config = EagleConfig(
        vocab_size=int(hf.get_output_embeddings().weight.shape[0]),
        hidden_size=h,
        num_layers=int(tc.num_hidden_layers),
        n_vocab=int(vocab_map.numel()),
        n_head=n_head or int(tc.num_attention_heads),
        n_kv_head=n_kv_head or int(getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads),
        d_ff=d_ff or int(getattr(tc, "intermediate_size", 4 * h)),
        rope_theta=float(_rope_theta(tc)),
        norm_eps=float(getattr(tc, "rms_norm_eps", 1e-5)),
        max_length=int(getattr(tc, "max_position_embeddings", 8192)),
    )
    head = EagleHead(config, vocab_map, hf.get_input_embeddings())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name != "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.02)
        head.fc.bias.zero_()
        rows = hf.get_output_embeddings().weight.detach()[vocab_map.to(hf.device)]
        head.lm_head.weight.copy_(rows.float().cpu())
    return head


def _rope_theta(tc: Any) -> float:
    params = getattr(tc, "rope_parameters", None) or {}
    if isinstance(params, Mapping) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(tc, "rope_theta", 1.0e5))


def embedding_signature(hf: Any) -> list[float]:
    """Mean |w| of the target's input embedding and its first 4x4 entries (signed): tolerant to a
    fp32 / bf16 cast of one target, different for any other (e.g. retrained) target."""
    w = hf.get_input_embeddings().weight.detach()
    return [float(w.double().abs().mean()), *w[:4, :4].double().flatten().tolist()]


def _signature_matches(recorded: Any, mine: list[float]) -> bool:
    if not isinstance(recorded, list) or len(recorded) != len(mine):
        return False
    scale = abs(mine[0])
    return all(
        abs(float(a) - b) <= _SIGNATURE_RTOL * max(abs(float(a)), abs(b)) + 1e-3 * scale
        for a, b in zip(recorded, mine, strict=True)
    )


def save_eagle(
    head: EagleHead,
    path: str | os.PathLike[str],
    target: Any,
    tokenizer: Any = None,
    *,
    dtype: torch.dtype = torch.float16,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write the head (weights fp16/bf16, vocab_map, config, target identity + embedding signature)."""
    hf, _ = _target_parts(target)
    identity = target_identity(hf, tokenizer)
    write_head_file(
        path, FORMAT_EAGLE, head, head.config, identity, embedding_signature(hf), dtype=dtype, extra=extra
    )


def load_eagle(
    path: str | os.PathLike[str],
    target: Any,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    check_signature: bool = True,
) -> EagleHead:
    """Load a head written by `save_eagle` onto ``target`` (HFModel or transformers model), in the
    target's dtype unless ``dtype`` is given.

    Raises `DraftFileError` for a missing / corrupt file, or a head made for another target: other
    hidden size, vocabulary size, depth, tokenizer (when both are known) or input embedding.
    """
    tensors, config, recorded, sig, what = read_head_file(path, FORMAT_EAGLE, "EAGLE head file", EagleConfig)
    hf, _ = _target_parts(target)
    recorded.check(target_identity(hf, tokenizer), what=what, strict_shape=True)
    if check_signature and not _signature_matches(sig, embedding_signature(hf)):
        raise DraftFileError(
            f"{what} was trained on another target (its input-embedding signature differs); "
            "retrain the head for this target"
        )
    if "vocab_map" not in tensors:
        raise DraftFileError(f"{what} has no vocab_map tensor")
    vocab_map = check_vocab_map(tensors.pop("vocab_map"), config.vocab_size, what=f"{what}: vocab_map")
    try:
        head = EagleHead(config, vocab_map, hf.get_input_embeddings())
    except ValueError as err:
        raise DraftFileError(f"{what}: {err}") from err
    load_head_state(head, tensors, what)
    head.requires_grad_(False).eval()
    return head.to(device=hf.device, dtype=dtype or hf.dtype)
