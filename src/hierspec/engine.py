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
processed target. Draft and verification use separate RNG streams derived from `seed` and keyed
by position (`hierspec.rng.Streams`): with a deterministic draft (n-gram, suffix, greedy drafts)
every row emits the token plain sampling draws at its position, so a seeded text equals plain
decoding's with that seed whatever draft lengths were chosen; with a stochastic draft it is
reproducible for the same sequence of draft lengths.

Device: the target, the tensors fed to it and to the rule, and both RNG streams live on
``target.device``; the committed context stays on the CPU, where drafters read it. Each step
syncs with the host once, to commit (see `hierspec.step`).
Optional capabilities are typed protocols checked with ``isinstance``: a `TreeModel` target and a
`TreeDrafter` for tree steps, a `FeatureDrafter` (EAGLE) to receive the target's hidden states.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from .drafters.base import Drafter, StepObserver, TreeDrafter, TreeSpec
from .models.base import LanguageModel, PrefillModel, tree_support
from .output import Output
from .rng import Streams
from .sampling import SamplingParams
from .stats import SpecStats
from .step import StepContext, speculative_step, tree_step
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
    stats: SpecStats | None = None,
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
    tree: draft a tree of this shape each step instead of a chain (`tree_step`; the drafter must be
    a `TreeDrafter` (``propose_tree``), the target a `TreeModel` (``forward_tree`` / ``compact``);
    ``rule`` and ``gamma`` are unused:
    trees are verified by exact recursive rejection sampling, depth caps the tokens per step;
    ``on_verify`` is not called for tree steps: `hierspec.verify.tree.tree_law` is their law).

    A `FeatureDrafter` (EAGLE) receives the target's last hidden states of every committed
    position through ``observe_target`` (prefill and each verification); a `StepObserver` each
    step's outcome through ``observe_step`` (the SSD verifier's remote drafter records rounds).
    stats: a `SpecStats` (or subclass) to fill instead of a new one.

    Device: everything runs on ``target.device`` (see module docstring); a prompt tensor may live
    anywhere, the committed context is kept on the CPU.
    """
    params = params or SamplingParams()
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).cpu()
    if prompt.dim() == 1:
        prompt = prompt[None]
    check_generate_args(target, prompt, drafter, gamma, max_new_tokens)
    verify_rule = get_rule("greedy" if params.greedy else rule)
    if tree is not None:
        _check_tree_args(target, drafter, tree, prompt.shape[1])
    output = Output(
        eos_token_id=eos_token_id, stop_strings=stop_strings, tokenizer=tokenizer, on_tokens=on_tokens
    )
    stats = stats if stats is not None else SpecStats()
    stats.prompt_tokens = prompt.shape[1]
    streams = Streams(seed, target.device)
    ctx = StepContext(target, drafter, verify_rule, params, streams, stats, validate, on_verify)
    room = target.max_length - prompt.shape[1]
    budget_total = min(max_new_tokens, room)

    with _torch_threads(getattr(target, "torch_threads", None)):
        return _run(ctx, prompt, gamma, output, tree, budget_total)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` (a backend's ``torch_threads``) for the block."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _run(
    ctx: StepContext,
    prompt: torch.Tensor,
    gamma: int,
    output: Output,
    tree: TreeSpec | None,
    budget_total: int,
) -> GenerationResult:
    """`generate`'s loop, its arguments checked (see module docstring)."""
    target, drafter, stats = ctx.model, ctx.drafter, ctx.stats
    wants_hidden = ctx.wants_hidden
    observer = drafter if isinstance(drafter, StepObserver) else None
    t0 = time.perf_counter()
    target.reset()
    if drafter is not None:
        drafter.reset()
    if prompt.shape[1] > 1 and isinstance(target, PrefillModel) and not wants_hidden:
        target.prefill(prompt[:, :-1].to(target.device))  # no logits: nobody reads them
    elif prompt.shape[1] > 1:
        out = target.forward(prompt[:, :-1].to(target.device), output_hidden=wants_hidden)
        if wants_hidden:
            drafter.observe_target(0, out.hidden[0])
    stats.time_prefill = time.perf_counter() - t0

    # the committed context lives in one buffer; each step reads a view of its first n tokens
    # (those never change), so committing costs no concatenation
    n = prompt.shape[1]
    buf = torch.empty((1, n + budget_total), dtype=torch.long)
    buf[:, :n] = prompt
    host = buf.numpy()
    context = buf[:, :n]
    t_start = time.perf_counter()
    while len(output.tokens) < budget_total:
        budget = budget_total - len(output.tokens)
        k_max = min(gamma, budget - 1)
        spec = _fit_tree(tree, budget, target.max_length - n)
        if spec is not None:
            res = tree_step(ctx, context, spec)
        else:
            res = speculative_step(ctx, context, k_max)
        if observer is not None:
            observer.observe_step(res.drafted, res.accepted, res.tokens)
        step = output.commit(res.tokens)  # EOS / stop-string cut, streaming (`hierspec.output`)
        host[0, n : n + len(step)] = step
        n += len(step)
        context = buf[:, :n]
        if output.done:
            break
    stats.time_decode = time.perf_counter() - t_start
    stats.num_generated_tokens = len(output.tokens)
    return GenerationResult(output.tokens, output.finish, stats, output.text(), prompt[0].tolist())


def _check_tree_args(target: LanguageModel, drafter: Drafter | None, tree: TreeSpec, prompt_len: int) -> None:
    """ValueError for a tree run that cannot work: no tree drafter / target, or a tree that does
    not fit the target's context."""
    if not isinstance(tree, TreeSpec):
        raise ValueError(f"tree: expected a TreeSpec, got {type(tree).__name__}")
    if not isinstance(drafter, TreeDrafter):
        name = type(drafter).__name__ if drafter is not None else "none"
        raise ValueError(
            f"tree: the drafter ({name}) cannot draft trees (it is no TreeDrafter: no propose_tree); "
            "use an EAGLE drafter (--method eagle)"
        )
    why = tree_support(target)
    if why is not None:
        raise ValueError(f"tree: {why}")
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
