"""Distillation of a draft from cached teacher top-k: loss, data order, training loop with exact
resume, held-out evaluation, export.

KD loss and the tail. The student's q lives on its reduced vocabulary S (R ids; S = everything
for a full-vocabulary student). For every position the teacher cache gives the top-k
probabilities p_1..p_k and, through the stored logsumexp, the exact mass outside them,
``tail = 1 - sum_i p_i``. Both distributions are coarse-grained onto the same buckets:

    one bucket per top-k token inside S          teacher p_i          student q_i
    one REST bucket = every other token of S     teacher tail         student 1 - sum_i q_i
    (top-k tokens outside S are dropped: q is 0 there by construction)

and the teacher side is renormalised over the buckets. The loss is KL(teacher || student) over
the buckets: exact on the top-k, and consistent on the rest (the student is asked to put
exactly the teacher's tail mass on the tokens it does not see individually, without being told
how to spread it). Renormalising is the right target for a reduced vocabulary: the student
that minimises it is q = p restricted to S and renormalised, which maximises sum_v min(p, q)
(= p(S)) among all q supported on S. The only approximation is that the tail is assumed to lie
inside S (it is unknown how it splits); with S = the top 8k tokens and k = 64 the tail is a
few percent and mostly inside S. With no REST rows (S inside the top-k) the tail is dropped.
Optional hard labels: ``loss = (1 - ce_weight) * KL + ce_weight * CE(next token)`` (targets
outside S are skipped).

Resume. A checkpoint (every ``ckpt_every`` steps and at the end) holds the trainable weights,
AdamW state, LR-schedule state, RNG states, the data cursor (epoch, position) and the step; it is
written to a temporary file and renamed, and framed with a magic string, a length and a sha256
so a truncated or corrupt file is refused with `CheckpointError`. The data order is a pure
function of (seed, epoch), so a resumed run replays exactly the batches the stopped one would
have seen: interrupt + resume gives the same weights as an uninterrupted run (bitwise on one
machine).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import struct
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from hierspec.files import write_bytes_atomic
from hierspec.models.draft import DraftLM, TargetIdentity
from hierspec.models.early_exit import EarlyExitDraft
from hierspec.train.data import DataError, list_shards, load_rows
from hierspec.train.teacher import TargetPass, load_teacher, teacher_path
from hierspec.train.vocab import inverse_map

__all__ = [
    "CheckpointError",
    "DistilledLM",
    "Evaluator",
    "ShardLoader",
    "Student",
    "TrainConfig",
    "TrainError",
    "as_student",
    "describe_student",
    "export_student",
    "init_draft_from_target",
    "init_draft_from_target_layers",
    "kd_loss",
    "load_checkpoint",
    "save_checkpoint",
    "simulate_acceptance_length",
    "train",
    "trainable_module",
]

_MAGIC = b"HSCKPT01"
_HEADER = struct.Struct("<8s32sQ")  # magic, sha256 of payload, payload length


class TrainError(RuntimeError):
    """Training cannot start or continue (existing run, incompatible checkpoint, ...)."""


class CheckpointError(TrainError):
    """A checkpoint file is missing, truncated, corrupt, or not a hierspec checkpoint."""


# ============================================================================ checkpoints
def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Atomically write ``payload`` (torch-serialisable) framed with magic + length + sha256."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    header = _HEADER.pack(_MAGIC, hashlib.sha256(data).digest(), len(data))
    write_bytes_atomic(path, header + data)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; `CheckpointError` if it is not intact."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    raw = path.read_bytes()
    if len(raw) < _HEADER.size or not raw.startswith(_MAGIC):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a hierspec training checkpoint (or is truncated)"
        )
    _, digest, length = _HEADER.unpack_from(raw)
    data = raw[_HEADER.size :]
    if len(data) != length:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated ({len(data)} of {length} payload bytes); "
            "delete it to restart, or restore a copy"
        )
    if hashlib.sha256(data).digest() != digest:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt (sha256 mismatch); delete it or restore a copy"
        )
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # pragma: no cover - the sha256 check catches damage first
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be decoded: {err}") from err


# ============================================================================ students
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


def _vocab_map(student: Any) -> torch.Tensor | None:
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


# ============================================================================ data order
class ShardLoader:
    """Batches of (token rows, teacher top-k) in a deterministic, resumable order.

    Epoch e: the shards are permuted with seed (seed, e), taken ``group`` at a time, and the rows
    of each group are shuffled together (so a batch mixes up to ``group`` shards while at most
    ``2 * group`` shards are held in memory). A cursor ``{"epoch", "pos"}`` indexes that order;
    a batch may run into the next epoch.
    """

    def __init__(
        self, data_dir: str | os.PathLike[str], *, seed: int = 0, group: int = 4, features: bool = False
    ) -> None:
        from safetensors import safe_open

        self.features = features
        self.shards = list_shards(data_dir)
        if not self.shards:
            raise DataError(f"no token shards under {Path(data_dir) / 'tokens'}: prepare the data first")
        missing = [s.name for s in self.shards if not teacher_path(s).is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} of {len(self.shards)} token shards have no teacher cache yet "
                f"(first: {missing[0]}); run the teacher-caching stage first"
            )
        self.rows = []
        for s in self.shards:
            try:
                with safe_open(str(s), framework="pt") as f:
                    self.rows.append(int(f.get_slice("ids").get_shape()[0]))
            except Exception as err:
                raise DataError(f"token shard {s} is unreadable: {err}") from err
        self.total_rows = sum(self.rows)
        self.seed, self.group = seed, max(1, group)
        self._order_epoch: int | None = None
        self._order: torch.Tensor | None = None
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """[total_rows, 2] (shard index, row) pairs of one epoch."""
        if self._order_epoch == epoch and self._order is not None:
            return self._order
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.shards), generator=g).tolist()
        parts = []
        for g0 in range(0, len(perm), self.group):
            members = perm[g0 : g0 + self.group]
            pairs = torch.cat(
                [
                    torch.stack([torch.full((self.rows[s],), s), torch.arange(self.rows[s])], 1)
                    for s in members
                ]
            )
            parts.append(pairs[torch.randperm(pairs.shape[0], generator=g)])
        self._order_epoch, self._order = epoch, torch.cat(parts)
        return self._order

    def _shard(self, i: int) -> dict[str, torch.Tensor]:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        ids, mask, meta = load_rows(self.shards[i])
        t = load_teacher(self.shards[i], meta)
        if t["logp"].shape[:2] != ids.shape:
            raise DataError(f"teacher cache of {self.shards[i].name} does not match its token shard")
        item = {"ids": ids, "mask": mask, "t_logp": t["logp"], "t_ids": t["ids"], "t_lse": t["lse"]}
        if self.features:  # the target's last hidden states (EAGLE), see hierspec.train.eagle
            from hierspec.train.eagle import load_features

            item["h"] = load_features(self.shards[i])
            if item["h"].shape[:2] != ids.shape:
                raise DataError(f"feature cache of {self.shards[i].name} does not match its token shard")
        self._cache[i] = item
        while len(self._cache) > 2 * self.group:
            self._cache.popitem(last=False)
        return item

    def next_batch(
        self, cursor: dict[str, int], batch_size: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        epoch, pos = int(cursor["epoch"]), int(cursor["pos"])
        picks: list[torch.Tensor] = []
        need = batch_size
        while need > 0:
            order = self.epoch_order(epoch)
            take = order[pos : pos + need]
            picks.append(take)
            need -= take.shape[0]
            pos += take.shape[0]
            if pos >= order.shape[0]:
                epoch, pos = epoch + 1, 0
        pairs = torch.cat(picks)
        rows = [{k: v[int(r)] for k, v in self._shard(int(s)).items()} for s, r in pairs.tolist()]
        batch = {k: torch.stack([row[k] for row in rows]) for k in rows[0]}
        return batch, {"epoch": epoch, "pos": pos}


# ============================================================================ loss
def kd_loss(
    student_logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    row_of: torch.Tensor,
    *,
    ce_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Bucketed KL(teacher || student) on the cached top-k (+ optional CE); see module docstring.

    Args:
        student_logits: [B, T, R] logits over the student's rows.
        batch: ``mask`` [B, T], ``ids`` [B, T], ``t_logp`` [B, T, k], ``t_ids`` [B, T, k].
        row_of: [V] student row of each target id, R for ids outside the student's vocabulary.
    Returns:
        (loss, {"kl", "ce", "agree"}) where agree = student argmax == teacher argmax.
    """
    r = student_logits.shape[-1]
    device = student_logits.device
    valid = (batch["mask"] > 0).to(device)
    n_valid = valid.sum().clamp_min(1)
    logq = F.log_softmax(student_logits.float(), dim=-1)  # [B, T, R]
    t_rows = row_of.to(device)[batch["t_ids"].long().to(device)]  # [B, T, k]
    in_s = t_rows < r
    p_top = batch["t_logp"].float().to(device).exp()
    tail = (1.0 - p_top.sum(-1)).clamp_min(0.0)
    n_rest = r - in_s.sum(-1)
    p_in = p_top * in_s
    p_rest = tail * (n_rest > 0)
    z = (p_in.sum(-1) + p_rest).clamp_min(1e-30)
    pt_in, pt_rest = p_in / z[..., None], p_rest / z
    logq_top = logq.gather(-1, t_rows.clamp_max(r - 1))  # [B, T, k]; entries outside S masked below
    # log q(REST) = log(1 - sum of the student's top-k-in-S mass), summed in float64 on the small
    # [B, T, k] tensor: no second [B, T, R] pass. fp32 log-probs limit its relative precision to
    # ~1e-7 / q(REST); the clamp only bites when q(REST) < 1e-12, and then the top-k terms (whose
    # teacher mass sums to < 1) already move student mass back out of the top-k.
    q_top = torch.where(in_s, logq_top.double().exp(), 0.0).sum(-1)
    logq_rest = (1.0 - q_top).clamp_min(1e-12).log().float()
    kl_top = torch.where(in_s, torch.xlogy(pt_in, pt_in) - pt_in * logq_top, 0.0).sum(-1)
    kl_rest = torch.where(pt_rest > 0, torch.xlogy(pt_rest, pt_rest) - pt_rest * logq_rest, 0.0)
    kl = ((kl_top + kl_rest) * valid).sum() / n_valid
    loss = kl
    ce_val = 0.0
    if ce_weight > 0:
        labels = row_of.to(device)[batch["ids"][:, 1:].long().to(device)]
        ok = (labels < r) & (batch["mask"][:, 1:] > 0).to(device)
        nll = -logq[:, :-1].gather(-1, labels.clamp_max(r - 1)[..., None])[..., 0]
        ce = (nll * ok).sum() / ok.sum().clamp_min(1)
        loss = (1.0 - ce_weight) * kl + ce_weight * ce
        ce_val = float(ce.detach())
    with torch.no_grad():
        top_row = t_rows[..., 0]
        agree = ((logq.argmax(-1) == top_row) & valid).sum() / n_valid
    return loss, {"kl": float(kl.detach()), "ce": ce_val, "agree": float(agree)}


