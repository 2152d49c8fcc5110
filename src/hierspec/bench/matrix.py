"""The timed part of a benchmark run (`hierspec.bench.harness.run_bench`): warm-ups, then every
cell on every prompt and repeat in rotated order (`Matrix`), the seeds of the runs, the timing
summary, the identity check of greedy rows against AR and the oracle bound of the cost curve."""

from __future__ import annotations

import sys
import time
import traceback
from typing import Any

from ..methods import REFERENCE
from ..prompts import Prompt
from .config import WARMUP_TOKENS, BenchConfig, Cell
from .runner import Runner, SSDSessions

__all__ = ["Matrix", "mark_identity", "oracle", "seed_of", "timing"]


def seed_of(cfg: BenchConfig, prompt_index: int, repeat: int) -> int:
    """The seed of a run, the same for every method: one per prompt and repeat (>= 0); the
    warm-ups (``repeat`` -1, -2, ...) get seeds after those of every timed repeat (all >= 0)."""
    if repeat < 0:
        repeat = cfg.repeats - 1 - repeat
    return cfg.seed + 100_003 * repeat + prompt_index


class Matrix:
    """The timed part of a run: warm-ups, then every cell on every prompt and repeat (order
    rotated per prompt), accumulating rows, errors and the time inside generation calls."""

    def __init__(self, cfg: BenchConfig, runner: Runner, cells: list[Cell], bar: Any) -> None:
        self.cfg, self.runner, self.cells, self.bar = cfg, runner, cells, bar
        self.rows: list[dict] = []
        self.errors: list[dict] = []
        self.t_gen = self.t_analysis = self.t_warm = 0.0
        self.warm_rss: dict[tuple[str, float], float] = {}
        self.interrupted = False
        self.failed: dict | None = None  # the run that stopped the matrix (``--on-error raise``)

    def _failure(self, record: dict, err: Exception) -> bool:
        """Record a failed run: True to go on (``--on-error skip``), False to stop (then
        ``self.failed`` holds the record, with the traceback)."""
        error = f"{type(err).__name__}: {err}"
        if self.cfg.on_error == "raise":
            tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
            self.failed = {**record, "error": error, "traceback": tb}
            return False
        print(
            f"hierspec bench: warning: {record['label']} on {record['prompt_id']} failed "
            f"({record['stage']}): {err}",
            file=sys.stderr,
        )
        self.errors.append({**record, "error": error})
        self.bar.update()
        return True

    def warm_up(self, p: Prompt, ids: list[int]) -> None:
        for w in range(self.cfg.warmup):
            for cell in self.cells:
                t0 = time.perf_counter()
                max_new = min(WARMUP_TOKENS, self.cfg.max_new_tokens)
                seed = seed_of(self.cfg, 0, -1 - w)
                try:
                    row = self.runner.run(cell, ids, seed, max_new, False)
                except Exception as err:
                    record = {"prompt_id": p.id, "category": p.category, "label": cell.label}
                    record.update(method=cell.method.name, temperature=cell.temperature, seed=seed)
                    if self._failure({**record, "stage": "warmup"}, err):
                        continue
                    raise
                self.t_warm += time.perf_counter() - t0 - row.get("ssd", {}).get("time_sync_s", 0.0)
                key = (cell.label, cell.temperature)
                self.warm_rss[key] = self.warm_rss.get(key, 0.0) + row["rss_peak_raise_mb"]
                self.bar.update()

    def run(self, encoded: list[tuple[Prompt, list[int]]]) -> None:
        cfg = self.cfg
        for i, (p, ids) in enumerate(encoded):
            for rep in range(cfg.repeats):
                seed = seed_of(cfg, i, rep)
                k = (i + rep) % len(self.cells)
                for cell in self.cells[k:] + self.cells[:k]:  # rotate the order per prompt
                    self._one(p, ids, rep, seed, cell)

    def _one(self, p: Prompt, ids: list[int], rep: int, seed: int, cell: Cell) -> None:
        base = {
            "prompt_id": p.id,
            "category": p.category,
            "prompt_tokens": len(ids),
            "repeat": rep,
            "seed": seed,
            "method": cell.method.name,
            "kind": cell.method.kind,
            "label": cell.label,
            "temperature": cell.temperature,
            "gamma": cell.gamma,
            "rule": cell.rule,
            "draft_sampling": cell.draft_sampling,
        }
        try:
            row = self.runner.run(cell, ids, seed, self.cfg.max_new_tokens, self.cfg.expected_acceptance)
        except Exception as err:
            if self._failure({**base, "stage": "generate"}, err):
                return
            raise
        self.t_gen += row["time_call_s"]
        self.t_analysis += row["time_analysis_s"]
        row["tokens_per_s"] = row["new_tokens"] / row["time_s"] if row["time_s"] > 0 else 0.0
        self.rows.append({**base, **row})
        self.bar.update()


def oracle(target: Any) -> dict:
    """The target's cost curve on this host (`hierspec.costs.cost_curve`, cached per host) and
    the oracle bound: the speed-up of drafting k tokens that are all accepted, max over k."""
    from ..costs import cost_curve

    curve = cost_curve(target)
    ks = [n - 1 for n in curve.sizes if n > 1]
    best = max(ks, key=lambda k: (k + 1) * curve(1) / curve(k + 1))
    return {
        "sizes": list(curve.sizes),
        "seconds": [curve(n) for n in curve.sizes],
        "k": best,
        "speedup": (best + 1) * curve(1) / curve(best + 1),
    }


def timing(matrix: Matrix, ssd: SSDSessions, wall: float, t_sync: float) -> dict:
    inside = matrix.t_gen + matrix.t_warm
    harness_s = wall - inside - t_sync
    return {
        "wall_s": wall,
        "generation_calls_s": inside - matrix.t_analysis,
        "warmup_calls_s": matrix.t_warm,
        "analysis_s": matrix.t_analysis,
        "harness_s": harness_s,
        "harness_overhead_pct": 100.0 * harness_s / wall if wall > 0 else 0.0,
        "analysis_pct": 100.0 * matrix.t_analysis / wall if wall > 0 else 0.0,
        "ssd_start_s": ssd.start_s,  # speculator start-up, before the matrix (not in wall_s)
        "ssd_sync_s": t_sync,  # untimed waits for idle speculators, in wall_s, not in harness_s
    }


def mark_identity(rows: list[dict]) -> None:
    """``identical_to_ar`` for greedy rows: same token ids as hierspec AR on that prompt/repeat."""
    ar = {
        (r["prompt_id"], r["repeat"]): r["token_ids"]
        for r in rows
        if r["kind"] == REFERENCE and r["temperature"] == 0
    }
    for r in rows:
        ref = ar.get((r["prompt_id"], r["repeat"]))
        ok = r["temperature"] == 0 and r["kind"] != REFERENCE and ref is not None
        r["identical_to_ar"] = (r["token_ids"] == ref) if ok else None
