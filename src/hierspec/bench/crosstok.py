"""Cross-tokenizer drafting, measured: a draft model of another family (its own vocabulary)
proposing to a target through `hierspec.drafters.text.TextDrafter`, against plain decoding and
against transformers' universal assisted decoding on the same pair, in one run.

    python -m hierspec.bench.crosstok --out bench-out/crosstok
    python -m hierspec.bench.crosstok --target qwen2.5-coder-1.5b --draft smollm2-135m \\
        --backends llama.cpp,torch --prompts code:2,chat:2 --max-new-tokens 64 --gamma 4,8

Rows, per backend (greedy decoding, the same prompts, interleaved per prompt so that load on a
shared machine hits every method alike):

    ar              hierspec's engine without a drafter (the baseline of the speed-ups)
    text:K          the text-level drafter, K target tokens per step (each K of ``--gamma``)
    text:auto       the same inside `hierspec.policy.AdaptiveDrafter` (cost curve of the target
                    from `hierspec.costs.cost_curve`): it drafts only where the measured costs say
                    it pays, so it should stay >= ~0.95x plain decoding even when drafting loses
    hf-ar           (torch) transformers' own greedy ``generate``
    hf-uad:K        (torch) universal assisted decoding, ``generate(assistant_model=draft,
                    tokenizer=target's, assistant_tokenizer=draft's)``, constant K tokens
    hf-uad:auto     (torch) the same with transformers' defaults (20 tokens, confidence 0.4)

Each row: new tokens, seconds of the whole call (prefill included) and this process's CPU
seconds over it (on one core, `taskset -c N` and ``--threads 1``, the measure a shared machine's
load disturbs least), tokens per second, the mean acceptance length (hierspec: accepted + 1 per
step; transformers: new tokens per forward of the target, counted by a hook) and whether the
tokens equal ``ar``'s. Speed-ups are ratios of tokens per second in the same run; ``hf-*`` rows
are also compared with ``hf-ar``. Writes ``crosstok.md`` (markdown table) and ``crosstok.json``
to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .lists import names, parse_list, positive_ints

__all__ = ["main", "run", "to_markdown"]


def _set_count(part: str) -> tuple[str, int]:
    """``code:2`` -> ("code", 2); ``code`` -> ("code", 1)."""
    name, _, n = part.partition(":")
    return name, int(n or 1)


def _prompt_spec(text: str) -> list[tuple[str, int]]:
    """``code:2,chat:2`` -> [("code", 2), ("chat", 2)]."""
    return parse_list(text, _set_count, "", valid=lambda sn: sn[1] >= 1, expected="SET:N[,SET:N...]")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hierspec.bench.crosstok",
        description="Cross-tokenizer drafting (text-level drafts) vs plain decoding and transformers' "
        "universal assisted decoding, same pair, same run.",
    )
    p.add_argument("--target", default="qwen2.5-coder-1.5b", help="target model (catalogue name or path)")
    p.add_argument("--draft", default="smollm2-135m", help="draft model of another family")
    p.add_argument(
        "--backends",
        type=names(("llama.cpp", "torch")),
        default="llama.cpp,torch",
        help="comma-separated: llama.cpp, torch",
    )
    p.add_argument("--prompts", type=_prompt_spec, default="code:2,chat:2", help="prompt sets, SET:N,...")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--gamma",
        type=positive_ints(),
        default="4",
        help="target tokens drafted per step, one fixed row each (4,8)",
    )
    p.add_argument("--k-max", type=int, default=8, help="longest draft of the adaptive row")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="torch dtype (a GGUF runs packed: fastest in float32)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--n-ctx", type=int, default=2048, help="llama.cpp context")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' rows")
    p.add_argument("--no-adaptive", action="store_true", help="skip the text:auto row")
    p.add_argument("--out", required=True, type=Path, help="folder for crosstok.md and crosstok.json")
    return p


@contextlib.contextmanager
def _count_forwards(module: Any) -> Iterator[list[int]]:
    """Counts calls of ``module`` (a torch module) while the block runs."""
    n = [0]
    handle = module.register_forward_hook(lambda *_: n.__setitem__(0, n[0] + 1))
    try:
        yield n
    finally:
        handle.remove()


def _engine_row(target: Any, ids: list[int], drafter: Any, gamma: int, max_new: int, eos: int | None) -> dict:
    from ..engine import generate
    from ..sampling import SamplingParams

    t0, c0 = time.perf_counter(), time.process_time()
    res = generate(
        target,
        ids,
        drafter=drafter,
        gamma=gamma,
        params=SamplingParams(temperature=0),
        max_new_tokens=max_new,
        eos_token_id=eos,
    )
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    s = res.stats
    tau = s.mean_acceptance_length if drafter is not None and s.num_spec_steps else 1.0
    return {
        "token_ids": res.token_ids,
        "time_s": dt,
        "cpu_s": cpu,
        "acceptance": tau,
        "drafted": s.num_draft_tokens,
        "accepted": s.num_accepted_draft_tokens,
    }


def _hf_row(
    target: Any, draft: Any | None, gamma: int | None, ids: list[int], max_new: int, eos: int | None
) -> dict:
    """transformers' greedy ``generate`` on the target's module, with the draft's module as a
    universal assistant when ``draft`` = (module, target tokenizer, draft tokenizer)."""
    model = target.model
    inp = torch.tensor([ids], dtype=torch.long, device=model.device)
    kw: dict[str, Any] = {
        "input_ids": inp,
        "attention_mask": torch.ones_like(inp),
        "max_new_tokens": max_new,
        "do_sample": False,
        "eos_token_id": eos,
        "pad_token_id": eos,
    }
    if draft is not None:
        assistant, t_tok, d_tok = draft
        n, threshold = (gamma, 0.0) if gamma else (20, 0.4)  # transformers' defaults at "auto"
        gc = assistant.generation_config
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = n, "constant"
        gc.assistant_confidence_threshold = threshold
        kw.update(
            assistant_model=assistant,
            tokenizer=t_tok,
            assistant_tokenizer=d_tok,
            num_assistant_tokens=n,
            num_assistant_tokens_schedule="constant",
            assistant_confidence_threshold=threshold,
        )
    with _count_forwards(model) as n_fwd, torch.inference_mode():
        t0, c0 = time.perf_counter(), time.process_time()
        out = model.generate(**kw)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    new = out[0, inp.shape[1] :].tolist()
    decode_fwd = max(n_fwd[0] - 1, 1)  # the prefill forward emits the first token
    return {
        "token_ids": new,
        "time_s": dt,
        "cpu_s": cpu,
        "acceptance": max(len(new) - 1, 0) / decode_fwd,
        "drafted": None,
        "accepted": None,
    }


def _open(name: str, backend: str, dtype: str, n_ctx: int) -> Any:
    from ..models.open import open_target

    return open_target(name, backend=backend, dtype=dtype, n_ctx=n_ctx if backend == "llama.cpp" else None)


def run(args: argparse.Namespace) -> dict:
    """Measure every row (module docstring); returns the JSON-able results."""
    from ..prompts import load_prompt_set

    torch.set_num_threads(args.threads)
    prompts = [p for name, n in args.prompts for p in load_prompt_set(name, n)]
    results: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(),
        },
        "rows": [],
        "notes": {},
    }
    for backend in args.backends:
        _run_backend(args, backend, prompts, results)
    results["summary"] = summarize(results["rows"])
    return results


def _run_backend(args: argparse.Namespace, backend: str, prompts: list, results: dict) -> None:
    """The rows of one backend, interleaved per prompt, appended to ``results``."""
    from ..costs import cost_curve
    from ..drafters.text import TextDrafter, text_drafter
    from ..policy import AdaptiveDrafter
    from ..prompts import encode_prompt

    t_load = time.perf_counter()
    target = _open(args.target, backend, args.dtype, args.n_ctx)
    draft = _open(args.draft, backend, args.dtype, args.n_ctx)
    drafter, note = text_drafter(target, draft)
    results["notes"][backend] = note
    if not isinstance(drafter, TextDrafter):
        print(f"crosstok: {args.draft} shares {args.target}'s vocabulary ({note})", file=sys.stderr)
    eos, lm = target.tokenizer.eos_token_id, target.model
    engine: dict[str, tuple[Any, int]] = {"ar": (None, 1)} | {f"text:{g}": (drafter, g) for g in args.gamma}
    adaptive = None
    if not args.no_adaptive:
        curve = cost_curve(lm)
        adaptive = AdaptiveDrafter(drafter, curve, k_max=args.k_max)
        engine["text:auto"] = (adaptive, args.k_max)
        results["notes"][f"{backend} cost curve"] = curve.to_dict()
    rows: dict[str, Any] = {
        name: (lambda ids, d=d, g=g, n=args.max_new_tokens: _engine_row(lm, ids, d, g, n, eos))
        for name, (d, g) in engine.items()
    }
    if backend == "torch" and not args.no_hf:
        pair = (draft.model.model, target.tokenizer, draft.tokenizer)
        peers = {"hf-ar": (None, None)} | {f"hf-uad:{g}": (pair, g) for g in args.gamma}
        for name, (hp, g) in (peers | {"hf-uad:auto": (pair, None)}).items():
            rows[name] = lambda ids, hp=hp, g=g, n=args.max_new_tokens: _hf_row(lm, hp, g, ids, n, eos)
    results["notes"][f"{backend} load_s"] = time.perf_counter() - t_load
    warm = encode_prompt(target.tokenizer, prompts[0])
    for d, g in engine.values():  # warm-up, not recorded
        _engine_row(lm, warm, d, g, 8, eos)
    for p in prompts:
        ids = encode_prompt(target.tokenizer, p)
        for name, fn in rows.items():
            row = fn(ids)
            results["rows"].append({"backend": backend, "method": name, "prompt": p.id, **row})
            msg = f"{len(row['token_ids']):4d} tok {row['time_s']:7.2f} s  tau {row['acceptance']:.2f}"
            print(f"{backend:9s} {p.id:14s} {name:12s} {msg}", file=sys.stderr, flush=True)
    if adaptive is not None:
        results["notes"][f"{backend} adaptive"] = {
            k: v for k, v in adaptive.stats().items() if k != "cost_curve"
        }
    for m in (target.model, draft.model):
        close = getattr(m, "close", None)
        if close is not None:
            close()


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Per (backend, method): tokens, seconds, tokens/s, speed-ups (wall and CPU time),
    acceptance, identity with ``ar``."""
    ref = {(r["backend"], r["prompt"]): r["token_ids"] for r in rows if r["method"] == "ar"}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["backend"], r["method"]), []).append(r)

    def rate(backend: str, method: str, clock: str = "time_s") -> float | None:
        g = groups.get((backend, method))
        if not g or any(r.get(clock) is None for r in g):
            return None
        return sum(len(r["token_ids"]) for r in g) / sum(r[clock] for r in g)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    out = []
    for (backend, method), g in groups.items():
        same = sum(r["token_ids"] == ref.get((backend, r["prompt"])) for r in g)
        hf = method.startswith("hf-")
        out.append(
            {
                "backend": backend,
                "method": method,
                "prompts": len(g),
                "tokens": sum(len(r["token_ids"]) for r in g),
                "time_s": sum(r["time_s"] for r in g),
                "tokens_per_s": rate(backend, method),
                "speedup_vs_ar": ratio(rate(backend, method), rate(backend, "ar")),
                "cpu_speedup_vs_ar": ratio(rate(backend, method, "cpu_s"), rate(backend, "ar", "cpu_s")),
                "speedup_vs_hf_ar": ratio(rate(backend, method), rate(backend, "hf-ar")) if hf else None,
                "acceptance": sum(r["acceptance"] for r in g) / len(g),
                "identical_to_ar": f"{same}/{len(g)}",
            }
        )
    return out


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def to_markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [
        f"# Cross-tokenizer drafting: {cfg['draft']} drafting for {cfg['target']}",
        "",
        f"Greedy, {cfg['max_new_tokens']} new tokens, prompts {cfg['prompts']}, torch {cfg['dtype']} "
        f"with {cfg['threads']} threads. Speed-ups are ratios of tokens/s in this run; the CPU-time "
        "ratio (this process's CPU seconds) is the one a loaded machine disturbs least, when run "
        "on one core (`taskset -c N`, `--threads 1`).",
        "",
        "| backend | method | tok/s | vs ar | vs ar (CPU time) | vs hf-ar | accept. length | same as ar |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in results["summary"]:
        lines.append(
            f"| {s['backend']} | {s['method']} | {_f(s['tokens_per_s'])} | {_f(s['speedup_vs_ar'])}x | "
            f"{_f(s.get('cpu_speedup_vs_ar'))}x | {_f(s['speedup_vs_hf_ar'])}x | {_f(s['acceptance'])} | "
            f"{s['identical_to_ar']} |"
        )
    lines += ["", *(f"- {k}: {v}" for k, v in results["notes"].items() if isinstance(v, str))]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("max_new_tokens", "k_max", "threads", "n_ctx"):
        if getattr(args, flag) < 1:
            print(f"crosstok: error: --{flag.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        results = run(args)
    except ValueError as err:
        print(f"crosstok: error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "crosstok.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    md = to_markdown(results)
    (args.out / "crosstok.md").write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
