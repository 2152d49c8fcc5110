"""Verifier <-> speculator transport: one handshake per round.

Two implementations of one interface (`start`, `request`, `end`, `close`):

* `LocalChannel`: the speculator lives in the verifier's process and pre-speculates right after
  answering (no overlap): the sequential baseline and a fast path for tests. Same speculator
  code, same RNG consumption order (serve, build, serve, build, ...), so for a given seed it emits
  exactly the tokens of the two-process path.
* `ProcessChannel`: the speculator runs in its own process (`speculator_main`), connected by a
  torch.distributed process group (gloo over loopback on CPU; the same messages go over NCCL
  with CUDA buffers). After sending its answer the speculator builds the speculation cache while
  the verifier verifies -- the overlap that SSD is about.

Wire format (fixed-size messages, so both sides always agree on the sizes):

    verifier -> speculator   int64[4] command: [START, prompt_len, 0, 0] then float64 options
                             (`SSDOptions.to_vector`) followed by the prompt ids; [ROUND, k, t, 0];
                             [SYNC] (answered with float64[1] once the speculator is idle);
                             [EXIT]. A generation ends implicitly with the next START or EXIT.
    speculator -> verifier   float64[HDR + K (+ K V)] reply: [status, source, n, has_q, fk, rank,
                             t_build, t_fallback], the n draft tokens (K slots), and the n q' rows
                             inline when K V <= INLINE_MAX (else as a second float64[K V] message)

Token ids (< 2^53) are exact in float64; q' rows are sent in float64, so float32/float64 drafts
arrive bit-exact. A reply that does not arrive within `reply_timeout_s`, or a closed connection,
raises `SpeculatorFault`; the verifier then finishes alone.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from .draft_spec import build_draft_model
from .options import VECTOR_LEN, SSDOptions
from .speculator import SOURCES, STATUSES, Proposal, Speculator

CMD_START, CMD_ROUND, CMD_END, CMD_EXIT, CMD_SYNC = 1, 2, 3, 4, 5
HDR = 8
INLINE_MAX = 1 << 16
_LONG = datetime.timedelta(days=1)


class SpeculatorFault(RuntimeError):
    """The speculator died, stopped answering, or sent garbage."""


def reply_sizes(gamma: int, vocab_size: int) -> tuple[int, int]:
    """(size of the reply message, size of the separate q message or 0)."""
    kv = gamma * vocab_size
    return (HDR + gamma + kv, 0) if kv <= INLINE_MAX else (HDR + gamma, kv)


def encode_reply(p: Proposal, gamma: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    size, qsize = reply_sizes(gamma, vocab_size)
    n = len(p.tokens)
    msg = torch.zeros(size, dtype=torch.float64)
    has_q = p.probs is not None
    msg[:HDR] = torch.tensor(
        [
            STATUSES.index(p.status),
            SOURCES.index(p.source),
            n,
            int(has_q),
            p.fk,
            p.rank,
            p.t_build,
            p.t_fallback,
        ],
        dtype=torch.float64,
    )
    if n:
        msg[HDR : HDR + n] = torch.tensor(p.tokens, dtype=torch.float64)
    qmsg = None
    if has_q:
        flat = p.probs.reshape(-1).to(torch.float64)
        if qsize:
            qmsg = torch.zeros(qsize, dtype=torch.float64)
            qmsg[: flat.numel()] = flat
        else:
            msg[HDR + gamma : HDR + gamma + flat.numel()] = flat
    return msg, qmsg


def decode_reply(msg: torch.Tensor, qmsg: torch.Tensor | None, gamma: int, vocab_size: int) -> Proposal:
    h = msg[:HDR].tolist()
    status_i, source_i, n, has_q = int(h[0]), int(h[1]), int(h[2]), bool(h[3])
    if not (0 <= status_i < len(STATUSES) and 0 <= source_i < len(SOURCES) and 0 <= n <= gamma):
        raise SpeculatorFault(f"malformed speculator reply header {h}")
    tokens = [int(x) for x in msg[HDR : HDR + n].tolist()]
    probs = None
    if has_q and n:
        src = qmsg if qmsg is not None else msg[HDR + gamma :]
        probs = src[: n * vocab_size].reshape(n, vocab_size).clone()
    return Proposal(tokens, probs, STATUSES[status_i], SOURCES[source_i], int(h[4]), int(h[5]), h[6], h[7])


class LocalChannel:
    """In-process speculator: answer, then pre-speculate immediately (sequential)."""

    alive = True

    def __init__(self, speculator: Speculator) -> None:
        self.spec = speculator

    def start(self, prompt: list[int], opts: SSDOptions) -> None:
        self.spec.start(prompt, opts)

    def request(self, key: tuple[int, int] | None) -> Proposal:
        p = self.spec.serve(key)
        self.spec.build()
        return p

    def end(self) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_process_group(backend: str, store: Any, rank: int, timeout: datetime.timedelta) -> Any:
    """A two-rank process group on `store` without touching torch.distributed's global state."""
    prefix = dist.PrefixStore("hierspec-ssd", store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefix, rank, 2, timeout)
    if backend == "nccl":  # untested here (no GPU): one CUDA device per rank
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(prefix, rank, 2, opts)
    raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")


