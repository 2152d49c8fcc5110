"""The report of ``hierspec bench-serve`` (`hierspec.bench.serving`): a markdown table, the
ratios the serving targets are stated in, greedy identity between servers, and a plot."""

from __future__ import annotations

from pathlib import Path

from .serving import median_levels


def _fmt(x: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "–" if x is None else f"{x * scale:.{digits}f}"


def identity(results: dict, a: str, b: str) -> tuple[int, int]:
    """(prompts whose greedy texts agree, prompts compared) between targets ``a`` and ``b``."""
    same = total = 0
    la = [v for v in results["levels"].values() if v["label"] == a]
    lb = [v for v in results["levels"].values() if v["label"] == b]
    for x in la:
        for y in lb:
            if (x["concurrency"], x.get("repeat")) != (y["concurrency"], y.get("repeat")):
                continue
            for s, t in zip(x["texts"], y["texts"], strict=False):
                if s is not None and t is not None:
                    total += 1
                    same += s == t
    return same, total


def batching_bound(results: dict) -> float | None:
    """4 c(1) / c(4) from the hierspec server's learned cost curve (its /health)."""
    for h in results.get("health", {}).values():
        curve = (h.get("worker") or h).get("cost_curve_ms") if isinstance(h, dict) else None
        if curve and "1" in curve and "4" in curve:
            return 4 * curve["1"] / curve["4"]
    return None


def write_report(results: dict, out: Path) -> str:
    med = median_levels(results)
    labels = list(dict.fromkeys(k[0] for k in med))
    conc = sorted({k[1] for k in med})
    lines = [
        "| server | "
        + " | ".join(f"c={c}: tok/s" for c in conc)
        + " | TTFT p95 (s) at max c | ITL p50 (ms) at max c |",
        "|---|" + "---|" * (len(conc) + 2),
    ]
    for lab in labels:
        row = [_fmt(med.get((lab, c), {}).get("tok_per_s")) for c in conc]
        top = med.get((lab, conc[-1]), {})
        lines.append(
            f"| {lab} | " + " | ".join(row) + f" | {_fmt(top.get('ttft_p95'), 1, 2)} | "
            f"{_fmt(top.get('itl_p50'), 1e3)} |"
        )
    notes = []
    bound = batching_bound(results)
    ar = "hierspec ar"
    if bound is not None and (ar, 1) in med and (ar, 4) in med:
        gain = med[(ar, 4)]["tok_per_s"] / max(med[(ar, 1)]["tok_per_s"], 1e-9)
        notes.append(
            f"batching bound 4 c(1)/c(4) = {bound:.2f}x; hierspec ar c=4 / c=1 = {gain:.2f}x "
            f"({100 * gain / bound:.0f}% of the bound)"
        )
    for c in conc:
        peers = {
            lab: med[(lab, c)]["tok_per_s"]
            for lab in labels
            if (lab, c) in med and not lab.startswith("hierspec")
        }
        ours = {
            lab: med[(lab, c)]["tok_per_s"]
            for lab in labels
            if (lab, c) in med and lab.startswith("hierspec")
        }
        if peers and ours:
            best_peer = max(peers, key=peers.get)
            parts = ", ".join(f"{lab} {v / peers[best_peer]:.2f}x" for lab, v in ours.items())
            notes.append(f"c={c}: vs the best peer ({best_peer}, {peers[best_peer]:.1f} tok/s): {parts}")
    for lab in labels:
        shares = []
        for c in conc:
            xs = [
                v["scheduler"]["draft_share_of_rows"]
                for v in results["levels"].values()
                if v["label"] == lab and v["concurrency"] == c and v.get("scheduler")
            ]
            if xs:
                shares.append(f"c={c}: {100 * sorted(xs)[len(xs) // 2]:.0f}%")
        if shares:
            notes.append(f"{lab}: drafted rows / decode rows " + ", ".join(shares))
    for other in labels:
        if other != ar:
            same, total = identity(results, ar, other)
            if total:
                notes.append(f"greedy texts identical to hierspec ar: {other} {same}/{total}")
    text = "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    (out / "report.md").write_text(text)
    _plot(med, labels, conc, out / "throughput.png")
    return text


def _plot(med: dict, labels: list[str], conc: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for lab in labels:
        xs = [c for c in conc if (lab, c) in med]
        ax[0].plot(xs, [med[(lab, c)]["tok_per_s"] for c in xs], marker="o", label=lab)
        ax[1].plot(xs, [med[(lab, c)]["ttft_p95"] or 0 for c in xs], marker="o", label=lab)
    ax[0].set(xlabel="concurrent clients", ylabel="tokens / s", title="throughput")
    ax[1].set(xlabel="concurrent clients", ylabel="seconds", title="time to first token, p95")
    for a in ax:
        a.set_xticks(conc)
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
