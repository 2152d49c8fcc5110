"""The target's cost curve c(T): seconds of one forward of T new tokens, measured on this host,
cached per (host, backend, dtype, model, threads, library versions) only when its repeats agree.

Why per host: the shape of c(T) decides whether speculation pays, and it differs several-fold by
backend and host (SmolLM2-135M with 2 threads: c(6)/c(1) = 1.11 for torch bf16 on an AVX-512-BF16
host, 2.8 on an AVX2 host, 3.8 for llama.cpp Q4_1). A curve is therefore never carried
between machines or models: the cache key holds the CPU model name, the speed-relevant CPU flags
(avx2, avx512*, amx*, ...), the core count, the accelerator name, the backend class, dtype,
device, a model fingerprint (`hierspec.calibrate.fingerprint` for torch modules; path + size +
mtime for file-backed backends such as llama.cpp), the thread count and the library versions.

    curve = cost_curve(model)            # cached JSON or a ~1 s measurement (`measure_cost_curve`)
    curve(4)                             # seconds, linear interpolation / extrapolation
    curve.relative(6)                    # c(6) / c(1)

Cache: ``cache_root() / "costs" / <sha256 of the key>.json`` holding the key and the curve,
written atomically (`hierspec.cache.write_json_cache`). A file whose key differs from this
model's (copied from another host, a hash collision) is re-measured; a damaged file gives one
warning line (`hierspec.cache.read_json_cache`) and a fresh measurement, never a crash.

Trust (`measure_cost_curve`). A curve measured while another process used the CPU can be wrong in
shape (seen: c(1..8) = 27 / 92 / 92 / 745 / 1216 / 1216 ms on a host whose real curve is 12 / 22
/ 34 / 37 / 53 / 69 ms), and a policy that believes long forwards are dear never runs them, so
never learns otherwise. So sizes are timed in interleaved rounds (`hierspec.calibrate.time_forwards`),
each size's repeats must agree (`spread`: interquartile range / median <= `SPREAD_TOL`) and the
medians must have a physical shape (`hierspec.curve.shape_flaws`, tol = 0.5): one forward of
a + b tokens costs no more than two forwards of a and b tokens, c(a + b) <= (1 + tol) (c(a) +
c(b)), and a smaller forward costs no more than a larger one, c(m) <= (1 + tol) c(n) for m < n.
The sizes that fail are re-measured (at most `MAX_REMEASURE` times); a curve that still fails is
used for this run, marked ``trusted=False`` (the policy then explores more,
`hierspec.curve.OnlineCostCurve`), said once on stderr and never cached. A cached curve that
fails the shape check is re-measured.
The curve is a prior only: `hierspec.policy` learns c(T) online from the forwards it runs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
import json
import logging
import math
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cache import cache_root, read_json_cache, write_json_cache
from .calibrate import fingerprint, time_forwards
from .curve import interpolate, shape_flaws
from .host import cpu_flags, cpu_model
from .models.base import LanguageModel

DEFAULT_SIZES: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
CACHE_VERSION = 3  # 3: interleaved, spread- and shape-checked; older files are re-measured
SPREAD_TOL = 0.25  # a size's repeats agree: interquartile range <= 25 % of their median
MAX_REMEASURE = 2  # re-measurements of the sizes that fail, before giving up (untrusted)
MIN_ROUNDS, MAX_ROUNDS = 5, 15
log = logging.getLogger(__name__)
#: CPU flags that change the speed of a forward (vector width, bf16/int8 dot products, AMX tiles)
SPEED_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "sve", "asimd",
)  # fmt: skip
_LIBRARIES = ("torch", "transformers", "llama_cpp_python", "numpy")


@dataclass(frozen=True)
class CostCurve:
    """Seconds per forward of n new tokens at the measured ``sizes`` (increasing, sizes[0] >= 1).
    ``trusted``: False when its measurement failed the spread or shape check (not compared)."""

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]
    trusted: bool = field(default=True, compare=False)

    def __post_init__(self) -> None:
        sizes, secs = tuple(self.sizes), tuple(float(s) for s in self.seconds)
        if not sizes or len(sizes) != len(secs):
            raise ValueError(f"cost curve: expected equally many sizes and costs (>= 1), got {sizes}, {secs}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes) or any(
            b <= a for a, b in itertools.pairwise(sizes)
        ):
            raise ValueError(f"cost curve sizes: expected increasing integers >= 1, got {sizes}")
        if any(not math.isfinite(s) or s <= 0 for s in secs):
            raise ValueError(f"cost curve seconds: expected finite numbers > 0, got {secs}")
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "seconds", secs)

    def __call__(self, n: int) -> float:
        """Seconds for a forward of n tokens (`hierspec.curve.interpolate`: linear between the
        measured sizes and beyond them, flat below sizes[0])."""
        return interpolate(self.sizes, self.seconds, n)

    @property
    def decode(self) -> float:
        """c(1): seconds of one plain decoding step."""
        return self(1)

    def relative(self, n: int) -> float:
        """c(n) / c(1)."""
        return self(n) / self(1)

    def scaled(self, factor: float) -> CostCurve:
        """The same shape, every cost times ``factor`` (> 0)."""
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"factor: expected a finite number > 0, got {factor!r}")
        return CostCurve(self.sizes, tuple(s * factor for s in self.seconds), self.trusted)

    def to_dict(self) -> dict:
        return {"sizes": list(self.sizes), "seconds": list(self.seconds)}

    @staticmethod
    def from_dict(obj: dict) -> CostCurve:
        return CostCurve(tuple(int(n) for n in obj["sizes"]), tuple(float(s) for s in obj["seconds"]))


# ---------------------------------------------------------------------------------- measuring
def spread(samples: Sequence[float]) -> float:
    """Interquartile range / median of repeated timings (inf with fewer than 3)."""
    if len(samples) < 3:
        return math.inf
    q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return (q3 - q1) / q2 if q2 > 0 else math.inf


def summarise(
    sizes: Sequence[int], samples: Sequence[Sequence[float]], spread_tol: float = SPREAD_TOL
) -> tuple[CostCurve, list[int]]:
    """The curve of per-size medians of ``samples`` and the indices of the sizes that fail the
    checks (`spread` > ``spread_tol``, or `hierspec.curve.shape_flaws`); trusted iff none fails.
    The medians are repaired to their running minimum from the right, c(n) := min_{m >= n} c(m)
    (a forward of n tokens never costs more than one of m > n; a spike at n must not make
    drafting look cheap)."""
    med = [statistics.median(t) for t in samples]
    noisy = {i for i, t in enumerate(samples) if spread(t) > spread_tol} | set(shape_flaws(sizes, med))
    for i in range(len(med) - 2, -1, -1):
        med[i] = min(med[i], med[i + 1])
    return CostCurve(tuple(sizes), tuple(med), trusted=not noisy), sorted(noisy)


def measure_cost_curve(
    model: LanguageModel,
    sizes: Sequence[int] = DEFAULT_SIZES,
    budget_s: float = 1.0,
    context: int = 128,
    *,
    clock: Callable[[], float] | None = None,
) -> CostCurve:
    """Per-size median seconds of forwards of n tokens (n in ``sizes``) after a warm cache of
    ``context`` tokens, from ``MIN_ROUNDS``..``MAX_ROUNDS`` interleaved rounds (as many as fit in
    about ``budget_s`` after a one-round pilot); the sizes failing `summarise`'s checks are timed
    again (fresh rounds, at most ``MAX_REMEASURE`` times). ``trusted`` says whether the final
    curve passes. ``clock``: seconds (default `time.perf_counter`). Leaves the model's cache empty."""
    sizes = sorted({int(n) for n in sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"sizes: expected integers >= 1, got {sizes}")
    if not (isinstance(budget_s, (int, float)) and budget_s > 0):
        raise ValueError(f"budget_s: expected seconds > 0, got {budget_s!r}")
    context = max(1, min(context, model.max_length - sizes[-1] - 1))
    pilot = sum(t[0] for t in time_forwards(model, sizes, context, 1, clock=clock))
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, budget_s / max(pilot, 1e-6))))
    samples = time_forwards(model, sizes, context, rounds, clock=clock)
    curve, noisy = summarise(sizes, samples)
    for _ in range(MAX_REMEASURE):
        if not noisy:
            break
        again = time_forwards(model, [sizes[i] for i in noisy], context, rounds, clock=clock)
        for i, t in zip(noisy, again, strict=True):
            samples[i] = t
        curve, noisy = summarise(sizes, samples)
    return curve


