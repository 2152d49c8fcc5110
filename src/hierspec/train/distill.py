"""Distillation of a draft from cached teacher top-k: the data order and the training loop with
exact resume, plus the export. The pieces live in small modules, all re-exported here:

    loss.py        `kd_loss`: bucketed KL(teacher || student) on the cached top-k
    student.py     `Student`, `DistilledLM`, `as_student`, draft initialisation from the target
    config.py      `TrainConfig`
    checkpoint.py  `TrainError`, `CheckpointError`, `save_checkpoint` / `load_checkpoint`
    evaluate.py    `Evaluator`, `simulate_acceptance_length`
    features.py    the EAGLE feature cache (`load_features`)

Resume. A checkpoint (every ``ckpt_every`` steps and at the end) holds the trainable weights,
AdamW state, LR-schedule state, RNG states, the data cursor (epoch, position) and the step; it is
written to a temporary file and renamed, and framed with a magic string, a length and a sha256
so a truncated or corrupt file is refused with `CheckpointError`. The data order is a pure
function of (seed, epoch), so a resumed run replays exactly the batches the stopped one would
have seen: interrupt + resume gives the same weights as an uninterrupted run (bitwise on one
machine).
"""

from __future__ import annotations

import json
import os
import random
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hierspec.models.draft import DraftLM, TargetIdentity
from hierspec.models.early_exit import EarlyExitDraft
from hierspec.train.checkpoint import CheckpointError, TrainError, load_checkpoint, save_checkpoint
from hierspec.train.config import TrainConfig
from hierspec.train.data import DataError, list_shards, load_rows
from hierspec.train.evaluate import Evaluator, simulate_acceptance_length
from hierspec.train.features import load_features
from hierspec.train.loss import kd_loss
from hierspec.train.student import (
    DistilledLM,
    Student,
    as_student,
    describe_student,
    init_draft_from_target,
    init_draft_from_target_layers,
    student_vocab_map,
    trainable_module,
)
from hierspec.train.teacher import load_teacher, teacher_path
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


# ============================================================================ training
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
    row_of = inverse_map(student_vocab_map(learner), learner.vocab_size)
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
        my_vm = student_vocab_map(learner)
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
