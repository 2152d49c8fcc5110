"""One speculative step: propose -> one target forward -> verify -> commit -> roll back.

Precondition: ``model``'s cache holds ``context[:, :-1]`` (every committed token but the last).

    draft   = drafter.propose(context, k)                     X_1..X_k, rows q (or one-hot)
    logits  = model.forward([x_L, X_1..X_k])                  rows p_1..p_{k+1}
    tau, Y  = rule(X, q, process(logits))
    emitted = X_1..X_tau, Y;   model.crop(L + tau)            cache = new context minus its last

The emitted tokens are distributed exactly as ``model``'s (processed) autoregressive law, and the
processed row of every emitted token is p_1..p_{tau+1}: token t was emitted with conditional law
p_t given the tokens before it. A hierarchy level hands exactly these full rows up as its q (the
residual a correction token was drawn from would be biased; see `hierarchy.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .drafters.base import Draft, Drafter, TreeDrafter, TreeSpec
from .models.base import LanguageModel
from .sampling import SamplingParams, check_logits, process_logits
from .stats import SpecStats
from .verify import Rule
from .verify.tree import verify_tree, verify_tree_greedy


@dataclass
class StepResult:
    """Tokens emitted by one step, their processed rows [n, V] (None at temperature 0), and the
    number of draft tokens proposed and accepted."""

    tokens: list[int]
    rows: torch.Tensor | None
    drafted: int
    accepted: int


def speculative_step(
    model: LanguageModel,
    context: torch.Tensor,
    drafter: Drafter | None,
    rule: Rule,
    k_max: int,
    params: SamplingParams,
    g_draft: torch.Generator,
    g_verify: torch.Generator,
    stats: SpecStats | None = None,
    validate: bool = False,
    on_verify: Callable[[dict], None] | None = None,
) -> StepResult:
    """One step at batch size 1 (see module docstring); times go into `stats` if given.

    on_verify, if given, receives {draft_tokens [1,k], draft_probs [1,k,V] | None, target_rows
    [1,k+1,V] (processed; raw logits at temperature 0), num_accepted} after verification: what
    ``rule.law`` needs for the exact acceptance law of that draft.
    """
    t = time.perf_counter()
    if drafter is not None and k_max > 0:
        draft = drafter.propose(context, k_max, params, g_draft)
    else:
        draft = Draft.empty(1)
    k = draft.num_tokens
    t1 = time.perf_counter()
    inp = torch.cat([context[:, -1:], draft.tokens.cpu()], 1).to(model.device)
    wants_hidden = getattr(drafter, "wants_target_hidden", False)
    fwd = model.forward(inp, output_hidden=wants_hidden)
    logits = fwd.logits  # [1, k+1, V]
    t2 = time.perf_counter()
    if params.greedy:
        check_logits(logits)
        rows, q = logits, None
    else:
        rows = process_logits(logits, params)
        q = None if draft.probs is None else draft.probs.to(rows.device, rows.dtype)
    t3 = time.perf_counter()
    out = rule(draft.tokens.to(rows.device), q, rows, g_verify, validate=validate)
    tau = int(out.num_accepted[0])
    tokens = [*draft.tokens[0, :tau].tolist(), int(out.next_token[0])]
    t4 = time.perf_counter()
    model.crop(context.shape[1] + tau)
    if wants_hidden:  # features of the root and the accepted tokens (a feature-level drafter)
        drafter.observe_target(context.shape[1] - 1, fwd.hidden[0, : tau + 1])
    t5 = time.perf_counter()
    if on_verify is not None:
        on_verify({"draft_tokens": draft.tokens, "draft_probs": q, "target_rows": rows, "num_accepted": tau})
    if stats is not None:
        stats.time_draft += t1 - t
        stats.time_target_forward += t2 - t1
        stats.time_logits_processing += t3 - t2
        stats.time_verify_rule += t4 - t3
        stats.time_rollback += t5 - t4
        stats.record_step(k, tau)
    return StepResult(tokens, None if params.greedy else rows[0, : tau + 1], k, tau)


def tree_step(
    model: LanguageModel,
    context: torch.Tensor,
    drafter: TreeDrafter,
    spec: TreeSpec,
    params: SamplingParams,
    g_verify: torch.Generator,
    stats: SpecStats | None = None,
    validate: bool = False,
) -> StepResult:
    """One tree step (EAGLE / SpecInfer): draft a tree, verify ALL its nodes in one target forward
    with a tree attention mask, walk it with exact recursive rejection sampling, keep only the
    accepted path in the target's KV cache.

    Precondition as `speculative_step`; the model needs ``forward_tree`` and ``compact``::

        tree    = drafter.propose_tree(context, spec)        node 0 = x_L, parents[0] = -1
        rows    = model.forward_tree(tokens, parents)        row i = p(. | context, path to i)
        path, Y = verify_tree(parents, tokens, rows)         one-hot proposals: exact
        emitted = tokens[path], Y;  model.compact(L-1, [0] + path)
    """
    t = time.perf_counter()
    tree = drafter.propose_tree(context, spec, params)
    t1 = time.perf_counter()
    start = context.shape[1] - 1
    wants_hidden = getattr(drafter, "wants_target_hidden", False)
    fwd = model.forward_tree(tree.tokens[None].to(model.device), tree.parents, output_hidden=wants_hidden)
    t2 = time.perf_counter()
    if params.greedy:
        check_logits(fwd.logits)
        rows, t2b = None, t2
        out = verify_tree_greedy(tree.parents, tree.tokens, fwd.logits[0])
    else:
        rows = process_logits(fwd.logits, params)[0]
        t2b = time.perf_counter()
        out = verify_tree(
            tree.parents, tree.tokens, rows, None, mode="deterministic", generator=g_verify, validate=validate
        )
    t3 = time.perf_counter()
    keep = [0, *out.path]
    model.compact(start, keep)
    if wants_hidden:
        drafter.observe_target(start, fwd.hidden[0, keep])
    tau = len(out.path)
    tokens = [*tree.tokens[out.path].tolist(), int(out.next_token)]
    t4 = time.perf_counter()
    if stats is not None:
        stats.time_draft += t1 - t
        stats.time_target_forward += t2 - t1
        stats.time_logits_processing += t2b - t2
        stats.time_verify_rule += t3 - t2b
        stats.time_rollback += t4 - t3
        stats.record_step(tree.num_nodes, tau)
    return StepResult(tokens, None if rows is None else rows[keep], tree.num_nodes, tau)
