"""Teacher top-k cache: the target's next-token distributions on every token shard, computed ONCE.

For each token shard ``tokens/X.safetensors`` the teacher file ``teacher/X.safetensors`` holds,
for every position t of every row (row t predicts token t+1):

    logp  float16 [N, T, k]   the k largest log-probabilities log p(v | ids[:t+1]), descending
    ids   int32   [N, T, k]   their token ids
    lse   float32 [N, T]      logsumexp of the full logits (so logits = logp + lse, and the mass
                              outside the top-k is exactly 1 - sum(exp(logp)))

Log-probabilities (not logits) are stored so fp16 is most precise where the mass is (near 0).
Computed in batched prefill forwards (right padding + attention mask, no KV cache) and written
atomically per shard, so an interrupted job resumes at the next shard without a teacher file.
Each teacher file records the sha256 of its token shard, so a rebuilt token shard invalidates it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from hierspec.models.draft import DraftFileError, read_safetensors, write_safetensors
from hierspec.train.data import DataError, list_shards, load_rows

__all__ = [
    "TEACHER_FORMAT",
    "TargetPass",
    "cache_teacher",
    "load_teacher",
    "target_pass",
    "teacher_path",
    "teacher_topk",
    "topk_rows",
    "write_teacher",
]

TEACHER_FORMAT = "hierspec.teacher-topk"


def teacher_path(token_shard: str | os.PathLike[str]) -> Path:
    p = Path(token_shard)
    return p.parent.parent / "teacher" / p.name


def _hf(model: Any) -> Any:
    from hierspec.models.hf import HFModel

    return model.model if isinstance(model, HFModel) else model


@torch.inference_mode()
def target_pass(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [B, T, H], logits [B, T, V]) of the target over one right-padded batch, in one
    forward: the last hidden states after the final norm (what EAGLE reads) and the logits.
    Padding never changes earlier positions (causal attention); pads only attend to themselves."""
    hf = _hf(model)
    att = (mask > 0).long()
    att[:, 0] = 1  # a row is never empty of attention
    out = hf(
        input_ids=ids.long().to(hf.device),
        attention_mask=att.to(hf.device),
        use_cache=False,
        output_hidden_states=True,
    )
    return out.hidden_states[-1], out.logits


