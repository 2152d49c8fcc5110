"""Command line: ``hierspec generate | calibrate | plan | bench | bench-verify | train-draft``.

    hierspec generate --prompt "Write a haiku about the sea." --chat --compare
    hierspec generate --prompt "def fib(n):" --method ngram --rule block --json
    hierspec bench --quick --out bench-out/quick

`generate` runs the embedded SmolLM2-135M-Instruct target with the chosen drafter, streams the
text to the terminal (or prints one JSON object with ``--json``: text, token_ids, stats, and
nothing else on stdout), and with ``--compare`` also runs plain decoding with the same settings
and prints the speed-up and whether the outputs are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

METHODS = ("ar", "draft", "ngram", "hierarchy", "early-exit", "hispec", "eagle", "ssd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class CliError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hierspec", description="Lossless speculative decoding.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text with speculative decoding")
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument(
        "--method",
        default="ngram",
        choices=METHODS,
        help="drafter: ar (none), draft (a draft model; default the shipped draft), ngram (prompt "
        "lookup), hierarchy (--levels), early-exit (LayerSkip-style self-speculation from a shipped "
        "exit head), hispec (draft exit + intermediate exit + full model), eagle (feature-level "
        "head on the target's hidden states; --tree for tree drafting), ssd; default ngram",
    )
    g.add_argument(
        "--eagle", default=None, help="--method eagle: an EAGLE head file (default: the shipped head)"
    )
    g.add_argument(
        "--tree",
        action="store_true",
        help="--method eagle: draft a dynamic tree (EAGLE-2) verified in one target forward",
    )
    g.add_argument("--tree-depth", type=int, default=5, help="--tree: levels (tokens per step <= depth+1)")
    g.add_argument("--tree-topk", type=int, default=4, help="--tree: children per expanded node")
    g.add_argument("--tree-budget", type=int, default=16, help="--tree: drafted nodes per step")
    g.add_argument(
        "--draft",
        default=None,
        help="draft model for --method draft: a shipped draft name (small, large; default "
        "small), a hierspec draft (.safetensors), a transformers model directory or a .gguf file "
        "sharing the target's tokenizer",
    )
    g.add_argument(
        "--exits",
        default=None,
        help="--method hispec: draft and intermediate exit layers L_d,L_i (default 4,8, the shipped "
        "heads); --method early-exit: the draft exit L_d (default 4). A head file per exit: "
        "L:PATH instead of L uses PATH",
    )
    g.add_argument("--nd", type=int, default=2, help="--method hispec: draft tokens per draft step (N_d)")
    g.add_argument(
        "--ni", type=int, default=4, help="--method hispec: buffered tokens per full verification (N_i)"
    )
    g.add_argument(
        "--levels",
        default=None,
        help="--method hierarchy: draft levels bottom first, comma-separated: 'ngram' (bottom only) "
        "or a draft path; the target is the top",
    )
    g.add_argument(
        "--gammas",
        default=None,
        help="--method hierarchy: tokens each draft model's own drafter proposes per step, one per "
        "draft model (default 3); the target uses --gamma",
    )
    g.add_argument(
        "--rule",
        default="block",
        choices=("token", "block", "hsd"),
        help="verification rule at temperature > 0 (greedy at temperature 0)",
    )
    g.add_argument("--gamma", type=int, default=5, help="draft tokens per step (>= 1)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument(
        "--dtype",
        default="float32",
        choices=tuple(DTYPES),
        help="bfloat16 is ~2x faster on AVX512-BF16 CPUs but not bit-exact",
    )
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--json", action="store_true", help="print one JSON object, no streaming")
    g.add_argument("--compare", action="store_true", help="also run plain decoding and report the speed-up")
    from .ssd.cli import add_ssd_arguments

    add_ssd_arguments(g)
    c = sub.add_parser("calibrate", help="measure costs and pairwise acceptance for the planner")
    c.add_argument("--levels", required=True, help="draft model paths, cheapest first (the target is added)")
    c.add_argument("--out", required=True, help="calibration JSON to write")
    c.add_argument("--set", default="chat", help="prompt set (code, chat, prose, specbench:PATH)")
    c.add_argument("--n", type=int, default=8, help="calibration prompts")
    c.add_argument("--new-tokens", type=int, default=64, help="target-sampled tokens per prompt")
    c.add_argument("--temperature", type=float, default=1.0)
    c.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p = sub.add_parser("plan", help="rank hierarchies by the latency model from a calibration file")
    p.add_argument("--calibration", required=True)
    p.add_argument("--n-max", type=int, default=8, help="largest batch length per level")
    p.add_argument("--top", type=int, default=5)
    sub.add_parser("bench", help="benchmark matrix with HF peers and a report (--help for options)")
    sub.add_parser("bench-verify", help="micro-benchmark of the verification rules (--help for options)")
    sub.add_parser("train-draft", help="distil a draft or early-exit head (--help for options)")
    return ap


def _load_level(spec: str, target, dtype: torch.dtype):
    """A draft level from its CLI spec (`hierspec.models.loading.load_draft_model`: a hierspec
    draft or early-exit head file, a transformers directory or a .gguf file); its vocabulary
    must be the target's."""
    from .models import DraftFileError
    from .models.loading import load_draft_model

    try:
        model = load_draft_model(spec, dtype, target)
    except FileNotFoundError:
        raise CliError(f"draft {spec!r} does not exist") from None
    except (DraftFileError, OSError) as err:
        raise CliError(f"draft {spec!r}: {err}") from None
    if model.vocab_size != target.vocab_size:
        raise CliError(
            f"draft {spec!r}: its vocabulary has {model.vocab_size} tokens but the target's "
            f"has {target.vocab_size}; a draft must share the target's tokenizer"
        )
    return model


