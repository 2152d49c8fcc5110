"""Peers, run by the bench's peer runners (`hierspec.bench.peers`) on the same prompts:
HF transformers' own decoding modes (``hf-ngram``, ``hf-draft:MODEL``, ``hf-early-exit[:L]``) and
llama.cpp's own loops (``llama-ar``, ``llama-pld``). Their build only gathers what the runner reads
in `Parts.options`:

    prompt_lookup: True     prompt-lookup decoding with gamma tokens (hf-ngram, llama-pld)
    assistant: MODEL        HF assisted generation with this draft (hf-draft)
    early_exit: L           HF's LayerSkip self-speculation from layer L (hf-early-exit)
"""

from __future__ import annotations

from .modelset import ModelSet
from .parts import Parts
from .spec import MethodSpec, ints

__all__ = [
    "build_assisted",
    "build_layerskip",
    "build_own_loop",
    "build_prompt_lookup",
    "parse_hf_early_exit",
]


def parse_hf_early_exit(text: str, arg: str | None) -> MethodSpec:
    from ..models import shipped

    return MethodSpec(
        text, "hf-early-exit", exits=tuple(ints(text, arg, (1,)) if arg else [shipped.DEFAULT_EXITS[0]])
    )


def build_own_loop(spec: MethodSpec, models: ModelSet, rule: str, gamma: int) -> Parts:
    """The peer's plain loop (llama-ar)."""
    return Parts(models.target, None, gamma)


def build_prompt_lookup(spec: MethodSpec, models: ModelSet, rule: str, gamma: int) -> Parts:
    return Parts(models.target, None, gamma, options={"prompt_lookup": True})


def build_assisted(spec: MethodSpec, models: ModelSet, rule: str, gamma: int) -> Parts:
    return Parts(models.target, None, gamma, options={"assistant": models.draft(spec.path)})


def build_layerskip(spec: MethodSpec, models: ModelSet, rule: str, gamma: int) -> Parts:
    return Parts(models.target, None, gamma, options={"early_exit": spec.exits[0]})