class ProcessChannel:
    """Verifier end (rank 0) of the two-process transport; see module docstring."""

    def __init__(
        self,
        pg: Any,
        vocab_size: int,
        *,
        device: str = "cpu",
        reply_timeout_s: float = 60.0,
        proc: Any = None,
    ) -> None:
        self.pg, self.v, self.device = pg, vocab_size, torch.device(device)
        self.timeout = datetime.timedelta(seconds=reply_timeout_s)
        self.proc = proc
        self.alive = True
        self.gamma = 1

    def _send(self, t: torch.Tensor) -> None:
        self.pg.send([t.to(self.device)], 1, 0).wait(self.timeout)

    def _recv(self, size: int) -> torch.Tensor:
        buf = torch.empty(size, dtype=torch.float64, device=self.device)
        self.pg.recv([buf], 1, 0).wait(self.timeout)
        return buf.cpu()

    def _guard(self, fn, *args):
        if not self.alive:
            raise SpeculatorFault("speculator already failed")
        if self.proc is not None and not self.proc.is_alive():
            self.alive = False
            raise SpeculatorFault(f"speculator process exited (exit code {self.proc.exitcode})")
        try:
            return fn(*args)
        except SpeculatorFault:
            self.alive = False
            raise
        except RuntimeError as err:  # gloo: connection closed by peer, or timed out
            self.alive = False
            raise SpeculatorFault(str(err).splitlines()[0][:300]) from err

    def _cmd(self, cmd: int, a: int = 0, b: int = 0) -> None:
        self._send(torch.tensor([cmd, a, b, 0], dtype=torch.int64))

    def start(self, prompt: list[int], opts: SSDOptions) -> None:
        def go() -> None:
            self.gamma = opts.gamma
            self._cmd(CMD_START, len(prompt))
            self._send(torch.cat([opts.to_vector(), torch.tensor(prompt, dtype=torch.float64)]))

        self._guard(go)

    def request(self, key: tuple[int, int] | None) -> Proposal:
        def go() -> Proposal:
            if key is not None:
                self._cmd(CMD_ROUND, int(key[0]), int(key[1]))
            size, qsize = reply_sizes(self.gamma, self.v)
            msg = self._recv(size)
            qmsg = self._recv(qsize) if qsize and msg[3] > 0 else None
            return decode_reply(msg, qmsg, self.gamma, self.v)

        return self._guard(go)

    def end(self) -> None:
        """Nothing to send: the speculator's next command (START or EXIT) ends the generation."""
        self._guard(lambda: None)

    def sync(self) -> None:
        """Return once the speculator has finished its pending pre-speculation and is idle (it
        answers SYNC only after the build that followed its last reply)."""

        def go() -> None:
            self._cmd(CMD_SYNC)
            self._recv(1)

        self._guard(go)

    def close(self) -> None:
        if self.alive:
            try:
                self._cmd(CMD_EXIT)
            except RuntimeError:
                pass
        self.alive = False


# ---------------------------------------------------------------------- speculator process
def _pin(cpu: int | None) -> None:
    torch.set_num_threads(1)
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            pass


def speculator_main(conn: Any, port: int, draft_spec: Any, backend: str, cpu: int | None) -> None:
    """Entry point of the speculator process (rank 1): build the draft, report ready, serve.

    Startup errors are reported through `conn` as ("error", message); afterwards any transport
    error (the verifier is gone) ends the process quietly, so it never outlives its verifier.
    """
    _pin(cpu)
    try:
        model = build_draft_model(draft_spec)
        conn.send(("ready", int(model.vocab_size), int(model.max_length)))
    except BaseException as err:  # report, never hang the verifier
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    device = "cuda" if backend == "nccl" else "cpu"
    try:
        store = dist.TCPStore("127.0.0.1", port, 2, False, timeout=datetime.timedelta(seconds=60))
        pg = make_process_group(backend, store, 1, _LONG)
        serve_forever(pg, Speculator(model), device)
    except RuntimeError:
        return
    finally:
        conn.close()


def serve_forever(pg: Any, spec: Speculator, device: str = "cpu") -> None:
    """The speculator loop: answer each key at once, then pre-speculate until the next one."""
    v = spec.vocab_size

    def recv(size: int, dtype: torch.dtype) -> torch.Tensor:
        buf = torch.empty(size, dtype=dtype, device=device)
        pg.recv([buf], 0, 0).wait(_LONG)
        return buf.cpu()

    def reply(p: Proposal, gamma: int) -> None:
        msg, qmsg = encode_reply(p, gamma, v)
        pg.send([msg.to(device)], 0, 0).wait(_LONG)
        if qmsg is not None:
            pg.send([qmsg.to(device)], 0, 0).wait(_LONG)

    opts = None
    while True:
        cmd = recv(4, torch.int64).tolist()
        if cmd[0] == CMD_EXIT:
            return
        if cmd[0] == CMD_END:
            continue
        if cmd[0] == CMD_SYNC:
            pg.send([torch.ones(1, dtype=torch.float64, device=device)], 0, 0).wait(_LONG)
            continue
        if cmd[0] == CMD_START:
            payload = recv(VECTOR_LEN + cmd[1], torch.float64)
            opts = SSDOptions.from_vector(payload[:VECTOR_LEN])
            prompt = [int(x) for x in payload[VECTOR_LEN:].tolist()]
            spec.start(prompt, opts)
            p = spec.serve(None)
        elif cmd[0] == CMD_ROUND and opts is not None:
            p = spec.serve((cmd[1], cmd[2]))
        else:
            raise RuntimeError(f"unexpected command {cmd}")
        reply(p, opts.gamma)
        spec.build()
