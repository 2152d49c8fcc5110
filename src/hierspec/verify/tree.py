"""Exact verification of a draft *tree* in one target forward: recursive rejection sampling (RRS),
as in SpecInfer, EAGLE and multi-draft speculative sampling. Batch size 1.

Tree contract (node indices 0..N-1, parents before children):

    parents[N]        parents[0] = -1 (node 0 = root = the last committed token, never accepted),
                      0 <= parents[i] < i for i >= 1
    tokens[N]         tokens[i] = drafted token of node i (tokens[0] is ignored)
    target_probs[N,V] row i = p_i = the target's processed next-token distribution after root..i
    draft_probs[N,V]  row i = q_i, the distribution the children of node i were drawn from (rows of
                      leaves are unused); None for a deterministic tree (q one-hot at each child)

Children are tried in increasing node-index order (= drawing order for the stochastic modes).

Rule. Start at the root with r = p_root. At a node with children c_1..c_m (tokens x_1..x_m), round
j has a target r_j (r_1 = p_node) and a proposal q_j, the law of x_j given x_1..x_{j-1}:

    mode "deterministic":       q_j = onehot(x_j)
    mode "iid":                 q_j = q_node                   (children i.i.d. from q_node)
    mode "without_replacement": q_j = q_node with x_1..x_{j-1} zeroed, renormalised

    accept c_j with probability  a_j = min(1, r_j(x_j) / q_j(x_j));
    on rejection                 r_{j+1} = (r_j - q_j)^+ / sum (r_j - q_j)^+          (*)
                                 (deterministic: r_j with x_j zeroed, renormalised, as r_j <= 1)

If c_j is accepted, move to c_j with a fresh r = p_{c_j}. If all children are rejected (or the node
is a leaf) draw ``next_token`` from the current r and stop. Output: the accepted nodes ``path``
and ``next_token``. A duplicate sibling token in a deterministic tree is never accepted (after the
first copy is rejected r(x) = 0), which keeps the rule exact; stochastic trees may repeat tokens
in "iid" mode and must not in "without_replacement" mode.

Why it is lossless (per node the emitted token has law r_1 = p_node, by induction over the
rounds; then by induction over depth), why the deterministic sampler is a single inverse-CDF draw
per level, and why no lossless verifier beats RRS on deterministic trees (`expected_accepted_bound`
is attained) while block verification beats it on stochastic chains: docs/exactness-trees.md.

Numerics: verification and the laws compute in float64 (uniforms from ``torch.rand(generator=)``
in float64). A residual with zero mass (reachable only through round-off) falls back to the
current r. `tree_law` and `expected_accepted` are analysis paths (Python loops over nodes).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..sampling import categorical, check_generator
from ..treeshape import check_parents
from .core import _check_prob_rows, _fail
from .greedy import _argmax

MODES = ("deterministic", "iid", "without_replacement")


@dataclass
class TreeVerifyOutput:
    """Outcome of verifying one tree.

    path:       accepted node indices, root excluded, in root-to-leaf order.
    next_token: the bonus / correction token emitted after the last accepted node.
    """

    path: list[int]
    next_token: int

    def tokens(self, tokens: torch.Tensor) -> list[int]:
        """Emitted token ids: the accepted nodes' tokens, then `next_token`."""
        tok = tokens.tolist()
        return [tok[i] for i in self.path] + [self.next_token]


# ------------------------------------------------------------------- structure and validation
def children(parents: torch.Tensor | Sequence[int]) -> list[list[int]]:
    """children(parents)[i] = the children of node i in increasing index order."""
    pl = parents.tolist() if isinstance(parents, torch.Tensor) else list(parents)
    kids: list[list[int]] = [[] for _ in pl]
    for i in range(1, len(pl)):
        kids[pl[i]].append(i)
    return kids


def _check_int_vector(name: str, x: object, n: int | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.int64, torch.int32):
        got = str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
        _fail(name, "an int64/int32 tensor", got)
    if x.dim() != 1 or x.numel() == 0 or (n is not None and x.numel() != n):
        _fail(
            name,
            "shape [N]" + (f" with N = {n} (as parents)" if n is not None else " with N >= 1"),
            str(tuple(x.shape)),
        )


