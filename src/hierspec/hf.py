"""hierspec inside transformers' ``generate``: a ``custom_generate`` bridge (transformers 5.23).

    out = model.generate(**inputs, custom_generate=hierspec.hf.generate, assistant_model=draft,
                         method="draft", rule="block", gamma="auto", do_sample=True, temperature=0.7,
                         max_new_tokens=128, return_dict_in_generate=True)
    out.sequences                          [1, L + n] prompt + new tokens, as transformers returns
    out.hierspec_stats                     `hierspec.stats.SpecStats` (vLLM's names), out.hierspec_method
    model.generate(**inputs, custom_generate=hierspec.hf.CUSTOM_GENERATE_DIR, trust_remote_code=True)

Arguments are transformers' own, with their meanings (``do_sample``, ``temperature``, ``top_k``,
``top_p``, ``min_p``, ``max_new_tokens`` / ``max_length``, ``eos_token_id`` (an id or a list),
``pad_token_id``, ``stop_strings`` + ``tokenizer``, ``max_time``, ``stopping_criteria``,
``streamer``, ``return_dict_in_generate``, ``generation_config``), validated by transformers
itself: whatever it rejects raises its own error. Plus hierspec's:

    method   a method spec (`hierspec.methods`, e.g. ``ngram``, ``suffix``, ``draft:small``,
             ``hierarchy:ngram+assistant@3``, ``eagle``, ``hispec``); ``assistant`` names the
             ``assistant_model=`` (a transformers model with the target's vocabulary) and
             ``draft`` means ``draft:assistant``; ``default``: ``draft:assistant`` with an
             assistant, else ``ngram``. Every method whose loop is the engine's runs (not
             ``ssd`` (its own process) nor the ``hf-*`` / ``llama-*`` peers).
    rule     verification rule at temperature > 0: token | block | hsd | match.
    draft_sampling   how a draft model drafts at temperature > 0: "sample" (from its q, the
             default) or "greedy" (its argmax, the engines' practice); only for methods with a
             draft model.
    gamma    draft tokens per step, an integer >= 1, or "auto" (the adaptive policy).
    seed     hierspec's RNG streams; None draws one from torch's default generator, so
             ``torch.manual_seed`` / ``transformers.set_seed`` make runs reproducible.

Law: the new tokens are distributed exactly as transformers' own sampling of ``model`` with the
same settings (temperature, top-k, top-p, min-p in transformers' order), token-identical to
``do_sample=False`` greedy decoding up to floating-point ties; stopping is evaluated after every
token as transformers' ``_sample`` does, so a step that overshoots a stop string, ``max_time``
or a custom criterion is cut where plain decoding would have stopped. Batch size 1.

How transformers 5.23 calls a ``custom_generate`` (``generation/utils.py``):

* callable: ``generate`` validates and prepares everything (``generation_config`` merged with
  the keyword arguments, the logits processors and stopping criteria it would use, the prompt
  already put into the streamer), then calls ``fn(model, input_ids, logits_processor=,
  stopping_criteria=, generation_config=, **model_kwargs)`` plus the keyword arguments named in
  ``fn``'s own signature that ``_sample``'s lacks. It drops ``assistant_model`` and ``streamer``
  (it rebuilds the mode's arguments from those extra names only), so they are read from the
  calling ``generate`` frame; ``attention_mask`` arrives in ``model_kwargs`` (naming it in the
  signature would make transformers pass it twice).
  It drops ``tokenizer=`` too and then refuses ``stop_strings`` itself ("could not locate a
  tokenizer"): stop strings need the folder form or a direct call.
* directory (``custom_generate="DIR"``, ``DIR/custom_generate/generate.py``) and a direct call
  ``hierspec.hf.generate(model, input_ids, ...)``: ``generate`` passes its raw arguments
  (``model=``, ``inputs=``, ``generation_config=``, ..., ``**kwargs``); this function hands them
  back to transformers' ``generate`` with itself as the callable, so both forms are validated and
  prepared by transformers in the same way (stop strings and their tokenizer are carried past).

Output: ``hierspec_stats`` and ``hierspec_method`` are attributes of what is returned (the dict
output, or the tensor, where any tensor operation drops them: prefer ``return_dict_in_generate``).
A streamer's exception propagates as it is and nothing is returned; the next call starts afresh.
State: what a method builds (suffix decoding's earlier outputs, the adaptive policy's learned
costs) is kept on the model (attribute ``_hierspec_bridge``, the last 8 combinations of method,
rule, gamma and assistant) and freed with it.

Logits processing beyond temperature / top-k / top-p / min-p (repetition penalty, bad words,
min length, ...) is refused (ValueError naming the processor): the verifier needs the same
processing on every row, and those depend on the tokens sampled so far.
"""

