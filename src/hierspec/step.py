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

Phases: `propose` (the draft), `step_input` (the rows fed to the target), the forward,
`verify_rows` (rule + the step's one host sync), then the roll-back. `speculative_step` runs them
for one sequence; the server's batch worker (`hierspec.serve.batch`) runs the forward of many
sequences' rows at once and the other phases per sequence, with the same functions. Everything a
sequence's steps need travels in a `StepContext`; its randomness is keyed by position
(`hierspec.rng.Streams`), so seeded text does not depend on the draft lengths chosen.

Device: ``context`` may live anywhere (the engine keeps it on the CPU, where drafters read it);
the model input, the draft's tokens and rows given to the rule, and the streams live on
``model.device``. The step's one host sync is the commit: a single ``.tolist()`` of
[tau, emitted tokens] (at temperature > 0, `process_logits` adds its NaN check and the rule its
data-dependent branches; at temperature 0 the finiteness check rides on the commit's sync).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .drafters.base import Draft, Drafter, FeatureDrafter, TreeSpec
from .models.base import LanguageModel
from .rng import Streams
from .sampling import SamplingParams, check_logits, invalid_logits_error, process_logits
from .stats import SpecStats
from .verify import Rule, greedy
from .verify.tree import verify_tree, verify_tree_greedy


@dataclass
class StepResult:
    """Tokens emitted by one step, their processed rows [n, V] (None at temperature 0), and the
    number of draft tokens proposed and accepted."""

    tokens: list[int]
    rows: torch.Tensor | None
    drafted: int
    accepted: int


@dataclass
class StepContext:
    """What one sequence's steps read besides its committed context: the model and drafter, the
    rule (greedy at temperature 0), the sampling parameters, the sequence's random `Streams`,
    and optional statistics / validation / a verification hook (see `speculative_step`)."""

    model: LanguageModel
    drafter: Drafter | None
    rule: Rule
    params: SamplingParams
    streams: Streams
    stats: SpecStats | None = None
    validate: bool = False
    on_verify: Callable[[dict], None] | None = None
    wants_hidden: bool = field(init=False)  # a `FeatureDrafter` (checked once: a Protocol check is slow)

    def __post_init__(self) -> None:
        self.wants_hidden = isinstance(self.drafter, FeatureDrafter)


# ------------------------------------------------------------------------------------ phases
def propose(ctx: StepContext, context: torch.Tensor, k_max: int) -> Draft:
    """Phase 1: the draft for a step after ``context`` [1, L] (at most ``k_max`` tokens). Seeds
    the sequence's streams for this step (keyed by L: `hierspec.rng`)."""
    ctx.streams.at(context.shape[1])
    if ctx.drafter is not None and k_max > 0:
        return ctx.drafter.propose(context, k_max, ctx.params, ctx.streams.draft)
    return Draft.empty(1, ctx.model.device)


def step_input(context: torch.Tensor, draft: Draft, device: torch.device) -> torch.Tensor:
    """Phase 2's rows: [x_L, X_1..X_k] as a [1, k + 1] tensor on ``device``."""
    if draft.num_tokens == 0:
        return context[:, -1:].to(device)
    return torch.cat([context[:, -1:].to(device), draft.tokens.to(device)], 1)


def verify_rows(
    ctx: StepContext, context: torch.Tensor, draft: Draft, logits: torch.Tensor
) -> tuple[int, list[int], torch.Tensor | None]:
    """Phase 3: verify ``draft`` against the target's ``logits`` [1, k+1, V] of its rows; returns
    (tau, emitted tokens, processed rows [1, k+1, V] or None at temperature 0). Times go to
    ``ctx.stats``; ``ctx.on_verify`` sees the rule's inputs. The one host sync of the step."""
    t2 = time.perf_counter()
    dev, params = logits.device, ctx.params
    host = dev.type == "cpu" and logits.dtype == torch.float32 and not ctx.validate
    if params.greedy and host and ctx.rule.name == "greedy":
        return _verify_greedy_host(ctx, draft, logits, t2)
    x = draft.tokens.to(dev)  # [1, k]
    k = x.shape[1]
    uniforms = None
    if params.greedy:
        if ctx.validate:
            check_logits(logits)
        rows, q = logits, None
    else:
        rows = process_logits(logits, params)  # raises on NaN / inf logits
        q = None if draft.probs is None else draft.probs.to(rows.device, rows.dtype)
        uniforms = ctx.streams.uniforms(context.shape[1], k + 1)  # keyed by position
    t3 = time.perf_counter()
    out = ctx.rule(x, q, rows, ctx.streams.verify, validate=ctx.validate, uniforms=uniforms)
    # The commit's one host sync: [finite, tau, emitted tokens padded with -1].
    finite = torch.isfinite(logits.amax(-1)).all() if params.greedy else torch.ones((), device=dev)
    got = torch.cat([finite.long()[None], out.num_accepted, out.tokens(x)[0]]).tolist()
    if not got[0]:
        raise invalid_logits_error()
    tau = got[1]
    if ctx.on_verify is not None:
        hook = {"draft_tokens": draft.tokens, "draft_probs": q, "target_rows": rows, "num_accepted": tau}
        ctx.on_verify(hook)
    if ctx.stats is not None:
        ctx.stats.time_logits_processing += t3 - t2
        ctx.stats.time_verify_rule += time.perf_counter() - t3
        ctx.stats.record_step(k, tau)
    return tau, got[2 : tau + 3], None if params.greedy else rows


def _verify_greedy_host(
    ctx: StepContext, draft: Draft, logits: torch.Tensor, t2: float
) -> tuple[int, list[int], None]:
    """`verify_rows` at temperature 0 for CPU float32 logits: the greedy rule on the host
    (`hierspec.verify.greedy.verify_host`, the same rule without a dozen small torch ops)."""
    xs = draft.tokens[0].tolist()
    tau, y = greedy.verify_host(xs, logits[0].numpy())
    if ctx.on_verify is not None:
        hook = {"draft_tokens": draft.tokens, "draft_probs": None, "target_rows": logits, "num_accepted": tau}
        ctx.on_verify(hook)
    if ctx.stats is not None:
        ctx.stats.time_verify_rule += time.perf_counter() - t2
        ctx.stats.record_step(len(xs), tau)
    return tau, [*xs[:tau], y], None


# ------------------------------------------------------------------------------------ one step
def speculative_step(ctx: StepContext, context: torch.Tensor, k_max: int) -> StepResult:
    """One step at batch size 1 (see module docstring): `propose`, one forward over
    `step_input`, `verify_rows`, then roll the model back to the committed tokens minus the last.

    ``ctx.on_verify``, if given, receives {draft_tokens [1,k], draft_probs [1,k,V] | None,
    target_rows [1,k+1,V] (processed; raw logits at temperature 0), num_accepted} after
    verification: what ``rule.law`` needs for the exact acceptance law of that draft.
    """
    model, drafter = ctx.model, ctx.drafter
    t = time.perf_counter()
    draft = propose(ctx, context, k_max)
    t1 = time.perf_counter()
    wants_hidden = ctx.wants_hidden
    fwd = model.forward(step_input(context, draft, model.device), output_hidden=wants_hidden)
    t2 = time.perf_counter()
    tau, tokens, rows = verify_rows(ctx, context, draft, fwd.logits)
    t4 = time.perf_counter()
    model.crop(context.shape[1] + tau)
    if wants_hidden:  # features of the root and the accepted tokens (a feature-level drafter)
        drafter.observe_target(context.shape[1] - 1, fwd.hidden[0, : tau + 1])
    if ctx.stats is not None:
        ctx.stats.time_draft += t1 - t
        ctx.stats.time_target_forward += t2 - t1
        ctx.stats.time_rollback += time.perf_counter() - t4
    return StepResult(tokens, None if rows is None else rows[0, : tau + 1], draft.num_tokens, tau)


def tree_step(ctx: StepContext, context: torch.Tensor, spec: TreeSpec) -> StepResult:
    """One tree step (EAGLE / SpecInfer): draft a tree, verify ALL its nodes in one target forward
    with a tree attention mask, walk it with exact recursive rejection sampling, keep only the
    accepted path in the target's KV cache.

    Precondition as `speculative_step`; ``ctx.model`` is a `TreeModel` (``forward_tree`` and
    ``compact``), ``ctx.drafter`` a `TreeDrafter` (checked by the engine)::

        tree    = drafter.propose_tree(context, spec)        node 0 = x_L, parents[0] = -1
        rows    = model.forward_tree(tokens, parents)        row i = p(. | context, path to i)
        path, Y = verify_tree(parents, tokens, rows)         one-hot proposals: exact
        emitted = tokens[path], Y;  model.compact(L-1, [0] + path)
    """
    model, drafter, params, stats, validate = ctx.model, ctx.drafter, ctx.params, ctx.stats, ctx.validate
    g_verify = ctx.streams.at(context.shape[1]).verify
    t = time.perf_counter()
    tree = drafter.propose_tree(context, spec, params)
    t1 = time.perf_counter()
    start = context.shape[1] - 1
    wants_hidden = ctx.wants_hidden
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
