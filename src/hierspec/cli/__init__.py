"""Command line: ``hierspec generate | serve | calibrate | plan | bench | bench-serve | bench-verify |
train-draft``.

    hierspec generate --prompt "Write a haiku about the sea." --chat --compare
    hierspec generate --prompt "def fib(n):" --method 'hierarchy:ngram@2+small@3' --json
    hierspec generate --prompt "..." --model qwen2.5-coder-1.5b --method draft:qwen2.5-coder-0.5b
    hierspec bench --quick --out bench-out/quick

`generate` runs a target (``--model``, default the embedded SmolLM2-135M-Instruct, on ``--backend``
auto | torch | llama.cpp) with a method of the registry (``--method SPEC``, the same strings as
``bench --methods``), streams the text to the terminal (or prints one JSON object with ``--json``:
text, token_ids, stats, and nothing else on stdout), and with ``--compare`` also runs plain
decoding on the same backend and prints the speed-up and whether the outputs are identical.

Errors: a user error is one line on stderr and exit status 2, found before any long work; Ctrl-C
prints one line and exits with 130.
"""

from __future__ import annotations

import argparse
import os
import sys

from .flags import CliError, method_type

__all__ = ["CliError", "main"]

DTYPES = ("float32", "bfloat16")


def _build_parser() -> argparse.ArgumentParser:
    from ..models.open import BACKENDS
    from ..ssd.arguments import add_ssd_arguments

    ap = argparse.ArgumentParser(prog="hierspec", description="Lossless speculative decoding.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text with speculative decoding")
    g.add_argument(
        "--prompt", required=True, help="prompt text (UTF-8; other bytes are an error, exit status 2)"
    )
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    _add_model_arguments(g, BACKENDS)
    g.add_argument(
        "--method",
        default="ngram",
        type=method_type,
        help="a method spec, as for `hierspec bench --methods` (e.g. ar, ngram, suffix, draft:small, "
        "'hierarchy:ngram@2+small@3', hispec:4/8/2/4, eagle-tree:5/4/16, ssd:small/budget=16), or a "
        "method kind with the flags below; default ngram",
    )
    g.add_argument(
        "--eagle", default=None, help="--method eagle: an EAGLE head file (default: the shipped head)"
    )
    g.add_argument("--tree", action="store_true", help="--method eagle: a dynamic tree (EAGLE-2)")
    g.add_argument("--tree-depth", type=int, default=5, help="--tree: levels (tokens per step <= depth+1)")
    g.add_argument("--tree-topk", type=int, default=4, help="--tree: children per expanded node")
    g.add_argument("--tree-budget", type=int, default=16, help="--tree: drafted nodes per step")
    g.add_argument(
        "--draft",
        default=None,
        help="--method draft / ssd: a shipped draft (small, large; default small), a catalogue model "
        "(qwen2.5-coder-0.5b), a hierspec draft file, a transformers folder or a .gguf sharing the "
        "target's tokenizer",
    )
    g.add_argument("--exits", default=None, help="--method hispec: L_d,L_i (default 4,8); early-exit: L_d")
    g.add_argument("--nd", type=int, default=2, help="--method hispec: draft tokens per draft step (N_d)")
    g.add_argument("--ni", type=int, default=4, help="--method hispec: buffered tokens per full pass (N_i)")
    g.add_argument(
        "--levels", default=None, help="--method hierarchy: draft levels bottom first, comma-separated"
    )
    g.add_argument("--gammas", default=None, help="--method hierarchy: tokens per step of each draft level")
    g.add_argument(
        "--rule",
        default="block",
        choices=("token", "block", "hsd", "match"),
        help="verification rule at temperature > 0 (greedy at temperature 0); every level of a "
        "hierarchy and both HiSpec stages use it",
    )
    g.add_argument(
        "--draft-sampling",
        default="sample",
        choices=("sample", "greedy"),
        help="how a draft model drafts at temperature > 0: sample = draws from its own distribution "
        "(what block / HSD verification gain from), greedy = its argmax (llama.cpp's and SGLang's "
        "practice); both exact with every rule",
    )
    g.add_argument(
        "--gamma",
        default="auto",
        help="draft tokens per step: an integer >= 1, or auto (default: chosen per step from the "
        "measured cost curve and the drafter's confidence, 0..8, never slower than plain decoding)",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0, help="random seed, an integer in [0, 2^63) (default 0)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--json", action="store_true", help="print one JSON object, no streaming")
    g.add_argument("--compare", action="store_true", help="also run plain decoding and report the speed-up")
    g.add_argument(
        "--compare-backend",
        action="store_true",
        help="also run plain decoding on the other backend (torch <-> llama.cpp) and report that speed-up",
    )
    add_ssd_arguments(g)
    c = sub.add_parser("calibrate", help="measure costs and pairwise acceptance for the planner")
    c.add_argument("--levels", required=True, help="ngram/suffix, then draft models (the target is added)")
    c.add_argument("--out", required=True, help="calibration JSON to write")
    c.add_argument(
        "--set", default="chat", help="prompt sets, comma-separated (code, chat, prose, specbench:P)"
    )
    c.add_argument("--n", type=int, default=8, help="calibration prompts per set")
    c.add_argument("--new-tokens", type=int, default=64, help="target-sampled tokens per prompt")
    c.add_argument("--temperature", type=float, default=1.0)
    _add_model_arguments(c, BACKENDS)
    p = sub.add_parser("plan", help="rank hierarchies by the latency model from a calibration file")
    p.add_argument("--calibration", required=True)
    p.add_argument("--n-max", type=int, default=8, help="largest batch length per level")
    p.add_argument("--top", type=int, default=5)
    from .serve import add_serve_arguments

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_model_arguments(s, BACKENDS)
    add_serve_arguments(s)
    sub.add_parser("bench", help="benchmark matrix with peers and a report (--help for options)")
    sub.add_parser("bench-verify", help="micro-benchmark of the verification rules (--help for options)")
    sub.add_parser("bench-serve", help="OpenAI servers under concurrent load (--help for options)")
    sub.add_parser("train-draft", help="distil a draft or early-exit head (--help for options)")
    return ap


