"""The Saguaro speculator: serve the next draft for a verification outcome, then pre-speculate
the draft after every likely outcome of *that* draft (the speculation cache), while the verifier
verifies it.

Per round, with committed context c (length L), the draft just sent s_1..s_n and the token budget
R left before it is verified:

    serve(key = (k, t))   c <- c s_1..s_k t;  R <- R - (k + 1)
                          hit:  the cached draft of (k, t)                           (no drafting)
                          miss: fallback "jit" (draft now from q') or "fast" (n-gram /
                                random tokens, sent as one-hot proposals)
    build()               glue:  one draft forward over [c_L, s_1..s_n] -> scores z_0..z_n
                          fork:  candidates(k) = top-F_k(z_k) minus s_{k+1}     (`saguaro.py`)
                          tree:  for every branch (k, t): sample n_b tokens after c s_1..s_k t
                                 from q' = Saguaro(q); cache[(k, t)] = (tokens, q' rows)

The cache is rebuilt from scratch every round. For a draft that implements
`hierspec.models.branches.BranchDecoder` (`TinyGPT`, `DraftLM`) the branches advance together: max
n_b batched steps of ``decode_branches`` with a per-branch prefix mask and scratch K/V. Any other
`LanguageModel` decodes them one after another on its own KV cache, in
decreasing k, each cropping back to its own prefix (the cache holds c s_1..s_k after the glue),
so a branch costs n_b one-token forwards. Both paths consume the RNG in the same order and have
the same law.

Exactness (why a hit adds no bias): whether (k, t) is cached depends on the verifier's outcome and
the draft's scores, never on the coins used to sample the cached continuation, so conditional on
the new context the served draft -- cached or JIT -- is a fresh sample from q'(. | context) with
the speculator's own RNG stream, and its rows are exactly q'. A fast backup's tokens are
deterministic given the context (n-gram) or drawn independently (random) and are sent with
probs = None, i.e. verified as one-hot proposals. Sizes: a draft after a context of length m with
R tokens left has n = min(gamma, R - 1, draft.max_length - m) tokens, which is exactly the
verifier's k_max, so both sides agree without extra messages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..drafters.ngram import NgramDrafter
from ..models.base import LanguageModel
from ..models.branches import BranchDecoder
from ..sampling import categorical, make_generators, process_logits, uniforms
from .options import SSDOptions
from .saguaro import FanoutEstimator, bonus_rank, fork_candidates, saguaro_reshape

STATUSES = ("hit", "miss", "cold", "empty")
SOURCES = ("cache", "jit", "fast", "none")


@dataclass
class Proposal:
    """The speculator's answer to one outcome key.

    tokens: the next draft s_1..s_n; probs: [n, V] the rows they were drawn from (q', what the
    verifier must use), None = one-hot (greedy draft or fast backup). status: "hit" | "miss" |
    "cold" (first round) | "empty" (no draft: n = 0). source: "cache" | "jit" | "fast" | "none".
    fk: fan-out F_k at the realised k (-1: none); rank: 1-based rank of the realised bonus token among
    the draft's candidates at k (-1: unknown). t_build: seconds of the pre-speculation that
    preceded this answer; t_fallback: seconds spent in the fallback.
    """

    tokens: list[int]
    probs: torch.Tensor | None
    status: str
    source: str
    fk: int = -1
    rank: int = -1
    t_build: float = 0.0
    t_fallback: float = 0.0


def supports_tree(model: object) -> bool:
    """Whether the speculator can decode its branches in one batch on ``model``: it implements
    `BranchDecoder` and its cache holds one sequence."""
    return isinstance(model, BranchDecoder) and model.supports_branches()


def _lcp(a: list[int], b: list[int], n: int) -> int:
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Speculator:
    """Draft-side state machine (batch size 1); see module docstring. Not thread-safe."""

    def __init__(self, model: LanguageModel, tree: bool | None = None) -> None:
        if tree and not supports_tree(model):
            raise ValueError(
                "tree: batched tree decode needs a draft with decode_branches (a BranchDecoder such as "
                f"DraftLM or TinyGPT) and a batch-1 cache, got {type(model).__name__}"
            )
        self.model = model
        self.tree = supports_tree(model) if tree is None else bool(tree)
        self.vocab_size = int(model.vocab_size)
        self.opts = SSDOptions()
        self.estimator = FanoutEstimator()
        self._reset_round_state()

    def _reset_round_state(self) -> None:
        self.ctx: list[int] = []
        self.fed: list[int] = []
        self.remaining = 0
        self.draft: list[int] = []
        self.cache: dict[tuple[int, int], tuple[list[int], torch.Tensor | None]] = {}
        self.scores: torch.Tensor | None = None
        self.fan: list[int] = []
        self.t_build = 0.0

    # ------------------------------------------------------------------ lifecycle
    def start(self, prompt: list[int], opts: SSDOptions) -> None:
        """New generation: forget everything, seed the draft RNG stream from opts.seed."""
        self.opts = opts
        self.model.reset()
        self._reset_round_state()
        self.ctx = list(prompt)
        self.remaining = opts.max_new_tokens
        self.generator = make_generators(opts.seed, self.model.device)[0]  # on the draft's device
        self.estimator = FanoutEstimator()
        self.ngram = NgramDrafter()

    def draft_len(self, ctx_len: int, remaining: int) -> int:
        """n = min(gamma, remaining - 1, room in the draft's context) (>= 0)."""
        return max(0, min(self.opts.gamma, remaining - 1, self.model.max_length - ctx_len))

    # ------------------------------------------------------------------ draft-model helpers
    def _forward_from(self, seq: list[int], keep: int) -> torch.Tensor:
        """Make the draft's cache hold `seq`, re-feeding from its common prefix with `fed` (at most
        len(seq) - keep tokens are reused, so the last `keep` are always fed); logits [T, V] of
        the fed tokens."""
        n = min(len(self.fed), len(seq) - keep)
        lcp = _lcp(self.fed, seq, n)
        self.model.crop(lcp)
        ids = torch.tensor([seq[lcp:]], dtype=torch.long, device=self.model.device)
        logits = self.model.forward(ids).logits[0]
        self.fed = list(seq)
        return logits

    def _sample(self, ctx: list[int], n: int) -> tuple[list[int], torch.Tensor | None]:
        """n tokens after ctx from q' = Saguaro(q) (argmax at temperature 0); rows sent: q' (or q
        under the _report_unmodified_q test hook, the negative control), None at temperature 0."""
        o = self.opts
        params = o.params
        logits = self._forward_from(ctx, 1)[-1]
        fan = self.estimator.fanout(o.fanout, o.budget, n)
        u = None if params.greedy else uniforms(n, self.generator, self.model.device)
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        for j in range(n):
            if params.greedy:
                x = int(logits.argmax())
            else:
                q = process_logits(logits[None], params)[0]
                qs = saguaro_reshape(q, fan[j] + 1, o.saguaro_c)
                x = int(categorical(qs[None], u[j : j + 1])[0])
                rows.append(q if o._report_unmodified_q else qs)
            tokens.append(x)
            if j + 1 < n:
                ids = torch.tensor([[x]], dtype=torch.long, device=self.model.device)
                logits = self.model.forward(ids).logits[0, -1]
                self.fed.append(x)
        return tokens, (torch.stack(rows) if rows else None)

    def _fast(self, n: int) -> list[int]:
        """Fast backup: n-gram continuation padded with uniform random tokens, or random tokens."""
        toks: list[int] = []
        if self.opts.fast_backup == "ngram":
            toks = self.ngram.propose(torch.tensor([self.ctx]), n).tokens[0].tolist()
        if len(toks) < n:
            g = self.generator
            toks += torch.randint(0, self.vocab_size, (n - len(toks),), generator=g, device=g.device).tolist()
        return toks

    # ------------------------------------------------------------------ the round
    def serve(self, key: tuple[int, int] | None) -> Proposal:
        """Apply the outcome `key` = (k accepted, bonus t) of the last draft (None: first round)
        and return the next draft (see module docstring)."""
        t_build, self.t_build = self.t_build, 0.0
        fk = rank = -1
        if key is None:
            status = "cold"
        else:
            k, t = int(key[0]), int(key[1])
            n = len(self.draft)
            if not (0 <= k <= n and 0 <= t < self.vocab_size):
                raise ValueError(f"outcome key ({k}, {t}) impossible for a draft of {n} tokens")
            if self.scores is not None and self.scores.shape[0] == n + 1:
                fk = self.fan[k]
                rank = bonus_rank(self.scores[k], t, self.draft[k] if k < n else None)
            self.estimator.observe(k, n, rank if rank > 0 else None)
            self.ctx += [*self.draft[:k], t]
            self.remaining -= k + 1
            status = "hit" if (k, t) in self.cache and not self.opts.force_miss else "miss"
        self.scores = None
        n_next = self.draft_len(len(self.ctx), self.remaining)
        if n_next == 0:
            self.draft, self.cache = [], {}
            return Proposal([], None, "empty", "none", fk, rank, t_build)
        t_fb = 0.0
        if status == "hit":
            tokens, probs = self.cache[(k, t)]
            source = "cache"
        else:
            t0 = time.perf_counter()
            if self.opts.fallback == "jit":
                tokens, probs = self._sample(self.ctx, n_next)
                source = "jit"
            else:
                tokens, probs = self._fast(n_next), None
                source = "fast"
            t_fb = time.perf_counter() - t0
        self.draft, self.cache = tokens, {}
        return Proposal(list(tokens), probs, status, source, fk, rank, t_build, t_fb)

    def build(self) -> None:
        """Pre-speculate the next draft for every predicted outcome of the current draft."""
        t0 = time.perf_counter()
        self.cache = {}
        n = len(self.draft)
        if n == 0:
            self.t_build = time.perf_counter() - t0
            return
        o = self.opts
        self.scores = self._forward_from(self.ctx + self.draft, n + 1)[-(n + 1) :]
        self.fan = self.estimator.fanout(o.fanout, o.budget, n)
        cands = fork_candidates(self.scores, self.draft, self.fan)
        branches = []
        for k in range(n, -1, -1):  # decreasing k: each branch re-feeds only its bonus token
            rem = self.remaining - (k + 1)
            n_b = self.draft_len(len(self.ctx) + k + 1, rem)
            if rem > 0 and n_b > 0:
                branches += [(k, t, n_b) for t in cands[k]]
        if self.tree and branches:
            self._build_tree(branches)
        else:
            for k, t, n_b in branches:
                self.cache[(k, t)] = self._sample([*self.ctx, *self.draft[:k], t], n_b)
        self.t_build = time.perf_counter() - t0

    def _build_tree(self, branches: list[tuple[int, int, int]]) -> None:
        """All branches at once (the model's ``decode_branches``), max n_b batched steps. Consumes the RNG in
        the sequential path's order (each branch's n_b uniforms, branch by branch), so both paths
        draw the same tokens from the same rows up to float rounding."""
        o = self.opts
        params, big_l = o.params, len(self.ctx)
        fans = [self.estimator.fanout(o.fanout, o.budget, n_b) for _, _, n_b in branches]
        us = [
            None if params.greedy else uniforms(n_b, self.generator, self.model.device)
            for _, _, n_b in branches
        ]
        dev = self.model.device
        depth = max(n_b for _, _, n_b in branches)
        state = self.model.branch_state(len(branches), depth)
        ids = torch.tensor([t for _, t, _ in branches], dtype=torch.long, device=dev)
        start = torch.tensor([big_l + k for k, _, _ in branches], dtype=torch.long, device=dev)
        toks: list[list[int]] = [[] for _ in branches]
        rows: list[list[torch.Tensor]] = [[] for _ in branches]
        for d in range(depth):
            logits = self.model.decode_branches(ids, start + d, start, state, d)
            q_all = None if params.greedy else process_logits(logits, params)
            nxt = []
            for b, (_, _, n_b) in enumerate(branches):
                if d >= n_b:
                    nxt.append(0)
                    continue
                if q_all is None:
                    x = int(logits[b].argmax())
                else:
                    qs = saguaro_reshape(q_all[b], fans[b][d] + 1, o.saguaro_c)
                    x = int(categorical(qs[None], us[b][d : d + 1])[0])
                    rows[b].append(q_all[b] if o._report_unmodified_q else qs)
                toks[b].append(x)
                nxt.append(x)
            ids = torch.tensor(nxt, dtype=torch.long, device=dev)
        for b, (k, t, _) in enumerate(branches):
            self.cache[(k, t)] = (toks[b], torch.stack(rows[b]) if rows[b] else None)
