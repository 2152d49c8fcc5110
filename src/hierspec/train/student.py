"""What `hierspec.train.distill.train` trains: the `Student` protocol, `DistilledLM` (a draft with
reduced logits, trained with `kd_loss`), and initialisations of a standalone draft from the target.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from hierspec.models.draft import DraftLM
from hierspec.models.early_exit import EarlyExitDraft
from hierspec.train.checkpoint import TrainError
from hierspec.train.config import TrainConfig
from hierspec.train.loss import kd_loss

__all__ = [
    "DistilledLM",
    "Student",
    "as_student",
    "describe_student",
    "init_draft_from_target",
    "init_draft_from_target_layers",
    "student_vocab_map",
    "trainable_module",
]


@runtime_checkable
class Student(Protocol):
    """What `train` trains. A student names its trainable module, describes itself (what a
    checkpoint must match), says whether its batches need cached target features, and computes
    its own loss on a batch (``row_of`` maps full-vocabulary ids to its reduced rows)."""

    vocab_size: int
    needs_features: bool

    @property
    def trainable(self) -> nn.Module: ...

    @property
    def vocab_map(self) -> torch.Tensor | None: ...

    def describe(self) -> dict[str, Any]: ...

    def train_loss(
        self, batch: dict[str, torch.Tensor], row_of: torch.Tensor, cfg: TrainConfig
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


class DistilledLM:
    """A draft that outputs reduced logits (`DraftLM`, or `EarlyExitDraft` whose frozen target
    layers feed a trained head) as a `Student`: loss = `kd_loss` on its ``train_logits``."""

    needs_features = False

    def __init__(self, model: DraftLM | EarlyExitDraft) -> None:
        self.model = model
        self.vocab_size = model.vocab_size

    @property
    def trainable(self) -> nn.Module:
        return self.model if isinstance(self.model, DraftLM) else self.model.head

    @property
    def vocab_map(self) -> torch.Tensor | None:
        return self.model.vocab_map

    def describe(self) -> dict[str, Any]:
        if isinstance(self.model, DraftLM):
            return {"kind": "standalone", "config": self.model.config.to_dict()}
        return {"kind": "early-exit", "config": self.model.head.config.to_dict()}

    def train_loss(
        self, batch: dict[str, torch.Tensor], row_of: torch.Tensor, cfg: TrainConfig
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return kd_loss(self.model.train_logits(batch["ids"]), batch, row_of, ce_weight=cfg.ce_weight)


def as_student(student: Any) -> Student:
    """``student`` as a `Student`: drafts with reduced logits are wrapped in `DistilledLM`;
    anything else must implement the protocol itself (e.g. `hierspec.train.eagle.EagleStudent`)."""
    if isinstance(student, (DraftLM, EarlyExitDraft)):
        return DistilledLM(student)
    if isinstance(student, Student):
        return student
    raise TypeError(
        f"cannot train a {type(student).__name__}: expected DraftLM, EarlyExitDraft or a Student "
        "(trainable, vocab_map, vocab_size, needs_features, describe, train_loss)"
    )


def trainable_module(student: Any) -> nn.Module:
    """The nn.Module whose parameters are trained (the whole draft, the early-exit head, ...)."""
    return as_student(student).trainable


def describe_student(student: Any) -> dict[str, Any]:
    """{"kind": ..., "config": {...}, ...}: what a checkpoint of ``student`` must match."""
    return as_student(student).describe()


def student_vocab_map(student: Any) -> torch.Tensor | None:
    vm = as_student(student).vocab_map
    return None if vm is None else vm.cpu()


@torch.no_grad()
def init_draft_from_target(draft: DraftLM, target: Any) -> None:
    """Initialise the draft's (tied) embedding from the target's: the rows at ``vocab_map``
    projected onto their top ``d_model`` principal directions (an SVD), UNK = their mean.

    A cheap, strong start: the draft begins as a low-rank copy of the target's token geometry.
    """
    from hierspec.models.hf import HFModel

    hf = target.model if isinstance(target, HFModel) else target
    emb = hf.get_input_embeddings().weight.detach().float().cpu()[draft.vocab_map.cpu()]
    d = draft.config.d_model
    if emb.shape[1] >= d:
        _, _, vh = torch.linalg.svd(emb, full_matrices=False)
        proj = emb @ vh[:d].T
    else:
        proj = torch.zeros(emb.shape[0], d)
        proj[:, : emb.shape[1]] = emb
    w = draft.embed.weight
    w[: proj.shape[0]] = proj.to(w)
    w[proj.shape[0]] = proj.mean(0).to(w)
    if draft.lm_head is not None:
        draft.lm_head.weight.copy_(proj.to(draft.lm_head.weight))


@torch.no_grad()
def init_draft_from_target_layers(draft: DraftLM, target: Any, layers: list[int]) -> None:
    """Initialise a draft of the target's width as a copy of some of its layers (layer-dropping
    self-distillation): the embedding rows at ``vocab_map`` (UNK = their mean), the decoder
    layers ``layers`` (in order) and the final norm. With the target's tied head the draft's
    tied head is then exactly the target's LM-head rows at ``vocab_map``, so before training the
    draft computes the target's own forward with every other layer skipped (all layers given:
    the target's logits restricted to the reduced vocabulary).

    The draft's config must match the target's layer shapes (d_model, heads, KV heads, d_ff,
    rope_theta); a Llama-layout transformers target is expected.
    """
    from hierspec.models.hf import HFModel

    hf = target.model if isinstance(target, HFModel) else target
    tc = hf.config.get_text_config(decoder=True)
    c = draft.config
    want = (
        int(tc.hidden_size),
        int(tc.num_attention_heads),
        int(tc.num_key_value_heads),
        int(tc.intermediate_size),
    )
    have = (c.d_model, c.n_head, c.kv_heads, c.ff_dim)
    if want != have:
        raise TrainError(
            f"copying target layers needs the draft's (d_model, heads, kv_heads, d_ff) = the target's "
            f"{want}, got {have}"
        )
    if len(layers) != c.n_layer or any(not 0 <= i < tc.num_hidden_layers for i in layers):
        raise TrainError(
            f"give {c.n_layer} target layer indices in 0..{tc.num_hidden_layers - 1}, got {layers}"
        )
    emb = hf.get_input_embeddings().weight.detach().float().cpu()[draft.vocab_map.cpu()]
    w = draft.embed.weight
    w[: emb.shape[0]] = emb.to(w)
    w[emb.shape[0]] = emb.mean(0).to(w)
    if draft.lm_head is not None:
        head = hf.get_output_embeddings().weight.detach().float().cpu()[draft.vocab_map.cpu()]
        draft.lm_head.weight.copy_(head.to(draft.lm_head.weight))
    names = {
        "attn_norm": "input_layernorm",
        "mlp_norm": "post_attention_layernorm",
        "q_proj": "self_attn.q_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.o_proj",
        "gate_proj": "mlp.gate_proj",
        "up_proj": "mlp.up_proj",
        "down_proj": "mlp.down_proj",
    }
    for mine, i in zip(draft.layers, layers, strict=True):
        theirs = hf.model.layers[i]
        for a, b in names.items():
            src = theirs.get_submodule(b).weight.detach()
            getattr(mine, a).weight.copy_(src.to(getattr(mine, a).weight))
    draft.norm.weight.copy_(hf.model.norm.weight.detach().to(draft.norm.weight))
