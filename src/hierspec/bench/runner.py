"""Running one cell on one prompt: the method is built once through the registry
(`hierspec.methods.build_method`) and timed; the result row carries counts, the time breakdown,
the exact expected acceptance (``_LawHook``) and memory. SSD speculator sessions live in
`SSDSessions`; HF transformers and llama.cpp peers run in `hierspec.bench.peers`.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..methods import MethodSpec, ModelSet, backend_of, build_method, entry_of, hf_module
from ..methods.ssd import REPLY_TIMEOUT_S, ssd_options
from ..sampling import SamplingParams
from ..verify import RULES
from .config import SPEC_RULES, BenchConfig, BenchError, Cell

SSD_REPLY_TIMEOUT_S = REPLY_TIMEOUT_S  # the registry's default (`hierspec.methods.ssd`)


# ------------------------------------------------------------------------------------ running
class _ForwardCounter:
    """Counts forward calls of a torch module (a pre-hook; ~1 µs per call)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_args) -> None:
        self.calls += 1

    def take(self) -> int:
        n, self.calls = self.calls, 0
        return n


class _LawHook:
    """``on_verify`` hook: sums the exact E[accepted | draft] (and its variance) of every realised
    draft with ``RULES[rule].law``, timing itself so the harness can subtract that time."""

    def __init__(self, rule: str) -> None:
        self.rule = RULES[rule]
        self.expected = 0.0
        self.variance = 0.0
        self.measured = 0
        self.steps = 0
        self.seconds = 0.0

    def __call__(self, info: dict) -> None:
        t0 = time.perf_counter()
        tokens = info["draft_tokens"]
        k = tokens.shape[-1]
        if k:
            q = info["draft_probs"]
            law = self.rule.law(tokens[0], None if q is None else q[0], info["target_rows"][0])
            pk = law.sum(-1, dtype=torch.float64)  # P(num_accepted = j), j = 0..k
            j = torch.arange(k + 1, dtype=torch.float64)
            mean = float((pk * j).sum())
            self.expected += mean
            self.variance += max(0.0, float((pk * j * j).sum()) - mean * mean)
            self.measured += int(info["num_accepted"])
            self.steps += 1
        self.seconds += time.perf_counter() - t0


def _maxrss_mb() -> float:
    """Process peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS) in MiB."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def _placement() -> tuple[set[int] | None, int]:
    """This thread's (CPU affinity or None where unsupported, torch thread count)."""
    aff = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return aff, torch.get_num_threads()


def _apply_placement(p: tuple[set[int] | None, int]) -> None:
    if p[0] is not None and os.sched_getaffinity(0) != p[0]:
        os.sched_setaffinity(0, p[0])
    if torch.get_num_threads() != p[1]:
        torch.set_num_threads(p[1])


class SSDSessions:
    """The SSD speculator sessions of a run, one per (draft path, reply timeout).

    Started before the timed loop (`start`) and stopped at its end (`close`, idempotent, on errors
    too). `SSDSession` pins the verifier (this thread) to one core with one torch thread; here that
    placement is captured, the bench's placement restored at once, and the SSD placement applied
    only around SSD generations (`placed`)."""

    def __init__(self) -> None:
        self.sessions: dict[tuple[str, float], Any] = {}
        self.bench = _placement()
        self.verifier: tuple[set[int] | None, int] | None = None
        self.start_s = 0.0
        self.sync_s = 0.0

    @staticmethod
    def key(m: MethodSpec) -> tuple[str, float]:
        return str(m.path), ssd_options(m)[1]

    def start(self, methods: Sequence[MethodSpec], target: Any, specs: dict[str, Any]) -> None:
        from ..ssd import SSDSession

        t0 = time.perf_counter()
        try:
            for m in methods:
                if not entry_of(m).remote or self.key(m) in self.sessions:
                    continue
                k = self.key(m)
                try:
                    self.sessions[k] = SSDSession(target, specs[m.path], reply_timeout_s=k[1])
                except (ValueError, RuntimeError) as err:
                    raise BenchError(f"method {m.name}: the SSD speculator did not start: {err}") from None
                self.verifier = _placement()
        finally:
            _apply_placement(self.bench)
            self.start_s += time.perf_counter() - t0

    def session(self, m: MethodSpec) -> Any:
        return self.sessions[self.key(m)]

    @contextlib.contextmanager
    def placed(self) -> Iterator[None]:
        """The SSD verifier's placement inside, the bench's after."""
        try:
            if self.verifier is not None:
                _apply_placement(self.verifier)
            yield
        finally:
            _apply_placement(self.bench)

    def info(self) -> dict:
        bench, ver = self.bench, self.verifier
        cpus = sorted(bench[0]) if bench[0] is not None else []
        return {
            "sessions": len(self.sessions),
            "start_s": self.start_s,
            "sync_s": self.sync_s,
            "bench_cpus": cpus or None,
            "bench_threads": bench[1],
            "verifier_cpus": sorted(ver[0]) if ver and ver[0] is not None else None,
            "verifier_threads": ver[1] if ver else None,
            "speculator_cpu": cpus[1] if len(cpus) > 1 else None,
            "speculator_threads": 1,
        }

    def close(self) -> None:
        try:
            for s in self.sessions.values():
                try:
                    s.close()
                except Exception as err:  # keep closing the others
                    print(f"hierspec bench: warning: closing an SSD session: {err}", file=sys.stderr)
        finally:
            _apply_placement(self.bench)


