"""`RemoteDrafter`: the SSD speculator (another process, or local) seen by the verifier as a
drafter, so SSD rounds run in the engine's one decode loop (`hierspec.engine.generate`)."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..drafters.base import Draft
from ..sampling import SamplingParams
from .channel import SpeculatorFault
from .options import SSDOptions
from .stats import SSDStats


class RemoteDrafter:
    """The verifier's view of the speculator, as a drafter for the engine's loop (one decode
    loop: EOS, stop strings, streaming, prefill and stats are the engine's).

    Each `propose` asks the channel for the draft after the last step's outcome, the key
    (tau, last emitted token) read by `observe_step`; the first one of a generation starts the
    speculator on the prompt. On a fault (and in later generations of a faulted session) it
    drafts locally (`SSDSession._local_drafter`) or not at all. `observe_step` records the round
    (`SSDStats.record_round`) and sleeps ``emulate_s`` (an emulated large target)."""

    vocab_size = None  # session: the `hierspec.ssd.session.SSDSession` it serves

    def __init__(self, session: Any, opts: SSDOptions, stats: SSDStats, emulate_s: float) -> None:
        self.session, self.opts, self.stats, self.emulate_s = session, opts, stats, emulate_s
        self.reset()

    def reset(self) -> None:
        self._started = False
        self._key: tuple[int, int] | None = None
        self._prop: Any = None
        self._asked = False  # propose ran this step (the engine skips it when no draft fits)
        self._local: Any = None
        self._t_proposed = time.perf_counter()
        self._done = 0

    def _fault(self, err: BaseException) -> None:
        self.session._fault(self.stats, err, self._done)

    def propose(
        self, context: torch.Tensor, num_tokens: int, params: SamplingParams, generator: Any = None
    ) -> Draft:
        session, stats = self.session, self.stats
        if not self._started:
            self._started = True
            if session.faulted:
                stats.fallback_events.append("speculator unavailable (earlier fault): decoding alone")
            else:
                try:
                    session.channel.start(context[0].tolist(), self.opts)
                except SpeculatorFault as err:
                    self._fault(err)
        self._prop, self._asked = None, True
        if not session.faulted:
            tw = time.perf_counter()
            try:
                self._prop = session.channel.request(self._key)
            except SpeculatorFault as err:
                self._fault(err)
            stats.time_wait += time.perf_counter() - tw
        prop = self._prop
        if prop is not None:
            stats.num_fallback_jit += prop.source == "jit"
            stats.num_fallback_fast += prop.source == "fast"
            stats.time_fallback += prop.t_fallback
            if prop.t_build > 0:
                stats.time_speculate += prop.t_build
                stats.num_builds += 1
            probs = None if prop.probs is None else prop.probs[None, :num_tokens]
            draft = Draft(torch.tensor([prop.tokens[:num_tokens]], dtype=torch.long), probs)
        else:
            if self._local is None:
                self._local = session._local_drafter() or False
            local = self._local
            draft = local.propose(context, num_tokens, params, generator) if local else Draft.empty()
        self._t_proposed = time.perf_counter()
        return draft

    def observe_step(self, drafted: int, accepted: int, tokens: list[int]) -> None:
        if self.emulate_s > 0:
            te = time.perf_counter()
            time.sleep(self.emulate_s)
            self.stats.time_emulated += time.perf_counter() - te
        prop, asked = self._prop, self._asked
        self._prop, self._asked = None, False
        status = "empty" if not asked else prop.status if prop is not None else "local"
        self.stats.record_round(
            status=status,
            prev_k=None if self._key is None else self._key[0],
            fk=prop.fk if prop is not None else -1,
            rank=prop.rank if prop is not None else -1,
            emitted=len(tokens),
            t_verify=time.perf_counter() - self._t_proposed,
        )
        self._key = (accepted, tokens[-1])
        self._done += len(tokens)

    def end(self, done: int) -> None:
        """The generation is over: tell the speculator (a fault only marks the session)."""
        if self._started and not self.session.faulted:
            try:
                self.session.channel.end()
            except SpeculatorFault as err:
                self.session._fault(self.stats, err, done)
