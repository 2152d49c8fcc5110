"""`DraftLM`: a small standalone Llama-style draft model for a target's tokenizer, with a reduced
draft vocabulary, a static position-addressed KV cache, and a one-file safetensors format.

Read top to bottom: target identity -> checked safetensors I/O -> config -> modules -> model
(training path, then the `LanguageModel` path) -> save/load.

Architecture (Llama): token embedding -> ``n_layer`` x [RMSNorm -> GQA attention with RoPE
(``rope_theta`` 1e5 like SmolLM2) -> residual; RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm ->
LM head.

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

File format: ONE safetensors file, weights in fp16 (or bf16) plus ``vocab_map`` (int64), and in
the metadata ``format``, ``format_version``, ``config`` (JSON), ``target`` (JSON identity of the
target: vocab size, hidden size, layers, tokenizer fingerprint) and ``sha256`` (of every tensor's
bytes). `load_draft` raises `DraftFileError` when the file is truncated or corrupt, was made for
another target, or its vocab_map is invalid.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hierspec.files import write_atomic
from hierspec.models.base import ForwardOutput

__all__ = [
    "DraftConfig",
    "DraftFileError",
    "DraftLM",
    "TargetIdentity",
    "load_draft",
    "read_safetensors",
    "save_draft",
    "target_identity",
    "tokenizer_fingerprint",
    "write_safetensors",
]

FORMAT_DRAFT = "hierspec.draft"
FORMAT_VERSION = 1
_HALF_DTYPES = (torch.float16, torch.bfloat16)


class DraftFileError(ValueError):
    """A draft / head file is unreadable, corrupt, or made for another target."""


# ============================================================================ target identity
def tokenizer_fingerprint(tokenizer: Any, n: int = 1000) -> str:
    """sha256 (first 16 hex digits) of the first ``n`` token strings of a HF tokenizer.

    Two tokenizers with the same fingerprint map the first ``n`` ids to the same strings; with
    equal vocabulary sizes that identifies the tokenizer in practice.
    """
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(n, size))))
    blob = "\x00".join("" if t is None else str(t) for t in tokens)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class TargetIdentity:
    """What a draft file records about the target it was made for.

    vocab_size: width of the target's logits (the only thing a standalone draft depends on).
    hidden_size / num_layers: the target's residual width and depth (an early-exit head depends
        on them; informational for a standalone draft).
    tokenizer: `tokenizer_fingerprint` of the target's tokenizer, or None if unknown.
    name: free-form label (e.g. "SmolLM2-135M-Instruct"), never checked.
    """

    vocab_size: int
    hidden_size: int | None = None
    num_layers: int | None = None
    tokenizer: str | None = None
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TargetIdentity:
        known = {f.name for f in fields(cls)}
        if not isinstance(d, Mapping) or "vocab_size" not in d:
            raise DraftFileError("the file's target identity has no vocab_size")
        return cls(**{k: v for k, v in d.items() if k in known})

    def check(self, other: TargetIdentity, *, what: str, strict_shape: bool = False) -> None:
        """Raise `DraftFileError` if ``other`` (the actual target) is not the one recorded here.

        vocab_size must match; the tokenizer fingerprint must match when both are known;
        with ``strict_shape`` hidden_size and num_layers must match too when both are known.
        """
        if self.vocab_size != other.vocab_size:
            raise DraftFileError(
                f"{what} was made for a target with vocabulary size {self.vocab_size}, but this "
                f"target has {other.vocab_size}: it belongs to another model / tokenizer"
            )
        if self.tokenizer and other.tokenizer and self.tokenizer != other.tokenizer:
            raise DraftFileError(
                f"{what} was made for another tokenizer (fingerprint {self.tokenizer}, this "
                f"target's tokenizer has {other.tokenizer}); token ids would not mean the same"
            )
        if strict_shape:
            for name in ("hidden_size", "num_layers"):
                mine, theirs = getattr(self, name), getattr(other, name)
                if mine is not None and theirs is not None and mine != theirs:
                    raise DraftFileError(
                        f"{what} was made for a target with {name}={mine}, but this target has {theirs}"
                    )


def target_identity(model: Any, tokenizer: Any = None, *, name: str | None = None) -> TargetIdentity:
    """`TargetIdentity` of a transformers causal LM or an ``HFModel`` (optionally its tokenizer)."""
    hf = getattr(model, "model", model) if not hasattr(model, "get_output_embeddings") else model
    config = hf.config.get_text_config(decoder=True)
    head = hf.get_output_embeddings()
    vocab = int(head.weight.shape[0]) if head is not None else int(config.vocab_size)
    return TargetIdentity(
        vocab_size=vocab,
        hidden_size=int(config.hidden_size),
        num_layers=int(config.num_hidden_layers),
        tokenizer=tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        name=name or getattr(config, "_name_or_path", None) or None,
    )


# ============================================================================ checked safetensors I/O
def _tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Write ``tensors`` + ``metadata`` (+ a ``sha256`` of the tensors) atomically (temp + rename)."""
    from safetensors.torch import save_file

    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {**{k: str(v) for k, v in metadata.items()}, "sha256": _tensor_digest(data)}
    write_atomic(path, lambda tmp: save_file(data, str(tmp), metadata=meta))


