"""EAGLE drafter: chains and dynamic trees from an `EagleHead` fed with the target's features.

Feature contract with the engine (a `hierspec.drafters.base.FeatureDrafter`): every target
forward over committed positions reports its last hidden states through
``observe_target(start, hidden)``: the prefill
gives f_0..f_{L-2}, each verification the features of the root and the accepted tokens. So at
every `propose` the drafter holds f_0..f_{L-2} for a context of length L (the target's cache
positions) and nothing is recomputed.

Head cache discipline: slots 0..n-1 hold the pairs (f_t, x_{t+1}) t < n fed with TRUE features and
tokens equal to the context (``_true``, ``_fed``); draft pairs beyond them are dropped at the next
`propose`, which feeds the missing true pairs up to t = L-2 and then drafts:

    chain:  X_j ~ q_j = softmax(W_head f^_{L-2+j}),  then pair (f^_{L-2+j}, X_j) at position L-2+j
    tree:   EAGLE-2 dynamic tree. Depth 1 = the top-k tokens of q_1; at each depth the top-k nodes
            by draft path probability are expanded in ONE head forward (tree mask: a node reads the
            true pairs and its ancestors), each adding its top-k children; the tree is then the
            ``budget`` most probable nodes (an ancestor is at least as probable as its child, so
            they form a tree). Children are chosen deterministically, so the proposal of every
            node is one-hot and `hierspec.verify.tree` verifies it exactly in deterministic mode.

Device: features, head cache, drafted tokens and rows stay on the head's device (the target's);
a chain draws its uniforms from the draft stream (`hierspec.sampling.uniforms`); at temperature 0
it never syncs with the host per drafted token (at T > 0 `process_logits` checks each row for
NaN). The tree search reads scores on the host at every depth.
"""

from __future__ import annotations

import math

import torch

from ..models.eagle import EagleHead
from ..sampling import SamplingParams, categorical, process_logits, uniforms
from .base import Draft, DraftTree, TreeSpec, check_context, draft_room