# ---------------------------------------------------------------------------------- cache key
def host_key() -> dict:
    """What about this machine changes forward costs: CPU model, speed flags, cores, accelerator."""
    cpu = cpu_model() or platform.processor() or platform.machine()
    flags = cpu_flags()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "machine": platform.machine(),
        "flags": sorted(flags & set(SPEED_FLAGS)),
        "cores": os.cpu_count(),
        "gpu": gpu,
    }


def model_identity(model: LanguageModel) -> str:
    """A file-backed model (``model_path`` / ``path`` attribute): path, size and mtime; a torch
    model: `hierspec.calibrate.fingerprint` (shapes and values of its parameters)."""
    for attr in ("model_path", "path", "gguf_path"):
        p = getattr(model, attr, None)
        if isinstance(p, (str, os.PathLike)) and Path(p).is_file():
            st = Path(p).stat()
            return f"file:{Path(p).resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return f"params:{fingerprint(model)}"


def _versions() -> dict:
    out = {}
    for lib in _LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    return out


def cost_key(model: LanguageModel) -> dict:
    """The full cache key of ``model``'s cost curve on this host (JSON-serialisable)."""
    threads = next(
        (t for t in (getattr(model, a, None) for a in ("threads", "n_threads")) if isinstance(t, int)),
        torch.get_num_threads(),
    )
    return {
        "version": CACHE_VERSION,
        "host": host_key(),
        "backend": f"{type(model).__module__}.{type(model).__qualname__}",
        "dtype": str(getattr(model, "dtype", None)),
        "device": str(getattr(model, "device", None)),
        "model": model_identity(model),
        "max_length": int(model.max_length),
        "threads": int(threads),
        "sequences": int(getattr(model, "n_seq_max", 1)),
        "versions": _versions(),
    }


