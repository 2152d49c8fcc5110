"""``hierspec generate``: check every input, open the target, build the method through the
registry, warm up on a short prefix, run (streaming or one JSON object), optionally compare with
plain decoding on the same backend and on the other one."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from .flags import CliError, check_prompt, check_seed, spec_from_flags

_WARMUP_PROMPT = 16  # tokens: a warm-up never repeats a long prefill


def _params(args: Any) -> Any:
    from ..sampling import SamplingParams

    flags = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p"}
    try:
        return SamplingParams(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p
        )
    except ValueError as err:
        field = str(err).split(" ", 1)[0]
        raise CliError(f"{flags.get(field, field)}: {err}") from None


def _device(text: str) -> str:
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text != "cpu" and not text.startswith("cuda"):
        raise CliError(f"--device: expected cpu, cuda, cuda:N or auto, got {text!r}")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {text}: no CUDA device is available here (use --device cpu)")
    return text


def _check(args: Any) -> tuple[Any, Any, int, str]:
    """Everything that can be checked before a model is loaded: (params, spec, gamma, device)."""
    from ..methods import MethodError, check_gammas, entry_of, parse_method
    from ..methods.spec import parse_gamma

    params = _params(args)
    try:
        gamma = parse_gamma(args.gamma)
    except ValueError:
        raise CliError(f"--gamma must be >= 1 (or auto), got {args.gamma}") from None
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_seed(args.seed)
    args.prompt = check_prompt(args.prompt)
    if not args.prompt.strip():
        raise CliError("--prompt is empty")
    if args.compare_backend and args.device != "cpu":
        raise CliError("--compare-backend compares llama.cpp and torch on the CPU; drop --device")
    try:
        spec = parse_method(spec_from_flags(args))
        check_gammas(spec, [gamma])
    except MethodError as err:
        raise CliError(str(err)) from None
    if entry_of(spec).peer:
        raise CliError(f"--method {spec.kind} is a peer for `hierspec bench`, not a hierspec method")
    return params, spec, gamma, _device(args.device)


def encode(tok: Any, text: str, chat: bool) -> list[int]:
    """Token ids of a prompt (chat prompts through the template): `hierspec.prompts.encode_prompt`."""
    from ..prompts import Prompt, encode_prompt

    return encode_prompt(tok, Prompt("cli", "cli", text, chat))


def run_generate(args: Any) -> int:
    from ..methods import REFERENCE, MethodError, ModelSet, build_method, entry_of, needs
    from ..models.open import open_target

    params, spec, gamma, device = _check(args)
    t0 = time.perf_counter()
    opened = open_target(
        args.model, backend=args.backend, dtype=args.dtype, device=device, needs=needs([spec])
    )
    load_s = time.perf_counter() - t0
    target, tok = opened.model, opened.tokenizer
    ids = encode(tok, args.prompt, args.chat)
    if len(ids) >= target.max_length:
        raise CliError(f"--prompt: {len(ids)} tokens exceed the model's context of {target.max_length}")
    room = target.max_length - len(ids)
    if room < args.max_new_tokens:
        print(
            f"hierspec: warning: the context ({target.max_length} tokens) leaves room for {room} of the "
            f"{args.max_new_tokens} requested new tokens after the {len(ids)}-token prompt",
            file=sys.stderr,
        )
    import torch

    models = ModelSet(target, tok, dtype=getattr(torch, args.dtype), backend=opened.backend, name=opened.name)
    try:
        built = build_method(spec, models, rule=args.rule, gamma=gamma, draft_sampling=args.draft_sampling)
    except MethodError as err:
        raise CliError(str(err)) from None
    if built.note:
        print(built.note, file=sys.stderr)
    kw = dict(
        rule=args.rule,
        params=params,
        max_new_tokens=args.max_new_tokens,
        eos_token_id=tok.eos_token_id,
        stop_strings=args.stop,
        tokenizer=tok,
        seed=args.seed,
    )
    stream = None if args.json else text_streamer(tok)
    if entry_of(spec).remote:
        res = _run_ssd(built, ids, kw, stream)
    else:
        built.generate(ids[:_WARMUP_PROMPT], **{**kw, "max_new_tokens": 4})  # allocation, not timed
        res = built.generate(ids, on_tokens=stream, **kw)
    stage = built.system.stage_stats(res) if built.system is not None else None
    plain = {}
    if args.compare:
        plain[opened.backend] = build_method(REFERENCE, models, rule=args.rule).generate(ids, **kw)
    if args.compare_backend:
        other = "torch" if opened.backend == "llama.cpp" else "llama.cpp"
        try:
            o = open_target(args.model, backend=other, dtype=args.dtype)
        except ValueError as err:
            print(f"hierspec: warning: --compare-backend: {err}", file=sys.stderr)
        else:
            ar = build_method(REFERENCE, ModelSet(o.model, o.tokenizer, backend=other), rule=args.rule)
            ar.generate(ids[:_WARMUP_PROMPT], **{**kw, "max_new_tokens": 4})
            plain[other] = ar.generate(ids, **kw)
    info = {
        "method": spec.name,
        "model": opened.name,
        "backend": opened.backend,
        "rule": "greedy" if params.greedy else args.rule,
        "gamma": gamma or "auto",
        "sampling": params.describe(),
        "dtype": args.dtype if opened.backend == "torch" else "gguf",
        "load_seconds": load_s,
    }
    adaptive = getattr(built.drafter, "stats", None)
    if args.json:
        out = {"text": res.text, "token_ids": res.token_ids, "finish_reason": res.finish_reason, **info}
        out["stats"] = res.stats.to_dict()
        if callable(adaptive):
            out["adaptive"] = adaptive()
        if stage is not None:
            out["stages"] = stage
        for backend, ar in plain.items():
            key = "" if backend == opened.backend else f"_{backend.replace('.', '')}"
            out[f"ar{key}_stats"] = ar.stats.to_dict()
            out[f"speedup_vs_ar{key}"] = res.stats.tokens_per_second / max(ar.stats.tokens_per_second, 1e-9)
            out[f"identical_to_ar{key}"] = res.token_ids == ar.token_ids
        print(json.dumps(out, default=str))
        return 0
    _print_stats(res, info, stage, adaptive() if callable(adaptive) else None)
    for backend, ar in plain.items():
        print_compare(res, ar, backend)
    return 0


def _run_ssd(built: Any, ids: list[int], kw: dict, stream: Any) -> Any:
    """An SSD method: its speculator process for this one generation, ``built.gamma`` tokens per
    round (``auto``: the entry's fixed length)."""
    from ..ssd import SSDSession

    opts = built.options
    with SSDSession(built.target, opts["draft"], reply_timeout_s=opts["timeout"]) as session:
        return session.generate(ids, gamma=built.gamma, on_tokens=stream, **kw, **opts["generate"])


def _print_stats(res: Any, info: dict, stage: dict | None, adaptive: dict | None) -> None:
    s, err = res.stats, sys.stderr
    print(file=sys.stdout)
    print(
        f"\n--- {info['method']} on {info['model']} ({info['backend']}, {info['rule']}, "
        f"gamma={info['gamma']}, {info['sampling']}, {info['dtype']}) ---",
        file=err,
    )
    print(
        f"{s.num_generated_tokens} tokens in {s.time_decode:.2f} s = {s.tokens_per_second:.1f} tok/s"
        f" (prefill {s.time_prefill * 1e3:.0f} ms, model load {info['load_seconds']:.1f} s)",
        file=err,
    )
    if s.num_spec_steps:
        print(
            f"mean acceptance length {s.mean_acceptance_length:.2f}, draft acceptance rate "
            f"{s.draft_acceptance_rate:.2f}, target forwards/token {s.target_forwards_per_token:.2f}",
            file=err,
        )
    if adaptive and adaptive.get("k_hist"):
        hist = ", ".join(f"k={k}: {n}" for k, n in sorted(adaptive["k_hist"].items()))
        print(f"adaptive draft length: {hist}", file=err)
    print(
        f"time: draft {s.time_draft:.2f} s, target forward {s.time_target_forward:.2f} s, "
        f"engine overhead {s.overhead_per_step_ms:.2f} ms/step",
        file=err,
    )
    if hasattr(s, "hit_rate"):
        from ..ssd.arguments import ssd_summary_lines

        for line in ssd_summary_lines(s):
            print(line, file=err)
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


def text_streamer(tok: Any) -> Any:
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


def print_compare(res: Any, ar: Any, backend: str) -> None:
    """One --compare line: plain decoding's speed on ``backend``, the speed-up, identity."""
    a, s = ar.stats, res.stats
    print(
        f"plain decoding ({backend}): {a.tokens_per_second:.1f} tok/s -> speed-up "
        f"{s.tokens_per_second / max(a.tokens_per_second, 1e-9):.2f}x; output identical: "
        f"{res.token_ids == ar.token_ids}",
        file=sys.stderr,
    )