def planned_stack(dtype: str = "float32") -> tuple[list[str], list[int], int, object]:
    """The planner's fastest stack of the shipped drafts from the shipped calibration of this
    project's machine: (levels bottom first, their gammas, the target's gamma, the Plan).

    A chain m_0 -> m_1 -> ... -> target with batch lengths n_0, n_1, ... becomes levels m_0, m_1,
    ... where level m_{i+1} drafts n_i tokens per step with level m_i (the bottom samples plainly)
    and the target verifies the last batch length."""
    from .calibrate import Calibration
    from .models import shipped
    from .planner import plan

    path = shipped.calibration_path(dtype)
    cal = Calibration.load(path)
    ranked = [pl for pl in plan(cal.alpha_matrix(), cal.cost, n_max=8, top=5) if len(pl.chain) > 1]
    if not ranked:
        raise CliError(f"the shipped calibration {path} plans no stack with a draft")
    best = ranked[0]
    names = [cal.names[i] for i in best.chain[:-1]]
    gammas = [1, *best.batches[:-1]]  # the bottom level has no drafter: its gamma is unused
    return names, gammas, best.batches[-1], best


def _parse_levels(
    levels: str | None, gammas: str | None, dtype: str = "float32"
) -> tuple[list[str], list[int]]:
    """Validate --levels/--gammas before any model is loaded (no --levels: the planned stack)."""
    if not levels:
        if gammas:
            raise CliError("--gammas needs --levels (without --levels the planner picks both)")
        names, gs, _, _ = planned_stack(dtype)
        return names, gs
    specs = [x.strip() for x in levels.split(",") if x.strip()]
    if "ngram" in specs[1:]:
        raise CliError("--levels: 'ngram' can only be the bottom level")
    n_models = len(specs) - (specs[0] == "ngram")
    if n_models < 1:
        raise CliError("--levels: give at least one draft model (e.g. ngram,PATH)")
    try:
        gs = [int(x) for x in gammas.split(",")] if gammas else [3] * n_models
    except ValueError:
        raise CliError(f"--gammas: expected comma-separated integers, got {gammas!r}") from None
    if len(gs) != n_models or min(gs) < 1:
        raise CliError(f"--gammas: expected {n_models} integers >= 1 (one per draft model), got {gammas!r}")
    return specs, gs


