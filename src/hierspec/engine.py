"""The decode loop: propose -> verify -> commit -> roll back.

Invariant between steps: the committed sequence is ``context`` [1, L] (prompt + generated), and
the target's cache holds its first L - 1 tokens — the last committed token is fed at the start of
the next step, together with the draft:

    draft  = drafter.propose(context, k)                        X_1..X_k with rows q (or one-hot)
    logits = target.forward([x_L, X_1..X_k])                    rows p_1..p_{k+1}
    tau, Y = rule(X, q, process(logits))                        exact: output ~ target
    commit X_1..X_tau, Y;  target.crop(L + tau)                 cache = committed minus last

Plain autoregressive decoding is the same loop with k = 0 (no drafter): one row, Y ~ p_1.
At temperature 0 the greedy rule runs on the raw logits (only the argmax matters), so the output
is token-identical to plain greedy decoding; at T > 0 target rows are processed with the same
`SamplingParams` as the draft's, and the chosen rule keeps the output distributed exactly as the
processed target. Draft and verification use separate RNG streams derived from `seed`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from .drafters.base import Drafter, TreeSpec
from .models.base import LanguageModel
from .sampling import SamplingParams, make_generators
from .stats import SpecStats
from .step import speculative_step, tree_step
from .verify import get_rule


@dataclass
class GenerationResult:
    """New tokens (prompt excluded), why generation stopped, the text if a tokenizer was given,
    and the statistics."""

    token_ids: list[int]
    finish_reason: str  # "length" | "eos" | "stop"
    stats: SpecStats
    text: str | None = None
    prompt_ids: list[int] = field(default_factory=list)


def check_generate_args(
    target: LanguageModel,
    prompt: torch.Tensor,
    drafter: Drafter | None,
    gamma: int,
    max_new_tokens: int,
) -> None:
    """`generate`'s argument checks (shared with other decode loops, e.g. `hierspec.ssd`):
    ValueError naming the argument and what was expected."""
    if prompt.dim() != 2 or prompt.shape[0] != 1:
        raise ValueError(f"prompt_ids: expected shape [1, L] (batch size 1), got {tuple(prompt.shape)}")
    if prompt.shape[1] == 0:
        raise ValueError("prompt_ids: the prompt is empty; give at least one token")
    if prompt.shape[1] >= target.max_length:
        raise ValueError(
            f"prompt_ids: the prompt has {prompt.shape[1]} tokens but the target's context holds "
            f"{target.max_length}; shorten it"
        )
    lo, hi = int(prompt.min()), int(prompt.max())
    if lo < 0 or hi >= target.vocab_size:
        raise ValueError(f"prompt_ids: token ids must lie in [0, {target.vocab_size}), got [{lo}, {hi}]")
    if not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma: expected an integer >= 1 (draft tokens per step), got {gamma!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens!r}")
    dv = getattr(drafter, "vocab_size", None)
    if drafter is not None and dv is not None and dv != target.vocab_size:
        raise ValueError(
            f"drafter: its vocabulary has {dv} tokens but the target's has {target.vocab_size}; "
            "a draft model must share the target's tokenizer"
        )


def generate(
    target: LanguageModel,
    prompt_ids: torch.Tensor | Sequence[int],
    *,
    drafter: Drafter | None = None,
    rule: str = "token",
    gamma: int = 5,
    params: SamplingParams | None = None,
    max_new_tokens: int = 128,
    eos_token_id: int | Sequence[int] | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    seed: int | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
    validate: bool = False,
    on_verify: Callable[[dict], None] | None = None,
    tree: TreeSpec | None = None,
) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens after `prompt_ids` (see module docstring).

    rule: "token" | "block" | "hsd" (ignored at temperature 0, where "greedy" runs).
    eos_token_id: stop after emitting it (it is kept in the output). stop_strings: stop once the
    decoded new text contains one (needs `tokenizer`); the text is cut after it.
    on_tokens: called with the newly committed token ids after every step (streaming).
    validate: check the verifier's inputs every step (slow; for debugging drafters).
    on_verify: called after every verification (before the step is committed) with a dict
    ``draft_tokens`` [1, k] (k = 0: no draft), ``draft_probs`` [1, k, V] or None (deterministic),
    ``target_rows`` [1, k+1, V] (processed probabilities; raw logits at temperature 0) and
    ``num_accepted`` (int) -- what ``RULES[rule].law`` needs for the exact acceptance law of
    that draft. Read-only views of engine tensors; the time it takes counts in ``time_decode``.
    tree: draft a tree of this shape each step instead of a chain (`tree_step`; the drafter needs
    ``propose_tree``, the target ``forward_tree`` / ``compact``; ``rule`` and ``gamma`` are unused:
    trees are verified by exact recursive rejection sampling, depth caps the tokens per step;
    ``on_verify`` is not called for tree steps: `hierspec.verify.tree.tree_law` is their law).

    A drafter with ``wants_target_hidden`` (EAGLE) receives the target's last hidden states of
    every committed position through ``observe_target`` (prefill and each verification).
    """
    params = params or SamplingParams()
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long)
    if prompt.dim() == 1:
        prompt = prompt[None]
    check_generate_args(target, prompt, drafter, gamma, max_new_tokens)
    verify_rule = get_rule("greedy" if params.greedy else rule)
    if tree is not None:
        _check_tree_args(target, drafter, tree, prompt.shape[1])
    wants_hidden = bool(getattr(drafter, "wants_target_hidden", False))
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings: a tokenizer is needed to match stop strings")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or ()))
    g_draft, g_verify = make_generators(seed)
    stats = SpecStats(prompt_tokens=prompt.shape[1])
    room = target.max_length - prompt.shape[1]
    budget_total = min(max_new_tokens, room)
    finish = "length"

    t0 = time.perf_counter()
    target.reset()
    if drafter is not None:
        drafter.reset()
    if prompt.shape[1] > 1:
        out = target.forward(prompt[:, :-1].to(target.device), output_hidden=wants_hidden)
        if wants_hidden:
            drafter.observe_target(0, out.hidden[0])
    stats.time_prefill = time.perf_counter() - t0

    context = prompt
    new: list[int] = []
    t_start = time.perf_counter()
    while len(new) < budget_total:
        budget = budget_total - len(new)
        k_max = min(gamma, budget - 1)
        spec = _fit_tree(tree, budget, target.max_length - context.shape[1])
        if spec is not None:
            res = tree_step(target, context, drafter, spec, params, g_verify, stats, validate)
        else:
            res = speculative_step(
                target,
                context,
                drafter,
                verify_rule,
                k_max,
                params,
                g_draft,
                g_verify,
                stats,
                validate,
                on_verify,
            )
        step = res.tokens

        for i, tok in enumerate(step):
            if tok in eos:
                step = step[: i + 1]
                finish = "eos"
                break
        new.extend(step)
        context = torch.cat([context, torch.tensor([step], dtype=torch.long)], 1)
        if stop_strings:
            text = tokenizer.decode(new, skip_special_tokens=False)
            hit = _find_stop(text, stop_strings)
            if hit is not None:
                new, step = _cut_at_stop(new, step, tokenizer, hit, stop_strings)
                finish = "stop"
        if on_tokens is not None and step:
            on_tokens(step)
        if finish != "length":
            break
    stats.time_decode = time.perf_counter() - t_start
    stats.num_generated_tokens = len(new)
    text = None
    if tokenizer is not None:
        text = tokenizer.decode(new, skip_special_tokens=True)
        if finish == "stop":
            end = _find_stop(text, stop_strings)
            if end is not None:
                text = text[:end]
    return GenerationResult(new, finish, stats, text, prompt[0].tolist())


