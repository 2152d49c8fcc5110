"""Benchmark report: summaries of the harness rows, ``report.md``, ``results.json`` and PNG plots.

Every metric of a (category, method cell, temperature) group is computed from the raw rows of
:func:`hierspec.bench.harness.run_bench`:

* tokens/s = new tokens / wall time of the generate call (prefill included; for hierspec runs
  the exact-law analysis time is subtracted), as a ratio of totals and as a mean over runs;
* speed-up vs AR (hierspec plain decoding on the same prompt, repeat and temperature, measured in
  the same run): ratio of totals (sum tokens / sum time, method over AR) and the mean (± sd) of
  per-prompt ratios; with several repeats also the ratio of totals per repeat;
* mean acceptance length τ = 1 + accepted / spec steps (vLLM's, includes the bonus token; = Spec-
  Bench's "#Mean accepted tokens"), draft acceptance rate α = accepted / drafted, per-position
  acceptance and the acceptance histogram (hierspec methods; HF exposes no per-step counts);
* target forwards per generated token (HF: counted with a forward pre-hook on the model; each HF
  call, the prefill included, emits >= 1 token) and draft forwards per token;
* time breakdown per generated token (hierspec: prefill, draft, target forward, logits processing,
  verify rule, rollback, other; HF: total only);
* exact expected acceptance: sum over realised drafts of E[accepted | draft] from
  ``RULES[rule].law`` next to the measured accepted count, with z = (measured - expected) / sd;
* greedy token identity with hierspec AR; peak RSS (``ru_maxrss``);
* SSD cells (``ssd:NAME``): pooled hit rate (hits / predicted rounds), E_hit / E_miss (tokens per
  round on a cache hit / on a fallback), T_p / T_v, fallback and fault counts, the Theorem-7 cost
  model's speed-up from the pooled measurements, and the speed-up over synchronous speculative
  decoding with the same draft (``draft:NAME``, same γ, rule and temperature, paired runs).

All files are rendered in memory first and then written one by one through a temporary file and
``os.replace``, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

from ..files import write_bytes_atomic
from .harness import TIME_COMPONENTS

PLOTS = (
    "speedup_by_category.png",
    "acceptance_vs_gamma.png",
    "per_position_acceptance.png",
    "time_breakdown.png",
)


def plots_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------ summary
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
    fw = [r.get("target_forwards") for r in rows]
    s["target_forwards_per_token"] = sum(fw) / tokens if tokens and None not in fw else None
    dfw = [r.get("draft_forwards") for r in rows]
    s["draft_forwards_per_token"] = sum(dfw) / tokens if tokens and None not in dfw and rows else None
    spec = [r for r in rows if "num_spec_steps" in r]
    if cell["kind"] != "ar" and spec and len(spec) == len(rows):
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
    ar = {(r["prompt_id"], r["repeat"], r["temperature"]): r for r in rows if r["kind"] == "ar"}
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
            if cell["kind"] == "ssd":
                # synchronous speculative decoding with the same draft, γ, rule and temperature
                sd = next(
                    (
                        c
                        for c in cells
                        if c["kind"] == "draft"
                        and c.get("draft") == cell.get("draft")
                        and all(c[k] == cell[k] for k in ("temperature", "gamma", "rule"))
                    ),
                    None,
                )
                ref = {(r["prompt_id"], r["repeat"]): r for r in group(sd, cat)} if sd else {}
                s["sd_label"] = sd["label"] if sd else None
                s["speedup_vs_sd"], s["sd_paired_runs"] = _paired_ratio(grp, ref)
            out.append(s)
    return out


def overall(summary: list[dict]) -> list[dict]:
    """The summaries over all categories ("all", or the only category)."""
    cats = {s["category"] for s in summary}
    want = "all" if "all" in cats else next(iter(cats), None)
    return [s for s in summary if s["category"] == want]


# ------------------------------------------------------------------------------------ markdown
def _f(x, fmt: str = ".2f", none: str = "–") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, fmt)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _temp(t: float) -> str:
    return "greedy" if t == 0 else f"{t:g}"


def _speed_row(s: dict) -> list[str]:
    sp_mean = f"{s['speedup_mean']:.2f} ± {s['speedup_sd']:.2f}" if s.get("speedup_mean") is not None else "–"
    law = "–"
    if s.get("expected_accepted") is not None:
        law = f"{s['measured_accepted']} / {s['expected_accepted']:.1f}"
    return [
        s["label"],
        _temp(s["temperature"]),
        _f(s["tokens_per_s"], ".1f"),
        _f(s["speedup_total"]) + "x",
        sp_mean,
        _f(s["mean_acceptance_length"]),
        _f(s["draft_acceptance_rate"]),
        _f(s["target_forwards_per_token"]),
        s["identical_count"] or "–",
        law,
    ]


SPEED_HEADER = [
    "method",
    "T",
    "tok/s",
    "speed-up (totals)",
    "speed-up (mean ± sd per prompt)",
    "τ",
    "α",
    "target fwd/token",
    "identical to AR",
    "accepted: measured / exact E",
]


SSD_HEADER = [
    "method",
    "T",
    "tok/s",
    "speed-up vs AR (totals)",
    "hit rate",
    "vs sync SD, same draft",
    "E_hit",
    "E_miss",
    "T_p / T_v",
    "T_v (ms)",
    "wait (ms/token)",
    "fallbacks jit / fast",
    "faults",
    "cost model speed-up",
    "identical to AR",
]


def _ssd_row(s: dict) -> list[str]:
    x = s["ssd"]
    vs_sd = "–"
    if s.get("speedup_vs_sd") is not None:
        vs_sd = f"{s['speedup_vs_sd']:.2f}x ({s['sd_label']})"
    hit = "–"
    if x["hit_rate"] is not None:
        hit = f"{x['hit_rate']:.2f} ({x['num_hits']}/{x['num_predicted_rounds']})"
    return [
        s["label"],
        _temp(s["temperature"]),
        _f(s["tokens_per_s"], ".1f"),
        _f(s["speedup_total"]) + "x",
        hit,
        vs_sd,
        _f(x["e_hit"]),
        _f(x["e_miss"]),
        _f(x["t_p_over_t_v"]),
        _f(x["t_v_ms"]),
        _f(x["wait_ms_per_token"]),
        f"{x['fallback_jit']} / {x['fallback_fast']}",
        str(x["fault_events"]),
        _f(x["predicted_speedup_vs_ar"]) + ("x" if x["predicted_speedup_vs_ar"] is not None else ""),
        s["identical_count"] or "–",
    ]


def format_summary(results: dict) -> str:
    """The overall table and timing line, for the terminal."""
    summ = results.get("summary") or summarize(results)
    t = results["timing"]
    lines = [
        f"hierspec bench: {results['target']}, {results['num_prompts']} prompts, "
        f"{len(results['rows'])} timed runs, wall {t['wall_s']:.1f} s; harness overhead "
        f"{t['harness_overhead_pct']:.2f}% of wall (exact-law analysis {t['analysis_pct']:.2f}%)",
        "",
        _table(SPEED_HEADER, [_speed_row(s) for s in overall(summ)]),
    ]
    ssd = [s for s in overall(summ) if s.get("ssd")]
    if ssd:
        lines += [
            "",
            "SSD (speculative speculative decoding):",
            _table(SSD_HEADER, [_ssd_row(s) for s in ssd]),
        ]
    return "\n".join(lines)


def _ssd_section(results: dict, ov: list[dict]) -> list[str]:
    ssd = [s for s in ov if s.get("ssd")]
    if not ssd:
        return []
    info = results.get("ssd") or {}
    t = results["timing"]
    place = (
        f"verifier (this process) on CPU(s) {info.get('verifier_cpus')} with "
        f"{info.get('verifier_threads')} torch thread(s), speculator process on CPU "
        f"{info.get('speculator_cpu')} with 1; every other method ran on CPU(s) "
        f"{info.get('bench_cpus')} with {info.get('bench_threads')} torch thread(s)"
    )
    opts = "; ".join(
        f"{s['label']}: " + ", ".join(f"{k}={v}" for k, v in s["ssd"]["options"].items()) for s in ssd
    )
    return [
        "## Speculative speculative decoding (SSD)",
        "",
        _table(SSD_HEADER, [_ssd_row(s) for s in ssd]),
        "",
        "Hit rate = rounds whose draft came from the speculation cache / rounds that could be looked "
        "up (pooled over runs); E_hit / E_miss = tokens emitted per round on a hit / on a fallback "
        "(cold start included); T_p = the speculator's pre-speculation time per round, T_v = the "
        "verification time per round; wait = verifier time blocked on the speculator's reply "
        "(counted as 'draft' in the time breakdown, an `emulate` sleep as 'target fwd'); "
        "cost model = Theorem 7 (Kumar, Dao, May) on "
        "the pooled measurements, with T_v as the AR step; 'vs sync SD' = tok/s over `draft:` with "
        "the same draft, γ, rule and temperature on the same prompts (ratio of totals).",
        "",
        f"Placement: {place}. {info.get('sessions')} speculator process(es), started before the "
        f"warm-ups in {t.get('ssd_start_s', 0.0):.1f} s (not timed) and reused by every SSD cell; "
        f"after each SSD generation the harness waited, untimed, {t.get('ssd_sync_s', 0.0):.2f} s in "
        "all for the speculator to finish its last pre-speculation, so it never overlaps the next "
        f"cell. Options: {opts}. An `emulate` option sleeps after every SSD verification only: "
        "such rows show SSD's behaviour (hit rate, cost model) under a slow target, not a speed-up "
        "comparable with the other methods.",
        "",
    ]


def to_markdown(results: dict, plots: Sequence[str] = ()) -> str:
    cfg, m, t = results["config"], results.get("machine", {}), results["timing"]
    summ = results["summary"]
    out = [f"# hierspec benchmark: {results['target']}", ""]
    out += [
        "## Machine",
        "",
        f"- CPU: {m.get('cpu')} ({m.get('cpu_count')} logical cores), "
        f"`torch.backends.cpu.get_cpu_capability()` = **{m.get('cpu_capability')}**, "
        f"torch threads {m.get('torch_threads')}",
        f"- torch {m.get('torch')}, transformers {m.get('transformers')}, Python {m.get('python')}, "
        f"hierspec {m.get('hierspec')}; {m.get('platform')}",
        f"- date: {m.get('date')}",
        "",
        "## Settings",
        "",
        f"- target: {results['target']}, dtype {cfg['dtype']}, batch size 1"
        + (" (`--quick` preset)" if cfg.get("quick") else ""),
        f"- prompt sets: {', '.join(cfg['sets'])}; {cfg['n']} per set (per category for Spec-Bench), "
        f"offset {cfg['offset']}; {results['num_prompts']} prompts used",
        f"- methods: {', '.join(cfg['methods'])}; rules at T > 0: {', '.join(cfg['rules'])}; "
        f"γ: {', '.join(map(str, cfg['gammas']))}; temperatures: "
        f"{', '.join(_temp(x) for x in cfg['temperatures'])}; top-p {cfg['top_p']:g}, top-k off",
        f"- {cfg['max_new_tokens']} new tokens max (stop at EOS), {cfg['repeats']} repeat(s), "
        f"{cfg['warmup']} warm-up run(s) per cell; base seed {cfg['seed']} (seed per prompt and "
        "repeat, the same for every method)",
        "- HF peers on the same `HFModel.model`: `hf-ngram` = `generate(prompt_lookup_num_tokens=γ, "
        "max_matching_ngram_size=3)`; `hf-draft` = `generate(assistant_model=..., num_assistant_tokens=γ, "
        'num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0)`; both with '
        "`top_k=0` (no implicit top-k 50)",
        "- order: warm-ups first; then for each prompt and repeat every cell in turn, the order "
        "rotated by one per prompt",
        "",
        "Definitions: tok/s = new tokens / wall time of the whole generate call (prefill included); "
        "speed-up is against hierspec AR on the same prompts in this run, as a ratio of totals and "
        "as the mean ± sd of per-prompt ratios; τ = 1 + accepted/spec steps (includes the bonus "
        "token); α = accepted/drafted; 'accepted: measured / exact E' sums, over every realised "
        "draft, the exact E[accepted | draft] from `RULES[rule].law` (hierspec drafting methods at "
        "T > 0). HF exposes no per-step counts, so τ and α are blank for HF rows; compare "
        "target forwards per token instead.",
        "",
        "## Harness overhead",
        "",
        _table(
            [
                "wall (matrix)",
                "in generate calls",
                "of which warm-ups",
                "exact-law analysis",
                "harness overhead",
                "model load",
            ],
            [
                [
                    f"{t['wall_s']:.1f} s",
                    f"{t['generation_calls_s']:.1f} s",
                    f"{t['warmup_calls_s']:.1f} s",
                    f"{t['analysis_s']:.2f} s ({t['analysis_pct']:.2f}%)",
                    f"{t['harness_s']:.2f} s (**{t['harness_overhead_pct']:.2f}%**)",
                    f"{t.get('model_load_s', 0.0):.1f} s",
                ]
            ],
        ),
        "",
        "Harness overhead = wall time of the matrix loop minus the time inside generate calls "
        "(timed runs and warm-ups, perf_counter around each call). The exact-law analysis runs "
        "inside the engine's `on_verify` hook; its time is measured in the hook, subtracted from "
        "each run's time and listed separately (`--no-expected-acceptance` turns it off).",
        "",
    ]
    cats = list(dict.fromkeys(s["category"] for s in summ))
    for cat in cats:
        title = "All categories" if cat == "all" else f"Category: {cat}"
        grp = [s for s in summ if s["category"] == cat]
        out += [f"## {title}", "", _table(SPEED_HEADER, [_speed_row(s) for s in grp]), ""]
    ov = overall(summ)
    out += _ssd_section(results, ov)
    out += ["## Time breakdown (all categories, ms per generated token)", ""]
    comp_hdr = ["prefill", "draft", "target fwd", "logits proc.", "verify rule", "rollback", "other"]
    trows = []
    for s in ov:
        tm = s["time_ms_per_token"] or {}
        if "total" in tm:
            trows.append([s["label"], _temp(s["temperature"]), f"{tm['total']:.1f}"] + ["–"] * 7)
        else:
            trows.append(
                [s["label"], _temp(s["temperature"]), f"{sum(tm.values()):.1f}"]
                + [f"{tm[c]:.2f}" for c in TIME_COMPONENTS]
            )
    out += [
        _table(["method", "T", "total", *comp_hdr], trows),
        "",
        "HF rows are timed as a whole (no split). 'other' = engine bookkeeping (committing tokens, "
        "EOS checks, tensor concatenation) and call overhead.",
        "",
    ]
    law = [s for s in ov if s.get("expected_accepted") is not None]
    if law:
        out += [
            "## Exact expected acceptance along the realised drafts (all categories)",
            "",
            _table(
                ["method", "T", "spec steps", "measured accepted", "exact E[accepted]", "sd", "z"],
                [
                    [
                        s["label"],
                        _temp(s["temperature"]),
                        str(s["law_steps"]),
                        str(s["measured_accepted"]),
                        f"{s['expected_accepted']:.2f}",
                        f"{s['expected_accepted_sd']:.2f}",
                        _f(s["acceptance_z"]),
                    ]
                    for s in law
                ],
            ),
            "",
            "z = (measured − E) / sd, with sd² the sum of the per-step conditional variances: the "
            "differences form a martingale, so |z| ≲ 2 is expected from a correct rule.",
            "",
        ]
    pp = [s for s in ov if s.get("per_position_acceptance")]
    if pp:
        width = max(len(s["per_position_acceptance"]) for s in pp)
        out += [
            "## Per-position acceptance (all categories)",
            "",
            _table(
                ["method", "T", *[f"pos {i + 1}" for i in range(width)]],
                [
                    [s["label"], _temp(s["temperature"])]
                    + [_f(x) for x in s["per_position_acceptance"]]
                    + ["–"] * (width - len(s["per_position_acceptance"]))
                    for s in pp
                ],
            ),
            "",
        ]
    mem = results["memory"]
    warm = {(w["label"], w["temperature"]): w["mb"] for w in mem.get("warmup_rss_raise_mb", [])}
    out += [
        "## Memory",
        "",
        f"Peak RSS: {mem['peak_rss_mb_before_runs']:.0f} MiB after loading, "
        f"{mem['peak_rss_mb_end']:.0f} MiB at the end. Measured with {mem['method']}. That "
        "high-water mark only grows, so per method the table gives how much it rose during that "
        "method's runs (warm-ups and timed runs separately). RSS also counts the pages of "
        "memory-mapped weight files, which the first forward faults in: a large raise in the "
        "first warm-up cell is the model itself, not that method.",
        "",
        _table(
            ["method", "T", "raise in warm-ups (MiB)", "raise in timed runs (MiB)"],
            [
                [
                    s["label"],
                    _temp(s["temperature"]),
                    _f(warm.get((s["label"], s["temperature"])), ".1f"),
                    f"{s['rss_peak_raise_mb']:.1f}",
                ]
                for s in ov
            ],
        ),
        "",
    ]
    if results["errors"]:
        out += [f"## Skipped ({len(results['errors'])})", ""]
        out += [f"- {e.get('prompt_id')} {e.get('label', '')}: {e['error']}" for e in results["errors"]]
        out += [""]
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------ plots
def _fig_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _title(t: float) -> str:
    return "T = 0 (greedy)" if t == 0 else f"T = {t:g}"


def _colors(n: int) -> list:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


def _method_short(s: dict) -> str:
    """The label without its gamma part: "ngram", "ngram/block", "draft:NAME/token"."""
    return "/".join(p for p in s["label"].split("/") if not p.startswith("γ"))


def _legend_below(ax, n: int) -> None:
    ax.legend(
        fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2 if n > 3 else 1, frameon=False
    )


def make_plots(results: dict) -> dict[str, bytes]:
    """PNG bytes by file name (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    summ = results["summary"]
    temps = list(dict.fromkeys(c["temperature"] for c in results["cells"]))
    out: dict[str, bytes] = {}

    # 1. speed-up by category and method (bars: ratio of totals; dots: mean of per-prompt ratios)
    cats = list(dict.fromkeys(s["category"] for s in summ))
    width_in = max(5.5, 1.6 * len(cats) + 3)
    fig, axes = plt.subplots(1, len(temps), figsize=(width_in * len(temps), 4.2), squeeze=False, sharey=True)
    for ax, t in zip(axes[0], temps, strict=True):
        labels = [c["label"] for c in results["cells"] if c["temperature"] == t and c["kind"] != "ar"]
        width = 0.8 / max(1, len(labels))
        colors = _colors(len(labels))
        for j, lab in enumerate(labels):
            xs, ys, ms = [], [], []
            for i, cat in enumerate(cats):
                s = next(
                    (s for s in summ if s["category"] == cat and s["label"] == lab and s["temperature"] == t),
                    None,
                )
                if s and s["speedup_total"] is not None:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(s["speedup_total"])
                    ms.append(s["speedup_mean"])
            ax.bar(xs, ys, width * 0.92, label=lab, color=colors[j])
            ax.plot(xs, ms, "k.", ms=5)
        ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.set_xticks(range(len(cats)), cats, rotation=20 if len(cats) > 4 else 0)
        ax.set_title(_title(t))
        ax.grid(axis="y", alpha=0.3)
        if labels:
            ax.legend(
                fontsize=8,
                loc="upper center",
                bbox_to_anchor=(0.5, -0.12),
                ncol=min(3, len(labels)),
                frameon=False,
            )
    axes[0][0].set_ylabel("speed-up vs AR\n(bars: ratio of totals, dots: mean of per-prompt ratios)")
    fig.suptitle(f"Speed-up over plain decoding (same run) — {results['target']}")
    out["speedup_by_category.png"] = _fig_bytes(fig)

    ov = overall(summ)
    spec = [s for s in ov if s.get("mean_acceptance_length") is not None]

    # 2. mean acceptance length vs gamma, one line per (method, rule)
    fig, axes = plt.subplots(1, len(temps), figsize=(4.8 * len(temps), 4.0), squeeze=False, sharey=True)
    for ax, t in zip(axes[0], temps, strict=True):
        series: dict[str, list[tuple[int, float]]] = {}
        for s in spec:
            if s["temperature"] == t:
                series.setdefault(_method_short(s), []).append((s["gamma"], s["mean_acceptance_length"]))
        colors = _colors(len(series))
        for j, (key, pts) in enumerate(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=key, color=colors[j])
        gammas = sorted({g for pts in series.values() for g, _ in pts})
        if gammas:
            ax.set_xticks(gammas)
            ax.set_xlim(min(gammas) - 0.5, max(gammas) + 0.5)
        ax.set_xlabel("γ (draft tokens per step)")
        ax.set_title(_title(t))
        ax.grid(alpha=0.3)
        if series:
            _legend_below(ax, len(series))
    axes[0][0].set_ylabel("mean acceptance length τ")
    fig.suptitle("Mean acceptance length vs γ per rule (hierspec methods, all categories)")
    out["acceptance_vs_gamma.png"] = _fig_bytes(fig)

    # 3. per-position acceptance
    fig, axes = plt.subplots(1, len(temps), figsize=(4.8 * len(temps), 4.0), squeeze=False, sharey=True)
    for ax, t in zip(axes[0], temps, strict=True):
        lines = [s for s in spec if s["temperature"] == t and s.get("per_position_acceptance")]
        colors = _colors(len(lines))
        for j, s in enumerate(lines):
            pp = s["per_position_acceptance"]
            xs = [i + 1 for i, v in enumerate(pp) if v is not None]
            ys = [v for v in pp if v is not None]
            ax.plot(xs, ys, "o-", label=s["label"], color=colors[j], alpha=0.85)
        ax.set_xlabel("draft position")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(_title(t))
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if lines:
            _legend_below(ax, len(lines))
    axes[0][0].set_ylabel("P(accepted | drafted at position)")
    fig.suptitle("Per-position acceptance (hierspec methods, all categories)")
    out["per_position_acceptance.png"] = _fig_bytes(fig)

    # 4. stacked time breakdown per method, ms per generated token
    bars = [s for s in ov if s.get("time_ms_per_token")]
    fig, ax = plt.subplots(figsize=(8.5, 0.42 * len(bars) + 1.4))
    names = [f"{s['label']}  (T={s['temperature']:g})" for s in bars]
    ys = list(range(len(bars)))[::-1]
    comp_colors = dict(zip(TIME_COMPONENTS, _colors(len(TIME_COMPONENTS)), strict=True))
    used: set[str] = set()
    for y, s in zip(ys, bars, strict=True):
        tm = s["time_ms_per_token"]
        if "total" in tm:
            label = None if "hf" in used else "HF generate (not split)"
            ax.barh(y, tm["total"], color="lightgrey", hatch="//", edgecolor="grey", label=label)
            used.add("hf")
            continue
        left = 0.0
        for c in TIME_COMPONENTS:
            label = None if c in used else c.replace("_", " ")
            ax.barh(y, tm[c], left=left, color=comp_colors[c], label=label)
            used.add(c)
            left += tm[c]
    ax.set_yticks(ys, names, fontsize=8)
    ax.set_ylim(-0.6, len(bars) - 0.4)
    ax.set_xlabel("ms per generated token")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("Time breakdown per method (all categories)")
    out["time_breakdown.png"] = _fig_bytes(fig)
    return out


# ------------------------------------------------------------------------------------ files
def write_report(results: dict, out: str | os.PathLike[str]) -> list[Path]:
    """Summarise ``results`` (adds ``results["summary"]``) and write report.md, results.json and
    the PNG plots into ``out`` (created if needed). Returns the paths written."""
    results["summary"] = summarize(results)
    pngs = make_plots(results) if plots_available() and results["rows"] else {}
    files = {
        "results.json": json.dumps(results, indent=1, default=str).encode(),
        **pngs,
        "report.md": to_markdown(results, list(pngs)).encode(),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in files.items():
        write_bytes_atomic(out / name, data)
        written.append(out / name)
    return written