def _add_model_arguments(p: argparse.ArgumentParser, backends: tuple[str, ...]) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="target: a catalogue name (smollm2-135m, qwen2.5-coder-1.5b, qwen2.5-coder-0.5b), a .gguf "
        "file or a transformers folder (default smollm2-135m, the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=backends,
        help="auto (llama.cpp for a GGUF on the CPU when the method can run there, else torch), "
        "torch (HF transformers) or llama.cpp",
    )
    p.add_argument(
        "--device", default="cpu", help="torch backend: cpu, cuda, cuda:N or auto (cuda if available)"
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="torch backend: bfloat16 is faster on AVX512-BF16 CPUs but not bit-exact",
    )


#: subcommands that own their argument parser: name -> module with main(argv)
DELEGATED = {
    "bench": "hierspec.bench.harness",
    "bench-verify": "hierspec.bench.microbench",
    "bench-serve": "hierspec.bench.serving_cli",
    "train-draft": "hierspec.train.cli",
}


def _quiet_hf() -> None:
    """No HF progress bars or warnings on stderr (``--json`` keeps stderr for errors)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] and argv[0] in DELEGATED:
            import importlib

            return int(importlib.import_module(DELEGATED[argv[0]]).main(argv[1:]) or 0)
        args = _build_parser().parse_args(argv)
        if getattr(args, "json", False):
            _quiet_hf()
        try:
            if args.command == "generate":
                from .generate import run_generate

                return run_generate(args)
            if args.command == "calibrate":
                from .calibrate import run_calibrate

                return run_calibrate(args)
            if args.command == "serve":
                from .serve import run_serve

                return run_serve(args)
            if args.command == "plan":
                from .calibrate import run_plan

                return run_plan(args)
        except (CliError, ValueError, FileNotFoundError, ModuleNotFoundError, OSError) as err:
            print(f"hierspec: error: {err}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print("hierspec: interrupted", file=sys.stderr)
        return 130
    return 0
