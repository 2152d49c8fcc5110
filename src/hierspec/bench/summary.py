"""Summaries of the harness rows, one per (prompt set or "all", cell): tok/s, speed-ups over AR
of the same prompts and repeats (ratio of totals, mean of per-prompt ratios, Spec-Bench's mean
tok/s over mean AR tok/s), acceptance, time breakdown, identity with AR, the exact expected
acceptance and its z-score, SSD statistics, the adaptive policy's chosen draft lengths, memory."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from ..methods import ENTRIES, REFERENCE
from .config import TIME_COMPONENTS

__all__ = ["summarize"]


def _mean_sd(xs: Sequence[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _sum_lists(lists: list[list[int]]) -> list[int]:
    out: list[int] = []
    for lst in lists:
        if len(out) < len(lst):
            out.extend([0] * (len(lst) - len(out)))
        for i, x in enumerate(lst):
            out[i] += x
    return out


def _group_summary(rows: list[dict], ar: dict, cell: dict, category: str) -> dict:
    tokens = sum(r["new_tokens"] for r in rows)
    time_s = sum(r["time_s"] for r in rows)
    s: dict = {
        "category": category,
        **{k: cell[k] for k in ("label", "method", "kind", "rule", "gamma", "temperature")},
        "runs": len(rows),
        "new_tokens": tokens,
        "time_s": time_s,
        "tokens_per_s": tokens / time_s if time_s > 0 else 0.0,
        "tokens_per_s_mean": statistics.fmean(r["tokens_per_s"] for r in rows),
    }
    pairs = [(r, ar.get((r["prompt_id"], r["repeat"], r["temperature"]))) for r in rows]
    pairs = [(r, a) for r, a in pairs if a is not None and a["time_s"] > 0 and a["new_tokens"] > 0]

    def total_ratio(ps) -> float | None:
        mt, ms = sum(r["new_tokens"] for r, _ in ps), sum(r["time_s"] for r, _ in ps)
        at, as_ = sum(a["new_tokens"] for _, a in ps), sum(a["time_s"] for _, a in ps)
        return (mt / ms) / (at / as_) if ps and ms > 0 and at > 0 else None

    ratios = [r["tokens_per_s"] / a["tokens_per_s"] for r, a in pairs if a["tokens_per_s"] > 0]
    s["speedup_total"] = total_ratio(pairs)
    s["speedup_mean"], s["speedup_sd"] = _mean_sd(ratios)
    reps = sorted({r["repeat"] for r, _ in pairs})
    s["speedup_total_by_repeat"] = (
        [total_ratio([(r, a) for r, a in pairs if r["repeat"] == k]) for k in reps] if len(reps) > 1 else None
    )
    s["paired_runs"] = len(pairs)
    # Spec-Bench's convention: mean per-prompt tok/s over mean per-prompt AR tok/s
    ar_mean = [a["tokens_per_s"] for _, a in pairs]
    s["speedup_specbench"] = (
        statistics.fmean(r["tokens_per_s"] for r, _ in pairs) / statistics.fmean(ar_mean)
        if pairs and statistics.fmean(ar_mean) > 0
        else None
    )
    hists = [r["k_hist"] for r in rows if r.get("k_hist") is not None]
    if hists:
        k_hist: dict[str, int] = {}
        for h in hists:
            for k, n in h.items():
                k_hist[str(k)] = k_hist.get(str(k), 0) + n
        s["k_hist"] = dict(sorted(k_hist.items(), key=lambda kv: int(kv[0])))
    fw = [r.get("target_forwards") for r in rows]
    s["target_forwards_per_token"] = sum(fw) / tokens if tokens and None not in fw else None
    dfw = [r.get("draft_forwards") for r in rows]
    s["draft_forwards_per_token"] = sum(dfw) / tokens if tokens and None not in dfw and rows else None
    spec = [r for r in rows if "num_spec_steps" in r]
    if cell["kind"] != REFERENCE and spec and len(spec) == len(rows):
        steps = sum(r["num_spec_steps"] for r in rows)
        drafted = sum(r["num_draft_tokens"] for r in rows)
        acc = sum(r["num_accepted_draft_tokens"] for r in rows)
        s["num_spec_steps"], s["num_draft_tokens"], s["num_accepted_draft_tokens"] = steps, drafted, acc
        s["mean_acceptance_length"] = 1.0 + acc / steps if steps else 1.0
        s["draft_acceptance_rate"] = acc / drafted if drafted else 0.0
        dpp = _sum_lists([r["drafted_per_position"] for r in rows])
        app = _sum_lists([r["accepted_per_position"] for r in rows])
        app += [0] * (len(dpp) - len(app))
        s["per_position_acceptance"] = [a / d if d else None for a, d in zip(app, dpp, strict=True)]
        s["drafted_per_position"] = dpp
        s["acceptance_histogram"] = _sum_lists([r["acceptance_histogram"] for r in rows])
    else:
        for k in ("mean_acceptance_length", "draft_acceptance_rate", "per_position_acceptance"):
            s[k] = None
    if all(r.get("times") for r in rows) and tokens:
        s["time_ms_per_token"] = {c: 1e3 * sum(r["times"][c] for r in rows) / tokens for c in TIME_COMPONENTS}
        s["time_fraction"] = {c: sum(r["times"][c] for r in rows) / time_s for c in TIME_COMPONENTS}
    else:
        s["time_ms_per_token"] = {"total": 1e3 * time_s / tokens} if tokens else None
        s["time_fraction"] = None
    ident = [r["identical_to_ar"] for r in rows if r.get("identical_to_ar") is not None]
    s["identical_to_ar"] = sum(ident) / len(ident) if ident else None
    s["identical_count"] = f"{sum(ident)}/{len(ident)}" if ident else None
    law = [r for r in rows if "expected_accepted" in r]
    if law:
        exp = sum(r["expected_accepted"] for r in law)
        var = sum(r["expected_accepted_var"] for r in law)
        meas = sum(r["num_accepted_draft_tokens"] for r in law)
        s["expected_accepted"] = exp
        s["expected_accepted_sd"] = math.sqrt(var)
        s["measured_accepted"] = meas
        s["law_steps"] = sum(r["law_steps"] for r in law)
        s["acceptance_z"] = (meas - exp) / math.sqrt(var) if var > 0 else None
    ssd = [r["ssd"] for r in rows if r.get("ssd")]
    if ssd and len(ssd) == len(rows):
        s["ssd"] = _ssd_summary(ssd, tokens)
    s["peak_rss_mb"] = max(r["rss_peak_mb"] for r in rows)
    s["rss_peak_raise_mb"] = sum(r["rss_peak_raise_mb"] for r in rows)
    return s


def _ssd_summary(ssd: list[dict], tokens: int) -> dict:
    """SSD statistics pooled over runs (ratios of sums) and the cost model on the pooled values."""
    from ..ssd.cost import predict

    def tot(k: str) -> float:
        return sum(x[k] for x in ssd)

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    hits, misses = tot("num_hits"), tot("num_misses")
    e_hit = ratio(tot("tokens_on_hit"), tot("rounds_on_hit"))
    e_miss = ratio(tot("tokens_on_miss"), tot("rounds_on_miss"))
    t_v = ratio(tot("time_verify_rounds"), tot("num_rounds"))
    t_p = ratio(tot("time_speculate"), tot("num_builds")) or 0.0
    t_b = ratio(tot("time_fallback"), tot("num_fallback_jit") + tot("num_fallback_fast")) or 0.0
    pred = None
    if t_v and (e_hit or e_miss):
        pred = predict(hits / max(1, hits + misses), e_hit or e_miss, e_miss or e_hit, t_p, t_b, t_v)
    return {
        "hit_rate": ratio(hits, tot("num_predicted_rounds")),
        "num_hits": int(hits),
        "num_predicted_rounds": int(tot("num_predicted_rounds")),
        "e_hit": e_hit,
        "e_miss": e_miss,
        "t_v_ms": 1e3 * t_v if t_v is not None else None,
        "t_p_ms": 1e3 * t_p,
        "t_b_ms": 1e3 * t_b,
        "t_p_over_t_v": t_p / t_v if t_v else None,
        "wait_ms_per_token": 1e3 * tot("time_wait") / tokens if tokens else None,
        "fallback_jit": int(tot("num_fallback_jit")),
        "fallback_fast": int(tot("num_fallback_fast")),
        "fault_events": sum(len(x["fallback_events"]) for x in ssd),
        "predicted_speedup_vs_ar": pred.speedup_vs_ar if pred else None,
        "predicted_tokens_per_s": pred.tokens_per_second if pred else None,
        "options": ssd[0]["options"],
    }


def _paired_ratio(rows: list[dict], ref: dict) -> tuple[float | None, int]:
    """(tok/s of ``rows`` over tok/s of their partners in ``ref`` (same prompt and repeat), as a
    ratio of totals, number of pairs)."""
    pairs = [(r, ref.get((r["prompt_id"], r["repeat"]))) for r in rows]
    pairs = [(r, a) for r, a in pairs if a is not None and a["time_s"] > 0 and a["new_tokens"] > 0]
    mt, ms = sum(r["new_tokens"] for r, _ in pairs), sum(r["time_s"] for r, _ in pairs)
    at, as_ = sum(a["new_tokens"] for _, a in pairs), sum(a["time_s"] for _, a in pairs)
    return ((mt / ms) / (at / as_) if pairs and ms > 0 and at > 0 else None), len(pairs)


def summarize(results: dict) -> list[dict]:
    """One summary per (category, cell) plus category "all"; cells in matrix order."""
    rows = results["rows"]
    ar = {(r["prompt_id"], r["repeat"], r["temperature"]): r for r in rows if r["kind"] == REFERENCE}
    cats = list(dict.fromkeys(r["category"] for r in rows))
    cells = results["cells"]
    out = []

    def group(cell: dict, cat: str) -> list[dict]:
        return [
            r
            for r in rows
            if r["label"] == cell["label"]
            and r["temperature"] == cell["temperature"]
            and (cat == "all" or r["category"] == cat)
        ]

    for cat in [*cats, "all"] if len(cats) > 1 else cats:
        for cell in cells:
            grp = group(cell, cat)
            if not grp:
                continue
            s = _group_summary(grp, ar, cell, cat)
            entry = ENTRIES.get(cell["kind"])  # None: a kind this version does not know
            partner = entry.compare_with if entry is not None else None
            if partner is not None:
                # e.g. SSD against synchronous speculative decoding: the same draft, γ, rule and T
                sd = next(
                    (
                        c
                        for c in cells
                        if c["kind"] == partner
                        and c.get("draft") == cell.get("draft")
                        and all(c[k] == cell[k] for k in ("temperature", "gamma", "rule"))
                        and c.get("draft_sampling", "sample") == "sample"  # SSD's drafts sample
                    ),
                    None,
                )
                ref = {(r["prompt_id"], r["repeat"]): r for r in group(sd, cat)} if sd else {}
                s["sd_label"] = sd["label"] if sd else None
                s["speedup_vs_sd"], s["sd_paired_runs"] = _paired_ratio(grp, ref)
            out.append(s)
    return out
