"""Benchmark configuration: the matrix (`BenchConfig`, presets, command-line parsing and checks),
the prompts and the cells (one method at one temperature, gamma and rule). Nothing here loads a
model; every bad input is a `BenchError` (one line, exit status 2) before any work.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..drafters.model import DRAFT_SAMPLINGS, check_draft_sampling
from ..methods import METHOD_SYNTAX, REFERENCE, MethodError, MethodSpec, check_gammas, entry_of, parse_method
from ..methods.spec import LOOKUP_LEVELS, parse_gamma
from ..prompts import PROMPT_SETS, Prompt, encode_prompt, load_prompt_set, specbench_prompts
from .lists import parse_list, split

SPEC_RULES = ("token", "block", "hsd", "match")
DTYPES = ("float32", "bfloat16")
WARMUP_TOKENS = 16
HF_PLD_MAX_NGRAM = 3  # = NgramDrafter's default max_ngram, so both prompt lookups match n = 3..1
TIME_COMPONENTS = (
    "prefill",
    "draft",
    "target_forward",
    "logits_processing",
    "verify_rule",
    "rollback",
    "other",
)

BACKENDS = ("auto", "torch", "llama.cpp")
#: bad bench input: the registry's one-line user error (unknown method, bad option, bad flag)
BenchError = MethodError


@dataclass
class BenchConfig:
    """Everything that defines a benchmark run (see the module docstring)."""

    out: Path
    sets: list[str] = field(default_factory=lambda: ["code", "chat", "prose"])
    n: int = 10
    offset: int = 0
    methods: list[MethodSpec] = field(
        default_factory=lambda: [MethodSpec("ar", "ar"), MethodSpec("ngram", "ngram")]
    )
    rules: list[str] = field(default_factory=lambda: list(SPEC_RULES[:3]))  # match: on request
    draft_samplings: list[str] = field(default_factory=lambda: ["sample"])  # model drafts at T > 0
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.7, 1.0])
    gammas: list[int] = field(default_factory=lambda: [3, 5])
    dtype: str = "float32"
    max_new_tokens: int = 128
    repeats: int = 1
    warmup: int = 3
    on_error: str = "raise"
    top_p: float = 1.0
    seed: int = 0
    threads: int = 0  # 0 = leave torch's setting
    model: str = "smollm2-135m"  # a catalogue name or a path (GGUF file, transformers directory)
    backend: str = "auto"  # auto | torch | llama.cpp
    expected_acceptance: bool = True
    quick: bool = False
    preset: str | None = None
    device: str = "cpu"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        d["methods"] = [m.name for m in self.methods]
        return d


FULL_DEFAULTS = {
    "sets": "code,chat,prose",
    "n": 10,
    "methods": "ar,ngram,hf-ngram",
    "rules": "token,block,hsd",
    "temperatures": "0,0.7,1.0",
    "gammas": "auto,3,5",
    "dtype": "float32",
    "max_new_tokens": 128,
    "repeats": 1,
    "warmup": 3,
}
QUICK_PRESET = {
    "sets": "code,chat",
    "n": 3,
    "methods": "ar,ngram,hf-ngram",
    "rules": "block",
    "temperatures": "0,1.0",
    "gammas": "auto,5",
    "dtype": "float32",
    "max_new_tokens": 64,
    "repeats": 1,
    "warmup": 1,
}
#: ``--preset gpu``: every method family in one run on the embedded SmolLM2 (float32, so greedy
#: rows are checked for identity), T = 0 and 1 with all three rules; ``make bench-gpu`` adds a run
#: of the Qwen2.5-Coder pair when its part packages are installed. Explicit flags override it
#: (``--device cpu --n 1 --max-new-tokens 16`` is the CPU smoke run).
GPU_PRESET = {
    "sets": "code,chat",
    "n": 5,
    "methods": "ar,ngram,suffix,draft:small,hierarchy,hispec,early-exit:8,eagle,eagle-tree:5/4/16,hf-ngram,"
    "hf-early-exit:8",
    "rules": "token,block,hsd",
    "temperatures": "0,1.0",
    "gammas": "auto,5",
    "dtype": "float32",
    "max_new_tokens": 128,
    "repeats": 1,
    "warmup": 1,
}
PRESETS = {"quick": QUICK_PRESET, "gpu": GPU_PRESET}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hierspec bench",
        description="Benchmark matrix: methods x prompt sets x temperatures x gamma x rules, with "
        "HF transformers' prompt lookup / assisted generation as peers, in one run.",
    )
    ap.add_argument(
        "--out", required=True, type=Path, help="output directory (report.md, results.json, PNGs)"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="preset that finishes in a few minutes: 3 code + 3 chat prompts, 64 new tokens, T 0 and "
        "1.0, gamma auto and 5, rule block, methods ar,ngram,hf-ngram, float32 (explicit flags override it)",
    )
    ap.add_argument(
        "--preset",
        choices=("quick", "gpu"),
        help="quick (= --quick) or gpu: every method family, T 0 and 1, all rules, gamma auto and 5 "
        "(see GPU_PRESET); explicit flags override it",
    )
    ap.add_argument("--device", default="cpu", help="torch backend: cpu, cuda, cuda:N or auto")
    ap.add_argument(
        "--sets",
        help="comma list of code, chat, prose, copy, long (700-1500-token summarization and RAG), "
        "specbench:PATH (default code,chat,prose)",
    )
    ap.add_argument("--n", type=int, help="prompts per set (per category for specbench:PATH); default 10")
    ap.add_argument("--offset", type=int, default=0, help="skip this many prompts of each set")
    ap.add_argument("--methods", help=f"comma list of {METHOD_SYNTAX} (default ar,ngram,hf-ngram)")
    ap.add_argument(
        "--rules",
        help="verification rules at T > 0: token,block,hsd,match (match: the engines' rule; "
        "default token,block,hsd)",
    )
    ap.add_argument(
        "--draft-sampling",
        default="sample",
        help="how draft models (draft:NAME) pick their tokens at T > 0, comma list of "
        f"{', '.join(DRAFT_SAMPLINGS)}: sample = draw from the draft's processed q, greedy = its "
        "argmax, the engines' practice (one cell each; default sample)",
    )
    ap.add_argument("--temperatures", help="comma list, 0 = greedy (default 0,0.7,1.0)")
    ap.add_argument(
        "--gammas",
        help="draft lengths, comma list: integers >= 1 or auto (the adaptive policy); default auto,3,5",
    )
    ap.add_argument("--dtype", choices=DTYPES, help="model dtype (default float32)")
    ap.add_argument(
        "--model",
        default="smollm2-135m",
        help="target: a catalogue name (smollm2-135m, qwen2.5-coder-1.5b, ...), a .gguf file or a "
        "transformers directory (default smollm2-135m, the embedded SmolLM2-135M-Instruct)",
    )
    ap.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="auto (llama.cpp for a GGUF target when every method can run on it, else torch), "
        "torch (HF transformers) or llama.cpp",
    )
    ap.add_argument("--max-new-tokens", type=int, help="new tokens per generation (default 128)")
    ap.add_argument("--repeats", type=int, help="timed runs per prompt and cell (default 1)")
    ap.add_argument("--warmup", type=int, help="warm-up runs per cell on the first prompt (default 3)")
    ap.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="malformed Spec-Bench lines, over-long prompts and failed generations: stop (raise, "
        "default) or skip them with a warning",
    )
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling at T > 0 (1 = off)")
    ap.add_argument("--seed", type=int, default=0, help="base seed (per prompt and repeat)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument(
        "--no-expected-acceptance",
        action="store_true",
        help="skip the exact E[accepted | draft] analysis (RULES[rule].law on every realised draft)",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return ap


def _parse_list(text: str, conv: Callable[[str], Any], what: str) -> list:
    return parse_list(text, conv, f"--{what}", error=BenchError)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Validate parsed arguments (no file is read but draft paths' existence)."""
    preset = "quick" if args.quick else args.preset
    base = PRESETS[preset] if preset else FULL_DEFAULTS

    def pick(name: str):
        value = getattr(args, name)
        return base[name] if value is None else value

    methods = [parse_method(m) for m in split(pick("methods"))]
    if not methods:
        raise BenchError("--methods: empty list")
    names = list(dict.fromkeys(m.name for m in methods))
    methods = [next(m for m in methods if m.name == n) for n in names]
    if not any(m.kind == REFERENCE for m in methods):
        methods.insert(0, parse_method(REFERENCE))  # the reference of every speed-up
    rules = _parse_list(pick("rules"), str, "rules")
    bad = [r for r in rules if r not in SPEC_RULES]
    if bad:
        raise BenchError(f"--rules: unknown rule(s) {bad}; valid: {', '.join(SPEC_RULES)}")
    samplings = _parse_list(args.draft_sampling, str, "draft-sampling")
    try:
        samplings = [check_draft_sampling(x, "--draft-sampling") for x in samplings]
    except ValueError as err:
        raise BenchError(str(err)) from None
    temps = _parse_list(pick("temperatures"), float, "temperatures")
    if any(not math.isfinite(t) or t < 0 for t in temps):
        raise BenchError(f"--temperatures: expected finite numbers >= 0, got {temps}")
    gammas = _parse_list(pick("gammas"), parse_gamma, "gammas")
    if any(g < 0 for g in gammas):
        raise BenchError(f"--gammas: expected integers >= 1 or 'auto', got {gammas}")
    for m in methods:
        if not entry_of(m).plain:
            check_gammas(m, method_gammas(m, gammas))
    sets = _parse_list(pick("sets"), str, "sets")
    for s in sets:
        if s.startswith("specbench:"):
            if not s[len("specbench:") :]:
                raise BenchError("--sets: 'specbench:' needs a file path, e.g. specbench:question.jsonl")
        elif s not in PROMPT_SETS:
            valid = ", ".join([*PROMPT_SETS, "specbench:PATH"])
            raise BenchError(f"--sets: unknown prompt set {s!r}; valid: {valid}")
    cfg = BenchConfig(
        out=args.out,
        sets=sets,
        n=int(pick("n")),
        offset=args.offset,
        methods=methods,
        rules=rules,
        draft_samplings=samplings,
        temperatures=temps,
        gammas=sorted(gammas),
        dtype=pick("dtype"),
        max_new_tokens=int(pick("max_new_tokens")),
        repeats=int(pick("repeats")),
        warmup=int(pick("warmup")),
        on_error=args.on_error,
        top_p=args.top_p,
        seed=args.seed,
        threads=args.threads,
        model=args.model,
        backend=args.backend,
        expected_acceptance=not args.no_expected_acceptance,
        quick=args.quick,
        preset=preset,
        device=args.device,
    )
    for name, lo in (("n", 1), ("max_new_tokens", 1), ("repeats", 1), ("warmup", 0), ("offset", 0)):
        if getattr(cfg, name) < lo:
            raise BenchError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(cfg, name)}")
    if not 0 < cfg.top_p <= 1:
        raise BenchError(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if cfg.device not in ("cpu", "auto") and not cfg.device.startswith("cuda"):
        raise BenchError(f"--device: expected cpu, cuda, cuda:N or auto, got {cfg.device!r}")
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise BenchError(f"--device {cfg.device}: no CUDA device is available here (use --device cpu)")
    if cfg.threads < 0:
        raise BenchError(f"--threads must be >= 0, got {cfg.threads}")
    return cfg


def check_output_dir(out: Path) -> None:
    """Raise BenchError unless ``out`` is (or can be created as) a writable directory.

    Probes with a temporary file that is removed at once (``os.access`` says yes to root)."""
    out = Path(out)
    probe_dir = out
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise BenchError(f"--out {str(out)!r}: {str(probe_dir)!r} exists and is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe_dir, prefix=".hierspec-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:  # ENOENT inside an existing folder: e.g. /proc, which takes no files
        why = "it takes no new files" if err.errno == errno.ENOENT else err.strerror
        raise BenchError(
            f"--out {str(out)!r}: directory {str(probe_dir)!r} is not writable ({why})"
        ) from None


def load_prompts(cfg: BenchConfig) -> list[Prompt]:
    """All prompts of the configured sets, in order; BenchError on unknown sets or bad files.

    For ``specbench:PATH`` ``n``/``offset`` apply per category (Spec-Bench files are sorted by
    task, so the first n of the file would all be MT-bench)."""
    prompts: list[Prompt] = []
    for name in cfg.sets:
        try:
            if name.startswith("specbench:"):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    items = specbench_prompts(name[len("specbench:") :], on_error=cfg.on_error)
                for w in caught:
                    print(f"hierspec bench: warning: {w.message}", file=sys.stderr)
                per_cat: dict[str, list[Prompt]] = {}
                for p in items:
                    per_cat.setdefault(p.category, []).append(p)
                for group in per_cat.values():
                    prompts.extend(group[cfg.offset : cfg.offset + cfg.n])
            else:
                prompts.extend(load_prompt_set(name, n=cfg.n, offset=cfg.offset))
        except (ValueError, FileNotFoundError, ModuleNotFoundError, OSError) as err:
            raise BenchError(f"--sets {name}: {err}") from None
    if not prompts:
        raise BenchError(f"--sets {','.join(cfg.sets)}: no prompts (check --n / --offset)")
    return prompts


def contexts(target: Any, drafts: dict[str, Any]) -> list[tuple[str, int]]:
    """``(model, max_length)`` of the target and of every loaded draft that has one: a prompt
    must fit all of them (every method runs on the same prompts)."""
    out = [("the target", int(target.max_length))]
    for path, d in drafts.items():
        n = getattr(d, "max_length", None)
        if isinstance(n, int) and n > 0:
            out.append((f"the draft {path}", n))
    return out


def encode_prompts(
    cfg: BenchConfig, tokenizer: Any, prompts: Sequence[Prompt], max_length: int | list[tuple[str, int]]
) -> tuple[list[tuple[Prompt, list[int]]], list[dict]]:
    """Token ids of every usable prompt, and the prompts skipped (``--on-error skip``).

    ``max_length``: the target's context, or ``(model, context)`` of every model (`contexts`); a
    prompt must leave room for at least one new token in each."""
    limits = [("the target", max_length)] if isinstance(max_length, int) else list(max_length)
    encoded: list[tuple[Prompt, list[int]]] = []
    errors: list[dict] = []
    for p in prompts:
        ids = encode_prompt(tokenizer, p)
        problem = None
        too_small = [(what, n) for what, n in limits if len(ids) >= n]
        if not ids:
            problem = "the prompt encodes to no tokens"
        elif too_small:
            what, n = min(too_small, key=lambda x: x[1])
            problem = f"{len(ids)} tokens exceed the context of {what} ({n} tokens)"
        if problem:
            if cfg.on_error == "raise":
                raise BenchError(f"prompt {p.id} ({p.category}): {problem} (--on-error skip skips it)")
            print(f"hierspec bench: warning: skipping prompt {p.id}: {problem}", file=sys.stderr)
            errors.append({"prompt_id": p.id, "category": p.category, "stage": "encode", "error": problem})
            continue
        encoded.append((p, ids))
    if not encoded:
        raise BenchError("no usable prompts")
    return encoded, errors


# ------------------------------------------------------------------------------------ cells
@dataclass(frozen=True)
class Cell:
    """One column of the matrix at one temperature: a method with its gamma and rule, and how its
    draft model picks tokens at T > 0 (``draft_sampling``; the label shows it unless "sample")."""

    method: MethodSpec
    temperature: float
    gamma: int | None
    rule: str  # "-" (AR), "greedy" (T = 0), token|block|hsd, "hf" (HF's own rule at T > 0)
    draft_sampling: str = "sample"  # sample | greedy (`hierspec.drafters.model.DRAFT_SAMPLINGS`)

    @property
    def label(self) -> str:
        entry = entry_of(self.method)
        if entry.plain:
            return self.method.kind
        name = self.method.name
        if self.method.path:
            name = f"{self.method.kind}:{Path(self.method.path).name or self.method.path}"
            name += "".join(
                f"/{k}={v:g}" if isinstance(v, float) else f"/{k}={v}" for k, v in self.method.ssd
            )
        elif self.method.levels:
            name = f"{self.method.kind}:" + "+".join(
                p if p in LOOKUP_LEVELS else f"{Path(p).stem}@{g}" for p, g in self.method.levels
            )
        planned = entry.planned(self.method)
        if planned:  # the planner's batch lengths, whatever gamma says
            name = f"{self.method.kind}:plan"
        parts = [name, "γplan" if planned else f"γ{self.gamma or 'auto'}"]
        if self.rule not in ("greedy", "hf"):
            parts.insert(1, self.rule)
        label = "/".join(parts)
        return label if self.draft_sampling == "sample" else f"{label} [{self.draft_sampling}]"


def method_gammas(m: MethodSpec, gammas: Sequence[int]) -> list[int]:
    """The draft lengths the matrix runs ``m`` at, from ``--gammas`` (0 = auto): the method's own
    length (HiSpec's N_i, a tree's depth), one cell for a planned stack (the planner's lengths,
    also at auto), integers only where the length is fixed (peers and SSD have no adaptive
    length; HF assisted generation has: auto = its own defaults), else all of them."""
    entry = entry_of(m)
    own = entry.own_gamma(m)
    if own is not None:
        return [own]
    fixed = [g for g in gammas if g] or [5]
    if entry.planned(m):
        return fixed[:1]
    return fixed if entry.fixed_gamma else list(gammas)


def plan_cells(cfg: BenchConfig) -> list[Cell]:
    """The cells of the matrix: AR once per temperature; rules only for hierspec drafting at T > 0."""
    cells = []
    for t in cfg.temperatures:
        for m in cfg.methods:
            entry = entry_of(m)
            if entry.plain:
                cells.append(Cell(m, t, None, "-"))
                continue
            for g in method_gammas(m, cfg.gammas):
                if t == 0:
                    cells.append(Cell(m, t, g, "greedy"))
                elif entry.peer:  # the peer's own rule
                    cells.append(Cell(m, t, g, entry.runner))
                elif m.tree:  # trees: exact recursive rejection sampling, no chain rule
                    cells.append(Cell(m, t, g, "tree"))
                else:  # a draft model's sampling is one more axis (draft: only)
                    samplings = cfg.draft_samplings if entry.draft_sampling else ["sample"]
                    cells.extend(Cell(m, t, g, r, ds) for ds in samplings for r in cfg.rules)
    return cells
