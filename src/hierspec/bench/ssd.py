"""Small SSD benchmark on tiny models: AR, synchronous SD, SSD in one process (sequential) and
SSD over two processes, in real mode and in emulated-latency mode, with the cost model's
prediction next to the measurement.

    python -m hierspec.bench.ssd [--emulate-ms 0 20] [--new-tokens 64] [--temperature 0 0.7]
    python -m hierspec.bench.ssd --smollm small [--prompts 3] ...   (SmolLM2 + a shipped draft)

Emulated mode adds the same sleep after every target verification in every method (`SlowTarget`
for AR/SD, ``emulate_verify_ms`` for SSD), mimicking a target whose verification dwarfs
drafting; the sleeping core is free, so the speculator overlaps for real.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from ..drafters import ModelDrafter
from ..engine import generate
from ..models import make_tiny_pair
from ..sampling import SamplingParams
from ..ssd.draft_spec import DraftSpec
from ..ssd.session import SSDSession


class SlowTarget:
    """A target whose every forward after the prefill sleeps `ms` milliseconds (emulated latency)."""

    def __init__(self, model: Any, ms: float) -> None:
        self._m, self._ms = model, ms

    def __getattr__(self, name: str) -> Any:
        return getattr(self._m, name)

    def forward(self, ids: torch.Tensor, **kw: Any) -> Any:
        prefill = self._m.cache_length == 0
        out = self._m.forward(ids, **kw)
        if self._ms > 0 and not prefill:
            time.sleep(self._ms / 1e3)
        return out


def run(
    emulate_ms: list[float], temps: list[float], new_tokens: int, gamma: int, budget: int, reps: int
) -> list[dict]:
    torch.set_num_threads(1)
    target, draft = make_tiny_pair(vocab_size=32, seed=3, dtype=torch.float32, max_length=512)
    prompt = [1, 5, 7, 5, 7, 5, 2, 9]
    rows = []
    with SSDSession(target, draft, mode="process") as proc, SSDSession(target, draft, mode="local") as loc:
        for em in emulate_ms:
            slow = SlowTarget(target, em)
            for temp in temps:
                params = SamplingParams(temperature=temp)
                kw = dict(params=params, max_new_tokens=new_tokens, rule="token")
                res: dict[str, list[float]] = {}
                ssd_stats = None
                for rep in range(reps):
                    sd_drafter = ModelDrafter(draft)
                    ssd_kw = dict(gamma=gamma, budget=budget, emulate_verify_ms=em, seed=rep, **kw)
                    runs = {
                        "ar": (generate, (slow, prompt), dict(seed=rep, **kw)),
                        "sd": (
                            generate,
                            (slow, prompt),
                            dict(drafter=sd_drafter, gamma=gamma, seed=rep, **kw),
                        ),
                        "ssd-local": (loc.generate, (prompt,), ssd_kw),
                        "ssd": (proc.generate, (prompt,), ssd_kw),
                    }
                    for name, (fn, args, fkw) in runs.items():
                        out = fn(*args, **fkw)
                        res.setdefault(name, []).append(out.stats.tokens_per_second)
                        if name == "ssd":
                            ssd_stats = out.stats
                row = {"emulate_ms": em, "temperature": temp}
                row.update({f"{k}_tok_s": sum(v) / len(v) for k, v in res.items()})
                st = ssd_stats
                pred = st.cost_prediction()
                row.update(
                    ssd_over_sd=row["ssd_tok_s"] / row["sd_tok_s"],
                    hit_rate=st.hit_rate,
                    e_hit=st.e_hit,
                    e_miss=st.e_miss,
                    t_v_ms=1e3 * st.t_v,
                    t_p_ms=1e3 * st.t_p,
                    t_p_over_t_v=st.t_p_over_t_v,
                    predicted_ssd_tok_s=pred.tokens_per_second if pred else None,
                )
                rows.append(row)
                print(
                    json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                    flush=True,
                )
    return rows


def run_smollm(
    draft_name: str,
    emulate_ms: list[float],
    temps: list[float],
    new_tokens: int,
    gamma: int,
    budget: int,
    n_prompts: int,
    threads: int,
) -> list[dict]:
    """SSD on the embedded SmolLM2 (fp32) with a shipped draft, on held-out chat prompts.

    Same total hardware: AR and synchronous SD run first with ``threads`` torch threads (both
    cores); SSD runs the verifier on one core and the speculator on the other (one thread each).
    """
    from ..models import load_draft, load_smollm2, shipped
    from ..prompts import load_prompt_set

    path = str(shipped.draft_path(draft_name)) if draft_name in shipped.DRAFTS else draft_name
    target, tok = load_smollm2(torch.float32)
    draft = load_draft(path)
    prompts = []
    for pr in load_prompt_set("chat", n=n_prompts):
        enc = tok.apply_chat_template([{"role": "user", "content": pr.text}], add_generation_prompt=True)
        prompts.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
    rows = []
    for em in emulate_ms:
        slow = SlowTarget(target, em)
        for temp in temps:
            kw = dict(params=SamplingParams(temperature=temp), max_new_tokens=new_tokens, rule="token")
            torch.set_num_threads(threads)
            res: dict[str, list[float]] = {"ar": [], "sd": [], "ssd": []}
            tokens: dict[str, int] = {"ar": 0, "sd": 0, "ssd": 0}
            for i, ids in enumerate(prompts):
                for name, drafter in (("ar", None), ("sd", ModelDrafter(draft))):
                    out = generate(slow, ids, drafter=drafter, gamma=gamma, seed=i, **kw)
                    res[name].append(out.stats.time_decode)
                    tokens[name] += out.stats.num_generated_tokens
            spec = DraftSpec(path, torch.float32)
            stats = []
            with SSDSession(target, spec, mode="process") as proc:
                proc.generate(prompts[0], gamma=gamma, budget=budget, max_new_tokens=8, params=kw["params"])
                for i, ids in enumerate(prompts):
                    out = proc.generate(ids, gamma=gamma, budget=budget, emulate_verify_ms=em, seed=i, **kw)
                    res["ssd"].append(out.stats.time_decode)
                    tokens["ssd"] += out.stats.num_generated_tokens
                    stats.append(out.stats)
            row = {"model": "SmolLM2-135M fp32", "draft": draft_name, "emulate_ms": em, "temperature": temp}
            row.update({f"{k}_tok_s": tokens[k] / sum(v) for k, v in res.items()})
            pred = [st.cost_prediction() for st in stats]
            row.update(
                ssd_over_sd=row["ssd_tok_s"] / row["sd_tok_s"],
                sd_over_ar=row["sd_tok_s"] / row["ar_tok_s"],
                hit_rate=sum(st.hit_rate for st in stats) / len(stats),
                e_hit=sum(st.e_hit for st in stats) / len(stats),
                e_miss=sum(st.e_miss for st in stats) / len(stats),
                t_v_ms=1e3 * sum(st.t_v for st in stats) / len(stats),
                t_p_ms=1e3 * sum(st.t_p for st in stats) / len(stats),
                t_p_over_t_v=sum(st.t_p_over_t_v for st in stats) / len(stats),
                predicted_ssd_tok_s=(
                    sum(p.tokens_per_second for p in pred) / len(pred) if all(pred) else None
                ),
            )
            rows.append(row)
            print(
                json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hierspec.bench.ssd")
    ap.add_argument(
        "--smollm", metavar="DRAFT", default=None, help="SmolLM2 target with this shipped draft name or path"
    )
    ap.add_argument("--prompts", type=int, default=3, help="--smollm: held-out chat prompts")
    ap.add_argument("--threads", type=int, default=2, help="--smollm: torch threads of AR and SD")
    ap.add_argument("--emulate-ms", type=float, nargs="+", default=[0.0, 20.0])
    ap.add_argument("--temperature", type=float, nargs="+", default=[0.0, 0.7])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args(argv)
    if a.smollm:
        run_smollm(
            a.smollm, a.emulate_ms, a.temperature, a.new_tokens, a.gamma, a.budget, a.prompts, a.threads
        )
        return 0
    run(a.emulate_ms, a.temperature, a.new_tokens, a.gamma, a.budget, a.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
