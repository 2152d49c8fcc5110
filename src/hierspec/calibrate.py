"""Calibration for the planner: per-model forward cost as a function of tokens per forward, and
pairwise acceptance alpha_ij = E[sum_v min(p_i, p_j)], on the serving host.

Costs: for each model, the median wall time of a forward of n new tokens (n in `sizes`) against a
warm cache of `context` tokens, then crop back. On CPUs the cost grows with n (on an AVX2 host a
bf16 forward of 6 tokens costs ~2.5 decodes), so the planner uses cost(i, n) interpolated from
these points, never "verify costs the same as decode".

Acceptance: contexts are sampled from the *target* (committed contexts in speculative decoding
are target samples), then every model is run teacher-forced over them once and, at each generated
position, sum_v min(p_i, p_j) is computed for every pair (after the same SamplingParams). alpha_ij
is the mean over positions; its 95 % interval is a bootstrap over prompts (positions within a
prompt are correlated).

The result is a JSON file naming the models (name, vocabulary size, parameter fingerprint), so a
calibration cannot be applied to another model set by mistake (`load`).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .engine import generate
from .files import write_json_atomic
from .models.base import LanguageModel
from .sampling import SamplingParams, process_logits


def fingerprint(model: LanguageModel) -> str:
    """Short hash of a model's identity: vocabulary size, max length, and its parameters' shapes
    and a few values (cheap; distinguishes different checkpoints of one architecture)."""
    h = hashlib.sha256(f"{model.vocab_size}:{model.max_length}".encode())
    module = getattr(model, "model", model)
    params = list(getattr(module, "parameters", lambda: [])())
    for p in params[:64]:
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().reshape(-1)[:16].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Calibration:
    """Costs [model][size] (seconds), alpha matrix with CIs, and the identities of the models."""

    names: list[str]
    fingerprints: list[str]
    sizes: list[int]
    costs: list[list[float]]
    alpha: list[list[float]]
    alpha_lo: list[list[float]]
    alpha_hi: list[list[float]]
    sampling: str
    context: int
    num_prompts: int

    def cost(self, i: int, n: int) -> float:
        """Seconds for a forward of n tokens of model i (linear interpolation/extrapolation)."""
        xs, ys = self.sizes, self.costs[i]
        if n <= xs[0]:
            return ys[0]
        for (x0, y0), (x1, y1) in zip(
            zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False
        ):
            if n <= x1:
                return y0 + (y1 - y0) * (n - x0) / (x1 - x0)
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0
        return ys[-1] + slope * (n - xs[-1])

    def alpha_matrix(self) -> np.ndarray:
        return np.array(self.alpha)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, asdict(self), indent=1)

    @staticmethod
    def load(path: str | Path, models: Sequence[LanguageModel] | None = None) -> Calibration:
        """Read a calibration; with `models`, check it was made for exactly these models."""
        try:
            cal = Calibration(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"calibration file {str(path)!r} is unreadable or malformed: {err}") from None
        if models is not None:
            fps = [fingerprint(m) for m in models]
            if fps != cal.fingerprints:
                raise ValueError(
                    f"calibration file {str(path)!r} was made for other models ({cal.names}); "
                    "re-run `hierspec calibrate` for this model set"
                )
        return cal


def measure_costs(model: LanguageModel, sizes: Sequence[int], context: int, repeats: int = 7) -> list[float]:
    """Median seconds of a forward of n tokens after a warm cache of `context` tokens."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.vocab_size, (1, context + max(sizes)), generator=gen)
    model.reset()
    model.forward(ids[:, :context])
    out = []
    for n in sizes:
        times = []
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            model.forward(ids[:, context : context + n])
            dt = time.perf_counter() - t0
            model.crop(context)
            if r:  # first run is a warm-up
                times.append(dt)
        out.append(statistics.median(times))
    model.reset()
    return out


def measure_alpha(
    models: Sequence[LanguageModel],
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    new_tokens: int,
    seed: int = 0,
    boot: int = 1000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """alpha[i][j] = mean over target-sampled positions of sum_v min(p_i, p_j), with a 95 %
    bootstrap interval over prompts. models[-1] is the target."""
    m = len(models)
    per_prompt = np.zeros((len(prompts), m, m))
    for pi, prompt in enumerate(prompts):
        res = generate(models[-1], list(prompt), params=params, max_new_tokens=new_tokens, seed=seed + pi)
        seq = torch.tensor([list(prompt) + res.token_ids])
        rows = []
        for model in models:
            model.reset()
            logits = model.forward(seq).logits[0, len(prompt) - 1 : -1]
            rows.append(process_logits(logits.double(), params))
            model.reset()
        for i in range(m):
            for j in range(m):
                per_prompt[pi, i, j] = float(torch.minimum(rows[i], rows[j]).sum(-1).mean())
    alpha = per_prompt.mean(0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(prompts), size=(boot, len(prompts)))
    samples = per_prompt[idx].mean(1)
    return alpha, np.quantile(samples, 0.025, axis=0), np.quantile(samples, 0.975, axis=0)


def calibrate(
    models: Sequence[LanguageModel],
    names: Sequence[str],
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    sizes: Sequence[int] = (1, 2, 4, 6, 8),
    context: int = 256,
    new_tokens: int = 64,
    repeats: int = 7,
) -> Calibration:
    """Costs and pairwise acceptance of `models` (sorted by cost, target last)."""
    if len(models) != len(names):
        raise ValueError(f"names: expected {len(models)} names, got {len(names)}")
    vocab = {m.vocab_size for m in models}
    if len(vocab) != 1:
        raise ValueError(f"models' vocabularies differ ({sorted(vocab)}); levels must share one")
    if not prompts:
        raise ValueError("prompts: give at least one calibration prompt")
    params = params or SamplingParams(temperature=1.0)
    costs = [measure_costs(m, sizes, min(context, m.max_length - max(sizes) - 1), repeats) for m in models]
    alpha, lo, hi = measure_alpha(models, prompts, params, new_tokens)
    return Calibration(
        list(names),
        [fingerprint(m) for m in models],
        list(sizes),
        costs,
        alpha.tolist(),
        lo.tolist(),
        hi.tolist(),
        params.describe(),
        context,
        len(prompts),
    )