def _check_tree_args(target: LanguageModel, drafter: Drafter | None, tree: TreeSpec, prompt_len: int) -> None:
    """ValueError for a tree run that cannot work: no tree drafter / target, or a tree that does
    not fit the target's context."""
    if not isinstance(tree, TreeSpec):
        raise ValueError(f"tree: expected a TreeSpec, got {type(tree).__name__}")
    if drafter is None or not hasattr(drafter, "propose_tree"):
        raise ValueError("tree: the drafter cannot draft trees (it has no propose_tree); use --method eagle")
    if not (hasattr(target, "forward_tree") and hasattr(target, "compact")):
        raise ValueError(f"tree: the target {type(target).__name__} has no tree-attention forward")
    if prompt_len - 1 + tree.budget + 1 > target.max_length:
        raise ValueError(
            f"tree budget: {tree.budget} nodes after a {prompt_len}-token prompt exceed the target's "
            f"context of {target.max_length} positions"
        )


def _fit_tree(tree: TreeSpec | None, budget: int, room: int) -> TreeSpec | None:
    """The tree shape for a step that may emit `budget` more tokens with `room` free positions
    (depth <= budget - 1: a path of d nodes emits d + 1 tokens; nodes <= room); None = no tree."""
    if tree is None or budget <= 1 or room < 1:
        return None
    return replace(tree, depth=min(tree.depth, budget - 1), budget=min(tree.budget, room))


def _find_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """End index of the earliest stop-string occurrence in text, or None."""
    ends = [text.find(s) + len(s) for s in stop_strings if s and s in text]
    return min(ends) if ends else None


def _cut_at_stop(
    new: list[int], step: list[int], tokenizer, end: int, stop_strings: Sequence[str]
) -> tuple[list[int], list[int]]:
    """Drop the tokens after the one that completes the stop string."""
    base = len(new) - len(step)
    for i in range(len(step)):
        if (
            _find_stop(tokenizer.decode(new[: base + i + 1], skip_special_tokens=False), stop_strings)
            is not None
        ):
            return new[: base + i + 1], step[: i + 1]
    return new, step
