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
* τ per cell with a 95 % interval, and each rule's Δτ, Δτ/τ and tok/s ratio against ``match``
  (same draft sampling, and greedy drafts: the engines' practice), paired by prompt and repeat,
  with percentile-bootstrap intervals over prompts (`hierspec.bench.intervals`);
* greedy token identity with hierspec AR; peak RSS (``ru_maxrss``);
* SSD cells (``ssd:NAME``): pooled hit rate (hits / predicted rounds), E_hit / E_miss (tokens per
  round on a cache hit / on a fallback), T_p / T_v, fallback and fault counts, the Theorem-7 cost
  model's speed-up from the pooled measurements, and the speed-up over synchronous speculative
  decoding with the same draft (``draft:NAME``, same γ, rule and temperature, paired runs).

All files are rendered in memory first and then written one by one through a temporary file and
``os.replace``, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from ..files import write_bytes_atomic
from .config import TIME_COMPONENTS
from .intervals import acceptance_intervals, intervals_section
from .plots import make_plots, overall
from .summary import summarize


def plots_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


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


def _adaptive_section(results: dict, summ: list[dict]) -> list[str]:
    """Chosen draft lengths of adaptive (γ auto) rows per prompt set, the oracle bound from the
    target's cost curve, and Spec-Bench's speed-up convention beside ours."""
    rows = [s for s in summ if s.get("k_hist")]
    oracle = results.get("oracle")
    if not rows and not oracle:
        return []
    out = ["## Adaptive draft length", ""]
    if oracle:
        curve = zip(oracle["sizes"], oracle["seconds"], strict=True)
        out += [
            "Target cost curve on this host (ms per forward of T tokens): "
            + ", ".join(f"T={n}: {1e3 * c:.1f}" for n, c in curve),
            f"Oracle bound (every drafted token accepted, best k): **{oracle['speedup']:.2f}x** at k = "
            f"{oracle['k']} (= (k + 1) c(1) / c(k + 1)).",
            "",
        ]
    if rows:
        out.append(
            _table(
                ["method", "set", "T", "speed-up (totals)", "Spec-Bench speed-up", "chosen k: count"],
                [
                    [
                        s["label"],
                        s["category"],
                        _temp(s["temperature"]),
                        _f(s["speedup_total"]),
                        _f(s.get("speedup_specbench")),
                        ", ".join(f"{k}: {n}" for k, n in s["k_hist"].items()),
                    ]
                    for s in rows
                ],
            )
        )
        out.append("")
    return out


def to_markdown(results: dict, plots: Sequence[str] = ()) -> str:
    cfg, m, t = results["config"], results.get("machine", {}), results["timing"]
    summ = results["summary"]
    out = [f"# hierspec benchmark: {results['target']}", ""]
    if results.get("interrupted"):
        out += [
            f"**Interrupted** (Ctrl-C): only the {len(results['rows'])} runs that finished are "
            "reported; cells and prompts after the interruption are missing.",
            "",
        ]
    failed = results.get("failed")
    if failed:
        where = f"`{failed['label']}` on prompt {failed['prompt_id']}" if "label" in failed else "the harness"
        out += [
            f"**Stopped by an error** ({failed['stage']} of {where}): only the "
            f"{len(results['rows'])} runs that finished are reported; the rest is missing "
            "(`--on-error skip` records failures and goes on).",
            "",
            "```",
            failed.get("traceback") or failed["error"],
            "```",
            "",
        ]
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
        f"draft models at T > 0: {', '.join(cfg.get('draft_samplings', ['sample']))}; "
        f"γ: {', '.join(str(g or 'auto') for g in cfg['gammas'])}; temperatures: "
        f"{', '.join(_temp(x) for x in cfg['temperatures'])}; top-p {cfg['top_p']:g}, top-k off",
        f"- {cfg['max_new_tokens']} new tokens max (stop at EOS), {cfg['repeats']} repeat(s), "
        f"{cfg['warmup']} warm-up run(s) per cell; base seed {cfg['seed']} (seed per prompt and "
        "repeat, the same for every method)",
        "- HF peers on the same `HFModel.model`: `hf-ngram` = `generate(prompt_lookup_num_tokens=γ, "
        "max_matching_ngram_size=3)`; `hf-draft` = `generate(assistant_model=..., num_assistant_tokens=γ, "
        'num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0)`, at γ auto HF\'s '
        "defaults (20 tokens, confidence threshold 0.4 adapted within each call); both with "
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
    out += intervals_section(results, results.get("acceptance_intervals"))
    out += _adaptive_section(results, summ)
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


def write_partial(results: dict, out: str | os.PathLike[str]) -> list[Path]:
    """`write_report` for a run stopped early; should the report itself fail on the partial rows,
    results.json alone (with ``report_error``). results.json comes first in the list."""
    try:
        return write_report(results, out)
    except Exception as err:
        results.pop("summary", None)
        results["report_error"] = f"{type(err).__name__}: {err}"
        path = Path(out) / "results.json"
        write_bytes_atomic(path, json.dumps(results, indent=1, default=str).encode())
        return [path]


def write_report(results: dict, out: str | os.PathLike[str]) -> list[Path]:
    """Summarise ``results`` (adds ``results["summary"]``) and write report.md, results.json and
    the PNG plots into ``out`` (created if needed). Returns the paths written."""
    results["summary"] = summarize(results)
    results["acceptance_intervals"] = acceptance_intervals(results)
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
