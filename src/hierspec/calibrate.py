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

Lookup levels (n-gram, suffix) take part as the cheapest models: their proposal is a point mass
q = delta_x (or nothing), so alpha_ij = E[p_j(x)] (0 where they propose nothing) and, between two
lookups, the rate at which they propose the same token; their cost is the time of a `propose`
call. That lets the planner weigh n-gram -> draft -> target stacks against the rest, but its
i.i.d. model sees neither that lookup acceptances come in runs nor the draft's catch-up forwards:
on the 2-core CPU host of 2026-12-01 such stacks measured 27-40 % slower than predicted (README,
"Measured on this host"), so check a plan with `hierspec bench` before trusting it.

The result is a JSON file naming the models (name, vocabulary size, parameter fingerprint), so a
calibration cannot be applied to another model set by mistake (`load`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .curve import interpolate
from .engine import generate
from .files import write_json_atomic
from .models.base import LanguageModel
from .sampling import SamplingParams, process_logits

Level = Any  # a LanguageModel, or a lookup drafter (`propose` only, no forward)


def is_lookup(level: Level) -> bool:
    """A model-free drafter (n-gram, suffix): it proposes by lookup, q one-hot, no forward."""
    return not hasattr(level, "forward") and hasattr(level, "propose")


def fingerprint(model: Level) -> str:
    """Short hash of a model's identity (cheap; distinguishes different checkpoints of one
    architecture): for a model run from a file (llama.cpp) its vocabulary size and the file's name
    and size; otherwise vocabulary size, max length and its parameters' shapes and a few values."""
    if is_lookup(model):
        return hashlib.sha256(f"lookup:{type(model).__name__}".encode()).hexdigest()[:16]
    path = getattr(model, "path", None)
    if isinstance(path, Path) and path.is_file():  # a file-backed model (llama.cpp), any context size
        ident = f"{model.vocab_size}:{path.name}:{path.stat().st_size}"
        return hashlib.sha256(ident.encode()).hexdigest()[:16]
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
        """Seconds for a forward of n tokens of model i (`hierspec.curve.interpolate`)."""
        return interpolate(self.sizes, self.costs[i], n)

    def alpha_matrix(self) -> np.ndarray:
        return np.array(self.alpha)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, asdict(self), indent=1)

    @staticmethod
    def load(path: str | Path, models: Sequence[LanguageModel] | None = None) -> Calibration:
        """Read and validate a calibration (`check_calibration`); with `models`, check it was made
        for exactly these models. Every defect is a ValueError naming the file and the field."""
        where = f"calibration file {str(path)!r}"
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{where} is unreadable or malformed: {err}") from None
        cal = Calibration(**check_calibration(raw, where))
        if models is not None:
            fps = [fingerprint(m) for m in models]
            if fps != cal.fingerprints:
                raise ValueError(
                    f"{where} was made for other models ({cal.names}); "
                    "re-run `hierspec calibrate` for this model set"
                )
        return cal


_ALPHA_TOLERANCE = 1e-6  # sums of probabilities may exceed 1 by rounding


def check_calibration(raw: object, where: str = "calibration") -> dict[str, Any]:
    """``raw`` (parsed JSON) if it is a well-formed calibration, else ValueError naming ``where``
    and the field: exactly the fields of `Calibration`; ``names`` a non-empty list of strings and
    ``fingerprints`` one string per name; ``sizes`` positive, strictly increasing ints; ``costs``
    one list per model of one positive finite number (seconds) per size; ``alpha``, ``alpha_lo``,
    ``alpha_hi`` square matrices (one row per model) of numbers in [0, 1]; ``sampling`` a string;
    ``context``, ``num_prompts`` positive ints. (Costs need not increase with the size: on a noisy
    host the medians of neighbouring sizes may cross.)"""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object with the fields {_FIELDS}, got {_kind(raw)}")
    missing = [k for k in _FIELDS if k not in raw]
    unknown = [k for k in raw if k not in _FIELDS]
    if missing:
        raise ValueError(f'{where}: field "{missing[0]}" is missing (a calibration has {_FIELDS})')
    if unknown:
        raise ValueError(f'{where}: unknown field "{unknown[0]}" (a calibration has {_FIELDS})')

    def bad(field: str, expected: str, got: str) -> ValueError:
        return ValueError(f'{where}: field "{field}": expected {expected}, got {got}')

    names, m = raw["names"], len(raw["names"]) if isinstance(raw["names"], list) else 0
    if not m or not all(isinstance(x, str) and x for x in names):
        raise bad("names", "a non-empty list of model names (strings)", _kind(names))
    fps = raw["fingerprints"]
    if not isinstance(fps, list) or len(fps) != m or not all(isinstance(x, str) for x in fps):
        raise bad("fingerprints", f'{m} strings (one per model in "names")', _kind(fps))
    sizes = raw["sizes"]
    if not isinstance(sizes, list) or not sizes or not all(_is_int(n) and n > 0 for n in sizes):
        raise bad("sizes", "a non-empty list of positive integers (tokens per forward)", _kind(sizes))
    if any(b <= a for a, b in itertools.pairwise(sizes)):
        raise bad("sizes", "strictly increasing sizes", str(sizes))
    costs = raw["costs"]
    if not isinstance(costs, list) or len(costs) != m:
        raise bad("costs", f'{m} lists (one per model in "names")', _kind(costs))
    for i, row in enumerate(costs):
        if not isinstance(row, list) or len(row) != len(sizes):
            raise bad(f"costs[{i}]", f'{len(sizes)} costs (one per entry of "sizes")', _kind(row))
        for j, c in enumerate(row):
            if not _is_number(c) or not math.isfinite(c) or c <= 0:
                raise bad(f"costs[{i}][{j}]", "a positive finite number of seconds", repr(c))
    for field in ("alpha", "alpha_lo", "alpha_hi"):
        a = raw[field]
        if not isinstance(a, list) or len(a) != m:
            got = f"{len(a)} rows" if isinstance(a, list) else _kind(a)
            raise bad(field, f'a {m}x{m} matrix (one row per model in "names")', got)
        for i, row in enumerate(a):
            if not isinstance(row, list) or len(row) != m:
                got = f"{len(row)} columns in row {i}" if isinstance(row, list) else f"row {i}: {_kind(row)}"
                raise bad(field, f'a {m}x{m} matrix (one row per model in "names")', got)
            for j, x in enumerate(row):
                if not _is_number(x) or not -_ALPHA_TOLERANCE <= x <= 1 + _ALPHA_TOLERANCE:
                    raise bad(f"{field}[{i}][{j}]", "an acceptance rate in [0, 1]", repr(x))
    if not isinstance(raw["sampling"], str):
        raise bad("sampling", "a string describing the sampling", _kind(raw["sampling"]))
    for field in ("context", "num_prompts"):
        if not _is_int(raw[field]) or raw[field] <= 0:
            raise bad(field, "a positive integer", repr(raw[field]))
    return raw