def _make_drafter(args, target):
    from .drafters import ModelDrafter, NgramDrafter
    from .hierarchy import build_hierarchy

    if args.method == "ar":
        return None
    if args.method == "ngram":
        return NgramDrafter()
    if args.method == "hierarchy":
        specs, gammas = _parse_levels(args.levels, args.gammas, args.dtype)
        if not args.levels:
            _, _, args.gamma, best = planned_stack(args.dtype)
            note = "" if best.speedup >= 1 else " (slower than the target alone with the shipped drafts)"
            print(
                f"hierarchy: planned stack {' -> '.join(specs)} -> target, batch lengths "
                f"{','.join(map(str, best.batches))}, predicted {1e3 * best.latency:.1f} ms/token = "
                f"{best.speedup:.2f}x{note}",
                file=sys.stderr,
            )
        bottom = NgramDrafter() if specs[0] == "ngram" else None
        models = [
            _load_level(_draft_spec(p), target, DTYPES[args.dtype]) for p in specs[bottom is not None :]
        ]
        return build_hierarchy(models, bottom, rules=args.rule, gammas=gammas)
    return ModelDrafter(_load_level(_draft_spec(args.draft), target, DTYPES[args.dtype]))


def _tree_spec(args):
    """--tree options as a TreeSpec (None without --tree); CliError on bad values."""
    from .drafters.eagle import TreeSpec

    if not args.tree:
        return None
    if args.method != "eagle":
        raise CliError(f"--tree drafts trees with an EAGLE head: use --method eagle, not {args.method}")
    try:
        return TreeSpec(depth=args.tree_depth, topk=args.tree_topk, budget=args.tree_budget)
    except ValueError as err:
        raise CliError(f"--{str(err).split(':')[0].replace(' ', '-')}: {err}") from None


def _eagle_drafter(spec: str | None, target, tok):
    """EagleDrafter over the head at `spec` (default the shipped one), loaded onto `target`."""
    from .drafters.eagle import EagleDrafter
    from .models.eagle import load_eagle
    from .models.shipped import eagle_path

    path = spec or eagle_path()
    if not os.path.exists(path):
        raise CliError(f"--eagle: {path} does not exist")
    try:
        return EagleDrafter(load_eagle(path, target, tokenizer=tok))
    except ValueError as err:  # DraftFileError is a ValueError
        raise CliError(f"--eagle: {err}") from None


def _draft_spec(spec: str | None) -> str:
    """A --draft / --levels entry: a shipped draft name becomes its path."""
    from .models import shipped

    if spec is None:
        spec = shipped.DEFAULT_DRAFT
    if spec in shipped.DRAFTS:
        return str(shipped.draft_path(spec))
    return spec


def _parse_exits(args) -> list[tuple[int, str | None]]:
    """--exits as [(layer, head path or None = shipped)], checked before any model loads."""
    from .models import shipped

    n = 2 if args.method == "hispec" else 1
    if args.exits is None:
        return [(e, None) for e in shipped.DEFAULT_EXITS[:n]]
    out = []
    for part in args.exits.split(","):
        layer, _, path = part.strip().partition(":")
        try:
            e = int(layer)
        except ValueError:
            raise CliError(f"--exits: expected layer numbers (L or L:PATH), got {part!r}") from None
        if path and not Path(path).is_file():
            raise CliError(f"--exits: head file {path!r} does not exist")
        if not path and e not in shipped.EXIT_HEADS:
            raise CliError(
                f"--exits: no shipped head at layer {e} (shipped: {sorted(shipped.EXIT_HEADS)}); "
                "give L:PATH for a head of your own"
            )
        out.append((e, path or None))
    if len(out) != n:
        raise CliError(f"--exits: --method {args.method} takes {n} exit layer(s), got {args.exits!r}")
    if n == 2 and not out[0][0] < out[1][0]:
        raise CliError(f"--exits: the draft exit must come before the intermediate exit, got {args.exits!r}")
    return out


