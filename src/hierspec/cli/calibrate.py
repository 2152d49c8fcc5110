"""``hierspec calibrate`` (costs and pairwise acceptance of a stack, for the planner) and
``hierspec plan`` (rank hierarchies from a calibration file). Every input and the output path
are checked before any model is loaded."""

from __future__ import annotations

from typing import Any

from .flags import CliError


def run_calibrate(args: Any) -> int:
    from ..bench.config import encode_prompt
    from ..bench.prompts import load_prompt_set
    from ..calibrate import calibrate
    from ..files import check_writable_file
    from ..methods import MethodError, ModelSet
    from ..models.open import open_target
    from ..sampling import SamplingParams

    check_writable_file(args.out, "--out")
    specs = [x.strip() for x in args.levels.split(",") if x.strip()]
    if not specs or any(s in ("ngram", "suffix") for s in specs):
        raise CliError("--levels: give draft models (a lookup drafter has no distribution to calibrate)")
    if args.n < 1 or args.new_tokens < 1:
        raise CliError("--n and --new-tokens must be >= 1")
    try:
        params = SamplingParams(temperature=args.temperature)
    except ValueError as err:
        raise CliError(f"--temperature: {err}") from None
    prompts = load_prompt_set(args.set, n=args.n)
    opened = open_target(args.model, backend=args.backend, dtype=args.dtype, device=args.device)
    models = ModelSet(opened.model, opened.tokenizer, backend=opened.backend)
    try:
        drafts = [models.draft(s) for s in specs]
    except MethodError as err:
        raise CliError(f"--levels: {err}") from None
    ids = [encode_prompt(opened.tokenizer, p) for p in prompts]
    cal = calibrate(
        [*drafts, opened.model], [*specs, "target"], ids, params=params, new_tokens=args.new_tokens
    )
    cal.save(args.out)
    print(f"wrote {args.out}")
    for i, name in enumerate(cal.names):
        costs = ", ".join(f"n={n}: {1e3 * c:.1f} ms" for n, c in zip(cal.sizes, cal.costs[i], strict=True))
        print(
            f"{name}: {costs}; alpha vs target {cal.alpha[i][-1]:.3f} "
            f"[{cal.alpha_lo[i][-1]:.3f}, {cal.alpha_hi[i][-1]:.3f}]"
        )
    return 0


def run_plan(args: Any) -> int:
    from ..calibrate import Calibration
    from ..planner import plan

    if args.n_max < 1 or args.top < 1:
        raise CliError("--n-max and --top must be >= 1")
    cal = Calibration.load(args.calibration)
    ranked = plan(cal.alpha_matrix(), cal.cost, n_max=args.n_max, top=args.top)
    print(f"calibration: {args.calibration} ({cal.sampling}, {cal.num_prompts} prompts)")
    print("| rank | hierarchy (bottom -> target) | batch lengths | predicted ms/token | predicted speed-up |")
    print("|---|---|---|---|---|")
    for r, pl in enumerate(ranked, 1):
        chain = " -> ".join(cal.names[i] for i in pl.chain)
        print(
            f"| {r} | {chain} | {','.join(map(str, pl.batches)) or '-'} | {1e3 * pl.latency:.1f} "
            f"| {pl.speedup:.2f}x |"
        )
    return 0
