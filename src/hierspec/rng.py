"""The random streams of one sequence, keyed by output position.

A seeded generation must give the same text whatever draft lengths the adaptive policy (timings)
or the server's scheduler (load) chose. So no uniform is "the next draw of a stream": each is a
function of (seed, stream, position of the token it decides):

    u(seed, stream, pos) = splitmix64(splitmix64(seed) ^ stream * C ^ pos) / 2^64     in [0, 1)

``Streams.uniforms(pos, n)`` gives the verification uniforms of rows pos .. pos + n - 1, what the
coupled verification of deterministic drafts reads (`hierspec.verify.coupled`): row t's token is
F_t^{-1}(u_t), the same token plain sampling draws at that position, so for one-hot drafts the
text does not depend on k. Rules that need more randomness (stochastic drafts, block's
scan, trees) draw from ``Streams.draft`` / ``Streams.verify``, torch generators re-seeded at the
start of every step from (seed, stream, position) by ``Streams.at(pos)``: a given sequence of
draft lengths reproduces its text, and the draft stream stays independent of the verifier's
(the losslessness proofs assume it). splitmix64 (Steele, Lea, Flood 2014) is a bijective 64-bit
mixer; its outputs for distinct inputs pass BigCrush, which is all a per-position seed needs.
"""

from __future__ import annotations

import torch

_M64 = (1 << 64) - 1
_STREAM = 0x9E3779B97F4A7C15  # the golden-ratio increment: stream ids far apart
DRAFT, VERIFY, UNIFORM = 1, 2, 3


def splitmix64(x: int) -> int:
    """One splitmix64 output for state ``x`` (a 64-bit bijection)."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def position_key(seed: int, stream: int, position: int) -> int:
    """A 64-bit key for (seed, stream, position); distinct inputs give unrelated keys."""
    return splitmix64(splitmix64(seed & _M64) ^ ((stream * _STREAM) & _M64) ^ (position & _M64))


def position_uniforms(seed: int, stream: int, start: int, n: int) -> list[float]:
    """u(seed, stream, start + i) for i < n: floats in [0, 1) with 53 random bits each."""
    return [(position_key(seed, stream, start + i) >> 11) * 2.0**-53 for i in range(n)]


def check_seed(seed: object, name: str = "seed") -> int | None:
    """``seed`` if it is None or an int in [0, 2^63), else ValueError naming ``name``."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"{name}: expected an integer in [0, 2^63) or None, got {seed!r}")
    return seed


class Streams:
    """One sequence's randomness (see module docstring). ``seed=None`` draws a seed from torch's
    default generator (so ``torch.manual_seed`` makes unseeded runs reproducible too)."""

    def __init__(self, seed: int | None, device: torch.device | str = "cpu") -> None:
        seed = check_seed(seed)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = seed
        self.device = torch.device(device)
        self._draft = torch.Generator(device=self.device)
        self._verify = torch.Generator(device=self.device)
        self._position = 0
        self._seeded = [-1, -1]  # the position the draft / verify generator was seeded for (-1: not yet)

    def at(self, position: int) -> Streams:
        """Re-seed the draft and verification generators for a step starting at ``position``
        (lazily: a generator is seeded when it is first read, so a step that draws nothing,
        e.g. plain greedy decoding, pays nothing)."""
        self._position = position
        self._seeded = [-1, -1]
        return self

    @property
    def draft(self) -> torch.Generator:
        """The draft's generator, seeded from (seed, DRAFT, position of this step)."""
        return self._keyed(0, self._draft, DRAFT)

    @property
    def verify(self) -> torch.Generator:
        """The verifier's generator, seeded from (seed, VERIFY, position of this step)."""
        return self._keyed(1, self._verify, VERIFY)

    def _keyed(self, i: int, gen: torch.Generator, stream: int) -> torch.Generator:
        if self._seeded[i] != self._position:
            gen.manual_seed(position_key(self.seed, stream, self._position) >> 1)
            self._seeded[i] = self._position
        return gen

    def uniforms(self, position: int, n: int) -> torch.Tensor:
        """[1, n] float64 uniforms of rows ``position .. position + n - 1`` on the device."""
        u = position_uniforms(self.seed, UNIFORM, position, n)
        return torch.tensor([u], dtype=torch.float64, device=self.device)
