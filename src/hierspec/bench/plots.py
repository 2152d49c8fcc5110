"""The benchmark report's PNG plots (matplotlib, Agg backend): speed-up by category, τ vs γ per
rule, per-position acceptance, time breakdown. Input: the results of `hierspec.bench.harness.
run_bench` with their ``summary`` (`hierspec.bench.summary.summarize`)."""

from __future__ import annotations

import io

from ..methods import REFERENCE
from .config import TIME_COMPONENTS

__all__ = ["make_plots", "overall"]


def overall(summary: list[dict]) -> list[dict]:
    """The summaries over all categories ("all", or the only category)."""
    cats = {s["category"] for s in summary}
    want = "all" if "all" in cats else next(iter(cats), None)
    return [s for s in summary if s["category"] == want]


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
        labels = [c["label"] for c in results["cells"] if c["temperature"] == t and c["kind"] != REFERENCE]
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
