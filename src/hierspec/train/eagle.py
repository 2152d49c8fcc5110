"""Training an `EagleHead`: cached target features, an unrolled ("training-time test") loss, and a
held-out evaluator that simulates greedy EAGLE drafting exactly.

Features. EAGLE reads the target's last hidden states, so they are computed once per token shard
(frozen target, float32, no grad) and stored next to the teacher cache as
``<data_dir>/features/<shard stem>.safetensors`` (``h`` [rows, T, H], bf16; written atomically,
so an interrupted pass resumes at the next missing shard).

Loss. `EagleHead.unroll` gives, for every start i, the features the head predicts at drafting
steps j = 1..S (step j >= 2 reads its own earlier predictions, as drafting does). Step j at
column i predicts f_{i+j} and, through the LM head, the token after position i+j::

    loss = sum_j w_j [ reg_w * SmoothL1(f^_{i+j} / s, f_{i+j} / s) + KL_j ]

with s the RMS of the features (a scale-free regression), KL_j the bucketed top-k distillation
loss of `hierspec.train.distill.kd_loss` against the teacher row at i+j, and uniform noise of
relative size ``noise`` added to the true input features (EAGLE-1's robustness trick).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hierspec.models.draft import write_safetensors
from hierspec.models.eagle import EagleHead
from hierspec.train.config import TrainConfig
from hierspec.train.data import list_shards, load_rows
from hierspec.train.features import FEATURES_FORMAT, feature_path, load_features
from hierspec.train.loss import kd_loss
from hierspec.train.teacher import TargetPass, target_pass, teacher_path, topk_rows, write_teacher

__all__ = [
    "EagleEvaluator",
    "EagleStudent",
    "cache_features",
    "feature_path",
    "feature_rms",
    "load_features",
]


@torch.no_grad()
def cache_features(
    hf: Any,
    data_dir: str | os.PathLike[str],
    *,
    batch_rows: int = 8,
    progress: bool = True,
    teacher_k: int | None = None,
) -> dict:
    """Write the feature file of every token shard that lacks one; returns {"shards", "written",
    "teacher_written"}.

    With ``teacher_k`` a shard that also lacks its teacher file (`hierspec.train.teacher`) gets
    it from the same forward: one target pass per new shard instead of two.
    """
    from tqdm.auto import tqdm

    shards = list_shards(data_dir)
    todo = [s for s in shards if not feature_path(s).is_file()]
    n_teacher = 0
    for s in tqdm(todo, desc="features", disable=not progress):
        ids, mask, meta = load_rows(s)
        with_teacher = teacher_k is not None and not teacher_path(s).is_file()
        parts, rows = [], []
        for b0 in range(0, ids.shape[0], batch_rows):
            h, logits = target_pass(hf, ids[b0 : b0 + batch_rows], mask[b0 : b0 + batch_rows])
            parts.append(h.to(torch.bfloat16).cpu())
            if with_teacher:
                rows.append(topk_rows(logits, teacher_k))
        if with_teacher:
            cat = tuple(torch.cat(x) for x in zip(*rows, strict=True))
            write_teacher(s, meta, cat, teacher=type(hf).__name__)
            n_teacher += 1
        write_safetensors(
            feature_path(s), {"h": torch.cat(parts)}, {"format": FEATURES_FORMAT, "shard": s.name}
        )
    return {"shards": len(shards), "written": len(todo), "teacher_written": n_teacher}


def feature_rms(data_dir: str | os.PathLike[str]) -> float:
    """RMS of the cached features of the first token shard over its non-padding positions."""
    shard = list_shards(data_dir)[0]
    h = load_features(shard).float()
    _, mask, _ = load_rows(shard)
    return float(h[mask > 0].pow(2).mean().sqrt())


class EagleStudent:
    """What `hierspec.train.distill.train` trains for ``--kind eagle``: the head plus its loss
    (a `hierspec.train.distill.Student`)."""

    def __init__(
        self,
        head: EagleHead,
        *,
        unroll: int = 3,
        step_weights: tuple[float, ...] = (1.0, 0.7, 0.5, 0.4, 0.3),
        reg_weight: float = 1.0,
        noise: float = 0.1,
        feature_scale: float = 1.0,
    ) -> None:
        if unroll < 1 or unroll > len(step_weights):
            raise ValueError(f"unroll: expected 1..{len(step_weights)}, got {unroll}")
        self.head = head
        self.unroll, self.step_weights = unroll, step_weights[:unroll]
        self.reg_weight, self.noise, self.feature_scale = reg_weight, noise, feature_scale
        self.vocab_size = head.vocab_size
        self.needs_features = True

    @property
    def trainable(self) -> nn.Module:
        return self.head

    @property
    def vocab_map(self) -> torch.Tensor:
        return self.head.vocab_map

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "eagle",
            "config": self.head.config.to_dict(),
            "unroll": self.unroll,
            "noise": self.noise,
            "reg_weight": self.reg_weight,
            "feature_scale": self.feature_scale,
        }

    def train_loss(
        self, batch: dict[str, torch.Tensor], row_of: torch.Tensor, cfg: TrainConfig
    ) -> tuple[torch.Tensor, dict[str, float]]:
        h = batch["h"].float()
        s = self.feature_scale
        noisy = h + (torch.rand_like(h) * 2 - 1) * (self.noise * s) if self.noise else h
        outs = self.head.unroll(noisy, batch["ids"].long(), self.unroll)
        t = h.shape[1]
        loss = h.new_zeros(())
        stats: dict[str, float] = {}
        for j, (f, w) in enumerate(zip(outs, self.step_weights, strict=False), 1):
            n = t - j
            pred, tgt = f[:, :n], h[:, j : j + n]
            valid = (batch["mask"][:, j : j + n] > 0).float()
            reg = F.smooth_l1_loss(pred / s, tgt / s, reduction="none").mean(-1)
            reg = (reg * valid).sum() / valid.sum().clamp_min(1)
            sub = {k: batch[k][:, j : j + n] for k in ("mask", "ids", "t_logp", "t_ids")}
            kl, st = kd_loss(self.head.logits(pred, full=False), sub, row_of)
            loss = loss + w * (self.reg_weight * reg + kl)
            stats[f"reg{j}"], stats[f"kl{j}"], stats[f"agree{j}"] = float(reg.detach()), st["kl"], st["agree"]
        stats["agree"] = stats["agree1"]
        return loss, stats


class EagleEvaluator:
    """Held-out metrics of an EAGLE head on the target's greedy responses (eval set rows).

    The target's features and greedy choices come from a `TargetPass` (run once, shared with
    `hierspec.train.distill.Evaluator`). For every response position the
    head drafts ``gamma`` tokens exactly as `EagleDrafter.propose` does at temperature 0 (true
    features up to the start, then its own); ``agree{j}`` is the rate at which draft token j
    equals the target's greedy token given that tokens 1..j-1 did, and ``mal_g{gamma}`` the
    mean number of tokens per target forward of greedy EAGLE decoding along the responses.
    """

    def __init__(self, target: TargetPass, *, gamma: int = 5) -> None:
        self.gamma = gamma
        self.ids, self.mask, self.h, self.top = target.ids, target.mask, target.h, target.top

    @torch.no_grad()
    def __call__(self, student: EagleStudent | EagleHead) -> dict[str, float]:
        head = student.head if isinstance(student, EagleStudent) else student
        was = head.training
        head.eval()
        g = self.gamma
        tokens = steps = 0
        hits = [0] * (g + 1)
        tries = [0] * (g + 1)
        for r in range(self.ids.shape[0]):
            resp = (self.mask[r] == 2).nonzero().flatten()
            if resp.numel() < 2:
                continue
            h = self.h[r : r + 1].to(head.dtype)
            outs = head.unroll(h, self.ids[r : r + 1], g)
            t = self.ids.shape[1]
            # chain from start i (true pairs 0..i; context ends at token i+1): draft j predicts the
            # token at i+j+1, the target's greedy choice there is top[i+j]
            ok = torch.zeros(t - 1, g, dtype=torch.bool)
            for j, f in enumerate(outs, 1):
                n = t - 1 - j
                pred = head.logits(f[0, :n]).argmax(-1).cpu()
                ok[:n, j - 1] = pred == self.top[r, j : j + n]
            run = ok.long().cumprod(1).sum(1)  # accepted draft tokens from each start
            first, last = int(resp[0]), int(resp[-1])  # drafting for response tokens first..last
            s = first - 1  # context ends at token s (= start column s - 1)
            while s < last:
                a = min(int(run[s - 1]), last - s - 1) if s >= 1 else 0
                tokens += a + 1
                steps += 1
                for j in range(1, min(g, last - s - 1) + 1):
                    tries[j] += 1
                    hits[j] += int(ok[s - 1, j - 1]) if s >= 1 else 0
                    if not ok[s - 1, j - 1]:
                        break
                s += a + 1
        if was:
            head.train()
        out: dict[str, float] = {f"mal_g{g}": tokens / max(steps, 1), "positions": tokens}
        for j in range(1, g + 1):
            out[f"agree{j}"] = hits[j] / max(tries[j], 1)
        out["agree"] = out["agree1"]
        return out
