"""95 % intervals for the bench's acceptance comparisons: a cluster bootstrap over prompts.

Runs of one prompt (its repeats, and the same prompt under two cells) are correlated, so the
resampling unit is the prompt: B resamples of the m prompts with replacement, all of a prompt's
runs kept together, the statistic recomputed on the resampled totals, and the interval the 2.5 /
97.5 % percentiles (the percentile bootstrap; seed fixed, so a report is reproducible).

Per cell (hierspec drafting at T > 0, a rule of `config.SPEC_RULES`):

    tau      = 1 + sum accepted / sum spec steps                 (vLLM's mean acceptance length)
    d_tau    = tau(cell) - tau(ref)        paired: only (prompt, repeat) runs present in both
    tok/s    = (sum tokens / sum time)(cell) / (same)(ref)      paired likewise

with two references: ``match`` with the cell's draft sampling (the rule alone), and ``match``
with greedy drafts (the engines' practice: llama.cpp and SGLang draft greedily and verify by
exact match), both for the same method, temperature and gamma. With a greedy draft every rule
verifies with the same coupled sampler (`hierspec.verify.coupled`) and the bench gives every
cell the same seed per prompt and repeat, so greedy cells of different rules emit the same
text: their d_tau is 0 exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

BOOT = 2000
LEVEL = 0.95

__all__ = ["acceptance_intervals", "cluster_bootstrap", "intervals_section"]


def cluster_bootstrap(
    sums: np.ndarray,
    stat: Callable[[np.ndarray], np.ndarray],
    boot: int = BOOT,
    seed: int = 0,
    level: float = LEVEL,
) -> tuple[float, float, float]:
    """(point, lo, hi): ``stat`` of the totals of ``sums`` [m, c] (per-cluster sums of c
    quantities; ``stat`` maps totals [..., c] to [...]) and its percentile-bootstrap interval
    over the m clusters. One cluster gives a zero-width interval (nothing to resample)."""
    sums = np.asarray(sums, dtype=np.float64)
    if sums.ndim != 2 or sums.shape[0] < 1:
        raise ValueError(f"sums: expected shape [m >= 1, c], got {sums.shape}")
    point = float(stat(sums.sum(0)))
    m = sums.shape[0]
    idx = np.random.default_rng(seed).integers(0, m, size=(boot, m))
    samples = stat(sums[idx].sum(1))  # [B]
    a = (1 - level) / 2
    lo, hi = np.quantile(samples, [a, 1 - a])
    return point, float(lo), float(hi)


def _tau(t: np.ndarray) -> np.ndarray:  # totals [..., (accepted, steps)]
    return 1.0 + t[..., 0] / np.maximum(t[..., 1], 1e-300)


def _d_tau(t: np.ndarray) -> np.ndarray:  # [..., (acc, steps, acc_ref, steps_ref)]
    return _tau(t[..., :2]) - _tau(t[..., 2:])


def _rel_tau(t: np.ndarray) -> np.ndarray:
    return _tau(t[..., :2]) / _tau(t[..., 2:]) - 1.0


def _speed(t: np.ndarray) -> np.ndarray:  # [..., (tokens, time, tokens_ref, time_ref)]
    return (t[..., 0] / t[..., 1]) / (t[..., 2] / t[..., 3])


def _by_prompt(rows: list[dict], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for r in rows:
        v = np.array([float(r[k]) for k in keys])
        out[r["prompt_id"]] = out.get(r["prompt_id"], 0.0) + v
    return out


def _paired(rows: list[dict], ref: list[dict], keys: tuple[str, str]) -> np.ndarray | None:
    """Per-prompt sums [m, 4] of ``keys`` over the (prompt, repeat) runs in both groups."""
    by_ref = {(r["prompt_id"], r["repeat"]): r for r in ref}
    pairs = [
        (r, by_ref[(r["prompt_id"], r["repeat"])]) for r in rows if (r["prompt_id"], r["repeat"]) in by_ref
    ]
    if not pairs:
        return None
    out: dict[str, np.ndarray] = {}
    for a, b in pairs:
        v = np.array([float(a[keys[0]]), float(a[keys[1]]), float(b[keys[0]]), float(b[keys[1]])])
        out[a["prompt_id"]] = out.get(a["prompt_id"], 0.0) + v
    return np.stack(list(out.values()))


def _spec(rows: list[dict]) -> bool:
    return (
        bool(rows) and all("num_spec_steps" in r for r in rows) and sum(r["num_spec_steps"] for r in rows) > 0
    )


def acceptance_intervals(results: dict, boot: int = BOOT, seed: int = 0) -> list[dict]:
    """One entry per drafting cell at T > 0 verified by a chain rule (see module docstring):
    tau with its interval, d_tau (absolute and relative) and the tok/s ratio against the two
    ``match`` references, each with its interval and the number of prompts paired."""
    from .config import SPEC_RULES

    rows = results["rows"]
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["label"], r["temperature"]), []).append(r)
    cells = [c for c in results["cells"] if c["temperature"] > 0 and c["rule"] in SPEC_RULES]

    def find(cell: dict, sampling: str) -> dict | None:
        keys = ("method", "temperature", "gamma")
        return next(
            (
                c
                for c in cells
                if c["rule"] == "match"
                and c.get("draft_sampling", "sample") == sampling
                and all(c[k] == cell[k] for k in keys)
            ),
            None,
        )

    out = []
    for cell in cells:
        grp = groups.get((cell["label"], cell["temperature"]), [])
        if not _spec(grp):
            continue
        ds = cell.get("draft_sampling", "sample")
        tau = cluster_bootstrap(
            np.stack(list(_by_prompt(grp, ("num_accepted_draft_tokens", "num_spec_steps")).values())),
            _tau, boot, seed,
        )  # fmt: skip
        e = {
            "label": cell["label"],
            "temperature": cell["temperature"],
            "rule": cell["rule"],
            "draft_sampling": ds,
            "runs": len(grp),
            "prompts": len({r["prompt_id"] for r in grp}),
            "tau": tau,
        }
        for name, ref_sampling in (("vs_match", ds), ("vs_engines", "greedy")):
            ref = find(cell, ref_sampling)
            ref_rows = groups.get((ref["label"], ref["temperature"]), []) if ref else []
            acc = _paired(grp, ref_rows, ("num_accepted_draft_tokens", "num_spec_steps")) if ref else None
            if acc is None or not _spec(ref_rows):
                e[name] = None
                continue
            spd = _paired(grp, ref_rows, ("new_tokens", "time_s"))
            e[name] = {
                "ref": ref["label"],
                "prompts": int(acc.shape[0]),
                "d_tau": cluster_bootstrap(acc, _d_tau, boot, seed),
                "rel_tau": cluster_bootstrap(acc, _rel_tau, boot, seed),
                "speed": cluster_bootstrap(spd, _speed, boot, seed),
            }
        out.append(e)
    return out


def _ci(x: tuple[float, float, float], fmt: str = ".2f", pct: bool = False) -> str:
    k = 100.0 if pct else 1.0
    unit = "%" if pct else ""
    return f"{k * x[0]:{fmt}}{unit} [{k * x[1]:{fmt}}, {k * x[2]:{fmt}}]"


def intervals_section(results: dict, entries: list[dict] | None = None) -> list[str]:
    """Markdown lines of the acceptance-interval table (nothing when no cell qualifies)."""
    entries = acceptance_intervals(results) if entries is None else entries
    if not entries:
        return []
    z = {
        (s["label"], s["temperature"]): s.get("acceptance_z")
        for s in results.get("summary") or []
        if s["category"] == "all" or len({x["category"] for x in results["summary"]}) == 1
    }

    def vs(x: dict | None) -> list[str]:
        if x is None:
            return ["–", "–", "–"]
        return [_ci(x["d_tau"]), _ci(x["rel_tau"], "+.1f", pct=True), _ci(x["speed"]) + "x"]

    rows = []
    for e in entries:
        zz = z.get((e["label"], e["temperature"]))
        rows.append(
            [
                e["label"],
                f"{e['temperature']:g}",
                f"{e['prompts']} / {e['runs']}",
                _ci(e["tau"]),
                *vs(e["vs_match"]),
                *vs(e["vs_engines"]),
                "–" if zz is None else f"{zz:.2f}",
            ]
        )
    header = [
        "method", "T", "prompts / runs", "τ [95% CI]",
        "Δτ vs match", "Δτ/τ vs match", "tok/s vs match",
        "Δτ vs match [greedy]", "Δτ/τ vs match [greedy]", "tok/s vs match [greedy]", "z",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return [
        "## Acceptance length with 95% intervals, and each rule against `match`",
        "",
        *lines,
        "",
        f"Intervals: percentile bootstrap over prompts ({BOOT} resamples, repeats of a prompt kept "
        "together). 'vs match' pairs each run with the `match` run of the same method, γ, T, draft "
        "sampling, prompt and repeat (same seed); 'vs match [greedy]' with `match` on greedy drafts, "
        "the engines' practice (llama.cpp, SGLang). Δτ/τ and tok/s are ratios of totals over the "
        "paired runs. z = (measured − exact E[accepted]) / sd from `RULES[rule].law` (section "
        "below). Greedy drafts go through one coupled sampler under every rule: their Δτ vs "
        "match [greedy] is 0.",
        "",
    ]
