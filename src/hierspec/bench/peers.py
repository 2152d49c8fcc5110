"""Peers in the same run, on the same prompts: HF transformers' own decoding modes on the same
underlying model, and llama.cpp's own loops on the same GGUF.

* ``hf-ngram``: ``model.generate(prompt_lookup_num_tokens=gamma, max_matching_ngram_size=3)``;
  ``hf-draft:MODEL``: assisted generation (``assistant_model=``, constant schedule of gamma,
  confidence threshold 0; at gamma ``auto`` HF's own defaults: up to 20 tokens, stopping where the
  assistant's confidence falls below a threshold that starts at 0.4 each call and adapts within
  it); ``hf-early-exit:L``: HF's LayerSkip self-speculation. ``top_k=0`` so HF's implicit
  top-k 50 does not apply.
* ``llama-ar``: llama-cpp-python's high-level ``Llama.generate`` loop (plain decoding);
  ``llama-pld``: the same loop with ``LlamaPromptLookupDecoding(num_pred_tokens=gamma)``. Both run
  on a `Llama` object over the target's GGUF file, loaded once per run; the time covers the whole
  call (prefill included), as for every other row. Settings: the target's context (``n_ctx``),
  batch (``n_batch``, prompts longer than it are evaluated in chunks) and threads;
  ``logits_all=True`` with a draft (see `_llama`). Like hierspec's engine, a run stops at the
  context end: at most ``n_ctx - len(prompt)`` new tokens (`llama_room`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

from ..methods import hf_module
from .config import HF_PLD_MAX_NGRAM, Cell

__all__ = ["HF_ASSISTED_DEFAULTS", "llama_room", "run_hf", "run_llama"]

#: transformers' defaults for assisted generation (GenerationConfig): num_assistant_tokens and
#: assistant_confidence_threshold (schedule "constant"); the hf-draft cell at gamma auto
HF_ASSISTED_DEFAULTS = (20, 0.4)


def _row(new: list[int], eos: int | None, t_call: float) -> dict:
    finish = "eos" if new and eos is not None and new[-1] == eos else "length"
    return {
        "new_tokens": len(new),
        "finish_reason": finish,
        "token_ids": new,
        "time_s": t_call,
        "time_call_s": t_call,
        "time_analysis_s": 0.0,
        "times": None,
        "target_forwards": None,
        "mean_acceptance_length": None,
    }


def run_hf(runner: Any, cell: Cell, ids: list[int], seed: int, max_new: int) -> dict:
    """One HF transformers generation of ``cell`` (see module docstring)."""
    model = hf_module(runner.target)
    inp = torch.tensor([ids], dtype=torch.long, device=model.device)
    kw: dict[str, Any] = {
        "input_ids": inp,
        "attention_mask": torch.ones_like(inp),
        "max_new_tokens": max_new,
        "eos_token_id": runner.eos_token_id,
        "pad_token_id": runner.eos_token_id,
    }
    if cell.temperature > 0:
        kw.update(do_sample=True, temperature=cell.temperature, top_k=0, top_p=runner.cfg.top_p)
    else:
        kw.update(do_sample=False)
    options = runner.built(cell).options  # what the registry's peer build gathered
    if options.get("prompt_lookup"):
        kw.update(prompt_lookup_num_tokens=cell.gamma, max_matching_ngram_size=HF_PLD_MAX_NGRAM)
    elif "early_exit" in options:
        # HF's LayerSkip self-speculation: the first L layers + the model's own norm and LM head
        kw.update(assistant_early_exit=options["early_exit"], num_assistant_tokens=cell.gamma)
    else:
        assistant = hf_module(options["assistant"])
        # HF reads these from the assistant's generation_config; pass them both ways
        gc = assistant.generation_config
        gamma, threshold = (cell.gamma, 0.0) if cell.gamma else HF_ASSISTED_DEFAULTS
        gc.num_assistant_tokens = gamma
        gc.num_assistant_tokens_schedule = "constant"
        gc.assistant_confidence_threshold = threshold
        kw.update(
            assistant_model=assistant,
            num_assistant_tokens=gamma,
            num_assistant_tokens_schedule="constant",
            assistant_confidence_threshold=threshold,
        )
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**kw)
    t_call = time.perf_counter() - t0
    return _row(out[0, inp.shape[1] :].tolist(), runner.eos_token_id, t_call)


#: llama.cpp pads a context to a multiple of this many positions
CTX_PAD = 256


def _llama(runner: Any, draft_tokens: int | None) -> Any:
    """llama-cpp-python's `Llama` over the target's GGUF (one per prompt-lookup length, cached on
    the runner), with the target's context, batch size and threads. Two traps of `Llama`
    (llama_cpp/llama.py, 0.3.x), both on long contexts:

    * With a draft model it decodes with logits for every position and ``eval`` stores them in
      ``self.scores[n_past : n_past + n]``, but ``__init__`` sizes that array by the *argument*
      ``logits_all``: ``np.ndarray((n_ctx if logits_all == True else n_batch, n_vocab))``. With
      the default ``logits_all=False`` every position past ``n_batch`` (a long prompt, or a prompt
      plus its output) fails with "could not broadcast input array from shape (n*n_vocab,) into
      shape (0,)". So ``logits_all=True`` with a draft (rows are paged in only as they are used).
    * ``input_ids`` and ``scores`` have the ``n_ctx`` asked for, but the draft tokens are capped by
      the context's own ``n_ctx()``, which llama.cpp pads up to a multiple of 256: near the end of
      a 640-token context a draft overflows ``input_ids``. So ``n_ctx`` is asked padded already
      (and once more with what the context reports, should it still differ); the runs stop at the
      target's own context all the same (`run_llama`)."""
    cache = runner.__dict__.setdefault("_llama_peers", {})
    if draft_tokens not in cache:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        target = runner.target

        def make(n_ctx: int) -> Any:
            draft = LlamaPromptLookupDecoding(num_pred_tokens=draft_tokens) if draft_tokens else None
            with _same_buffers_as(target):
                return Llama(
                    model_path=str(target.path),
                    n_ctx=n_ctx,
                    n_threads=target.n_threads,
                    n_threads_batch=target.n_threads,
                    n_batch=target.n_batch,
                    n_ubatch=target.n_batch,  # as LlamaCppModel: one physical batch per chunk
                    logits_all=draft is not None,
                    flash_attn=True,  # the kernels hierspec's LlamaCppModel uses (batch-invariant rows)
                    draft_model=draft,
                    verbose=False,
                )

        n_ctx = -(-int(target.max_length) // CTX_PAD) * CTX_PAD
        llm = make(n_ctx)
        if llm.n_ctx() != n_ctx:
            llm = make(llm.n_ctx())
        cache[draft_tokens] = llm
    return cache[draft_tokens]


@contextlib.contextmanager
def _same_buffers_as(target: Any) -> Iterator[None]:
    """Load the peer with the target's choice of llama.cpp extra buffer types: on AMX hosts the
    AMX matmul path of this build crashes on Q4 weights, so `LlamaCppModel` turns it off, and
    `Llama` (which has no such option) gets the same model parameters here."""
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params
    use_extra = bool(getattr(target, "extra_buffers", True))

    def params() -> Any:
        p = original()
        p.use_extra_bufts = use_extra
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = original


def llama_room(n_ctx: int, prompt_tokens: int, max_new: int) -> int:
    """New tokens a run may emit in a context of ``n_ctx``: ``max_new``, at most up to the
    context end (the last emitted token is never evaluated). ValueError if the prompt fills it."""
    room = n_ctx - prompt_tokens
    if room <= 0:
        raise ValueError(
            f"the prompt of {prompt_tokens} tokens fills the llama.cpp peer's context of {n_ctx} tokens"
        )
    return min(max_new, room)


def run_llama(runner: Any, cell: Cell, ids: list[int], seed: int, max_new: int) -> dict:
    """One generation with llama-cpp-python's own loop on the target's GGUF (see module docstring)."""
    lookup = runner.built(cell).options.get("prompt_lookup")
    llm = _llama(runner, cell.gamma if lookup else None)
    # the target's context (llama.cpp may round the peer's up, e.g. 640 -> 768): as hierspec AR
    max_new = llama_room(min(llm.n_ctx(), runner.target.max_length), len(ids), max_new)
    llm.reset()  # else `generate` silently reuses the KV cache of the previous call's common prefix
    llm.set_seed(seed % 2**31)
    kw: dict[str, Any] = {"reset": True}
    if cell.temperature > 0:
        kw.update(temp=cell.temperature, top_k=0, top_p=runner.cfg.top_p, min_p=0.0)
    else:
        kw.update(temp=0.0, top_k=1)
    new: list[int] = []
    eos = runner.eos_token_id
    t0 = time.perf_counter()
    for tok in llm.generate(ids, **kw):
        new.append(int(tok))
        if tok == eos or len(new) >= max_new:
            break
    t_call = time.perf_counter() - t0
    return _row(new, eos, t_call)
