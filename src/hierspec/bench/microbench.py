"""Micro-benchmark of the verification rules (a benchmark, not a test).

Times each rule on synthetic LM-like distributions (float32, V = 49152 by default) for several
batch sizes, with stochastic and deterministic (one-hot) drafts, and two regimes: drafts close to
the target (high acceptance) and unrelated drafts (low acceptance). Reports the median over
repeats, the validated call next to the hot-path call (``validate=False``, what the engine uses),
and the share of a reference decode step. Run:

    hierspec bench-verify --out bench-out/verify        (or python -m hierspec.bench.microbench)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ..verify import RULES


def _inputs(b: int, k: int, v: int, regime: str, gen: torch.Generator):
    """LM-like rows: logits with a heavy head; the draft is the target plus noise ("close") or an
    independent distribution ("far"). Draft tokens are sampled from q."""
    logits = torch.randn(b, k + 1, v, generator=gen) * 2.5
    target = torch.softmax(logits, -1)
    noise = torch.randn(b, k, v, generator=gen) * (0.5 if regime == "close" else 2.5)
    base = logits[:, :k] if regime == "close" else torch.zeros_like(noise)
    draft = torch.softmax(base + noise, -1)
    tokens = torch.multinomial(draft.reshape(-1, v), 1, generator=gen).reshape(b, k)
    return tokens, draft, target


def _median_us(fn, repeats: int) -> float:
    for _ in range(max(3, repeats // 10)):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def run(
    batch_sizes=(1, 8),
    k: int = 8,
    v: int = 49152,
    repeats: int = 200,
    threads: int = 2,
    step_ms: float = 20.0,
    seed: int = 0,
) -> dict:
    """Time every rule; returns a JSON-able dict of rows."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b in batch_sizes:
        for regime in ("close", "far"):
            tokens, draft, target = _inputs(b, k, v, regime, gen)
            for name, rule in RULES.items():
                for det in (False, True):
                    if name == "greedy" and not det:
                        continue
                    q = None if det else draft
                    g = torch.Generator().manual_seed(seed)
                    hot = _median_us(
                        lambda r=rule, q=q, g=g, x=tokens, p=target: r(x, q, p, g, validate=False), repeats
                    )
                    checked = _median_us(
                        lambda r=rule, q=q, g=g, x=tokens, p=target: r(x, q, p, g), max(20, repeats // 4)
                    )
                    acc = float(rule(tokens, q, target, g, validate=False).num_accepted.float().mean())
                    rows.append(
                        {
                            "rule": name,
                            "batch": b,
                            "K": k,
                            "V": v,
                            "draft": "one-hot" if det else "q",
                            "regime": regime,
                            "median_us": round(hot, 1),
                            "median_us_validated": round(checked, 1),
                            "share_of_step": round(hot / (step_ms * 1e3), 5),
                            "mean_accepted_sample": acc,
                        }
                    )
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": threads,
            "torch": torch.__version__,
        },
        "settings": {
            "K": k,
            "V": v,
            "dtype": "float32",
            "repeats": repeats,
            "reference_step_ms": step_ms,
        },
        "rows": rows,
    }


def to_markdown(res: dict) -> str:
    s = res["settings"]
    lines = [
        f"# Verification rule micro-benchmark (K={s['K']}, V={s['V']}, {s['dtype']}, "
        f"median of {s['repeats']})",
        "",
        f"torch {res['machine']['torch']}, {res['machine']['threads']} threads. "
        f"Share = hot-path time / {s['reference_step_ms']} ms reference decode step.",
        "",
        "| rule | B | draft | regime | hot path µs | validated µs | share of step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['rule']} | {r['batch']} | {r['draft']} | {r['regime']} | {r['median_us']:.0f} "
            f"| {r['median_us_validated']:.0f} | {100 * r['share_of_step']:.2f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hierspec bench-verify", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("bench-out/verify"),
        help="output directory (results.json, report.md)",
    )
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--gamma", type=int, default=8)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    res = run(k=args.gamma, v=args.vocab, repeats=args.repeats, threads=args.threads)
    (args.out / "results.json").write_text(json.dumps(res, indent=2))
    md = to_markdown(res)
    (args.out / "report.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