def _stats_row(res: Any, times: dict[str, float], t_net: float, t_call: float, analysis: float) -> dict:
    """The result row of one hierspec generation (engine or SSD): counts from ``res.stats`` and the
    time breakdown, where ``times`` gives the method's own "draft" and "target_forward" seconds and
    "other" is whatever of ``t_net`` (the call minus untimed analysis) no part accounts for."""
    s = res.stats
    parts = {
        "prefill": s.time_prefill,
        **times,
        "logits_processing": s.time_logits_processing,
        "verify_rule": s.time_verify_rule,
        "rollback": s.time_rollback,
    }
    parts["other"] = max(0.0, t_net - sum(parts.values()))
    return {
        "new_tokens": len(res.token_ids),
        "finish_reason": res.finish_reason,
        "token_ids": res.token_ids,
        "time_s": t_net,
        "time_call_s": t_call,
        "time_analysis_s": analysis,
        "times": parts,
        "target_forwards": s.num_target_forwards,
        "num_spec_steps": s.num_spec_steps,
        "num_draft_tokens": s.num_draft_tokens,
        "num_accepted_draft_tokens": s.num_accepted_draft_tokens,
        "drafted_per_position": s.drafted_per_position,
        "accepted_per_position": s.accepted_per_position,
        "acceptance_histogram": s.acceptance_histogram,
        "mean_acceptance_length": s.mean_acceptance_length,
    }


