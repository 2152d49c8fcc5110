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

Device: ``context`` may live anywhere (the engine keeps it on the CPU, where drafters read it);
the model input, the draft's tokens and rows given to the rule, and ``g_verify`` live on
``model.device``. The step's one host sync is the commit: a single ``.tolist()`` of
[tau, emitted tokens] (at temperature > 0, `process_logits` adds its NaN check and the rule its
data-dependent branches; at temperature 0 the finiteness check rides on the commit's sync).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .drafters.base import Draft, Drafter, FeatureDrafter, TreeDrafter, TreeSpec
from .models.base import LanguageModel, TreeModel
from .sampling import SamplingParams, check_logits, invalid_logits_error, process_logits
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
    dev = model.device
    root = context[:, -1:].to(dev)  # [1, 1]; after the last commit's sync: nothing queued to wait for
    if drafter is not None and k_max > 0:
        draft = drafter.propose(context, k_max, params, g_draft)
    else:
        draft = Draft.empty(1, dev)
    k = draft.num_tokens
    t1 = time.perf_counter()
    x = draft.tokens.to(dev)  # [1, k]
    wants_hidden = isinstance(drafter, FeatureDrafter)
    fwd = model.forward(torch.cat([root, x], 1), output_hidden=wants_hidden)
    logits = fwd.logits  # [1, k+1, V]
    t2 = time.perf_counter()
    if params.greedy:
        if validate:
            check_logits(logits)
        rows, q = logits, None
    else:
        rows = process_logits(logits, params)  # raises on NaN / inf logits
        q = None if draft.probs is None else draft.probs.to(rows.device, rows.dtype)
    t3 = time.perf_counter()
    out = rule(x, q, rows, g_verify, validate=validate)
    # The commit's one host sync: [finite, tau, emitted tokens padded with -1].
    finite = torch.isfinite(logits.amax(-1)).all() if params.greedy else torch.ones((), device=dev)
    got = torch.cat([finite.long()[None], out.num_accepted, out.tokens(x)[0]]).tolist()
    if not got[0]:
        raise invalid_logits_error()
    tau = got[1]
    tokens = got[2 : tau + 3]
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
    model: TreeModel,
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

    Precondition as `speculative_step`; ``model`` is a `TreeModel` (``forward_tree`` and
    ``compact``), ``drafter`` a `TreeDrafter` (checked by the engine)::

        tree    = drafter.propose_tree(context, spec)        node 0 = x_L, parents[0] = -1
        rows    = model.forward_tree(tokens, parents)        row i = p(. | context, path to i)
        path, Y = verify_tree(parents, tokens, rows)         one-hot proposals: exact
        emitted = tokens[path], Y;  model.compact(L-1, [0] + path)
    """
    t = time.perf_counter()
    tree = drafter.propose_tree(context, spec, params)
    t1 = time.perf_counter()
    start = context.shape[1] - 1
    wants_hidden = isinstance(drafter, FeatureDrafter)
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