def read_safetensors(
    path: str | os.PathLike[str], *, what: str = "file", expect_format: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a file written by `write_safetensors`; `DraftFileError` if missing, truncated or corrupt.

    Checks the recorded sha256 of the tensors and, if ``expect_format`` is given, the ``format``
    metadata entry.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DraftFileError(f"{what} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise DraftFileError(
            f"{what} {str(path)!r} is truncated or corrupt (not a readable safetensors file): {err}"
        ) from err
    if expect_format is not None and metadata.get("format") != expect_format:
        raise DraftFileError(
            f"{what} {str(path)!r} is not a {expect_format} file (format={metadata.get('format')!r})"
        )
    digest = metadata.get("sha256")
    if digest is None:
        raise DraftFileError(f"{what} {str(path)!r} has no sha256 entry: not written by hierspec")
    if _tensor_digest(tensors) != digest:
        raise DraftFileError(f"{what} {str(path)!r} is corrupt: its tensors do not match their sha256")
    return tensors, metadata


def parse_json_meta(metadata: Mapping[str, str], key: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError) as err:
        raise DraftFileError(f"{what}: metadata entry {key!r} is missing or not JSON") from err
    if not isinstance(value, dict):
        raise DraftFileError(f"{what}: metadata entry {key!r} is not a JSON object")
    return value


def check_vocab_map(vocab_map: torch.Tensor, vocab_size: int, *, what: str = "vocab_map") -> torch.Tensor:
    """Validate a vocab_map: 1-D, non-empty, integer, unique ids in [0, vocab_size). Returns int64."""
    if not isinstance(vocab_map, torch.Tensor) or vocab_map.ndim != 1 or vocab_map.numel() == 0:
        raise DraftFileError(f"{what} must be a non-empty 1-D tensor of target token ids")
    if vocab_map.is_floating_point() or vocab_map.dtype == torch.bool or vocab_map.is_complex():
        raise DraftFileError(f"{what} must hold integer token ids, got dtype {vocab_map.dtype}")
    vm = vocab_map.to(torch.long).cpu()
    lo, hi = int(vm.min()), int(vm.max())
    if lo < 0 or hi >= vocab_size:
        raise DraftFileError(
            f"{what} has token ids in [{lo}, {hi}], outside the target vocabulary [0, {vocab_size})"
        )
    if torch.unique(vm).numel() != vm.numel():
        raise DraftFileError(f"{what} holds duplicate token ids")
    if vm.numel() > vocab_size:
        raise DraftFileError(f"{what} has {vm.numel()} entries, more than the vocabulary {vocab_size}")
    return vm


def write_head_file(
    path: str | os.PathLike[str],
    fmt: str,
    module: nn.Module,
    config: Any,
    target: TargetIdentity,
    signature: list[float],
    *,
    dtype: torch.dtype = torch.float16,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a head that runs on a frozen target (early exit, EAGLE): its weights in fp16/bf16
    (`storage_dtype`), ``vocab_map`` (int64) if it has one, and metadata ``format`` = fmt,
    ``format_version`` 1, ``config`` (JSON of ``config.to_dict()``), ``target`` (identity),
    ``signature`` (of the target weights it relies on) and ``info`` (``extra``)."""
    weights = {k: v for k, v in module.state_dict().items() if k != "vocab_map"}
    sdt = storage_dtype(weights, dtype)
    tensors = {k: v.to(sdt) for k, v in weights.items()}
    vm = getattr(module, "vocab_map", None)
    if vm is not None:
        tensors["vocab_map"] = vm.to(torch.long)
    meta = {
        "format": fmt,
        "format_version": "1",
        "config": json.dumps(config.to_dict()),
        "target": json.dumps(target.to_dict()),
        "signature": json.dumps(signature),
        "info": json.dumps(dict(extra or {})),
    }
    write_safetensors(path, tensors, meta)


def read_head_file(
    path: str | os.PathLike[str], fmt: str, what: str, config_cls: Any
) -> tuple[dict[str, torch.Tensor], Any, TargetIdentity, Any, str]:
    """Read a `write_head_file` file: (tensors, config, recorded target identity, signature (JSON
    value, None if absent), the ``what`` prefix for errors); `DraftFileError` if it is missing,
    corrupt, of another format or version, or has an invalid config."""
    tensors, meta = read_safetensors(path, what=what, expect_format=fmt)
    what = f"{what} {str(path)!r}"
    if meta.get("format_version") != "1":
        raise DraftFileError(f"{what} has format_version {meta.get('format_version')!r}, expected 1")
    try:
        config = config_cls.from_dict(parse_json_meta(meta, "config", what))
    except (TypeError, ValueError) as err:
        raise DraftFileError(f"{what} has an invalid config: {err}") from err
    recorded = TargetIdentity.from_dict(parse_json_meta(meta, "target", what))
    try:
        signature = json.loads(meta.get("signature", "null") or "null")
    except ValueError:
        signature = None
    return tensors, config, recorded, signature, what


def load_head_state(module: nn.Module, tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Load a head file's weights (all but vocab_map, which the module already holds) into
    ``module`` in float32; `DraftFileError` naming missing / unexpected weights."""
    expected = {k for k in module.state_dict() if k != "vocab_map"}
    if set(tensors) != expected:
        raise DraftFileError(
            f"{what}: weights do not match its config (missing {sorted(expected - set(tensors))}, "
            f"unexpected {sorted(set(tensors) - expected)})"
        )
    try:
        module.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    except RuntimeError as err:
        raise DraftFileError(f"{what}: weights do not match its config: {err}") from err


def storage_dtype(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.dtype:
    """fp16 unless a value would overflow it (then bf16); bf16 stays bf16."""
    if dtype not in _HALF_DTYPES:
        raise ValueError(f"weights are stored as float16 or bfloat16, got {dtype}")
    if dtype == torch.float16:
        big = max((float(t.detach().abs().max()) for t in tensors.values() if t.numel()), default=0.0)
        if not math.isfinite(big) or big > 6.0e4:
            return torch.bfloat16
    return dtype


# ============================================================================ config
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
        h = x.float() if dtype in _HALF_DTYPES else x
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


# ============================================================================ model
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
        if reduced.dtype in _HALF_DTYPES:
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

    def cost_per_forward(self, num_tokens: int) -> float | None:
        return None

    def num_parameters(self, *, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def extra_repr(self) -> str:
        return f"R={self.config.n_vocab}/{self.vocab_size}, cache_length={self._length}"

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