@dataclass
class Runner:
    """Runs single generations of a cell on one prompt and returns a result row.

    Methods are built through the registry on one `ModelSet` (target, the loaded drafts by
    reference, early-exit heads by layer), once per (method, rule, gamma)."""

    cfg: BenchConfig
    target: Any
    eos_token_id: int | None
    drafts: dict[str, Any]  # draft reference -> loaded LanguageModel
    heads: dict[int, Any] = field(default_factory=dict)  # exit layer -> EarlyExitHead
    ssd: SSDSessions | None = None  # started SSD sessions (ssd methods)
    tokenizer: Any = None
    target_name: str | None = None
    models: ModelSet | None = None
    _built: dict[tuple[str, str, int, str], Any] = field(default_factory=dict)
    _counters: dict[str, _ForwardCounter] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.models is None:
            self.models = ModelSet(
                self.target,
                self.tokenizer,
                dtype=getattr(self.target, "dtype", torch.float32),
                backend=backend_of(self.target),
                drafts=self.drafts,
                heads=self.heads,
                name=self.target_name,
            )
        hf = hf_module(self.target)
        if hf is not None:
            self._counters["target"] = _ForwardCounter(hf)
        for path, model in self.drafts.items():
            m = hf_module(model)
            if m is not None:
                self._counters[path] = _ForwardCounter(m)

    def close(self) -> None:
        for c in self._counters.values():
            c.handle.remove()

    def built(self, cell: Cell) -> Any:
        """The registry's `Built` for this cell's method, rule, gamma and draft sampling (built
        once)."""
        rule = cell.rule if cell.rule in SPEC_RULES else "token"
        gamma = 1 if cell.gamma is None else cell.gamma  # AR: None; adaptive (γ auto): 0
        key = (cell.method.name, rule, gamma, cell.draft_sampling)
        if key not in self._built:
            self._built[key] = build_method(
                cell.method, self.models, rule=rule, gamma=gamma, draft_sampling=cell.draft_sampling
            )
        return self._built[key]

    def clear_caches(self) -> None:
        """Empty every cross-request drafter cache (suffix decoding) after the warm-ups, so no
        timed run finds its own prompt's warm-up output there; during the timed matrix the cache
        grows over the prompts in order, as in a serving session."""
        for built in self._built.values():
            d = built.drafter
            while d is not None:
                if hasattr(d, "clear_cache"):
                    d.clear_cache()
                d = getattr(d, "inner", None)

    def _take(self, key: str | None) -> int | None:
        c = self._counters.get(key) if key else None
        return c.take() if c is not None else None

    def run(self, cell: Cell, ids: list[int], seed: int, max_new_tokens: int, analyse: bool) -> dict:
        from .peers import run_hf, run_llama

        m = cell.method
        runner = entry_of(m).runner
        draft_key = next(iter(m.paths), None)  # the (bottom) draft model, if any
        self._take("target")
        self._take(draft_key)
        rss0 = _maxrss_mb()
        if runner == "hf":
            row = run_hf(self, cell, ids, seed, max_new_tokens)
        elif runner == "llama":
            row = run_llama(self, cell, ids, seed, max_new_tokens)
        elif runner == "ssd":
            row = self._run_ssd(cell, ids, seed, max_new_tokens)
        else:
            row = self._run_hierspec(cell, ids, seed, max_new_tokens, analyse)
        row["target_calls"] = self._take("target")
        draft_forwards = self._take(draft_key)
        row.setdefault("draft_forwards", draft_forwards)
        if runner == "hf" and row["target_calls"] is not None:
            # each HF target call (the first one is the prefill) emits >= 1 token
            row["target_forwards"] = row["target_calls"]
        rss1 = _maxrss_mb()
        row["rss_peak_mb"] = rss1
        row["rss_peak_raise_mb"] = rss1 - rss0
        return row

    def _run_hierspec(self, cell: Cell, ids: list[int], seed: int, max_new: int, analyse: bool) -> dict:
        built = self.built(cell)
        drafts = not entry_of(cell.method).plain
        hook = (
            _LawHook(cell.rule)
            if analyse and drafts and cell.temperature > 0 and built.tree is None
            else None
        )
        params = SamplingParams(
            temperature=cell.temperature, top_p=self.cfg.top_p if cell.temperature else 1.0
        )
        adaptive = getattr(built.drafter, "k_hist", None)
        k_before = dict(adaptive) if adaptive is not None else None
        t0 = time.perf_counter()
        res = built.generate(
            ids,
            rule=cell.rule if cell.rule in SPEC_RULES else "token",
            params=params,
            max_new_tokens=max_new,
            eos_token_id=self.eos_token_id,
            seed=seed,
            on_verify=hook,
        )
        t_call = time.perf_counter() - t0
        s = res.stats
        analysis = hook.seconds if hook is not None else 0.0
        t_net = t_call - analysis
        times = {"draft": s.time_draft, "target_forward": s.time_target_forward}
        row = _stats_row(res, times, t_net, t_call, analysis)
        if not drafts:
            row["mean_acceptance_length"] = None
        if built.system is not None:
            row["stages"] = built.system.stage_stats(res)
        if k_before is not None:  # the adaptive policy's chosen draft lengths in this run
            hist = built.drafter.k_hist
            row["k_hist"] = {k: n - k_before.get(k, 0) for k, n in hist.items() if n > k_before.get(k, 0)}
        if hook is not None:
            row["expected_accepted"] = hook.expected
            row["expected_accepted_var"] = hook.variance
            row["law_steps"] = hook.steps
        return row

    def _run_ssd(self, cell: Cell, ids: list[int], seed: int, max_new: int) -> dict:
        """One SSD generation on the method's running session (verifier here, speculator in its
        process); timed like the others (whole call, prefill included), then an untimed sync."""
        if self.ssd is None:
            raise RuntimeError(f"method {cell.method.name}: no SSD session was started")
        session = self.ssd.session(cell.method)
        kw = ssd_options(cell.method)[0]
        params = SamplingParams(
            temperature=cell.temperature, top_p=self.cfg.top_p if cell.temperature else 1.0
        )
        with self.ssd.placed():
            t0 = time.perf_counter()
            res = session.generate(
                ids,
                gamma=cell.gamma or 1,
                params=params,
                max_new_tokens=max_new,
                seed=seed % 2**62,
                eos_token_id=self.eos_token_id,
                rule=cell.rule if cell.rule in SPEC_RULES else "token",
                **kw,
            )
            t_call = time.perf_counter() - t0
            t_sync = session.sync()
        self.ssd.sync_s += t_sync
        s = res.stats
        times = {
            "draft": s.time_draft + s.time_wait,  # waiting for the speculator's reply
            "target_forward": s.time_target_forward + s.time_emulated,
        }
        from ..ssd.stats import DERIVED_FIELDS

        pred = s.cost_prediction()
        ssd = {
            name: getattr(s, name)
            for name in (
                *DERIVED_FIELDS,
                "num_rounds",
                "num_predicted_rounds",
                "num_hits",
                "num_misses",
                "num_cold_starts",
                "num_fallback_jit",
                "num_fallback_fast",
                "num_local_rounds",
                "tokens_on_hit",
                "rounds_on_hit",
                "tokens_on_miss",
                "rounds_on_miss",
                "time_verify_rounds",
                "time_wait",
                "time_emulated",
                "time_speculate",
                "num_builds",
                "time_fallback",
                "fallback_events",
            )
        }
        ssd.update(
            predicted_speedup_vs_ar=pred.speedup_vs_ar if pred else None,
            predicted_tokens_per_second=pred.tokens_per_second if pred else None,
            options={**kw, "budget": kw.get("budget") or 3 * ((cell.gamma or 1) + 1)},
            time_sync_s=t_sync,
        )
        # the draft runs in the speculator's process: no local forward counts
        return {**_stats_row(res, times, t_call, t_call, 0.0), "ssd": ssd, "draft_forwards": None}