def teacher_topk(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp fp16 [B,T,k], ids int32 [B,T,k], lse fp32 [B,T]) of one right-padded batch."""
    return topk_rows(target_pass(model, ids, mask)[1], k)


class TargetPass:
    """The target over fixed right-padded rows (a held-out set), run ONCE.

    Keeps the final-norm hidden states ``h`` [N, T, H] (float32) and the greedy choices ``top``
    [N, T]; ``logits(a, b)`` recomputes the logits of rows a..b-1 from ``h`` with the output
    embedding (one matmul instead of a forward). That is exact only for targets whose logits are
    that matmul (no logit scaling or soft-capping); the constructor checks it on the first batch
    and raises DataError otherwise.
    """

    def __init__(self, model: Any, ids: torch.Tensor, mask: torch.Tensor, *, batch_rows: int = 4) -> None:
        if ids.numel() == 0:
            raise DataError("the eval set is empty")
        self.hf = _hf(model)
        self.ids, self.mask = ids.long(), mask
        hs, tops = [], []
        for b0 in range(0, ids.shape[0], batch_rows):
            h, logits = target_pass(self.hf, self.ids[b0 : b0 + batch_rows], mask[b0 : b0 + batch_rows])
            if b0 == 0:
                tol = 1e-3 * float(logits.abs().max())
                if not torch.allclose(self._head(h).float(), logits.float(), rtol=1e-3, atol=tol):
                    raise DataError(
                        f"{type(self.hf).__name__}: logits are not the output embedding of the last "
                        "hidden state (logit scaling or soft-capping?); TargetPass cannot recompute them"
                    )
            hs.append(h.float().cpu())
            tops.append(logits.argmax(-1).cpu())
        self.h, self.top = torch.cat(hs), torch.cat(tops)

    @torch.inference_mode()
    def _head(self, h: torch.Tensor) -> torch.Tensor:
        head = self.hf.get_output_embeddings()
        return head(h.to(device=head.weight.device, dtype=head.weight.dtype))

    def logits(self, a: int, b: int) -> torch.Tensor:
        """Float32 CPU logits [b - a, T, V] of rows a..b-1."""
        return self._head(self.h[a:b]).float().cpu()


def topk_rows(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp fp16, ids int32, lse fp32) of logits [..., V]: the file layout of the module docstring."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    top, top_ids = logits.topk(k, dim=-1)
    logp = (top - lse[..., None]).clamp_min(-60000.0)
    return logp.half().cpu(), top_ids.to(torch.int32).cpu(), lse.cpu()


def write_teacher(
    token_shard: str | os.PathLike[str],
    token_meta: dict[str, str],
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    teacher: str,
) -> None:
    """Write (atomically) the teacher file of ``token_shard`` from its `topk_rows` output."""
    logp, top_ids, lse = rows
    write_safetensors(
        teacher_path(token_shard),
        {"logp": logp, "ids": top_ids, "lse": lse},
        {
            "format": TEACHER_FORMAT,
            "k": str(int(logp.shape[-1])),
            "tokens_sha256": token_meta["sha256"],
            "info": json.dumps({"teacher": teacher}),
        },
    )


def load_teacher(token_shard: str | os.PathLike[str], token_meta: dict[str, str] | None = None) -> dict:
    """Teacher tensors of a token shard (``logp``, ``ids``, ``lse``); DataError if missing/stale."""
    path = teacher_path(token_shard)
    try:
        tensors, meta = read_safetensors(path, what="teacher cache file", expect_format=TEACHER_FORMAT)
    except DraftFileError as err:
        raise DataError(f"{err} (run the teacher-caching stage again)") from err
    if token_meta is not None and meta.get("tokens_sha256") != token_meta.get("sha256"):
        raise DataError(f"{path} was computed for an older version of {token_shard}; delete it and re-cache")
    return tensors


def cache_teacher(
    model: Any,
    data_dir: str | os.PathLike[str],
    *,
    k: int = 64,
    batch_rows: int = 4,
    progress: bool = True,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Write the teacher file of every token shard that has none yet (resumable per shard).

    Returns ``{"shards_done", "shards_total", "tokens", "seconds", "tokens_per_s"}`` for the
    work done in this call (tokens = non-pad positions run through the teacher).
    ``max_seconds`` stops after the shard during which the budget ran out (for smoke runs).
    """
    from tqdm.auto import tqdm

    shards = list_shards(data_dir)
    if not shards:
        raise DataError(f"no token shards under {Path(data_dir) / 'tokens'}: prepare the data first")
    hf = _hf(model)
    hf.eval()
    todo = [s for s in shards if not teacher_path(s).is_file()]
    tokens, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(todo), desc="teacher top-k", unit="shard", disable=not progress)
    done = 0
    for shard in todo:
        ids, mask, meta = load_rows(shard)
        parts = [
            teacher_topk(hf, ids[b : b + batch_rows], mask[b : b + batch_rows], k)
            for b in range(0, ids.shape[0], batch_rows)
        ]
        rows = tuple(torch.cat(x) for x in zip(*parts, strict=True))
        write_teacher(shard, meta, rows, teacher=type(hf).__name__)
        tokens += int((mask > 0).sum())
        done += 1
        bar.update(1)
        bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            break
    bar.close()
    dt = time.perf_counter() - t0
    return {
        "shards_done": done,
        "shards_total": len(shards),
        "shards_missing": len(todo) - done,
        "tokens": tokens,
        "seconds": dt,
        "tokens_per_s": tokens / dt if dt > 0 else 0.0,
    }