def _self_speculator(args, target, tokenizer):
    """The HiSpec / early-exit system over the target's own layers (shipped or given heads)."""
    from .hispec import build_early_exit_spec, build_hispec
    from .models import DraftFileError, load_early_exit, shipped

    heads = []
    for layer, path in _parse_exits(args):
        p = path or str(shipped.exit_head_path(layer))
        try:
            head = load_early_exit(p, target.model, tokenizer=tokenizer).head
        except DraftFileError as err:
            raise CliError(f"--exits: {err}") from None
        if head.config.exit_layer != layer:
            raise CliError(f"--exits: {p} is a head for exit layer {head.config.exit_layer}, not {layer}")
        heads.append(head)
    try:
        if args.method == "hispec":
            return build_hispec(target.model, heads[0], heads[1], nd=args.nd, ni=args.ni, rule=args.rule)
        return build_early_exit_spec(target.model, heads[0], gamma=args.gamma)
    except ValueError as err:
        raise CliError(str(err)) from None


def _generate(args) -> int:
    from .engine import generate
    from .models import load_smollm2
    from .sampling import SamplingParams

    try:
        params = SamplingParams(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p
        )
    except ValueError as err:
        raise CliError(str(err)) from None
    if args.gamma < 1:
        raise CliError(f"--gamma must be >= 1, got {args.gamma}")
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.prompt.strip():
        raise CliError("--prompt is empty")
    if args.method == "hierarchy":
        _parse_levels(args.levels, args.gammas, args.dtype)
    if args.method == "ssd":
        from .ssd.cli import check_ssd_args

        args.draft = _draft_spec(args.draft)
        check_ssd_args(args)
    tree = _tree_spec(args)
    if args.method == "eagle" and args.eagle and not os.path.exists(args.eagle):
        raise CliError(f"--eagle: {args.eagle} does not exist")
    if args.method in ("hispec", "early-exit"):
        _parse_exits(args)
        if args.nd < 1 or args.ni < 1:
            raise CliError(f"--nd and --ni must be >= 1, got {args.nd} and {args.ni}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    target, tok = load_smollm2(DTYPES[args.dtype])
    load_s = time.perf_counter() - t0
    if args.chat:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
    else:
        ids = tok(args.prompt)["input_ids"]
    if len(ids) >= target.max_length:
        raise CliError(f"--prompt: {len(ids)} tokens exceed the model's context of {target.max_length}")
    system = None
    engine_target, gamma = target, args.gamma
    if args.method == "ssd":
        return _generate_ssd(args, target, tok, ids, params, load_s)
    if args.method in ("hispec", "early-exit"):
        system = _self_speculator(args, target, tok)
        engine_target, drafter, gamma = system.target, system.drafter, system.gamma
    elif args.method == "eagle":
        drafter = _eagle_drafter(args.eagle, target, tok)
    else:
        drafter = _make_drafter(args, target)
    kw = dict(
        rule=args.rule,
        gamma=gamma,
        params=params,
        max_new_tokens=args.max_new_tokens,
        eos_token_id=tok.eos_token_id,
        stop_strings=args.stop,
        tokenizer=tok,
        seed=args.seed,
    )

    stream = _text_streamer(tok)
    # Warm-up (first-call allocation costs would otherwise land on the timed run).
    generate(engine_target, ids, drafter=drafter, tree=tree, **{**kw, "max_new_tokens": 4})
    if system is not None:
        rest = {k: v for k, v in kw.items() if k != "gamma"}
        res = system.generate(ids, on_tokens=None if args.json else stream, **rest)
    else:
        on_tokens = None if args.json else stream
        res = generate(engine_target, ids, drafter=drafter, on_tokens=on_tokens, tree=tree, **kw)
    stage = system.stage_stats(res) if system is not None else None
    ar = None
    if args.compare:
        ar = generate(target, ids, drafter=None, **kw)
    if args.json:
        out = {
            "text": res.text,
            "token_ids": res.token_ids,
            "finish_reason": res.finish_reason,
            "method": args.method,
            "rule": "greedy" if params.greedy else args.rule,
            "sampling": params.describe(),
            "dtype": args.dtype,
            "load_seconds": load_s,
            "stats": res.stats.to_dict(),
        }
        if stage is not None:
            out["stages"] = stage
        if tree is not None:
            out["tree"] = {"depth": tree.depth, "topk": tree.topk, "budget": tree.budget}
        if ar is not None:
            out["ar_stats"] = ar.stats.to_dict()
            out["speedup_vs_ar"] = res.stats.tokens_per_second / max(ar.stats.tokens_per_second, 1e-9)
            out["identical_to_ar"] = res.token_ids == ar.token_ids
        print(json.dumps(out))
        return 0
    s = res.stats
    err = sys.stderr
    print(file=sys.stdout)
    print(
        f"\n--- {args.method} ({'greedy' if params.greedy else args.rule}, gamma={args.gamma}, "
        f"{params.describe()}, {args.dtype}) ---",
        file=err,
    )
    print(
        f"{s.num_generated_tokens} tokens in {s.time_decode:.2f} s = {s.tokens_per_second:.1f} tok/s"
        f" (prefill {s.time_prefill * 1e3:.0f} ms, model load {load_s:.1f} s)",
        file=err,
    )
    if s.num_spec_steps:
        print(
            f"mean acceptance length {s.mean_acceptance_length:.2f}, draft acceptance rate "
            f"{s.draft_acceptance_rate:.2f}, target forwards/token {s.target_forwards_per_token:.2f}",
            file=err,
        )
    print(
        f"time: draft {s.time_draft:.2f} s, target forward {s.time_target_forward:.2f} s, "
        f"engine overhead {s.overhead_per_step_ms:.2f} ms/step",
        file=err,
    )
    if stage is not None:
        ranges = ", ".join(
            f"layers {r['layers'][0]}-{r['layers'][1]}: {r['tokens']} tok in {r['passes']} passes, "
            f"{r['seconds']:.2f} s"
            for r in stage["ranges"]
        )
        inter = stage.get("intermediate_acceptance_rate")
        print(
            (f"intermediate acceptance {inter:.2f}, " if inter is not None else "")
            + f"full model overturns {stage['full_overturn_rate']:.2f} of buffered tokens, "
            f"{stage['tokens_per_full_pass']:.2f} tokens per full pass; {ranges}",
            file=err,
        )
    if ar is not None:
        _print_compare(res, ar)
    return 0


def _text_streamer(tok):
    """An ``on_tokens`` callback that writes the newly decoded text to stdout."""
    printed = [""]
    new_ids: list[int] = []

    def stream(step: list[int]) -> None:
        new_ids.extend(step)
        text = tok.decode(new_ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed[0]) :])
            sys.stdout.flush()
            printed[0] = text

    return stream