# ============================================================================ evaluation
def simulate_acceptance_length(agree: torch.Tensor, gamma: int) -> tuple[int, int]:
    """(tokens, steps) of greedy speculative decoding along one greedy continuation.

    ``agree[i]`` says whether the draft's argmax equals the target's at response position i
    (teacher-forced on the target's own greedy output, which is exactly the prefix the engine
    would hold). Each step accepts the run of agreements (at most gamma) and adds one target
    token, as the greedy rule does.
    """
    a = agree.tolist()
    n, i, steps = len(a), 0, 0
    while i < n:
        run = 0
        while run < gamma and i + run < n and a[i + run]:
            run += 1
        i += run + 1
        steps += 1
    return n, steps


class Evaluator:
    """Held-out metrics of a student against the teacher's exact full distributions (from a
    `TargetPass`: the teacher runs once, its logits are recomputed from its features per call).

    Positions: those predicting response tokens (mask 2) if the set has any, else every
    non-pad next token. Metrics: ``agree`` (greedy agreement), ``accept_t1`` (mean sum_v
    min(p, q) at T = 1: the expected acceptance of one draft token), ``coverage`` (teacher mass
    inside the student's vocabulary), and, on response rows, ``mal_g{gamma}``: the mean
    acceptance length of greedy speculative decoding with block size gamma, simulated on the
    target's greedy responses.
    """

    def __init__(self, target: TargetPass, *, gamma: int = 5, batch_rows: int = 2) -> None:
        self.target = target
        self.hf, self.ids, self.mask = target.hf, target.ids, target.mask
        self.gamma, self.batch_rows = gamma, batch_rows
        self.response = bool((self.mask == 2).any())

    @torch.no_grad()
    def __call__(self, student: DraftLM | EarlyExitDraft) -> dict[str, float]:
        module = trainable_module(student)
        was_training = module.training
        module.eval()
        vm = _vocab_map(student)
        v = self.hf.get_output_embeddings().weight.shape[0]
        inside = torch.zeros(v, dtype=torch.bool)
        if vm is None:
            inside[:] = True
        else:
            inside[vm] = True
        n = agree_sum = acc_sum = cov_sum = 0.0
        tokens = steps = 0
        for b0 in range(0, self.ids.shape[0], self.batch_rows):
            ids, mask = self.ids[b0 : b0 + self.batch_rows], self.mask[b0 : b0 + self.batch_rows]
            p = torch.softmax(self.target.logits(b0, b0 + ids.shape[0]), -1)
            s_red = student.train_logits(ids).float().cpu()
            if vm is None:
                q = torch.softmax(s_red, -1)
            else:
                q = torch.zeros_like(p)
                q[..., vm] = torch.softmax(s_red, -1)
            nxt = mask[:, 1:] == 2 if self.response else mask[:, 1:] > 0
            pos = torch.zeros_like(mask, dtype=torch.bool)
            pos[:, :-1] = nxt
            agree = p.argmax(-1) == q.argmax(-1)
            acc = torch.minimum(p, q).sum(-1)
            cov = (p * inside).sum(-1)
            n += float(pos.sum())
            agree_sum += float((agree & pos).sum())
            acc_sum += float((acc * pos).sum())
            cov_sum += float((cov * pos).sum())
            if self.response:
                for r in range(ids.shape[0]):
                    tok, st = simulate_acceptance_length(agree[r][pos[r]], self.gamma)
                    tokens, steps = tokens + tok, steps + st
        if was_training:
            module.train()
        n = max(n, 1.0)
        out = {"agree": agree_sum / n, "accept_t1": acc_sum / n, "coverage": cov_sum / n, "positions": int(n)}
        if self.response and steps:
            out[f"mal_g{self.gamma}"] = tokens / steps
        return out


