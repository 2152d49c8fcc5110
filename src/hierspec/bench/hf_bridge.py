"""Bench: hierspec through transformers' ``custom_generate`` against transformers' own assisted
generation (``assistant_model=``) with the same draft, on the torch backend, same run.

    python -m hierspec.bench.hf_bridge --n 2 --sets chat,code --max-new-tokens 128 --repeats 3 \\
        --temperatures 0,1 --out bench-out/hf-bridge

Rows, each on the same prompts, in an order rotated per prompt and repeat:

    hf                     ``model.generate`` (plain decoding), the reference
    hf-assisted/γ          ``model.generate(assistant_model=DRAFT)``: γ auto = transformers' own
                           defaults (20 tokens, confidence threshold 0.4), else a constant γ
    METHOD/γ               ``model.generate(custom_generate=hierspec.hf.generate, method=METHOD)``;
                           ``assistant`` in METHOD is the same ``assistant_model=DRAFT``

Speed = new tokens / seconds of the ``generate`` call (prefill included) over all prompts of one
repeat; the table gives the median over repeats, its ratio to ``hf`` and to the fastest
``hf-assisted`` row of the same temperature, hierspec's mean acceptance length τ, and at T = 0
how many outputs equal ``hf``'s (bf16 may flip near-ties: report, do not promise).
T > 0 runs with ``top_k=0`` and ``top_p=1`` on both sides (no implicit top-k 50).

The draft (``--draft``): a shipped draft (``small``, ``large``: hierspec's own `DraftLM` file,
run by transformers as the equivalent ``LlamaForCausalLM``,
`hierspec.models.draft.twin.transformers_twin`), a catalogue
model or a transformers folder / GGUF file with the target's vocabulary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .lists import gammas, names, split, temperatures

__all__ = ["main", "summarise"]

DTYPES = ("float32", "bfloat16")


# ----------------------------------------------------------------------------- the draft
def open_assistant(ref: str, dtype: torch.dtype, target: Any) -> Any:
    """The transformers model behind the draft ``ref`` (see module docstring)."""
    from ..methods import hf_module, resolve_draft
    from ..models import DraftLM
    from ..models.draft.twin import transformers_twin
    from ..models.loading import load_draft_model

    model = load_draft_model(resolve_draft(ref), dtype, target)
    if isinstance(model, DraftLM):
        return transformers_twin(model)
    hf = hf_module(model)
    if hf is None:
        raise ValueError(f"--draft {ref}: not a transformers model or a hierspec draft file")
    return hf


# ----------------------------------------------------------------------------- one call
def _sampling(temperature: float) -> dict[str, Any]:
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    return {"do_sample": False}


def run_one(
    model: Any, cell: dict, ids: list[int], temperature: float, max_new: int, seed: int, ctx: dict
) -> dict:
    """One timed ``generate`` call of ``cell`` (a row of the module docstring)."""
    import hierspec.hf

    inp = torch.tensor([ids], dtype=torch.long, device=model.device)
    kw: dict[str, Any] = {
        "input_ids": inp,
        "attention_mask": torch.ones_like(inp),
        "max_new_tokens": max_new,
        "eos_token_id": ctx["eos"],
        "pad_token_id": ctx["eos"],
        **_sampling(temperature),
    }
    assistant = ctx["assistant"]
    if cell["kind"] == "hf-assisted":
        from .peers import HF_ASSISTED_DEFAULTS

        gamma, threshold = (cell["gamma"], 0.0) if cell["gamma"] else HF_ASSISTED_DEFAULTS
        gc = assistant.generation_config  # transformers reads these from the assistant's config
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = gamma, "constant"
        gc.assistant_confidence_threshold = threshold
        kw.update(
            assistant_model=assistant, num_assistant_tokens=gamma, assistant_confidence_threshold=threshold
        )
        kw["num_assistant_tokens_schedule"] = "constant"
    elif cell["kind"] == "hierspec":
        kw.update(
            custom_generate=hierspec.hf.generate,
            method=cell["method"],
            gamma=cell["gamma"] or "auto",
            rule=ctx["rule"],
            return_dict_in_generate=True,
            assistant_model=assistant if hierspec.hf.uses_assistant(cell["method"]) else None,
        )
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**kw)
    elapsed = time.perf_counter() - t0
    seq = out.sequences if hasattr(out, "sequences") else out
    stats = getattr(out, "hierspec_stats", None)
    return {
        "new_tokens": int(seq.shape[1] - inp.shape[1]),
        "token_ids": seq[0, inp.shape[1] :].tolist(),
        "time_s": elapsed,
        "tau": stats.mean_acceptance_length if stats is not None and stats.num_spec_steps else None,
    }


def _cells(methods: Sequence[str], gammas: Sequence[int], hf_gammas: Sequence[int]) -> list[dict]:
    def g(x: int) -> str:
        return "auto" if x == 0 else str(x)

    cells = [{"name": "hf", "kind": "hf", "gamma": None}]
    cells += [{"name": f"hf-assisted/γ{g(x)}", "kind": "hf-assisted", "gamma": x} for x in hf_gammas]
    cells += [
        {"name": f"{m}/γ{g(x)}", "kind": "hierspec", "method": m, "gamma": x} for m in methods for x in gammas
    ]
    return cells


# ----------------------------------------------------------------------------- summary
def summarise(rows: list[dict], cells: list[dict], temperatures: Sequence[float]) -> list[dict]:
    """Per (temperature, cell): median over repeats of (new tokens / seconds) over the prompts,
    its ratio to ``hf`` and to the fastest ``hf-assisted`` cell, mean τ, and (T = 0) outputs
    equal to ``hf``'s."""
    out = []
    for t in temperatures:
        at = [r for r in rows if r["temperature"] == t]
        speed = {}
        for c in cells:
            mine = [r for r in at if r["cell"] == c["name"]]
            reps = sorted({r["repeat"] for r in mine})
            per = [
                sum(r["new_tokens"] for r in mine if r["repeat"] == k)
                / max(sum(r["time_s"] for r in mine if r["repeat"] == k), 1e-12)
                for k in reps
            ]
            speed[c["name"]] = statistics.median(per) if per else float("nan")
        hf_best = max((speed[c["name"]] for c in cells if c["kind"] == "hf-assisted"), default=float("nan"))
        ref = {(r["repeat"], r["prompt"]): r["token_ids"] for r in at if r["cell"] == "hf"}
        for c in cells:
            mine = [r for r in at if r["cell"] == c["name"]]
            taus = [r["tau"] for r in mine if r["tau"] is not None]
            same = (
                sum(r["token_ids"] == ref.get((r["repeat"], r["prompt"])) for r in mine) if t == 0 else None
            )
            out.append(
                {
                    "temperature": t,
                    "cell": c["name"],
                    "kind": c["kind"],
                    "tokens_per_s": speed[c["name"]],
                    "vs_hf": speed[c["name"]] / speed["hf"],
                    "vs_hf_assisted_best": speed[c["name"]] / hf_best,
                    "tau": statistics.fmean(taus) if taus else None,
                    "identical": same,
                    "calls": len(mine),
                }
            )
    return out


