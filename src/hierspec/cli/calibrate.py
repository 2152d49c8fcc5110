"""``hierspec calibrate`` (costs and pairwise acceptance of a stack, for the planner) and
``hierspec plan`` (rank hierarchies from a calibration file). Every input and the output path
are checked before any model is loaded."""

from __future__ import annotations

from typing import Any

from ..methods.spec import LOOKUP_LEVELS
from .flags import CliError


def run_calibrate(args: Any) -> int:
    from ..calibrate import calibrate
    from ..files import check_writable_file
    from ..methods import MethodError, ModelSet, lookup_drafter
    from ..models.open import open_target
    from ..prompts import encode_prompt, load_prompt_set
    from ..sampling import SamplingParams

    check_writable_file(args.out, "--out")
    specs = [x.strip() for x in args.levels.split(",") if x.strip()]
    if not specs:
        raise CliError("--levels: give the draft levels, cheapest first (ngram, suffix or draft models)")
    lookups = [s for s in specs if s in LOOKUP_LEVELS]
    if specs[: len(lookups)] != lookups:
        raise CliError(f"--levels: lookup drafters ({', '.join(lookups)}) are the cheapest: list them first")
    if args.n < 1 or args.new_tokens < 1:
        raise CliError("--n and --new-tokens must be >= 1")
    try:
        params = SamplingParams(temperature=args.temperature)
    except ValueError as err:
        raise CliError(f"--temperature: {err}") from None
    sets = [x.strip() for x in args.set.split(",") if x.strip()]
    if not sets:
        raise CliError("--set: give one or more prompt sets, e.g. code,chat")
    prompts = [p for name in sets for p in load_prompt_set(name, n=args.n)]
    opened = open_target(args.model, backend=args.backend, dtype=args.dtype, device=args.device)
    models = ModelSet(opened.model, opened.tokenizer, backend=opened.backend, name=opened.name)
    try:
        drafts = [lookup_drafter(s) if s in LOOKUP_LEVELS else models.draft(s) for s in specs]
    except MethodError as err:
        raise CliError(f"--levels: {err}") from None
    ids = [encode_prompt(opened.tokenizer, p) for p in prompts]
    cal = calibrate(
        [*drafts, opened.model], [*specs, "target"], ids, params=params, new_tokens=args.new_tokens
    )
    cal.save(args.out)
    print(f"wrote {args.out}")
    for i, name in enumerate(cal.names):
        costs = ", ".join(f"n={n}: {1e3 * c:.3g} ms" for n, c in zip(cal.sizes, cal.costs[i], strict=True))
        print(
            f"{name}: {costs}; alpha vs target {cal.alpha[i][-1]:.3f} "
            f"[{cal.alpha_lo[i][-1]:.3f}, {cal.alpha_hi[i][-1]:.3f}]"
        )
    return 0


def run_plan(args: Any) -> int:
    from ..calibrate import Calibration
    from ..methods.hierarchy import plan_as_method
    from ..planner import plan

    if args.n_max < 1 or args.top < 1:
        raise CliError("--n-max and --top must be >= 1")
    cal = Calibration.load(args.calibration)
    lookups = [i for i, name in enumerate(cal.names) if name in LOOKUP_LEVELS]
    ranked = plan(cal.alpha_matrix(), cal.cost, n_max=args.n_max, top=args.top, bottom_only=lookups)
    print(f"calibration: {args.calibration} ({cal.sampling}, {cal.num_prompts} prompts)")
    print("| rank | hierarchy (bottom -> target) | batch lengths | predicted ms/token | predicted speed-up |")
    print("|---|---|---|---|---|")
    for r, pl in enumerate(ranked, 1):
        chain = " -> ".join(cal.names[i] for i in pl.chain)
        print(
            f"| {r} | {chain} | {','.join(map(str, pl.batches)) or '-'} | {1e3 * pl.latency:.1f} "
            f"| {pl.speedup:.2f}x |"
        )
    explicit = plan_as_method(cal.names, ranked[0])
    print(f"run the fastest: --method hierarchy:plan={args.calibration} (= {explicit})")
    return 0
