"""Side-by-side speed of decoding methods on the embedded SmolLM2, interleaved per prompt.

For every prompt, each method runs once per repeat in turn (so machine drift hits all alike);
per method we report total tokens / total decode time, the median per-prompt speed-up over plain
decoding (AR) measured in the same run, mean acceptance length, the engine's overhead per step
(everything but model forwards and drafting), and for greedy runs whether the output is
token-identical to AR. Run:

    python -m hierspec.bench.compare --set code --n 10 --dtype bfloat16 --out bench-out/compare
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ..drafters import NgramDrafter
from ..engine import generate
from ..models import load_smollm2
from ..sampling import SamplingParams
from .prompts import load_prompt_set

METHODS = {"ar": lambda: None, "ngram": NgramDrafter}


def run(
    set_name: str,
    n: int,
    offset: int,
    dtype: str,
    max_new_tokens: int,
    gamma: int,
    rule: str,
    temperature: float,
    repeats: int,
    methods: list[str],
) -> dict:
    torch.set_num_threads(2)
    target, tok = load_smollm2(getattr(torch, dtype))
    prompts = load_prompt_set(set_name, n=n, offset=offset)
    params = SamplingParams(temperature=temperature)
    rows = []
    generate(target, tok("warm up")["input_ids"], max_new_tokens=8)
    for pr in prompts:
        if pr.chat:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": pr.text}], add_generation_prompt=True, tokenize=True
            )
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        else:
            ids = tok(pr.text)["input_ids"]
        for rep in range(repeats):
            for m in methods:
                res = generate(
                    target,
                    ids,
                    drafter=METHODS[m](),
                    rule=rule,
                    gamma=gamma,
                    params=params,
                    max_new_tokens=max_new_tokens,
                    seed=rep,
                    eos_token_id=tok.eos_token_id,
                )
                s = res.stats
                rows.append(
                    {
                        "prompt": pr.id,
                        "method": m,
                        "repeat": rep,
                        "tokens": s.num_generated_tokens,
                        "time_decode": s.time_decode,
                        "tokens_per_second": s.tokens_per_second,
                        "mean_acceptance_length": s.mean_acceptance_length,
                        "target_forwards_per_token": s.target_forwards_per_token,
                        "overhead_per_step_ms": s.overhead_per_step_ms,
                        "time_target_forward": s.time_target_forward,
                        "num_target_forwards": s.num_target_forwards,
                        "token_ids": res.token_ids,
                    }
                )
    summary = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        ratios, same = [], []
        for r in mine:
            ar = next(
                a
                for a in rows
                if a["method"] == "ar" and a["prompt"] == r["prompt"] and a["repeat"] == r["repeat"]
            )
            ratios.append(r["tokens_per_second"] / ar["tokens_per_second"])
            same.append(r["token_ids"] == ar["token_ids"])
        summary[m] = {
            "tokens_per_second_total": sum(r["tokens"] for r in mine) / sum(r["time_decode"] for r in mine),
            "speedup_median_per_prompt": statistics.median(ratios),
            "mean_acceptance_length": statistics.mean(r["mean_acceptance_length"] for r in mine),
            "target_forwards_per_token": sum(r["num_target_forwards"] for r in mine)
            / sum(r["tokens"] for r in mine),
            "overhead_per_step_ms_median": statistics.median(r["overhead_per_step_ms"] for r in mine),
            "ms_per_target_forward": 1e3
            * sum(r["time_target_forward"] for r in mine)
            / sum(r["num_target_forwards"] for r in mine),
            "identical_to_ar": (sum(same) / len(same)) if params.greedy else None,
        }
    ar_total = summary["ar"]["tokens_per_second_total"]
    for m in methods:
        summary[m]["speedup_ratio_of_totals"] = summary[m]["tokens_per_second_total"] / ar_total
    return {
        "settings": {
            "set": set_name,
            "n": n,
            "offset": offset,
            "dtype": dtype,
            "max_new_tokens": max_new_tokens,
            "gamma": gamma,
            "rule": rule,
            "temperature": temperature,
            "repeats": repeats,
        },
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "summary": summary,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", default="code")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--rule", default="block")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--methods", default="ar,ngram")
    ap.add_argument("--out", type=Path, default=Path("bench-out/compare"))
    a = ap.parse_args(argv)
    methods = a.methods.split(",")
    if "ar" not in methods:
        methods.insert(0, "ar")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; expected some of {sorted(METHODS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    res = run(
        a.set, a.n, a.offset, a.dtype, a.max_new_tokens, a.gamma, a.rule, a.temperature, a.repeats, methods
    )
    name = f"{a.set}-{a.dtype}-T{a.temperature:g}.json"
    (a.out / name).write_text(json.dumps(res, indent=1))
    print(json.dumps({"settings": res["settings"], "summary": res["summary"]}, indent=1))


if __name__ == "__main__":
    main()
