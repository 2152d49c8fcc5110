"""The SSD verifier and the launcher: `SSDSession` (many generations, one speculator process) and
`generate_ssd` (one generation).

The verifier is the calling process (rank 0, holding the live target); the speculator is a
spawned process (rank 1) that re-creates the draft from a picklable spec (`draft_spec.DraftSpec`
(path, dtype) or a path, loaded with `hierspec.models.loading.load_draft_model`; a factory
callable; or a picklable model object). Per round the verifier

    sends the outcome key (k, t) of the last round   -> the speculator answers at once with the
    next draft s_1..s_n and its rows q' (hit: from the speculation cache; miss: fallback)
    verifies [x_L, s_1..s_n] with the target (+ `emulate_verify_ms` of sleep), commits
    X_1..X_tau, Y and makes (tau, Y) the next key

while the speculator pre-speculates the draft after every likely outcome of s_1..s_n. The rounds
run in the engine's decode loop (`hierspec.engine.generate`, the speculator behind a drafter,
`RemoteDrafter`): every draft is verified against the exact rows it was drawn from (q', or one-hot for
fast backups), so the output is distributed exactly as the processed target, and is
token-identical to greedy decoding at temperature 0 (the verifier's randomness is its own
streams, `hierspec.rng.Streams(seed, target.device)`).

Faults: if the speculator process dies, closes its connection, or does not answer within
`reply_timeout_s`, the verifier records the event in ``stats.fallback_events`` and finishes the
generation alone -- speculative decoding with a local copy of the draft (`fault_fallback="sd"`)
or plain autoregressive decoding ("ar") -- from the committed context, so the output stays exact
and complete. Later generations of the session run alone too.

Launcher: `SSDSession` starts the speculator with torch.multiprocessing "spawn" (so, as for any
spawn-based code, a script must guard its entry point with ``if __name__ == "__main__":``), waits
for it to report ready, and on `close()` (also on errors and at exit: it is a daemon) asks it to
exit, then kills it; the caller's CPU affinity and torch thread count are restored. With more
than one allowed core, the verifier pins itself to the first and the speculator to the second;
both use one torch thread. `sync()` waits until the speculator has finished the pre-speculation
that follows a generation's last round (benchmarks call it so that no speculator work overlaps
what they time next).
"""

from __future__ import annotations

import datetime
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..drafters.model import ModelDrafter
from ..engine import GenerationResult, check_generate_args, generate
from ..models.base import LanguageModel
from ..output import Output
from ..sampling import SamplingParams
from ..verify import get_rule
from .channel import LocalChannel, ProcessChannel, SpeculatorFault, make_process_group, speculator_main
from .draft_spec import build_draft_model, check_draft_spec, is_model
from .options import SSDOptions
from .remote import RemoteDrafter
from .speculator import Speculator
from .stats import SSDStats

MODES = ("process", "local")
FAULT_FALLBACKS = ("sd", "ar")