_FIELDS = [f.name for f in fields(Calibration)]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _kind(x: object) -> str:
    """A short description of a JSON value for error messages."""
    if isinstance(x, list):
        return f"a list of {len(x)}"
    text = json.dumps(x) if isinstance(x, str | int | float | bool) or x is None else type(x).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def time_forwards(
    model: Level,
    sizes: Sequence[int],
    context: int,
    repeats: int = 7,
    vocab_size: int | None = None,
    clock: Callable[[], float] | None = None,
) -> list[list[float]]:
    """Seconds of ``repeats`` forwards of n tokens for each n in ``sizes`` (one list per size)
    after a warm cache of `context` tokens (a lookup drafter: of proposals of n tokens after a
    context of about `context` tokens). Interleaved: round r times every size once, in an order
    rotated by r, after one untimed warm-up round; a load burst on a shared host then hits every
    size in the rounds it spans instead of all repeats of one size (which bends the curve's shape
    without widening any one size's spread). ``clock``: seconds (default `time.perf_counter`)."""
    clock = clock or time.perf_counter
    gen = torch.Generator().manual_seed(0)
    vocab = vocab_size or model.vocab_size
    ids = torch.randint(0, vocab, (1, context + max(sizes) + repeats + 1), generator=gen)
    times: list[list[float]] = [[] for _ in sizes]
    lookup = is_lookup(model)
    model.reset()
    if not lookup:
        model.forward(ids[:, :context])
    for r in range(repeats + 1):  # round 0: warm-up
        for i in (r % len(sizes) + j for j in range(len(sizes))):
            i %= len(sizes)
            n = sizes[i]
            t0 = clock()
            if lookup:
                model.propose(ids[:, : context + r], n)
            else:
                model.forward(ids[:, context : context + n])
            dt = clock() - t0
            if not lookup:
                model.crop(context)
            if r:
                times[i].append(dt)
    model.reset()
    return times


def measure_costs(
    model: Level, sizes: Sequence[int], context: int, repeats: int = 7, vocab_size: int | None = None
) -> list[float]:
    """Median seconds of a forward of n tokens after a warm cache of `context` tokens (a lookup
    drafter: of a proposal of n tokens after a context of `context` tokens), from interleaved
    rounds (`time_forwards`)."""
    floor = 1e-7 if is_lookup(model) else 0.0
    times = time_forwards(model, sizes, context, repeats, vocab_size)
    return [max(statistics.median(t), floor) for t in times]


def lookup_rows(drafter: Level, seq: torch.Tensor, start: int, vocab_size: int) -> torch.Tensor:
    """[L - start, V] rows of a lookup drafter's one-token proposal for each position t >= start
    of ``seq`` [1, L] given seq[:t]: one-hot at the proposed token, zero where it proposes none."""
    drafter.reset()
    rows = torch.zeros(seq.shape[1] - start, vocab_size, dtype=torch.float64)
    for t in range(start, seq.shape[1]):
        draft = drafter.propose(seq[:, :t], 1)
        if draft.num_tokens:
            rows[t - start, int(draft.tokens[0, 0])] = 1.0
    drafter.reset()
    return rows


def measure_alpha(
    models: Sequence[Level],
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
            if is_lookup(model):
                rows.append(lookup_rows(model, seq, len(prompt), models[-1].vocab_size))
                continue
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
    models: Sequence[Level],
    names: Sequence[str],
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    sizes: Sequence[int] = (1, 2, 4, 6, 8),
    context: int = 256,
    new_tokens: int = 64,
    repeats: int = 7,
) -> Calibration:
    """Costs and pairwise acceptance of `models` (sorted by cost, target last; lookup drafters
    first)."""
    if len(models) != len(names):
        raise ValueError(f"names: expected {len(models)} names, got {len(names)}")
    if is_lookup(models[-1]):
        raise ValueError("models: the last one (the target) must be a language model, not a lookup drafter")
    vocab = {m.vocab_size for m in models if not is_lookup(m)}
    if len(vocab) != 1:
        raise ValueError(f"models' vocabularies differ ({sorted(vocab)}); levels must share one")
    if not prompts:
        raise ValueError("prompts: give at least one calibration prompt")
    params = params or SamplingParams(temperature=1.0)
    target = models[-1]
    costs = [
        measure_costs(
            m,
            sizes,
            min(context, getattr(m, "max_length", target.max_length) - max(sizes) - 1),
            repeats,
            target.vocab_size,
        )
        for m in models
    ]
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
