"""The distillation loss: bucketed KL(teacher || student) on the cached teacher top-k.

KD loss and the tail. The student's q lives on its reduced vocabulary S (R ids; S = everything
for a full-vocabulary student). For every position the teacher cache gives the top-k
probabilities p_1..p_k and, through the stored logsumexp, the exact mass outside them,
``tail = 1 - sum_i p_i``. Both distributions are coarse-grained onto the same buckets:

    one bucket per top-k token inside S          teacher p_i          student q_i
    one REST bucket = every other token of S     teacher tail         student 1 - sum_i q_i
    (top-k tokens outside S are dropped: q is 0 there by construction)

and the teacher side is renormalised over the buckets. The loss is KL(teacher || student) over
the buckets: exact on the top-k, and consistent on the rest (the student is asked to put
exactly the teacher's tail mass on the tokens it does not see individually, without being told
how to spread it). Renormalising is the right target for a reduced vocabulary: the student
that minimises it is q = p restricted to S and renormalised, which maximises sum_v min(p, q)
(= p(S)) among all q supported on S. The only approximation is that the tail is assumed to lie
inside S (it is unknown how it splits); with S = the top 8k tokens and k = 64 the tail is a
few percent and mostly inside S. With no REST rows (S inside the top-k) the tail is dropped.
Optional hard labels: ``loss = (1 - ce_weight) * KL + ce_weight * CE(next token)`` (targets
outside S are skipped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss"]


def kd_loss(
    student_logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    row_of: torch.Tensor,
    *,
    ce_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Bucketed KL(teacher || student) on the cached top-k (+ optional CE); see module docstring.

    Args:
        student_logits: [B, T, R] logits over the student's rows.
        batch: ``mask`` [B, T], ``ids`` [B, T], ``t_logp`` [B, T, k], ``t_ids`` [B, T, k].
        row_of: [V] student row of each target id, R for ids outside the student's vocabulary.
    Returns:
        (loss, {"kl", "ce", "agree"}) where agree = student argmax == teacher argmax.
    """
    r = student_logits.shape[-1]
    device = student_logits.device
    valid = (batch["mask"] > 0).to(device)
    n_valid = valid.sum().clamp_min(1)
    logq = F.log_softmax(student_logits.float(), dim=-1)  # [B, T, R]
    t_rows = row_of.to(device)[batch["t_ids"].long().to(device)]  # [B, T, k]
    in_s = t_rows < r
    p_top = batch["t_logp"].float().to(device).exp()
    tail = (1.0 - p_top.sum(-1)).clamp_min(0.0)
    n_rest = r - in_s.sum(-1)
    p_in = p_top * in_s
    p_rest = tail * (n_rest > 0)
    z = (p_in.sum(-1) + p_rest).clamp_min(1e-30)
    pt_in, pt_rest = p_in / z[..., None], p_rest / z
    logq_top = logq.gather(-1, t_rows.clamp_max(r - 1))  # [B, T, k]; entries outside S masked below
    # log q(REST) = log(1 - sum of the student's top-k-in-S mass), summed in float64 on the small
    # [B, T, k] tensor: no second [B, T, R] pass. fp32 log-probs limit its relative precision to
    # ~1e-7 / q(REST); the clamp only bites when q(REST) < 1e-12, and then the top-k terms (whose
    # teacher mass sums to < 1) already move student mass back out of the top-k.
    q_top = torch.where(in_s, logq_top.double().exp(), 0.0).sum(-1)
    logq_rest = (1.0 - q_top).clamp_min(1e-12).log().float()
    kl_top = torch.where(in_s, torch.xlogy(pt_in, pt_in) - pt_in * logq_top, 0.0).sum(-1)
    kl_rest = torch.where(pt_rest > 0, torch.xlogy(pt_rest, pt_rest) - pt_rest * logq_rest, 0.0)
    kl = ((kl_top + kl_rest) * valid).sum() / n_valid
    loss = kl
    ce_val = 0.0
    if ce_weight > 0:
        labels = row_of.to(device)[batch["ids"][:, 1:].long().to(device)]
        ok = (labels < r) & (batch["mask"][:, 1:] > 0).to(device)
        nll = -logq[:, :-1].gather(-1, labels.clamp_max(r - 1)[..., None])[..., 0]
        ce = (nll * ok).sum() / ok.sum().clamp_min(1)
        loss = (1.0 - ce_weight) * kl + ce_weight * ce
        ce_val = float(ce.detach())
    with torch.no_grad():
        top_row = t_rows[..., 0]
        agree = ((logq.argmax(-1) == top_row) & valid).sum() / n_valid
    return loss, {"kl": float(kl.detach()), "ce": ce_val, "agree": float(agree)}