from __future__ import annotations

import copy
import re
import sys
import time
import weakref
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .drafters.model import check_draft_sampling
from .methods import ENTRIES, Built, MethodSpec, ModelSet, build_method, parse_method
from .sampling import SamplingParams
from .stats import SpecStats
from .verify import RULES

__all__ = [
    "ASSISTANT",
    "CUSTOM_GENERATE_DIR",
    "generate",
    "resolve_method",
    "sampling_params",
    "uses_assistant",
]

#: the folder to pass as ``custom_generate=`` (with ``trust_remote_code=True``): it holds
#: ``custom_generate/generate.py`` and ``requirements.txt``, in the layout transformers loads
CUSTOM_GENERATE_DIR = str(Path(__file__).resolve().parent / "hf_custom")

#: the name of ``assistant_model=`` inside a method spec
ASSISTANT = "assistant"
_ASSISTANT_REF = re.compile(rf"(?<=[:+]){ASSISTANT}(?=[@+/]|$)")
_CHAIN_RULES = tuple(r for r in RULES if r != "greedy")
_BUILT_CACHE_SIZE = 8  # methods kept built per target model (drafter state, learned costs)


class _Stop(Exception):
    """A stopping criterion fired inside a step: the committed tokens end here."""


def generate(
    model: Any,
    input_ids: torch.LongTensor | None = None,
    generation_config: Any = None,
    logits_processor: Any = None,
    stopping_criteria: Any = None,
    streamer: Any = None,
    assistant_model: Any = None,
    method: str = "default",
    rule: str = "block",
    gamma: int | str = "auto",
    seed: int | None = None,
    draft_sampling: str = "sample",
    _hierspec_call: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """transformers' ``generate`` with hierspec's decoding (see module docstring); returns a
    LongTensor [1, L + n] or, with ``return_dict_in_generate``, a ``GenerateDecoderOnlyOutput``
    whose ``sequences`` it is; both carry ``hierspec_stats`` and ``hierspec_method``.
    ``_hierspec_call`` is internal (what the re-entered call carries past transformers)."""
    hf = {
        "generation_config": generation_config,
        "logits_processor": logits_processor,
        "stopping_criteria": stopping_criteria,
        "streamer": streamer,
        "assistant_model": assistant_model,
    }
    ours = {"method": method, "rule": rule, "gamma": gamma, "seed": seed, "draft_sampling": draft_sampling}
    caller = _calling_generate()
    try:
        if caller is None:  # the directory form or a direct call: let transformers prepare
            if _hierspec_call is not None:
                raise RuntimeError(
                    "hierspec.hf.generate: transformers' generate did not call the custom_generate "
                    "callable as transformers 5.23 does; this transformers version is not supported"
                )
            return _reenter(model, input_ids, hf, ours, kwargs)
        for name in ("assistant_model", "streamer"):  # transformers 5.23 does not pass them on
            if hf[name] is None:
                hf[name] = caller.f_locals.get(name)
    finally:
        del caller
    criteria = list(stopping_criteria or ())
    if _hierspec_call is not None and _hierspec_call.get("stop_strings") is not None:
        criteria.append(_stop_string_criterion(**_hierspec_call))
    hf["stopping_criteria"] = criteria
    return _run_prepared(model, input_ids, hf, ours, kwargs)


def _reenter(
    model: Any, input_ids: Any, hf: dict[str, Any], ours: dict[str, Any], kwargs: dict[str, Any]
) -> Any:
    """transformers' ``generate`` with `generate` as the callable. transformers 5.23 does not hand
    ``tokenizer=`` to a callable, so stop strings (an argument or ``generation_config``'s) travel
    past it in ``_hierspec_call`` and become transformers' own `StopStringCriteria` there."""
    inputs = kwargs.pop("inputs", None)
    if input_ids is not None:
        kwargs["input_ids"] = input_ids
    call = {"stop_strings": kwargs.pop("stop_strings", None), "tokenizer": kwargs.pop("tokenizer", None)}
    config = hf["generation_config"]
    if config is not None and getattr(config, "stop_strings", None) is not None:
        config = hf["generation_config"] = copy.deepcopy(config)
        if call["stop_strings"] is None:
            call["stop_strings"] = config.stop_strings
        config.stop_strings = None
    return type(model).generate(
        model, inputs, custom_generate=generate, _hierspec_call=call, **hf, **ours, **kwargs
    )


def _stop_string_criterion(stop_strings: Any, tokenizer: Any) -> Any:
    """transformers' `StopStringCriteria`, with its error for stop strings without a tokenizer."""
    from transformers.generation.stopping_criteria import StopStringCriteria

    if tokenizer is None:
        raise ValueError(
            "There are one or more stop strings, either in the arguments to `generate` or in the "
            "model's generation config, but we could not locate a tokenizer. When generating with "
            "stop strings, you must pass the model's tokenizer to the `tokenizer` argument of `generate`."
        )
    return StopStringCriteria(stop_strings=stop_strings, tokenizer=tokenizer)


def _calling_generate() -> Any:
    """The frame of transformers' ``GenerationMixin.generate`` that called `generate` with the
    callable (the prepared form), else None."""
    from transformers.generation.utils import GenerationMixin

    code = _unwrap(GenerationMixin.generate).__code__
    frame = sys._getframe(2)
    if frame.f_code is code and frame.f_locals.get("custom_generate") is generate:
        return frame
    return None


def _unwrap(fn: Any) -> Any:
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


# ----------------------------------------------------------------------------- the prepared form
def _run_prepared(
    model: Any,
    input_ids: torch.Tensor,
    hf: dict[str, Any],
    ours: dict[str, Any],
    model_kwargs: dict[str, Any],
) -> Any:
    """Decode with transformers' prepared arguments ``hf`` and hierspec's ``ours`` (see module
    docstring)."""
    config, streamer, assistant = hf["generation_config"], hf["streamer"], hf["assistant_model"]
    _check_config(config)
    prompt = _prompt(model, input_ids, model_kwargs)  # [1, L'] without left padding
    params = sampling_params(hf["logits_processor"], greedy=not config.do_sample)
    spec = resolve_method(ours["method"], assistant is not None)
    built = _built(model, spec, ours["rule"], _gamma(ours["gamma"]), assistant, ours["draft_sampling"])
    eos = config._eos_token_tensor
    eos_ids = None if eos is None else [int(t) for t in eos.reshape(-1).tolist()]
    budget = int(config.max_length) - input_ids.shape[1]
    done_by_engine = ("MaxLengthCriteria", "EosTokenCriteria")
    extra = [c for c in hf["stopping_criteria"] if type(c).__name__ not in done_by_engine]
    new: list[int] = []
    stats = SpecStats()
    if budget > 0:
        on_tokens = _committer(input_ids, new, extra, streamer)
        t0 = time.perf_counter()
        try:
            kw = {"params": params, "max_new_tokens": budget, "eos_token_id": eos_ids, "seed": ours["seed"]}
            built.generate(prompt[0].tolist(), on_tokens=on_tokens, stats=stats, **kw)
        except _Stop:
            stats.num_generated_tokens = len(new)
            stats.time_decode = time.perf_counter() - t0 - stats.time_prefill
    if streamer is not None:
        streamer.end()
    tail = torch.tensor([new], dtype=torch.long, device=input_ids.device).reshape(1, -1)
    return _output(torch.cat([input_ids, tail], dim=1), config, stats, built.spec.name)


def _prompt(model: Any, input_ids: torch.Tensor | None, model_kwargs: dict[str, Any]) -> torch.Tensor:
    """The prompt [1, L'] to decode: ``input_ids`` less its left padding; ValueError for what
    one sequence of a decoder-only model cannot be."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("hierspec.hf.generate supports decoder-only models; this one is an encoder-decoder")
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("hierspec.hf.generate needs input_ids; inputs_embeds is not supported")
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("hierspec.hf.generate needs a non-empty prompt: input_ids of shape [1, L]")
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"hierspec.hf.generate is only supported for batch_size = 1 (input_ids has batch size "
            f"{input_ids.shape[0]}; num_return_sequences must be 1)"
        )
    mask = model_kwargs.get("attention_mask")
    if mask is None or bool(mask.all()):
        return input_ids
    keep = mask[0].bool()
    first = int(keep.int().argmax())
    if not bool(keep[first:].all()):
        raise ValueError(
            "attention_mask: hierspec.hf.generate accepts left padding only (zeros, then ones); "
            f"got {mask[0].tolist()}"
        )
    return input_ids[:, first:]


#: generation_config settings this bridge cannot honour, with the value that switches them off
_UNSUPPORTED = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
}


def _check_config(config: Any) -> None:
    for name, off in _UNSUPPORTED.items():
        value = getattr(config, name, None)
        if value not in (None, off):
            raise ValueError(f"{name}: hierspec.hf.generate supports only {name}={off!r}, got {value!r}")


_WARPERS = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper")


def sampling_params(processors: Any, *, greedy: bool) -> SamplingParams:
    """`SamplingParams` equal to transformers' prepared ``logits_processor`` list: temperature,
    top-k, top-p and min-p warpers, applied in that order by both (greedy: temperature 0).
    ValueError naming any other processor."""
    found: dict[str, Any] = {}
    for p in processors or ():
        name = type(p).__name__
        if name not in _WARPERS or name in found or getattr(p, "min_tokens_to_keep", 1) != 1:
            raise ValueError(
                f"logits_processor: hierspec.hf.generate applies only temperature, top_k, top_p and "
                f"min_p (the same processing on draft and target rows); got {name}"
            )
        found[name] = p
    order = [n for n in _WARPERS if n in found]
    if [type(p).__name__ for p in processors or ()] != order:
        raise ValueError(f"logits_processor: expected the warpers in transformers' order {order}")
    if greedy:
        return SamplingParams(temperature=0.0)
    top_p = float(found["TopPLogitsWarper"].top_p) if "TopPLogitsWarper" in found else 1.0
    if top_p <= 0:
        raise ValueError(
            "top_p: hierspec.hf.generate needs top_p in (0, 1]; got 0 (do_sample=False is greedy)"
        )
    temperature = found.get("TemperatureLogitsWarper")
    top_k, min_p = found.get("TopKLogitsWarper"), found.get("MinPLogitsWarper")
    return SamplingParams(
        temperature=float(temperature.temperature) if temperature is not None else 1.0,
        top_k=int(top_k.top_k) if top_k is not None else 0,
        top_p=top_p,
        min_p=float(min_p.min_p) if min_p is not None else 0.0,
    )


def _committer(input_ids: torch.Tensor, new: list[int], criteria: list[Any], streamer: Any) -> Any:
    """The engine's ``on_tokens``: append each committed token to ``new``, cut at the first
    token after which a stopping criterion fires (evaluated on prompt + new tokens, as
    transformers' ``_sample`` does after every token), stream what was kept, then `_Stop`."""
    seq = input_ids.cpu()

    def on_tokens(step: list[int]) -> None:
        nonlocal seq
        kept, stop = step, False
        if criteria:
            for i, tok in enumerate(step):
                seq = torch.cat([seq, torch.tensor([[tok]], dtype=torch.long)], dim=1)
                if any(bool(c(seq, None).any()) for c in criteria):
                    kept, stop = step[: i + 1], True
                    break
        new.extend(kept)
        if streamer is not None:
            streamer.put(torch.tensor([kept], dtype=torch.long))
        if stop:
            raise _Stop

    return on_tokens


def _output(sequences: torch.Tensor, config: Any, stats: SpecStats, method: str) -> Any:
    """What transformers' ``generate`` returns, with hierspec's stats as attributes."""
    if config.return_dict_in_generate:
        from transformers.generation import GenerateDecoderOnlyOutput

        out: Any = GenerateDecoderOnlyOutput(sequences=sequences)
    else:
        out = sequences
    out.hierspec_stats = stats
    out.hierspec_method = method
    return out


# ----------------------------------------------------------------------------- methods
def resolve_method(method: str, has_assistant: bool) -> MethodSpec:
    """The method spec ``method`` names (see module docstring), with ``assistant`` standing for
    ``assistant_model=``; ValueError (a `hierspec.methods.MethodError` for the spec itself) for
    a spec that cannot run through this bridge."""
    if not isinstance(method, str) or not method.strip():
        raise ValueError(f"method: expected a method spec such as 'ngram' or 'draft', got {method!r}")
    text = method.strip()
    if text == "default":
        text = f"draft:{ASSISTANT}" if has_assistant else "ngram"
    elif text == "draft":
        text = f"draft:{ASSISTANT}"
    uses = _ASSISTANT_REF.search(text) is not None
    if uses and not has_assistant:
        raise ValueError(f"method {text!r} drafts with the assistant model: pass assistant_model=")
    if has_assistant and not uses:
        raise ValueError(
            f"assistant_model: method {text!r} does not use it (use method='draft', or name it in a "
            f"hierarchy, e.g. 'hierarchy:ngram+{ASSISTANT}@3')"
        )
    spec = parse_method(text) if not uses else _parse_with_assistant(text)
    entry = ENTRIES[spec.kind]
    if entry.runner != "engine" or "llama" in entry.needs:
        runs = [k for k, e in ENTRIES.items() if e.runner == "engine" and "llama" not in e.needs]
        raise ValueError(
            f"method {text!r} runs in its own loop ({entry.runner}), not through custom_generate; "
            f"available: {', '.join(runs)}"
        )
    return spec


def uses_assistant(method: str) -> bool:
    """Whether ``method`` drafts with ``assistant_model=`` (``draft``, ``default``, or a spec
    naming ``assistant``); no parsing, no error."""
    text = method.strip() if isinstance(method, str) else ""
    return text in ("draft", "default") or _ASSISTANT_REF.search(text) is not None


def _parse_with_assistant(text: str) -> MethodSpec:
    """`parse_method` of a spec naming the assistant: parsed with a known draft name standing in
    for it (the grammar checks that a model reference exists), then mapped back."""
    from .models import shipped

    words = set(re.split(r"[:+@/]", text))
    stand_in = next(n for n in (*shipped.DRAFTS, "small", "large") if n not in words)
    spec = parse_method(_ASSISTANT_REF.sub(stand_in, text))

    def back(ref: str | None) -> str | None:
        return ASSISTANT if ref == stand_in else ref

    levels = tuple((back(r), g) for r, g in spec.levels)
    return replace(spec, name=text, path=back(spec.path), levels=levels)


def _gamma(gamma: int | str) -> int:
    """``gamma`` as `build_method` takes it: an integer >= 1, or 0 for "auto"."""
    if isinstance(gamma, str) and gamma.strip().lower() == "auto":
        return 0
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma: expected an integer >= 1 or 'auto', got {gamma!r}")
    return gamma


#: the attribute of a target module holding (its HFModel, OrderedDict of built methods): on the
#: module itself, so that the module and what was built on it are freed together
_SESSION_ATTR = "_hierspec_bridge"


def _built(
    model: Any, spec: MethodSpec, rule: str, gamma: int, assistant: Any, draft_sampling: str = "sample"
) -> Built:
    """The method built on ``model`` (cached per model, method, rule, gamma, draft sampling and
    assistant: a suffix drafter's earlier outputs and the adaptive policy's learned costs carry
    over)."""
    if rule not in _CHAIN_RULES:
        raise ValueError(f"rule: expected one of {', '.join(_CHAIN_RULES)}, got {rule!r}")
    check_draft_sampling(draft_sampling, "draft_sampling")
    session = model.__dict__.get(_SESSION_ATTR)
    if session is None:
        session = (_wrap(model), OrderedDict())
        model.__dict__[_SESSION_ATTR] = session
    target, builts = session
    key = (spec, rule, gamma, draft_sampling, id(assistant), model.dtype, str(model.device))
    hit = builts.get(key)
    if hit is not None and hit[0]() is assistant:
        builts.move_to_end(key)
        return hit[1]
    drafts = {ASSISTANT: _wrap(assistant)} if assistant is not None else {}
    models = ModelSet(target, dtype=model.dtype, backend="torch", drafts=drafts)
    built = build_method(spec, models, rule=rule, gamma=gamma, draft_sampling=draft_sampling)
    ref = weakref.ref(assistant) if assistant is not None else (lambda: None)
    builts[key] = (ref, built)
    while len(builts) > _BUILT_CACHE_SIZE:
        builts.popitem(last=False)
    return built


def _wrap(module: Any) -> Any:
    """``module`` as an `hierspec.models.hf.HFModel`, its train/eval mode left as it was."""
    from .models.hf import HFModel

    if not isinstance(module, torch.nn.Module) or not hasattr(module, "get_output_embeddings"):
        raise ValueError(f"assistant_model: expected a transformers model, got {type(module).__name__}")
    training = module.training
    try:
        return HFModel(module)
    finally:
        module.train(training)