def _check_rows_shape(name: str, x: object, n: int, v: int | None) -> int:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        _fail(name, "a floating-point tensor", str(getattr(x, "dtype", type(x).__name__)))
    if x.dim() != 2 or x.shape[0] != n or x.shape[1] < 1 or (v is not None and x.shape[1] != v):
        want = f"shape [N, V] with N = {n} (as parents)" + (f" and V = {v}" if v is not None else "")
        _fail(name, want, str(tuple(x.shape)))
    return int(x.shape[1])


def check_tree(
    parents: torch.Tensor,
    tokens: torch.Tensor,
    target_probs: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
) -> None:
    """Validate a tree (see module docstring); ValueError naming the argument otherwise.

    Checks: parents is an int vector with parents[0] = -1 and 0 <= parents[i] < i; tokens has the
    same length; probability rows are [N, V], finite, >= 0 and sum to 1 within PROB_SUM_TOL
    (draft rows only for nodes with children); tokens[1:] lie in [0, V); q > 0 at every child's
    token under its parent's draft row."""
    _check_int_vector("parents", parents, None)
    n = check_parents(parents).numel()
    _check_int_vector("tokens", tokens, n)
    pl = parents.tolist()
    v = None
    if target_probs is not None:
        v = _check_rows_shape("target_probs", target_probs, n, None)
        _check_prob_rows("target_probs", target_probs)
    if draft_probs is not None:
        v = _check_rows_shape("draft_probs", draft_probs, n, v)
        if target_probs is not None and draft_probs.device != target_probs.device:
            _fail("draft_probs", f"device {target_probs.device} (as target_probs)", str(draft_probs.device))
        internal = sorted(set(pl[1:]))
        if internal:
            _check_prob_rows("draft_probs", draft_probs[internal])
    if v is None or n == 1:
        return
    tok = tokens.tolist()
    bad = [i for i in range(1, n) if not 0 <= tok[i] < v]
    if bad:
        _fail("tokens", f"token ids in [0, {v}) for nodes 1..N-1", f"tokens[{bad[0]}] = {tok[bad[0]]}")
    if draft_probs is not None:
        q_tok = draft_probs[pl[1:], tok[1:]].tolist()
        zero = [i + 1 for i, qv in enumerate(q_tok) if not qv > 0]
        if zero:
            i = zero[0]
            _fail(
                "draft_probs",
                "q > 0 at every child's token under its parent's row (the children "
                "must be drawn from draft_probs)",
                f"q[{pl[i]}, {tok[i]}] = 0 for node {i}",
            )


