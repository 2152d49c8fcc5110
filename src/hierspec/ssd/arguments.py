"""The SSD command-line arguments and summary, used by ``hierspec generate --method ssd`` (wired in
by `hierspec.cli`)::

    hierspec generate --method ssd --draft DRAFT.safetensors --prompt "..." [--gamma K]
        [--fanout uniform|geometric] [--budget B] [--saguaro-c C] [--fallback jit|fast]
        [--fast-backup ngram|random] [--emulate-verify-ms MS] [--ssd-reply-timeout S]

`add_ssd_arguments(parser)` adds the flags (`hierspec.cli.flags` turns them into the method spec,
which `hierspec.methods.ssd` validates once, before any model is loaded); `ssd_summary_lines(stats)`
formats the SSD statistics for stderr.
"""

from __future__ import annotations

import argparse

from .options import FALLBACKS, FAST_BACKUPS
from .saguaro import FANOUTS
from .stats import SSDStats


def add_ssd_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the SSD flags (used with ``--method ssd``) to `parser`."""
    g = parser.add_argument_group("speculative speculative decoding (--method ssd)")
    g.add_argument("--fanout", default="uniform", choices=FANOUTS, help="fan-out allocation over k")
    g.add_argument(
        "--budget",
        type=int,
        default=None,
        help="branches pre-speculated per round (>= gamma + 1; default 3(gamma + 1))",
    )
    g.add_argument(
        "--saguaro-c",
        type=float,
        default=1.0,
        help="Saguaro sampling constant C in (0, 1] (1 = plain sampling)",
    )
    g.add_argument(
        "--fallback", default="jit", choices=FALLBACKS, help="on a cache miss: jit draft or fast backup"
    )
    g.add_argument(
        "--fast-backup", default="ngram", choices=FAST_BACKUPS, help="what --fallback fast proposes"
    )
    g.add_argument(
        "--emulate-verify-ms",
        type=float,
        default=0.0,
        help="sleep this long after each verification (emulates a large target; 0 = real mode)",
    )
    g.add_argument(
        "--ssd-reply-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the speculator before the verifier finishes alone",
    )


def ssd_summary_lines(stats: SSDStats) -> list[str]:
    """Human-readable SSD statistics (for stderr)."""
    per_k = ", ".join(f"k={k}: {r:.2f}" for k, r in enumerate(stats.hit_rate_per_k))
    lines = [
        f"SSD: hit rate {stats.hit_rate:.2f} ({stats.num_hits}/{stats.num_predicted_rounds} rounds; per k: "
        f"{per_k or '-'}), bonus-token accuracy {stats.bonus_accuracy:.2f} "
        f"(top-1 {stats.bonus_top1_accuracy:.2f})",
        f"E_hit {stats.e_hit:.2f}, E_miss {stats.e_miss:.2f} tokens/round; T_v {1e3 * stats.t_v:.2f} ms, "
        f"T_p {1e3 * stats.t_p:.2f} ms (T_p/T_v {stats.t_p_over_t_v:.2f}), T_b {1e3 * stats.t_b:.2f} ms; "
        f"fallbacks: jit {stats.num_fallback_jit}, fast {stats.num_fallback_fast}",
    ]
    pred = stats.cost_prediction()
    if pred is not None:
        lines.append(
            f"cost model: predicted {pred.tokens_per_second:.1f} tok/s, "
            f"measured {stats.tokens_per_second:.1f} tok/s"
        )
    lines += [f"fault: {e}" for e in stats.fallback_events]
    return lines
