"""`EarlyExitHead`: the small trained head an early exit of the target drafts with (on the
target's first L decoder layers: `hierspec.models.early_exit.EarlyExitDraft` standalone, or the
target's own layer ranges in `hierspec.models.layered`), its shape (`EarlyExitConfig`), its
logits (`exit_logits`) and the weight signature of the layers it shares with the target.

Head (`EarlyExitHead`): ``[adapter] -> RMSNorm -> LM head``.
  * RMSNorm is initialised from the target's final norm.
  * adapter (optional, ``adapter_dim > 0``): a residual SwiGLU MLP with its own pre-norm and a
    zero-initialised output, so training starts exactly at the untrained early exit. It gives
    the head some capacity to translate the layer-L residual stream into the final layer's
    "language"; a plain norm + linear head can only re-read it.
  * LM head, ``head="reduced"`` (default): R rows for the target ids in ``vocab_map``,
    initialised from the target's (tied) LM head rows, -inf elsewhere in the full-vocabulary
    logits. ``head="tied"``: the target's own full LM head (frozen, not stored in the file).
    Why reduced is the default: SmolLM2's head is a 49152 x 576 matrix, ~28M multiply-adds per
    token, and measured 7 ms of the ~8-10 ms a 1-2 layer early exit costs on this CPU; with
    R = 8192 rows it costs ~1/6 of that, and it is trainable without touching the target.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hierspec.models.draft import RMSNorm, check_vocab_map

__all__ = ["EarlyExitConfig", "EarlyExitHead", "exit_logits", "weight_signature"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class EarlyExitConfig:
    """Shape of an early-exit head.

    exit_layer: L, number of target decoder layers run before the head (1..num_layers).
    vocab_size / hidden_size / num_layers: the target's.
    head: "reduced" (R rows for vocab_map) or "tied" (the target's own LM head).
    n_vocab: R for a reduced head (None for tied).
    adapter_dim: width of the residual SwiGLU adapter; 0 = no adapter.
    """

    exit_layer: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    head: str = "reduced"
    n_vocab: int | None = None
    adapter_dim: int = 0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.head not in ("reduced", "tied"):
            raise ValueError(f"head must be 'reduced' or 'tied', got {self.head!r}")
        if not 1 <= self.exit_layer <= self.num_layers:
            raise ValueError(f"exit_layer must be in 1..{self.num_layers}, got {self.exit_layer}")
        if self.head == "reduced" and not (self.n_vocab and 0 < self.n_vocab <= self.vocab_size):
            raise ValueError(f"a reduced head needs n_vocab in 1..{self.vocab_size}, got {self.n_vocab}")
        if self.head == "tied" and self.n_vocab not in (None, self.vocab_size):
            raise ValueError("a tied head covers the full vocabulary; leave n_vocab None")
        if self.adapter_dim < 0:
            raise ValueError(f"adapter_dim must be >= 0, got {self.adapter_dim}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EarlyExitConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown EarlyExitConfig fields: {sorted(unknown)}")
        return cls(**d)


def _llama_parts(model: Any) -> tuple[Any, Any]:
    """(causal LM, its base model) of a transformers model or an HFModel; checks the layout."""
    from hierspec.models.hf import HFModel

    hf = model.model if isinstance(model, HFModel) else model
    base = getattr(hf, "model", None)
    for name in ("embed_tokens", "layers", "rotary_emb", "norm"):
        if base is None or not hasattr(base, name):
            raise ValueError(
                "early exit needs a Llama-layout transformers causal LM (model.model.embed_tokens, "
                f".layers, .rotary_emb, .norm); {type(hf).__name__} has no model.model.{name}"
            )
    return hf, base


def weight_signature(model: Any, exit_layer: int) -> list[float]:
    """Mean |w| of the embedding and of each shared layer's q_proj and down_proj (float64 sums)."""
    _, base = _llama_parts(model)
    sig = [float(base.embed_tokens.weight.detach().double().abs().mean())]
    for layer in base.layers[:exit_layer]:
        sig.append(float(layer.self_attn.q_proj.weight.detach().double().abs().mean()))
        sig.append(float(layer.mlp.down_proj.weight.detach().double().abs().mean()))
    return sig


class EarlyExitHead(nn.Module):
    """``[residual SwiGLU adapter] -> RMSNorm -> LM head`` (reduced or the target's tied head)."""

    def __init__(self, config: EarlyExitConfig, vocab_map: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        if config.adapter_dim:
            self.adapter_norm = RMSNorm(h, config.norm_eps)
            self.adapter_gate = nn.Linear(h, config.adapter_dim, bias=False)
            self.adapter_up = nn.Linear(h, config.adapter_dim, bias=False)
            self.adapter_down = nn.Linear(config.adapter_dim, h, bias=False)
            with torch.no_grad():
                for lin in (self.adapter_gate, self.adapter_up):
                    lin.weight.normal_(0.0, 1.0 / math.sqrt(h))
                self.adapter_down.weight.zero_()
        self.norm = RMSNorm(h, config.norm_eps)
        if config.head == "reduced":
            if vocab_map is None:
                raise ValueError("a reduced head needs a vocab_map")
            vm = check_vocab_map(vocab_map, config.vocab_size)
            if vm.numel() != config.n_vocab:
                raise ValueError(f"config.n_vocab={config.n_vocab} but vocab_map has {vm.numel()} ids")
            self.lm_head: nn.Linear | None = nn.Linear(h, config.n_vocab, bias=False)
            self.register_buffer("vocab_map", vm, persistent=True)
        else:
            if vocab_map is not None:
                raise ValueError("a tied head covers the full vocabulary; pass no vocab_map")
            self.lm_head = None
            self.vocab_map = None

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Adapter (if any) then the final norm: [.., hidden] -> [.., hidden]."""
        if self.config.adapter_dim:
            a = self.adapter_norm(h)
            h = h + self.adapter_down(F.silu(self.adapter_gate(a)) * self.adapter_up(a))
        return self.norm(h)

    def init_from_target(self, model: Any) -> None:
        """Copy the target's final-norm weight and (reduced head) its LM-head rows at vocab_map."""
        hf, base = _llama_parts(model)
        with torch.no_grad():
            self.norm.weight.copy_(base.norm.weight.detach().to(self.norm.weight.dtype))
            if self.lm_head is not None:
                rows = hf.get_output_embeddings().weight.detach()[self.vocab_map.to(hf.device)]
                self.lm_head.weight.copy_(rows.to(self.lm_head.weight))


def exit_logits(
    head: EarlyExitHead, exit_hidden: torch.Tensor, output_weight: torch.Tensor, *, full: bool = True
) -> torch.Tensor:
    """``head`` on a layer-L residual stream [.., H]. A tied head uses ``output_weight`` (the
    target's LM head, [V, H]). full=True: [.., V] logits, -inf outside a reduced head's
    vocab_map (float32 for half-precision models); full=False: [.., R] reduced logits."""
    h = head.hidden(exit_hidden)
    if head.lm_head is None:
        return F.linear(h, output_weight)
    reduced = head.lm_head(h)
    if not full:
        return reduced
    if reduced.dtype in _HALF_DTYPES:
        reduced = reduced.float()
    out = reduced.new_full((*reduced.shape[:-1], output_weight.shape[0]), float("-inf"))
    return out.index_copy_(-1, head.vocab_map, reduced)
