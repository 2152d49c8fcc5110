"""Held-out evaluation of a student: greedy agreement, sum min(p, q), and the simulated acceptance
length of greedy speculative decoding, against the teacher's exact full distributions."""

from __future__ import annotations

import torch

from hierspec.models.draft import DraftLM
from hierspec.models.early_exit import EarlyExitDraft
from hierspec.train.student import student_vocab_map, trainable_module
from hierspec.train.teacher import TargetPass

__all__ = ["Evaluator", "simulate_acceptance_length"]


def simulate_acceptance_length(agree: torch.Tensor, gamma: int) -> tuple[int, int]:
    """(tokens, steps) of greedy speculative decoding along one greedy continuation.

    ``agree[i]`` says whether the draft's argmax equals the target's at response position i
    (teacher-forced on the target's own greedy output, which is exactly the prefix the engine
    would hold). Each step accepts the run of agreements (at most gamma) and adds one target
    token, as the greedy rule does.
    """
    a = agree.tolist()
    n, i, steps = len(a), 0, 0
    while i < n:
        run = 0
        while run < gamma and i + run < n and a[i + run]:
            run += 1
        i += run + 1
        steps += 1
    return n, steps


class Evaluator:
    """Held-out metrics of a student against the teacher's exact full distributions (from a
    `TargetPass`: the teacher runs once, its logits are recomputed from its features per call).

    Positions: those predicting response tokens (mask 2) if the set has any, else every
    non-pad next token. Metrics: ``agree`` (greedy agreement), ``accept_t1`` (mean sum_v
    min(p, q) at T = 1: the expected acceptance of one draft token), ``coverage`` (teacher mass
    inside the student's vocabulary), and, on response rows, ``mal_g{gamma}``: the mean
    acceptance length of greedy speculative decoding with block size gamma, simulated on the
    target's greedy responses.
    """

    def __init__(self, target: TargetPass, *, gamma: int = 5, batch_rows: int = 2) -> None:
        self.target = target
        self.hf, self.ids, self.mask = target.hf, target.ids, target.mask
        self.gamma, self.batch_rows = gamma, batch_rows
        self.response = bool((self.mask == 2).any())

    @torch.no_grad()
    def __call__(self, student: DraftLM | EarlyExitDraft) -> dict[str, float]:
        module = trainable_module(student)
        was_training = module.training
        module.eval()
        vm = student_vocab_map(student)
        v = self.hf.get_output_embeddings().weight.shape[0]
        inside = torch.zeros(v, dtype=torch.bool)
        if vm is None:
            inside[:] = True
        else:
            inside[vm] = True
        n = agree_sum = acc_sum = cov_sum = 0.0
        tokens = steps = 0
        for b0 in range(0, self.ids.shape[0], self.batch_rows):
            ids, mask = self.ids[b0 : b0 + self.batch_rows], self.mask[b0 : b0 + self.batch_rows]
            p = torch.softmax(self.target.logits(b0, b0 + ids.shape[0]), -1)
            s_red = student.train_logits(ids).float().cpu()
            if vm is None:
                q = torch.softmax(s_red, -1)
            else:
                q = torch.zeros_like(p)
                q[..., vm] = torch.softmax(s_red, -1)
            nxt = mask[:, 1:] == 2 if self.response else mask[:, 1:] > 0
            pos = torch.zeros_like(mask, dtype=torch.bool)
            pos[:, :-1] = nxt
            agree = p.argmax(-1) == q.argmax(-1)
            acc = torch.minimum(p, q).sum(-1)
            cov = (p * inside).sum(-1)
            n += float(pos.sum())
            agree_sum += float((agree & pos).sum())
            acc_sum += float((acc * pos).sum())
            cov_sum += float((cov * pos).sum())
            if self.response:
                for r in range(ids.shape[0]):
                    tok, st = simulate_acceptance_length(agree[r][pos[r]], self.gamma)
                    tokens, steps = tokens + tok, steps + st
        if was_training:
            module.train()
        n = max(n, 1.0)
        out = {"agree": agree_sum / n, "accept_t1": acc_sum / n, "coverage": cov_sum / n, "positions": int(n)}
        if self.response and steps:
            out[f"mal_g{self.gamma}"] = tokens / steps
        return out