class EagleDrafter:
    """Proposes chains (`propose`) and trees (`propose_tree`) from an `EagleHead` (batch 1); a
    `FeatureDrafter` and a `TreeDrafter`."""

    def __init__(self, head: EagleHead) -> None:
        self.head = head
        self.vocab_size = head.vocab_size
        self.reset()

    def reset(self) -> None:
        self.head.reset()
        h = self.head.config.hidden_size
        self._feats = torch.zeros(0, h, dtype=self.head.dtype, device=self.head.device)
        self._nfeat = 0
        self._fed = torch.zeros(0, dtype=torch.long)  # x_{t+1} of the true pairs in the cache
        self._last: torch.Tensor | None = None  # f^ output of the last true pair

    # ------------------------------------------------------------------ features from the target
    def observe_target(self, start: int, hidden: torch.Tensor) -> None:
        """Record the target's features [T, H] of positions start..start+T-1 (drops any later)."""
        t = hidden.shape[0]
        if start > self._nfeat:
            raise ValueError(f"observe_target: features of positions {self._nfeat}..{start - 1} are missing")
        end = start + t
        if end > self._feats.shape[0]:
            grow = self._feats.new_zeros(max(end, 2 * self._feats.shape[0], 256), self._feats.shape[1])
            grow[: self._nfeat] = self._feats[: self._nfeat]
            self._feats = grow
        self._feats[start:end] = hidden.detach().to(self._feats.device, self.head.dtype)
        self._nfeat = end
        keep = min(self.head.cache_length, start)  # pairs t >= start used other features
        if keep < self.head.cache_length:
            self.head.crop(keep)
            self._fed = self._fed[:keep]
            self._last = None

    # ------------------------------------------------------------------ head sync
    def _sync(self, ctx: torch.Tensor) -> torch.Tensor | None:
        """Feed the true pairs (f_t, x_{t+1}), t <= L-2; return f^_{L-1} [H] (None if L == 1)."""
        n_pairs = ctx.numel() - 1
        if n_pairs <= 0:
            return None
        if self._nfeat < n_pairs:
            raise ValueError(
                f"EAGLE drafter: the target's features cover {self._nfeat} positions, the context needs "
                f"{n_pairs}; run it through an engine that reports them (observe_target)"
            )
        n = min(self._fed.numel(), self.head.cache_length, n_pairs)
        lcp = int((self._fed[:n] == ctx[1 : n + 1]).long().cumprod(0).sum()) if n else 0
        if lcp == n_pairs and self._last is not None and self.head.cache_length == n_pairs:
            return self._last
        lcp = min(lcp, n_pairs - 1)  # re-feed the last pair to get its output
        self.head.crop(lcp)
        dev = self.head.device
        feats = self._feats[lcp:n_pairs][None].to(dev)
        nxt = ctx[lcp + 1 : n_pairs + 1][None].to(dev)
        out = self.head.step(feats, nxt, torch.arange(lcp, n_pairs))
        self._fed = ctx[1 : n_pairs + 1].clone()
        self._last = out[0, -1]
        return self._last

    def _rows(self, feats: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """Processed draft rows (probabilities; softmax of the raw logits at temperature 0)."""
        logits = self.head.logits(feats).float()
        if params.greedy:
            return torch.softmax(logits, -1)
        return process_logits(logits, params)

    # ------------------------------------------------------------------ chain
    @torch.no_grad()
    def propose(
        self,
        context: torch.Tensor,
        num_tokens: int,
        params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> Draft:
        num_tokens = draft_room(context, num_tokens, self.head.config.max_length)
        if num_tokens <= 0:
            return Draft.empty(1, context.device)
        ctx = context[0].cpu()
        f = self._sync(ctx)
        if f is None:
            return Draft.empty(1, context.device)
        base = self.head.cache_length
        dev = self.head.device
        u = None if params.greedy else uniforms(num_tokens, generator, dev)
        positions = torch.arange(base, base + num_tokens, device=dev)
        tokens: list[torch.Tensor] = []  # 0-dim, on the head's device: no host sync per token
        rows: list[torch.Tensor] = []
        for j in range(num_tokens):
            logits = self.head.logits(f[None])
            if params.greedy:
                x = logits[0].argmax()
            else:
                q = process_logits(logits, params)[0]
                x = categorical(q[None], u[j : j + 1])[0]
                rows.append(q)
            tokens.append(x)
            if j + 1 < num_tokens:
                f = self.head.step(f[None, None], x.view(1, 1), positions[j : j + 1])[0, -1]
        self.head.crop(base)  # keep only true pairs: the next context decides what was accepted
        out = torch.stack(tokens)[None]  # [1, k]
        return Draft(out, torch.stack(rows)[None] if rows else None)

    # ------------------------------------------------------------------ tree
    @torch.no_grad()
    def propose_tree(self, context: torch.Tensor, spec: TreeSpec, params: SamplingParams) -> DraftTree:
        """A dynamic draft tree after ``context`` [1, L] (see module docstring); at most
        ``spec.budget`` nodes and ``spec.depth`` levels (fewer near max_length)."""
        check_context(context)
        ctx = context[0].cpu()
        root = int(ctx[-1])
        depth = min(spec.depth, self.head.config.max_length - ctx.numel())
        f = self._sync(ctx) if depth > 0 else None
        if f is None:
            return DraftTree(torch.tensor([root]), torch.tensor([-1]))
        base = self.head.cache_length  # true pairs; tree pairs go after them
        k = spec.topk
        # candidates: token, parent candidate index (-1 = root), log path prob, depth
        cand_tok: list[int] = []
        cand_par: list[int] = []
        cand_score: list[float] = []
        cand_depth: list[int] = []
        slot_of: dict[int, int] = {}  # expanded candidate -> its head-cache slot
        row = self._rows(f[None], params)[0]
        top = torch.topk(row, min(k, int((row > 0).sum())))
        for p, x in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            cand_tok.append(x)
            cand_par.append(-1)
            cand_score.append(math.log(p))
            cand_depth.append(1)
        frontier = list(range(len(cand_tok)))
        feat_of: dict[int, torch.Tensor] = {-1: f}
        for d in range(1, depth):
            expand = sorted(frontier, key=lambda c: -cand_score[c])[:k]
            if not expand:
                break
            n = len(expand)
            start = self.head.cache_length
            mask = torch.zeros(n, start + n, dtype=torch.bool)
            mask[:, :base] = True
            for r, c in enumerate(expand):
                mask[r, start + r] = True
                a = cand_par[c]
                while a != -1:
                    mask[r, slot_of[a]] = True
                    a = cand_par[a]
                slot_of[c] = start + r
            feats = torch.stack([feat_of[cand_par[c]] for c in expand])[None]
            ids = torch.tensor([[cand_tok[c] for c in expand]])
            pos = torch.full((n,), base - 1 + d)
            outs = self.head.step(feats, ids, pos, mask=mask.to(self.head.device))[0]
            rows = self._rows(outs, params)
            frontier = []
            for r, c in enumerate(expand):
                feat_of[c] = outs[r]
                nz = int((rows[r] > 0).sum())
                top = torch.topk(rows[r], min(k, nz))
                for p, x in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                    cand_tok.append(x)
                    cand_par.append(c)
                    cand_score.append(cand_score[c] + math.log(p))
                    cand_depth.append(d + 1)
                    frontier.append(len(cand_tok) - 1)
        self.head.crop(base)
        # the budget most probable candidates (ties: shallower first, so parents precede children)
        order = sorted(range(len(cand_tok)), key=lambda c: (-cand_score[c], cand_depth[c], c))
        chosen = _close_under_parents(order[: spec.budget], cand_par)
        chosen.sort(key=lambda c: (cand_depth[c], c))
        node_of = {-1: 0}
        tokens, parents = [root], [-1]
        for c in chosen:
            node_of[c] = len(tokens)
            tokens.append(cand_tok[c])
            parents.append(node_of[cand_par[c]])
        return DraftTree(torch.tensor(tokens), torch.tensor(parents))


def _close_under_parents(chosen: list[int], parent: list[int]) -> list[int]:
    """``chosen`` plus any missing ancestors (only possible through exact score ties)."""
    out = set(chosen)
    for c in chosen:
        a = parent[c]
        while a != -1 and a not in out:
            out.add(a)
            a = parent[a]
    return list(out)