def _print_compare(res, ar) -> None:
    """The --compare line: plain decoding's speed, the speed-up, whether the outputs match."""
    a, s = ar.stats, res.stats
    print(
        f"plain decoding: {a.tokens_per_second:.1f} tok/s -> speed-up "
        f"{s.tokens_per_second / max(a.tokens_per_second, 1e-9):.2f}x; output identical: "
        f"{res.token_ids == ar.token_ids}",
        file=sys.stderr,
    )


def _generate_ssd(args, target, tok, ids, params, load_s: float) -> int:
    """--method ssd: verifier here, the Saguaro speculator in its own process (`hierspec.ssd`)."""
    from .engine import generate
    from .ssd.cli import run_ssd, ssd_summary_lines

    stream = _text_streamer(tok)
    res = run_ssd(
        args,
        target,
        ids,
        params,
        eos_token_id=tok.eos_token_id,
        tokenizer=tok,
        on_tokens=None if args.json else stream,
    )
    ar = None
    if args.compare:
        ar = generate(
            target,
            ids,
            params=params,
            max_new_tokens=args.max_new_tokens,
            eos_token_id=tok.eos_token_id,
            tokenizer=tok,
            seed=args.seed,
        )
    s = res.stats
    if args.json:
        out = {
            "text": res.text,
            "token_ids": res.token_ids,
            "finish_reason": res.finish_reason,
            "method": "ssd",
            "rule": "greedy" if params.greedy else args.rule,
            "sampling": params.describe(),
            "dtype": args.dtype,
            "load_seconds": load_s,
            "stats": s.to_dict(),
        }
        if ar is not None:
            out["ar_stats"] = ar.stats.to_dict()
            out["speedup_vs_ar"] = s.tokens_per_second / max(ar.stats.tokens_per_second, 1e-9)
            out["identical_to_ar"] = res.token_ids == ar.token_ids
        print(json.dumps(out, default=str))
        return 0
    err = sys.stderr
    print(file=sys.stdout)
    print(
        f"\n--- ssd ({'greedy' if params.greedy else args.rule}, gamma={args.gamma}, "
        f"{params.describe()}) ---",
        file=err,
    )
    print(
        f"{s.num_generated_tokens} tokens in {s.time_decode:.2f} s = {s.tokens_per_second:.1f} tok/s",
        file=err,
    )
    for line in ssd_summary_lines(s):
        print(line, file=err)
    if ar is not None:
        _print_compare(res, ar)
    return 0