def table(summary: list[dict]) -> str:
    """The summary as a markdown table, with one headline line per temperature."""
    lines = [
        "| T | row | tok/s | vs hf | vs best hf-assisted | τ | identical to hf |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        tau = f"{s['tau']:.2f}" if s["tau"] is not None else "–"
        same = f"{s['identical']}/{s['calls']}" if s["identical"] is not None else "–"
        lines.append(
            f"| {s['temperature']:g} | {s['cell']} | {s['tokens_per_s']:.1f} | {s['vs_hf']:.2f}x | "
            f"{s['vs_hf_assisted_best']:.2f}x | {tau} | {same} |"
        )
    for t in sorted({s["temperature"] for s in summary}):
        at = [s for s in summary if s["temperature"] == t]
        best = max((s for s in at if s["kind"] == "hierspec"), key=lambda s: s["tokens_per_s"], default=None)
        hf = max((s for s in at if s["kind"] == "hf-assisted"), key=lambda s: s["tokens_per_s"], default=None)
        if best and hf:
            ratio = best["tokens_per_s"] / hf["tokens_per_s"]
            lines.append(
                f"\nT = {t:g}: hierspec best {best['cell']} {best['tokens_per_s']:.1f} tok/s vs transformers "
                f"{hf['cell']} {hf['tokens_per_s']:.1f} tok/s = **{ratio:.2f}x**"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m hierspec.bench.hf_bridge",
        description="hierspec through transformers' custom_generate vs transformers' assisted generation "
        "(same target, same draft, torch backend, same run).",
    )
    ap.add_argument("--model", default="smollm2-135m", help="target: catalogue name or path (torch backend)")
    ap.add_argument(
        "--draft", default="small", help="draft: shipped name (small, large), catalogue name or path"
    )
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    ap.add_argument(
        "--sets",
        type=names(),
        default="chat,code",
        help="prompt sets (hierspec.prompts), comma-separated",
    )
    ap.add_argument("--n", type=int, default=2, help="prompts per set")
    ap.add_argument("--offset", type=int, default=0, help="skip this many prompts of each set")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (the table shows medians)")
    ap.add_argument(
        "--temperatures",
        type=temperatures(),
        default=[0.0, 1.0],
        help="e.g. 0,1 (0 = greedy)",
    )
    ap.add_argument(
        "--methods",
        default=None,
        help="hierspec methods through custom_generate (default: draft (the assistant), suffix, draft:DRAFT "
        "for a shipped or catalogue draft)",
    )
    ap.add_argument("--gammas", type=gammas(), default=[0], help="hierspec draft lengths (auto or integers)")
    ap.add_argument(
        "--hf-gammas",
        type=gammas(),
        default=[0, 5],
        help="transformers' num_assistant_tokens (auto = its defaults)",
    )
    ap.add_argument("--rule", default="block", help="hierspec's verification rule at T > 0")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-out/hf-bridge", help="folder for hf_bridge.json")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for name in ("n", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser().error(f"--{name.replace('_', '-')}: expected an integer >= 1")
    if args.threads < 0:
        parser().error("--threads: expected an integer >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..methods import hf_module
    from ..models import shipped
    from ..models.open import DTYPES as OPEN_DTYPES
    from ..models.open import open_target
    from ..prompts import encode_prompt, load_prompt_set

    opened = open_target(args.model, backend="torch", dtype=args.dtype)
    model = hf_module(opened.model)
    dtype = OPEN_DTYPES[args.dtype]
    assistant = open_assistant(args.draft, dtype, opened.model)
    if args.methods is None:
        native = [f"draft:{args.draft}"] if args.draft in shipped.DRAFTS else []
        args.methods = ",".join(["draft", "suffix", *native])
    methods = split(args.methods)
    prompts = [
        encode_prompt(opened.tokenizer, p) for s in args.sets for p in load_prompt_set(s, args.n, args.offset)
    ]
    cells = _cells(methods, args.gammas, args.hf_gammas)
    ctx = {"eos": opened.tokenizer.eos_token_id, "assistant": assistant, "rule": args.rule}
    print(
        f"# {opened.name} ({args.dtype}) + draft {args.draft}: {len(prompts)} prompts, {args.max_new_tokens} "
        f"tokens, {args.repeats} repeats, torch threads {torch.get_num_threads()}",
        file=sys.stderr,
    )
    for t in args.temperatures:  # warm-up: builds, cost curves, first-call allocations
        for c in cells:
            run_one(model, c, prompts[0], t, min(8, args.max_new_tokens), args.seed, ctx)
    rows = []
    for t in args.temperatures:
        for rep in range(args.repeats):
            for i, ids in enumerate(prompts):
                k = (i + rep) % len(cells)
                for c in cells[k:] + cells[:k]:
                    seed = args.seed + 1000 * rep + i
                    row = run_one(model, c, ids, t, args.max_new_tokens, seed, ctx)
                    rows.append({"temperature": t, "repeat": rep, "prompt": i, "cell": c["name"], **row})
            print(f"T={t:g} repeat {rep + 1}/{args.repeats} done", file=sys.stderr)
    summary = summarise(rows, cells, args.temperatures)
    print(table(summary))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from ..host import cpu_model

    record = {
        "args": {k: v for k, v in vars(args).items()},
        "host": {"cpu": cpu_model(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "summary": summary,
        "rows": rows,
    }
    (out / "hf_bridge.json").write_text(json.dumps(record, indent=1))
    print(f"\nwrote {out / 'hf_bridge.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
