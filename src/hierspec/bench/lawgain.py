"""What each verification rule can accept on a real (target, draft) pair, from recorded rows and
the rules' exact laws (`RULES[rule].law`): no verifier noise, every rule on the same drafts.

Recording (`record_steps`): each prompt is continued by the target alone (plain sampling at the
temperature, seeded), so contexts are distributed as in any exact run. At every ``stride``-th
generated position (context c) the draft proposes gamma tokens twice, and the target scores
each draft in one forward of gamma + 1 tokens:

    sampled  X ~ q            rows q_1..q_gamma      target rows p_1..p_{gamma+1} along X
    greedy   X*_t = argmax q_t (probs None)          target rows p*_1..p*_{gamma+1} along X*

`StepRows` holds one such draft with its rows (processed: temperature, top-p, as the engine's).

Analysis (`step_expectations`, `law_gain`): for a step, a rule r and a length g <= gamma

    A_r(g) = sum_k k P_r(tau = k | X_{1:g})        from RULES[r].law(X_{1:g}, q_{1:g}, p_{1:g+1})

the exact expected accepted tokens of that draft (a prefix of a sampled draft is a sampled draft
of length g, so one recording serves every g). Averaged over steps, A_r(g) estimates E[accepted
per step] of rule r at a fixed draft length g, and all rules see the same drafts and rows, so
their differences are paired. For a greedy draft every rule has one law (the coupled sampler,
`hierspec.verify.coupled`): A(g) = sum_{j<=g} prod_{t<=j} p*_t(X*_t). The per-step
identities behind the comparison: at g = 1 block = hsd = token, A = sum_x min(p_1, q_1), while
match on a sampled draft gets sum_x p_1 q_1 and a greedy draft p_1(argmax q_1); block gains over
token only through drafts whose early ratios p_t(X_t) / q_t(X_t) exceed 1 (its weights w_k keep
that excess for later positions, token-wise rejection drops it).

tau(g) = 1 + mean A(g) is the mean acceptance length such a run would have at fixed length g;
intervals are percentile bootstraps over prompts (`hierspec.bench.intervals.cluster_bootstrap`).

CLI::

    python -m hierspec.bench.lawgain --model qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b \\
        --backend llama.cpp --temperatures 0.6,0.8,1.0 --gamma 4 --n 4 [--top-p 0.95]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..drafters.base import sync_cache
from ..drafters.model import ModelDrafter
from ..engine import generate
from ..models.base import LanguageModel
from ..sampling import SamplingParams, process_logits
from ..verify import RULES
from ..verify.law import expected_accepted
from .intervals import cluster_bootstrap
from .lists import parse_list, split

#: the chain rules compared on sampled drafts (greedy drafts have one law for all of them)
LAW_RULES = ("token", "block", "hsd", "match")

__all__ = ["LAW_RULES", "StepRows", "law_gain", "main", "record_steps", "step_expectations"]


@dataclass
class StepRows:
    """One recorded draft: ``tokens`` [K], ``q`` [K, V] (the processed rows they were drawn
    from; None for a deterministic draft), ``p`` [K+1, V] (the target's processed rows along
    them), and the index of the ``prompt`` it came from (the bootstrap's cluster)."""

    tokens: torch.Tensor
    q: torch.Tensor | None
    p: torch.Tensor
    prompt: int = 0


def step_expectations(step: StepRows, rules: Sequence[str] = LAW_RULES) -> np.ndarray:
    """A_r(g) for r in ``rules`` and g = 1..K: [len(rules), K] (module docstring)."""
    k = int(step.tokens.shape[0])
    x, p = step.tokens.long(), step.p.double()
    q = None if step.q is None else step.q.double()
    out = np.zeros((len(rules), k))
    for i, r in enumerate(rules):
        for g in range(1, k + 1):
            law = RULES[r].law(x[:g], None if q is None else q[:g], p[: g + 1])
            out[i, g - 1] = expected_accepted(law)
    return out


def law_gain(
    steps: Iterable[tuple[StepRows, StepRows]], rules: Sequence[str] = LAW_RULES, seed: int = 0
) -> dict[str, Any]:
    """Exact expected accepted tokens per step, from (sampled, greedy) drafts recorded at the
    same contexts: ``mean[name]`` [K] for each sampled-draft rule and ``"greedy"`` (any rule),
    ``tau[name]`` (1 + mean at g = K, with its 95 % interval), ``vs[(a, b)]`` tau_a / tau_b - 1
    at g = K with its interval, for a = each entry and b in (token, match, greedy)."""
    per_prompt: dict[int, np.ndarray] = {}
    names = [*rules, "greedy"]
    k = None
    for sampled, greedy in steps:
        a = step_expectations(sampled, rules)
        b = step_expectations(greedy, ("match",))
        k = a.shape[1] if k is None else k
        if a.shape[1] != k or b.shape[1] != k:
            raise ValueError(f"steps: every draft must have the same length, got {a.shape[1]} and {k}")
        row = np.concatenate([a.ravel(), b.ravel(), [1.0]])  # [(R + 1) K + 1]: sums and a count
        per_prompt[sampled.prompt] = per_prompt.get(sampled.prompt, 0.0) + row
    if not per_prompt:
        raise ValueError("steps: nothing recorded")
    sums = np.stack(list(per_prompt.values()))  # [m, (R + 1) K + 1]
    n = float(sums[:, -1].sum())
    mean = {name: sums[:, i * k : (i + 1) * k].sum(0) / n for i, name in enumerate(names)}

    def tau_of(i: int):
        return lambda t: 1.0 + t[..., (i + 1) * k - 1] / t[..., -1]

    tau = {name: cluster_bootstrap(sums, tau_of(i), seed=seed) for i, name in enumerate(names)}
    vs = {}
    for ref in ("token", "match", "greedy"):
        if ref not in names:
            continue
        j = names.index(ref)
        for i, name in enumerate(names):
            if name != ref:
                f, g = tau_of(i), tau_of(j)
                vs[(name, ref)] = cluster_bootstrap(sums, lambda t, f=f, g=g: f(t) / g(t) - 1.0, seed=seed)
    return {
        "names": names,
        "gamma": k,
        "steps": int(n),
        "prompts": len(per_prompt),
        "mean": mean,
        "tau": tau,
        "vs": vs,
    }


# ------------------------------------------------------------------------------------ recording
def _score(
    target: LanguageModel, fed: torch.Tensor, ctx: torch.Tensor, x: torch.Tensor, params: SamplingParams
):
    """Target rows [K+1, V] along draft x [K] after ctx [L] (cache holding ``fed``), and the new
    ``fed``. The cache is cropped to at most L - 1 so the forward covers every row needed."""
    full = torch.cat([ctx, x.cpu()])
    out = sync_cache(target, fed[: ctx.numel() - 1], full, full.numel())
    rows = process_logits(out.logits[0, -(x.numel() + 1) :].double(), params)
    return rows, full.clone()


def record_steps(
    target: LanguageModel,
    draft: LanguageModel,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    gamma: int,
    *,
    new_tokens: int = 64,
    stride: int = 4,
    seed: int = 0,
    eos_token_id: int | None = None,
) -> Iterator[tuple[StepRows, StepRows]]:
    """(sampled, greedy) `StepRows` at every ``stride``-th position of each prompt's target
    continuation (``new_tokens`` long, plain sampling with ``seed + prompt index``); drafts of
    ``gamma`` tokens (fewer only near the draft's context end: such steps are skipped)."""
    if params.greedy:
        raise ValueError("params: the law-gain analysis needs a temperature > 0")
    drafter = ModelDrafter(draft, "sample")
    for pi, prompt in enumerate(prompts):
        res = generate(
            target,
            list(prompt),
            params=params,
            max_new_tokens=new_tokens,
            seed=seed + pi,
            eos_token_id=eos_token_id,
        )
        seq = torch.tensor([*prompt, *res.token_ids], dtype=torch.long)
        target.reset()
        drafter.reset()
        fed = torch.zeros(0, dtype=torch.long)
        for i in range(0, len(res.token_ids), stride):
            ctx = seq[: len(prompt) + i]
            gen = torch.Generator().manual_seed(seed * 1_000_003 + pi * 10_007 + i)
            drafts = []
            for mode in ("sample", "greedy"):  # one drafter, one draft cache: switch its choice
                drafter.sampling = mode
                d = drafter.propose(ctx[None], gamma, params, gen)
                drafts.append(d)
            if any(d.num_tokens != gamma for d in drafts):
                continue
            steps = []
            for d in drafts:
                x = d.tokens[0]
                p, fed = _score(target, fed, ctx, x, params)
                q = None if d.probs is None else d.probs[0].double()
                steps.append(StepRows(x.cpu(), None if q is None else q.cpu(), p.cpu(), pi))
            yield steps[0], steps[1]
        target.reset()


# ------------------------------------------------------------------------------------ CLI
def _pct(x: tuple[float, float, float]) -> str:
    return f"{100 * x[0]:+.1f}% [{100 * x[1]:+.1f}, {100 * x[2]:+.1f}]"


def format_table(res: dict[str, Any], title: str) -> str:
    k = res["gamma"]
    head = [
        "draft",
        "rule",
        *[f"A(g={g})" for g in range(1, k + 1)],
        f"τ(γ={k}) [95% CI]",
        "vs token",
        "vs match",
    ]
    head.append("vs greedy+match")
    lines = [f"{title}: {res['steps']} steps, {res['prompts']} prompts", " | ".join(head)]
    for name in res["names"]:
        t = res["tau"][name]
        cells = [
            "greedy" if name == "greedy" else "sample",
            "any" if name == "greedy" else name,
            *[f"{a:.3f}" for a in res["mean"][name]],
            f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]",
            *[
                _pct(res["vs"][(name, ref)]) if (name, ref) in res["vs"] else "–"
                for ref in ("token", "match", "greedy")
            ],
        ]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m hierspec.bench.lawgain",
        description="Exact expected accepted tokens per step of token / block / hsd / match (sampled "
        "drafts) and of greedy drafts, from the rules' laws on rows recorded on a real pair.",
    )
    ap.add_argument("--model", default="smollm2-135m", help="target: catalogue name or path")
    ap.add_argument("--draft", default="small", help="draft: shipped name, catalogue name or path")
    ap.add_argument("--backend", default="auto", choices=("auto", "torch", "llama.cpp"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--temperatures", default="0.6,0.8,1.0", help="comma list, each > 0")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off)")
    ap.add_argument("--gamma", type=int, default=4, help="draft length recorded (every g <= gamma reported)")
    ap.add_argument("--sets", default="code,chat", help="prompt sets (see hierspec bench --sets)")
    ap.add_argument("--n", type=int, default=4, help="prompts per set")
    ap.add_argument("--new-tokens", type=int, default=64, help="target tokens generated per prompt")
    ap.add_argument("--stride", type=int, default=4, help="record a step every this many positions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--json", help="also write the numbers to this file")
    return ap


def _check(args: argparse.Namespace) -> list[float]:
    temps = parse_list(
        args.temperatures,
        float,
        "--temperatures",
        valid=lambda t: t > 0,
        expected="numbers > 0",
        error=SystemExit,
    )
    for name, lo in (("gamma", 1), ("n", 1), ("new_tokens", 1), ("stride", 1)):
        if getattr(args, name) < lo:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(args, name)}")
    if not 0 < args.top_p <= 1:
        raise SystemExit(f"--top-p must be in (0, 1], got {args.top_p}")
    return temps


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    temps = _check(args)
    from ..methods import ModelSet
    from ..models.open import open_target
    from ..prompts import encode_prompt, load_prompt_set

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    opened = open_target(args.model, backend=args.backend, dtype=args.dtype)
    models = ModelSet(
        opened.model,
        opened.tokenizer,
        dtype=getattr(torch, args.dtype),
        backend=opened.backend,
        name=opened.name,
    )
    draft = models.draft(args.draft)
    prompts = [
        encode_prompt(opened.tokenizer, p) for s in split(args.sets) for p in load_prompt_set(s, n=args.n)
    ]
    eos = getattr(opened.tokenizer, "eos_token_id", None)
    print(
        f"lawgain: {opened.name} ({opened.backend}) drafted by {args.draft}, {len(prompts)} prompts, "
        f"gamma {args.gamma}, top-p {args.top_p:g}, loaded in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    out = []
    for t in temps:
        params = SamplingParams(temperature=t, top_p=args.top_p)
        t1 = time.perf_counter()
        steps = record_steps(
            opened.model, draft, prompts, params, args.gamma,
            new_tokens=args.new_tokens, stride=args.stride, seed=args.seed, eos_token_id=eos,
        )  # fmt: skip
        res = law_gain(steps, seed=args.seed)
        print(format_table(res, f"T={t:g} top-p={args.top_p:g} ({time.perf_counter() - t1:.0f} s)"), "\n")
        out.append({"temperature": t, "top_p": args.top_p, **_jsonable(res)})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"model": opened.name, "draft": args.draft, "backend": opened.backend, "runs": out},
                f,
                indent=1,
            )
    return 0


def _jsonable(res: dict[str, Any]) -> dict[str, Any]:
    return {
        **{k: res[k] for k in ("names", "gamma", "steps", "prompts")},
        "mean": {k: v.tolist() for k, v in res["mean"].items()},
        "tau": res["tau"],
        "vs": {f"{a} vs {b}": v for (a, b), v in res["vs"].items()},
    }


if __name__ == "__main__":
    raise SystemExit(main())