def _calibrate(args) -> int:
    from .bench.prompts import load_prompt_set
    from .calibrate import calibrate
    from .models import load_smollm2
    from .sampling import SamplingParams

    specs = [x.strip() for x in args.levels.split(",") if x.strip()]
    if not specs or "ngram" in specs:
        raise CliError("--levels: give draft model paths (n-gram has no distribution to calibrate)")
    if args.n < 1 or args.new_tokens < 1:
        raise CliError("--n and --new-tokens must be >= 1")
    params = SamplingParams(temperature=args.temperature)
    prompts = load_prompt_set(args.set, n=args.n)
    target, tok = load_smollm2(DTYPES[args.dtype])
    models = [_load_level(_draft_spec(p), target, DTYPES[args.dtype]) for p in specs] + [target]
    ids = []
    for pr in prompts:
        if pr.chat:
            enc = tok.apply_chat_template(
                [{"role": "user", "content": pr.text}], add_generation_prompt=True, tokenize=True
            )
            ids.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
        else:
            ids.append(tok(pr.text)["input_ids"])
    cal = calibrate(models, [*specs, "target"], ids, params=params, new_tokens=args.new_tokens)
    cal.save(args.out)
    print(f"wrote {args.out}")
    for i, name in enumerate(cal.names):
        costs = ", ".join(f"n={n}: {1e3 * c:.1f} ms" for n, c in zip(cal.sizes, cal.costs[i], strict=True))
        print(
            f"{name}: {costs}; alpha vs target {cal.alpha[i][-1]:.3f} "
            f"[{cal.alpha_lo[i][-1]:.3f}, {cal.alpha_hi[i][-1]:.3f}]"
        )
    return 0


def _plan(args) -> int:
    from .calibrate import Calibration
    from .planner import plan

    if args.n_max < 1 or args.top < 1:
        raise CliError("--n-max and --top must be >= 1")
    try:
        cal = Calibration.load(args.calibration)
    except ValueError as err:
        raise CliError(str(err)) from None
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


#: subcommands that own their argument parser: name -> module with main(argv)
DELEGATED = {
    "bench": "hierspec.bench.harness",
    "bench-verify": "hierspec.bench.microbench",
    "train-draft": "hierspec.train.cli",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in DELEGATED:
        import importlib

        rc = importlib.import_module(DELEGATED[argv[0]]).main(argv[1:])
        return int(rc or 0)
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "calibrate":
            return _calibrate(args)
        if args.command == "plan":
            return _plan(args)
    except (CliError, ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"hierspec: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