def cache_file(key: dict) -> Path:
    """``cache_root() / "costs" / <16 hex digits of sha256(key)>.json``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "costs" / f"{digest}.json"


def _curve_key(model: LanguageModel, sizes: Sequence[int]) -> dict:
    return cost_key(model) | {"sizes": sorted({int(n) for n in sizes})}  # each set of sizes its own file


def curve_file(model: LanguageModel, sizes: Sequence[int] = DEFAULT_SIZES) -> Path:
    """Where `cost_curve` caches ``model``'s curve over ``sizes`` on this host."""
    return cache_file(_curve_key(model, sizes))


def cost_curve(
    model: LanguageModel,
    *,
    sizes: Sequence[int] = DEFAULT_SIZES,
    budget_s: float = 1.0,
    cache: bool = True,
    refresh: bool = False,
) -> CostCurve:
    """``model``'s cost curve on this host: from the cache if one was made for exactly this key
    (see module docstring) and still plausible (`hierspec.curve.shape_flaws`), else measured
    (`measure_cost_curve`) and cached if ``trusted`` (else one warning). ``refresh``
    re-measures; ``cache=False`` neither reads nor writes the cache."""
    want = sorted({int(n) for n in sizes})
    key = _curve_key(model, want) if cache else None
    path = cache_file(key) if key is not None else None

    def valid(obj: object) -> bool:
        if not isinstance(obj, dict) or obj.get("key") != key:
            return False
        curve = CostCurve.from_dict(obj["curve"])  # raises on bad content -> one warning
        return list(curve.sizes) == want

    if path is not None and not refresh:
        obj = read_json_cache(path, valid)
        if obj is not None:
            curve = CostCurve.from_dict(obj["curve"])
            flaws = shape_flaws(curve.sizes, curve.seconds)
            if not flaws:
                return curve
            log.warning(
                "hierspec: the cached cost curve %s is implausible at T = %s (made on a busy host?); "
                "re-measuring it", path, ",".join(map(str, flaws)),
            )  # fmt: skip
    curve = measure_cost_curve(model, want, budget_s)
    if not curve.trusted:
        ms = " / ".join(f"{1e3 * s:.3g}" for s in curve.seconds)
        log.warning(
            "hierspec: the cost curve of this model (c(%s) = %s ms) was measured on a busy host "
            "(repeats disagree or the shape is implausible); it is used for this run only, not cached, "
            "and corrected online",
            ",".join(map(str, curve.sizes)), ms,
        )  # fmt: skip
    elif path is not None:
        write_json_cache(path, {"key": key, "curve": curve.to_dict()}, indent=1)
    return curve
