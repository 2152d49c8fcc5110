"""Logits -> processed probabilities, and the categorical sampling primitive.

Exactness in hierspec is defined against the *processed* target distribution: the same
`SamplingParams` are applied to draft and target rows, and the verifier receives the processed
rows (the draft's being exactly the rows its tokens were drawn from).

Processing order (as in HF transformers' warpers):
    1. temperature  T: z -> z / T                       (T = 0 means greedy: one-hot at argmax)
    2. top-k        keep the k largest logits           (0 = off)
    3. top-p        keep the smallest head of the sorted distribution whose mass reaches p;
                    ties at the cut are all kept         (1.0 = off)
    4. min-p        keep tokens with prob >= min_p * max prob   (0.0 = off)
    then renormalise. Masked tokens have probability exactly 0.

Sampling uses inverse-CDF with one uniform per row (`categorical`): `cumsum` + `searchsorted`
costs ~50 µs for a 49152-row on this CPU against ~750 µs for `torch.multinomial`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Top-p first looks for the cut inside the `_TOP_P_CANDIDATES` largest probabilities (one
# `topk`); only rows whose head is too flat for that fall back to a full sort.
_TOP_P_CANDIDATES = 256


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings shared by draft and target. temperature 0 means greedy decoding."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not (isinstance(self.min_p, (int, float)) and 0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def describe(self) -> str:
        if self.greedy:
            return "greedy"
        parts = [f"T={self.temperature:g}"]
        if self.top_k:
            parts.append(f"top_k={self.top_k}")
        if self.top_p < 1:
            parts.append(f"top_p={self.top_p:g}")
        if self.min_p > 0:
            parts.append(f"min_p={self.min_p:g}")
        return ",".join(parts)


def check_logits(logits: torch.Tensor) -> torch.Tensor:
    """Row maxima of `logits`; raises if a row holds NaN or +inf or is all -inf.

    `amax` propagates NaN, so one cheap reduction checks every entry."""
    row_max = logits.amax(dim=-1, keepdim=True)
    if not bool(torch.isfinite(row_max).all()):
        raise invalid_logits_error()
    return row_max


def invalid_logits_error() -> ValueError:
    """The error for logits with NaN / +inf entries or an all -inf row (see `check_logits`)."""
    return ValueError(
        "logits contain NaN or +inf values (or a row is entirely -inf); the model produced invalid scores"
    )


def _top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean keep-mask of the nucleus: tokens with prob >= the prob of the last token needed to
    reach mass `top_p` in descending order (so ties at the cut are kept)."""
    v = probs.shape[-1]
    m = min(v, _TOP_P_CANDIDATES)
    head, _ = probs.topk(m, dim=-1)  # descending
    csum = head.cumsum(-1)
    reached = csum >= top_p
    ok = reached.any(-1)
    if not bool(ok.all()):
        head, _ = probs.sort(dim=-1, descending=True)
        csum = head.cumsum(-1)
        reached = csum >= top_p
        reached[..., -1] = True  # float round-off: the whole row always reaches p
    cut_idx = reached.to(torch.int8).argmax(-1, keepdim=True)  # first index reaching top_p
    cutoff = head.gather(-1, cut_idx)
    return probs >= cutoff


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Processed probabilities [..., V] from logits [..., V].

    Computed in float32 (float64 if the logits are float64). Greedy gives one-hot rows at the
    first argmax. Raises ValueError on NaN/inf logits.
    """
    work_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(work_dtype)
    row_max = check_logits(z)
    if params.greedy:
        out = torch.zeros_like(z)
        out.scatter_(-1, z.argmax(-1, keepdim=True), 1.0)
        return out
    if params.temperature != 1.0:
        z = z / params.temperature
        row_max = row_max / params.temperature
    if params.top_k and params.top_k < z.shape[-1]:
        kth = z.topk(params.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, -math.inf)
    probs = torch.softmax(z, dim=-1)
    masked = False
    if params.top_p < 1.0:
        probs = probs.masked_fill(~_top_p_mask(probs, params.top_p), 0.0)
        masked = True
    if params.min_p > 0.0:
        pmax = probs.amax(-1, keepdim=True)
        probs = probs.masked_fill(probs < params.min_p * pmax, 0.0)
        masked = True
    if masked:
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def categorical(
    weights: torch.Tensor, uniform: torch.Tensor, fallback: torch.Tensor | None = None
) -> torch.Tensor:
    """Draw one index per row from non-negative, possibly unnormalised `weights` [B, V].

    Inverse CDF with one uniform per row (`uniform` [B] in [0, 1), any float dtype): the index i
    with C[i-1] <= u * C[V-1] < C[i], C = cumsum(weights) in float64 for float64 weights, else in
    float32 (a bfloat16 / float16 sum would saturate). Rows whose total is 0 (possible only
    through round-off, e.g. an empty residual) are drawn from the matching `fallback` row
    instead, if given.

    The returned token always has positive weight: C is non-decreasing (w >= 0), so
    L = min{i : C[i] >= C[V-1]} has C[L] > C[L-1], i.e. w_L > 0 (L is the last index with
    positive weight), and the result is min(i, L). For u < 1 in the work dtype, u * C[V-1] <
    C[V-1] (normal totals), so i <= L already; the min matters where the product reaches the
    total: a float64 u >= 1 - 2^-25 cast to float32 is 1.0 (probability 2^-25, mass that lies
    in L's interval unless w_L < 2^-25 of the total), or a subnormal total. Casting u to
    float32 elsewhere moves each interval boundary by at most 2^-25 of the total, below the
    float32 cumsum's own round-off. A row of zeros (no fallback) gives index 0.
    """
    work = torch.float64 if weights.dtype == torch.float64 else torch.float32
    csum = weights.to(work).cumsum(-1)
    if fallback is not None:
        empty = csum[:, -1] <= 0
        if bool(empty.any()):
            csum = torch.where(empty[:, None], fallback.to(work).cumsum(-1), csum)
    total = csum[:, -1:].contiguous()  # [B, 1]
    idx = torch.searchsorted(csum, uniform.to(work)[:, None] * total, right=True)
    return torch.minimum(idx, torch.searchsorted(csum, total)).squeeze(-1)


def make_generators(
    seed: int | None, device: torch.device | str = "cpu"
) -> tuple[torch.Generator, torch.Generator]:
    """Two independent RNG streams (drafting, verification) from one seed, on ``device``.

    Separate streams keep the draft's randomness independent of the verifier's, which the
    losslessness proofs assume. `seed=None` draws a fresh seed from torch's default RNG. The
    decode loop makes them on the target's device (``make_generators(seed, target.device)``), where
    the rules draw their uniforms; a CPU stream's numbers do not depend on anything else, a CUDA
    stream's differ from the CPU one for the same seed (same law, other samples).
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    device = torch.device(device)
    g_draft = torch.Generator(device=device)
    g_draft.manual_seed(seed)
    g_verify = torch.Generator(device=device)
    g_verify.manual_seed((seed * 0x9E3779B97F4A7C15 + 1) % (2**63))
    return g_draft, g_verify


def uniforms(
    n: int,
    generator: torch.Generator | None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``n`` uniforms in [0, 1) from ``generator``'s stream, drawn on the generator's device (a
    CUDA stream cannot fill a CPU tensor and vice versa) and returned on ``device`` (default: the
    generator's; the default generator's device is ``device`` or the CPU). Drafters use this so
    that they run with a stream of any device."""
    where = generator.device if generator is not None else torch.device(device or "cpu")
    u = torch.rand(n, generator=generator, device=where, dtype=dtype)
    return u if device is None else u.to(device)


def check_generator(generator: torch.Generator | None, device: torch.device, arg: str = "generator") -> None:
    """ValueError unless ``generator`` is None or lives on ``device``'s type (CPU / CUDA / ...):
    torch cannot draw a device's random numbers from another device's stream."""
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"{arg}: expected a torch.Generator on {device.type} (where the rows are), got one on "
            f"{generator.device}; make it with hierspec.sampling.make_generators(seed, device)"
        )