def _check_mode(mode: str, draft_probs: torch.Tensor | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
    if mode == "deterministic" and draft_probs is not None:
        _fail(
            "draft_probs",
            "None in mode 'deterministic' (children chosen deterministically)",
            "a tensor (pass mode='iid' or 'without_replacement' for sampled children)",
        )
    if mode != "deterministic" and draft_probs is None:
        _fail("draft_probs", f"the [N, V] draft rows the children were drawn from in mode {mode!r}", "None")


def _check_distinct_siblings(kids: list[list[int]], tok: list[int]) -> None:
    for node, ks in enumerate(kids):
        seen = [tok[c] for c in ks]
        if len(set(seen)) != len(seen):
            _fail(
                "tokens",
                "distinct sibling tokens in mode 'without_replacement'",
                f"a repeated token among the children of node {node}: {seen}",
            )


def _validate(parents, tokens, target_probs, draft_probs, mode: str) -> None:
    _check_mode(mode, draft_probs)
    check_tree(parents, tokens, target_probs, draft_probs)
    if mode == "without_replacement":
        _check_distinct_siblings(children(parents), tokens.tolist())


# ------------------------------------------------------------------- one round (shared math)
def _accept_prob(r: torch.Tensor, q: torch.Tensor | None, x: int) -> float:
    """a = min(1, r(x) / q(x)); q None = one-hot; q(x) = 0 (invalid input) is never accepted."""
    rx = float(r[x])
    if q is None:
        return min(rx, 1.0)
    qx = float(q[x])
    return min(1.0, rx / qx) if qx > 0 else 0.0


def _reject(
    r: torch.Tensor, q: torch.Tensor | None, x: int, mode: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(r, q) after rejecting x: r <- norm((r - q)^+); without replacement also q <- q minus x."""
    if q is None:
        res = r.clone()
        res[x] = 0.0
    else:
        res = (r - q).clamp_(min=0.0)
    s = float(res.sum())
    r_new = res / s if s > 0 else r
    if mode == "without_replacement" and q is not None:
        q = q.clone()
        q[x] = 0.0
        sq = float(q.sum())
        q = q / sq if sq > 0 else q
    return r_new, q


def _node_law(
    r: torch.Tensor, q: torch.Tensor | None, xs: list[int], mode: str
) -> tuple[list[float], float, torch.Tensor]:
    """(P(child j accepted) for each child, P(all rejected), the final residual) at one node."""
    reach, acc = 1.0, []
    for j, x in enumerate(xs):
        a = _accept_prob(r, q, x)
        acc.append(reach * a)
        reach *= 1.0 - a
        if reach <= 0.0:
            return acc + [0.0] * (len(xs) - j - 1), 0.0, r
        r, q = _reject(r, q, x, mode)
    return acc, reach, r


# ------------------------------------------------------------------- samplers
def verify_tree(
    parents: torch.Tensor,
    tokens: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    *,
    mode: str = "deterministic",
    generator: torch.Generator | None = None,
    validate: bool = False,
) -> TreeVerifyOutput:
    """Verify one tree by recursive rejection sampling (see module docstring).

    Cost: one host sync per visited depth level (deterministic) or per tried child (stochastic);
    V-sized work per level (deterministic) or per rejection (stochastic)."""
    _check_mode(mode, draft_probs)
    if validate:
        _validate(parents, tokens, target_probs, draft_probs, mode)
    check_generator(generator, target_probs.device)
    kids = children(parents)
    tok = tokens.tolist()
    dev = target_probs.device
    node, path = 0, []
    while True:
        p_row = target_probs[node].double()
        ks = kids[node]
        if mode == "deterministic":
            # Same law as the rounds: y ~ p_node, move to the first child with token y.
            u = torch.rand(1, generator=generator, dtype=torch.float64, device=dev)
            y = int(categorical(p_row[None], u)[0])
            nxt = next((c for c in ks if tok[c] == y), None)
            if nxt is None:
                return TreeVerifyOutput(path=path, next_token=y)
            node = nxt
            path.append(node)
            continue
        u_dev = torch.rand(len(ks) + 1, generator=generator, dtype=torch.float64, device=dev)
        u = u_dev.tolist()
        r, q = p_row, (draft_probs[node].double() if ks else None)
        nxt = None
        for j, c in enumerate(ks):
            x = tok[c]
            qx, rx = float(q[x]), float(r[x])
            if u[j] * qx < rx:  # probability min(1, r(x) / q(x)), no division
                nxt = c
                break
            r, q = _reject(r, q, x, mode)
        if nxt is None:
            y = int(categorical(r[None], u_dev[-1:], fallback=p_row[None])[0])
            return TreeVerifyOutput(path=path, next_token=y)
        node = nxt
        path.append(node)


def verify_tree_greedy(
    parents: torch.Tensor, tokens: torch.Tensor, target_logits: torch.Tensor, *, validate: bool = False
) -> TreeVerifyOutput:
    """Temperature 0: from the root, follow the first child (index order) whose token is the
    argmax of ``target_logits`` at its parent, the FIRST index among exact ties (what plain greedy
    decoding takes; a child that only ties the maximum at a higher index is not followed, as in
    `verify.greedy`); ``next_token`` = that argmax at the last node. Any finite scores work
    (logits or probabilities). One argmax over [N, V] (`greedy._argmax`, numpy's on CPU)."""
    if validate:
        check_tree(parents, tokens)
        v = _check_rows_shape("target_logits", target_logits, parents.numel(), None)
        if not bool(torch.isfinite(target_logits).all()):
            _fail("target_logits", "finite scores", "NaN or inf entries")
        if parents.numel() > 1 and not all(0 <= t < v for t in tokens.tolist()[1:]):
            _fail("tokens", f"token ids in [0, {v}) for nodes 1..N-1", str(tokens.tolist()))
    kids = children(parents)
    best = _argmax(target_logits).tolist()  # [N]: the first argmax of every node's row
    tok = tokens.tolist()
    node, path = 0, []
    while True:
        nxt = next((c for c in kids[node] if tok[c] == best[node]), None)
        if nxt is None:
            return TreeVerifyOutput(path=path, next_token=best[node])
        node = nxt
        path.append(node)


# ------------------------------------------------------------------- exact laws
def _walk(
    parents, tokens, target_probs, draft_probs, mode: str
) -> Iterator[tuple[tuple[int, ...], float, list[int], list[float], float, torch.Tensor]]:
    """Every node reached with positive probability: (emitted prefix, P(reach), its children,
    P(child accepted | reach) per child, P(stop | reach), the residual row the stop draws from)."""
    _validate(parents, tokens, target_probs, draft_probs, mode)
    kids = children(parents)
    tok = tokens.tolist()
    p = target_probs.double()
    q = draft_probs.double() if draft_probs is not None else None
    stack: list[tuple[int, tuple[int, ...], float]] = [(0, (), 1.0)]
    while stack:
        node, prefix, mass = stack.pop()
        ks = kids[node]
        acc, stop, res = _node_law(p[node], None if q is None else q[node], [tok[c] for c in ks], mode)
        yield prefix, mass, ks, acc, stop, res
        for c, a in zip(ks, acc, strict=True):
            if a > 0:
                stack.append((c, (*prefix, tok[c]), mass * a))


def tree_law(
    parents: torch.Tensor,
    tokens: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    *,
    mode: str = "deterministic",
) -> dict[tuple[int, ...], float]:
    """Exact law of the emitted token sequence (accepted tokens + next token) given this tree:
    {token tuple: probability}, summing to 1. Inputs are validated."""
    out: dict[tuple[int, ...], float] = defaultdict(float)
    for prefix, mass, _, _, stop, res in _walk(parents, tokens, target_probs, draft_probs, mode):
        m = mass * stop
        if m <= 0:
            continue
        idx = torch.nonzero(res > 0).flatten().tolist()
        for y, pr in zip(idx, res[idx].tolist(), strict=True):
            out[(*prefix, y)] += m * pr
    return dict(out)


def expected_accepted(
    parents: torch.Tensor,
    tokens: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    *,
    mode: str = "deterministic",
) -> float:
    """Exact E[len(path)] given this tree: the sum over non-root nodes of P(node accepted)."""
    return sum(
        mass * a
        for _, mass, _, acc, _, _ in _walk(parents, tokens, target_probs, draft_probs, mode)
        for a in acc
    )


def expected_accepted_bound(parents: torch.Tensor, tokens: torch.Tensor, target_probs: torch.Tensor) -> float:
    """sum over non-root nodes v of P(v) = prod of p(token | prefix) along root..v: the largest
    E[len(path)] any lossless verifier can reach on a deterministic tree, attained by RRS when
    siblings are distinct (duplicates count twice here but are never accepted)."""
    check_tree(parents, tokens, target_probs)
    pl, tok = parents.tolist(), tokens.tolist()
    if len(pl) == 1:
        return 0.0
    p_tok = target_probs[pl[1:], tok[1:]].double().tolist()
    joint = [1.0] * len(pl)
    for i in range(1, len(pl)):
        joint[i] = joint[pl[i]] * p_tok[i - 1]
    return float(sum(joint[1:]))