# ============================================================================ training
@dataclass
class TrainConfig:
    """Optimisation settings. lr follows linear warmup then cosine decay to lr * min_lr_ratio."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    ce_weight: float = 0.0
    ckpt_every: int = 100
    eval_every: int = 0
    log_every: int = 10
    seed: int = 0
    shuffle_group: int = 4

    def lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        frac = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


# settings that may change on resume without changing the run's meaning
_RESUMABLE_CHANGES = {"steps", "ckpt_every", "eval_every", "log_every"}


def _optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not params:
        raise TrainError("the student has no trainable parameters")
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=False)


def _log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def train(
    student: DraftLM | EarlyExitDraft,
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: TrainConfig,
    *,
    resume: bool = False,
    evaluator: Evaluator | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Distil ``student`` on the cached teacher of ``data_dir`` for ``cfg.steps`` steps.

    Writes ``out_dir/checkpoint.pt`` every ``cfg.ckpt_every`` steps and at the end, and
    ``out_dir/train_log.jsonl`` (training lines every ``log_every`` steps, eval lines every
    ``eval_every`` steps when an ``evaluator`` is given). With ``resume`` the run continues from
    the checkpoint (the student must have the checkpoint's kind, config and vocab_map);
    without it an existing checkpoint is an error. ``on_step(step, stats)`` is called after
    every step (tests use it to interrupt a run). Returns a summary.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out_dir / "checkpoint.pt", out_dir / "train_log.jsonl"
    learner = as_student(student)
    module = learner.trainable
    module.train()
    loader = ShardLoader(data_dir, seed=cfg.seed, group=cfg.shuffle_group, features=learner.needs_features)
    opt = _optimizer(module, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_factor)
    row_of = inverse_map(_vocab_map(learner), learner.vocab_size)
    desc = learner.describe()
    step, cursor = 0, {"epoch": 0, "pos": 0}
    history: list[dict[str, Any]] = []

    if ckpt_path.exists() and not resume:
        raise TrainError(f"{ckpt_path} exists: pass --resume to continue that run, or use another --out")
    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        if ck.get("student") != desc:
            raise TrainError(
                f"checkpoint {ckpt_path} is for another student ({ck.get('student')}), not {desc}"
            )
        old = TrainConfig.from_dict(ck["train_config"])
        changed = {k for k in asdict(cfg) if asdict(cfg)[k] != asdict(old)[k]} - _RESUMABLE_CHANGES
        if changed:
            raise TrainError(f"cannot resume with changed settings {sorted(changed)}; use the checkpoint's")
        state = ck["model_state"]
        ck_vm = state.get("vocab_map")
        my_vm = _vocab_map(learner)
        if (ck_vm is None) != (my_vm is None) or (my_vm is not None and not torch.equal(ck_vm, my_vm)):
            raise TrainError(f"checkpoint {ckpt_path} was trained with another vocab_map")
        module.load_state_dict(state)
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"]["torch"])
        random.setstate(ck["rng"]["python"])
        step, cursor, history = int(ck["step"]), dict(ck["cursor"]), list(ck.get("history", []))
    elif resume:
        warnings.warn(f"--resume: no checkpoint in {out_dir}, starting a new run", stacklevel=2)

    def checkpoint() -> None:
        save_checkpoint(
            ckpt_path,
            {
                "format": "hierspec.train-ckpt",
                "version": 1,
                "student": desc,
                "train_config": asdict(cfg),
                "model_state": {k: v.detach().clone() for k, v in module.state_dict().items()},
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                "step": step,
                "cursor": cursor,
                "history": history,
                "data_dir": str(data_dir),
            },
        )

    bar = tqdm(total=cfg.steps, initial=step, desc="distill", unit="step", disable=not progress)
    tokens = 0
    t_start = time.perf_counter()
    last: dict[str, float] = {}
    while step < cfg.steps:
        batch, cursor = loader.next_batch(cursor, cfg.batch_size)
        loss, stats = learner.train_loss(batch, row_of, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip) if cfg.grad_clip else None
        opt.step()
        sched.step()
        step += 1
        tokens += int((batch["mask"] > 0).sum())
        last = {"loss": float(loss.detach()), **stats}
        if gnorm is not None:
            last["grad_norm"] = float(gnorm)
        tok_s = tokens / max(time.perf_counter() - t_start, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.3f}", agree=f"{stats['agree']:.3f}", tok_s=f"{tok_s:.0f}")
        if cfg.log_every and step % cfg.log_every == 0:
            elapsed = time.perf_counter() - t_start
            _log(
                log_path,
                {"step": step, "lr": sched.get_last_lr()[0], "tok_s": tok_s, "elapsed": elapsed, **last},
            )
        if evaluator is not None and cfg.eval_every and step % cfg.eval_every == 0:
            metrics = {"step": step, **evaluator(student)}
            history.append(metrics)
            _log(log_path, {"eval": True, **metrics})
            bar.write(f"eval @ {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            checkpoint()
        if on_step is not None:
            on_step(step, last)
    bar.close()
    dt = time.perf_counter() - t_start
    return {
        "step": step,
        "tokens": tokens,
        "seconds": dt,
        "tokens_per_s": tokens / dt if dt > 0 else 0.0,
        "last": last,
        "history": history,
    }


# ============================================================================ export
def export_student(
    student: DraftLM | EarlyExitDraft,
    path: str | os.PathLike[str],
    target: TargetIdentity,
    *,
    dtype: torch.dtype = torch.float16,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write the small committed file (`hierspec.models.draft` / `early_exit` format)."""
    path = Path(path)
    student.save(path, target, dtype=dtype, extra=info)
    return path