class SSDSession:
    """A verifier with a running speculator; `generate` may be called many times.

    target: the live target `LanguageModel`. draft: see `check_draft_spec`. mode: "process" (two
    processes over torch.distributed) or "local" (speculator in this process, sequential).
    backend: "gloo" (CPU, loopback) or "nccl" (GPU; buffers on CUDA). port: TCP port of the
    rendezvous store (None: a free one). pin_cores: pin verifier / speculator to the first / second
    allowed core. start_timeout_s: how long the speculator may take to load the draft.
    reply_timeout_s: per-round answer deadline before the verifier goes on alone. fault_fallback:
    "sd" (local draft) or "ar".

    Raises (before any generation, with no process left behind): ValueError for a bad argument
    (named), RuntimeError when the rendezvous port cannot be bound or the speculator cannot start.
    """

    # Test hook, not an option: True makes the speculator report the unmodified draft rows q
    # instead of the Saguaro rows q' its tokens were drawn from -- deliberately NOT exact (the
    # negative control of tests/test_ssd.py sets it on a session).
    _report_unmodified_q: bool = False

    def __init__(
        self,
        target: LanguageModel,
        draft: Any,
        *,
        mode: str = "process",
        backend: str = "gloo",
        port: int | None = None,
        pin_cores: bool = True,
        start_timeout_s: float = 180.0,
        reply_timeout_s: float = 60.0,
        fault_fallback: str = "sd",
    ) -> None:
        if not is_model(target):
            raise ValueError(f"target: expected a LanguageModel, got {type(target).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
        if fault_fallback not in FAULT_FALLBACKS:
            raise ValueError(f"fault_fallback: expected one of {FAULT_FALLBACKS}, got {fault_fallback!r}")
        if port is not None and (
            isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536
        ):
            raise ValueError(f"port: expected an integer in [0, 65536) or None, got {port!r}")
        for name, val in (("start_timeout_s", start_timeout_s), ("reply_timeout_s", reply_timeout_s)):
            if not isinstance(val, (int, float)) or not math.isfinite(val) or val <= 0:
                raise ValueError(f"{name}: expected a positive number of seconds, got {val!r}")
        check_draft_spec(draft)
        self.target, self.draft_spec, self.mode = target, draft, mode
        self.fault_fallback = fault_fallback
        self.reply_timeout_s = float(reply_timeout_s)
        self.faulted = False
        self.proc: Any = None
        self._local_model: LanguageModel | None = None
        self._saved_affinity: set[int] | None = None
        self._saved_threads: int | None = None
        self._closed = False
        if mode == "local":
            self._local_model = build_draft_model(draft)
            self._check_vocab(int(self._local_model.vocab_size))
            self.channel: LocalChannel | ProcessChannel = LocalChannel(Speculator(self._local_model))
        else:
            self.channel = self._launch(backend, port, pin_cores, float(start_timeout_s))

    # ------------------------------------------------------------------ launcher
    def _check_vocab(self, v: int) -> None:
        if v != self.target.vocab_size:
            raise ValueError(
                f"draft: its vocabulary has {v} tokens but the target's has {self.target.vocab_size}; "
                "a draft must share the target's tokenizer"
            )

    def _launch(self, backend: str, port: int | None, pin: bool, start_timeout: float) -> ProcessChannel:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        child_cpu = cpus[1] if pin and len(cpus) > 1 else None
        try:
            store = dist.TCPStore(
                "127.0.0.1",
                port or 0,
                2,
                True,
                timeout=datetime.timedelta(seconds=start_timeout),
                wait_for_workers=False,
            )
        except (RuntimeError, OSError) as err:
            raise RuntimeError(
                f"port: cannot listen on 127.0.0.1:{port} for the speculator rendezvous "
                f"(in use?): {str(err).splitlines()[0]}"
            ) from None
        ctx = mp.get_context("spawn")
        conn, child_conn = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=speculator_main,
            args=(child_conn, store.port, self.draft_spec, backend, child_cpu),
            daemon=True,
            name="hierspec-ssd-speculator",
        )
        try:
            proc.start()
        except Exception as err:
            self._kill(proc)
            raise ValueError(f"draft: the spec cannot be sent to the speculator process: {err}") from None
        child_conn.close()
        self.proc = proc
        try:
            msg = self._wait_ready(conn, proc, start_timeout)
            if msg[0] == "error":
                raise RuntimeError(f"draft: the speculator process could not start: {msg[1]}")
            self._check_vocab(int(msg[1]))
            pg = make_process_group(backend, store, 0, datetime.timedelta(seconds=start_timeout))
        except BaseException:
            self._kill(proc)
            self.proc = None
            raise
        self._store = store  # keep the rendezvous alive with the group
        if pin and len(cpus) > 1:
            self._saved_affinity = set(cpus)
            os.sched_setaffinity(0, {cpus[0]})
        self._saved_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        device = "cuda" if backend == "nccl" else "cpu"
        return ProcessChannel(pg, int(msg[1]), device=device, reply_timeout_s=self.reply_timeout_s, proc=proc)

    @staticmethod
    def _wait_ready(conn: Any, proc: Any, timeout: float) -> tuple:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if conn.poll(0.1):
                try:
                    return conn.recv()
                except EOFError:
                    break
            if not proc.is_alive() and not conn.poll(0):
                break
        if proc.is_alive():
            raise RuntimeError(f"draft: the speculator process did not become ready within {timeout:g} s")
        raise RuntimeError(
            f"draft: the speculator process exited during start-up (exit code {proc.exitcode})"
        )

    @staticmethod
    def _kill(proc: Any) -> None:
        if proc is None or proc.pid is None:
            return
        if proc.is_alive():
            proc.kill()
        proc.join(10)

    @property
    def speculator_pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def close(self) -> None:
        """Stop the speculator (EXIT, then kill) and restore affinity and threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.channel.close()
        finally:
            if self.proc is not None:
                self.proc.join(2 if not self.faulted else 0.1)
                self._kill(self.proc)
            if self._saved_affinity is not None:
                os.sched_setaffinity(0, self._saved_affinity)
            if self._saved_threads is not None:
                torch.set_num_threads(self._saved_threads)

    def sync(self) -> float:
        """Wait until the speculator is idle (its pre-speculation after the last round of the
        previous generation is done), so that it takes no CPU from whatever runs next; returns the
        seconds waited. A fault here only marks the session faulted (later generations run alone)."""
        if self._closed or self.faulted:
            return 0.0
        t0 = time.perf_counter()
        try:
            self.channel.sync()
        except SpeculatorFault:
            self.faulted = True
        return time.perf_counter() - t0

    def __enter__(self) -> SSDSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ verifier
    def _fault(self, stats: SSDStats, err: BaseException, done: int) -> None:
        self.faulted = True
        alone = "speculative decoding with a local draft" if self.fault_fallback == "sd" else "autoregressive"
        stats.fallback_events.append(
            f"speculator fault after {done} tokens ({err}); the verifier continued alone ({alone})"
        )

    def _local_drafter(self) -> ModelDrafter | None:
        if self.fault_fallback == "ar":
            return None
        if self._local_model is None:
            self._local_model = build_draft_model(self.draft_spec)
        return ModelDrafter(self._local_model)

    def generate(
        self,
        prompt_ids: torch.Tensor | Sequence[int],
        *,
        gamma: int = 4,
        params: SamplingParams | None = None,
        max_new_tokens: int = 128,
        fanout: str = "uniform",
        budget: int | None = None,
        saguaro_c: float = 1.0,
        fallback: str = "jit",
        fast_backup: str = "ngram",
        emulate_verify_ms: float = 0.0,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        stop_strings: Sequence[str] = (),
        tokenizer: Any = None,
        rule: str = "token",
        on_tokens: Callable[[list[int]], None] | None = None,
        force_miss: bool = False,
    ) -> GenerationResult:
        """One SSD generation (see module docstring and `SSDOptions` for the knobs).

        emulate_verify_ms: sleep this long after every verification (a large target's latency;
        the sleeping core is free, so the speculator truly overlaps). rule: verification rule at
        temperature > 0 ("token" makes the excluded-own-token fork exact; "block"/"hsd" stay
        lossless). eos_token_id / stop_strings (needs ``tokenizer``) / on_tokens: as in
        `hierspec.engine.generate` (the same `hierspec.output.Output` bookkeeping). force_miss
        (tests): never use the speculation cache. Returns `GenerationResult` with `SSDStats`.
        """
        if self._closed:
            raise RuntimeError("session: already closed")
        params = params or SamplingParams()
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long)
        if prompt.dim() == 1:
            prompt = prompt[None]
        check_generate_args(self.target, prompt, None, gamma, max_new_tokens)
        em = emulate_verify_ms
        if isinstance(em, bool) or not isinstance(em, (int, float)) or not math.isfinite(em) or em < 0:
            raise ValueError(f"emulate_verify_ms: expected a number >= 0, got {em!r}")
        if seed is None:
            seed = random.getrandbits(62)
        total = min(max_new_tokens, self.target.max_length - prompt.shape[1])
        opts = SSDOptions(
            gamma=gamma,
            budget=budget,
            fanout=fanout,
            saguaro_c=saguaro_c,
            fallback=fallback,
            fast_backup=fast_backup,
            params=params,
            seed=seed,
            max_new_tokens=total,
            force_miss=force_miss,
            _report_unmodified_q=self._report_unmodified_q,
        )
        stats = SSDStats(prompt_tokens=prompt.shape[1], mode=self.mode)
        drafter = RemoteDrafter(self, opts, stats, em / 1e3)
        res = generate(
            self.target,
            prompt,
            drafter=drafter,
            rule=rule,
            gamma=gamma,
            params=params,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            stop_strings=stop_strings,
            tokenizer=tokenizer,
            seed=seed,
            on_tokens=on_tokens,
            stats=stats,
        )
        drafter.end(len(res.token_ids))
        return res


def generate_ssd(
    target: LanguageModel,
    draft: Any,
    prompt_ids: torch.Tensor | Sequence[int],
    *,
    gamma: int = 4,
    params: SamplingParams | None = None,
    max_new_tokens: int = 128,
    fanout: str = "uniform",
    budget: int | None = None,
    saguaro_c: float = 1.0,
    fallback: str = "jit",
    fast_backup: str = "ngram",
    emulate_verify_ms: float = 0.0,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer: Any = None,
    rule: str = "token",
    mode: str = "process",
    backend: str = "gloo",
    port: int | None = None,
    reply_timeout_s: float = 60.0,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> GenerationResult:
    """One SSD generation: start the speculator, generate, stop it (see `SSDSession`).

    All generation arguments are validated before the speculator process is started.
    """
    params = params or SamplingParams()
    SSDOptions(
        gamma=gamma,
        budget=budget,
        fanout=fanout,
        saguaro_c=saguaro_c,
        fallback=fallback,
        fast_backup=fast_backup,
        params=params,
        max_new_tokens=max(1, max_new_tokens),
    )
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long)
    check_generate_args(target, prompt[None] if prompt.dim() == 1 else prompt, None, gamma, max_new_tokens)
    get_rule("greedy" if params.greedy else rule)
    Output(eos_token_id=eos_token_id, stop_strings=stop_strings, tokenizer=tokenizer)
    with SSDSession(
        target, draft, mode=mode, backend=backend, port=port, reply_timeout_s=reply_timeout_s
    ) as s:
        return s.generate(
            prompt_ids,
            gamma=gamma,
            params=params,
            max_new_tokens=max_new_tokens,
            fanout=fanout,
            budget=budget,
            saguaro_c=saguaro_c,
            fallback=fallback,
            fast_backup=fast_backup,
            emulate_verify_ms=emulate_verify_ms,
            seed=seed,
            eos_token_id=eos_token_id,
            stop_strings=stop_strings,
            tokenizer=tokenizer,
            rule=rule,
            on_tokens=on_tokens,
        )
