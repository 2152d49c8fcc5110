"""The target's cost curve c(T): seconds of one forward of T new tokens, measured on this host,
cached per (host, backend, dtype, model, threads, library versions), and re-scaled on drift.

Why per host: the shape of c(T) decides whether speculation pays, and it differs several-fold by
backend and host (SmolLM2-135M, `reference/models.md` §0: torch bf16 on an AVX-512-BF16 host
c(6)/c(1) = 1.11, an AVX2 host 2.8, llama.cpp Q4_1 3.8). A curve is therefore never carried
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

Drift (`DriftTracker`): the caller reports (predicted, observed) step times; when the running
ratio observed / predicted leaves [1 - tol, 1 + tol] for `min_obs` consecutive-ish observations
(an exponential average), it returns that ratio once and the caller re-scales the curve by it
(`CostCurve.scaled`). Observed times include the engine's per-step overhead, so a re-scaled curve
absorbs it; the *shape* of the curve is kept (re-measure with ``refresh=True`` to change it).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import cache_root, read_json_cache, write_json_cache
from .calibrate import fingerprint, measure_costs
from .curve import interpolate
from .models.base import LanguageModel

DEFAULT_SIZES: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
CACHE_VERSION = 2
#: CPU flags that change the speed of a forward (vector width, bf16/int8 dot products, AMX tiles)
SPEED_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "sve", "asimd",
)  # fmt: skip
_LIBRARIES = ("torch", "transformers", "llama_cpp_python", "numpy")


@dataclass(frozen=True)
class CostCurve:
    """Seconds per forward of n new tokens at the measured ``sizes`` (increasing, sizes[0] >= 1)."""

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]

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
        return CostCurve(self.sizes, tuple(s * factor for s in self.seconds))

    def to_dict(self) -> dict:
        return {"sizes": list(self.sizes), "seconds": list(self.seconds)}

    @staticmethod
    def from_dict(obj: dict) -> CostCurve:
        return CostCurve(tuple(int(n) for n in obj["sizes"]), tuple(float(s) for s in obj["seconds"]))


# ---------------------------------------------------------------------------------- measuring
def measure_cost_curve(
    model: LanguageModel,
    sizes: Sequence[int] = DEFAULT_SIZES,
    budget_s: float = 1.0,
    context: int = 128,
) -> CostCurve:
    """Median seconds per forward of n tokens (n in ``sizes``) after a warm cache of ``context``
    tokens (`hierspec.calibrate.measure_costs`), with as many repeats (1..15) as fit in about
    ``budget_s`` seconds after a one-repeat pilot. Leaves the model's cache empty.

    Noise on a shared machine only ever adds time, and a forward of n tokens never costs more
    than one of m > n tokens, so the curve is repaired to its running minimum from the right,
    c(n) := min_{m >= n} c(m): a load spike during one size cannot make drafting look free."""
    sizes = sorted({int(n) for n in sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"sizes: expected integers >= 1, got {sizes}")
    if not (isinstance(budget_s, (int, float)) and budget_s > 0):
        raise ValueError(f"budget_s: expected seconds > 0, got {budget_s!r}")
    context = max(1, min(context, model.max_length - sizes[-1] - 1))
    pilot = measure_costs(model, [sizes[0], sizes[-1]], context, repeats=1)
    slope = (pilot[1] - pilot[0]) / max(sizes[-1] - sizes[0], 1)
    per_round = sum(pilot[0] + slope * (n - sizes[0]) for n in sizes)
    repeats = int(min(15, max(1, budget_s / max(per_round, 1e-6))))
    seconds = measure_costs(model, sizes, context, repeats)
    for i in range(len(seconds) - 2, -1, -1):
        seconds[i] = min(seconds[i], seconds[i + 1])
    return CostCurve(tuple(sizes), tuple(seconds))


# ---------------------------------------------------------------------------------- cache key
def host_key() -> dict:
    """What about this machine changes forward costs: CPU model, speed flags, cores, accelerator."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name == "model name":
                cpu = value.strip()
            elif name in ("flags", "Features"):
                flags = set(value.split())
            if cpu and flags and name == "":
                break
    except OSError:
        pass
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
        "versions": _versions(),
    }


def cache_file(key: dict) -> Path:
    """``cache_root() / "costs" / <16 hex digits of sha256(key)>.json``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "costs" / f"{digest}.json"


def cost_curve(
    model: LanguageModel,
    *,
    sizes: Sequence[int] = DEFAULT_SIZES,
    budget_s: float = 1.0,
    cache: bool = True,
    refresh: bool = False,
) -> CostCurve:
    """``model``'s cost curve on this host: from the cache if one was made for exactly this key
    (see module docstring), else measured (`measure_cost_curve`) and cached. ``refresh``
    re-measures; ``cache=False`` neither reads nor writes the cache."""
    key = cost_key(model) if cache else None
    path = cache_file(key) if key is not None else None
    want = sorted({int(n) for n in sizes})

    def valid(obj: object) -> bool:
        if not isinstance(obj, dict) or obj.get("key") != key:
            return False
        curve = CostCurve.from_dict(obj["curve"])  # raises on bad content -> one warning
        return list(curve.sizes) == want

    if path is not None and not refresh:
        obj = read_json_cache(path, valid)
        if obj is not None:
            return CostCurve.from_dict(obj["curve"])
    curve = measure_cost_curve(model, want, budget_s)
    if path is not None:
        write_json_cache(path, {"key": key, "curve": curve.to_dict()}, indent=1)
    return curve


# ---------------------------------------------------------------------------------- drift
class DriftTracker:
    """Exponential average of observed / predicted step times; `observe` returns the ratio when
    it has drifted beyond ``tol`` after at least ``min_obs`` observations (then starts over)."""

    def __init__(self, tol: float = 0.25, min_obs: int = 16, weight: float = 0.1) -> None:
        if not (tol > 0 and min_obs >= 1 and 0 < weight <= 1):
            raise ValueError(
                f"drift: expected tol > 0, min_obs >= 1, 0 < weight <= 1; got {tol}, {min_obs}, {weight}"
            )
        self.tol, self.min_obs, self.weight = tol, min_obs, weight
        self.ratio, self.count = 1.0, 0

    def observe(self, predicted: float, observed: float) -> float | None:
        if not (predicted > 0 and observed > 0 and math.isfinite(observed)):
            return None
        r = observed / predicted
        self.ratio = r if self.count == 0 else (1 - self.weight) * self.ratio + self.weight * r
        self.count += 1
        if self.count >= self.min_obs and abs(self.ratio - 1) > self.tol:
            out, self.ratio, self.count = self.ratio, 1.0, 0
            return out
        return None
