"""Benchmark harness: methods x prompt sets x temperatures x gamma x rules, on one target, one run.

    hierspec bench --quick --out bench-out/quick
    hierspec bench --out bench-out/full --sets code,chat,prose --n 10 \\
        --methods ar,ngram,hf-ngram,draft:PATH,hf-draft:PATH --rules token,block,hsd \\
        --temperatures 0,0.7,1.0 --gammas 3,5 --repeats 3

Methods (the target is the embedded SmolLM2-135M-Instruct):

* ``ar`` -- hierspec plain decoding (always run: every speed-up is measured against it, in the
  same run, on the same prompts).
* ``ngram`` -- hierspec prompt lookup (:class:`~hierspec.drafters.NgramDrafter`, n = 3..1).
* ``draft:PATH`` -- hierspec with a draft model (a transformers directory or a ``.gguf`` file
  sharing the target's tokenizer).
* ``ssd:NAME[/KEY=VALUE...]`` -- speculative speculative decoding (:mod:`hierspec.ssd`, Saguaro)
  with the draft ``NAME`` (as for ``draft:``) in a speculator process; options, as trailing
  ``/KEY=VALUE`` parts: ``fanout=uniform|geometric``, ``budget=B`` (branches per round, >= γ + 1;
  default 3(γ + 1)), ``c=C`` (Saguaro constant in (0, 1]), ``fallback=jit|fast``,
  ``backup=ngram|random`` (what ``fallback=fast`` proposes), ``emulate=MS`` (sleep MS after every
  SSD verification: emulates a slow target for the SSD row only, so its speed-up vs AR is then
  not comparable), ``timeout=S`` (speculator reply deadline). E.g.
  ``ssd:small/fanout=geometric/budget=16/c=0.5/fallback=fast``. Compare with ``draft:NAME`` in the
  same run: the report gives SSD's speed-up over it next to the hit rate.
* ``hf-ngram`` -- HF transformers' own ``model.generate(prompt_lookup_num_tokens=gamma,
  max_matching_ngram_size=3)`` on the same underlying model (``HFModel.model``).
* ``hf-draft:PATH`` -- HF assisted generation ``generate(assistant_model=..., num_assistant_tokens=
  gamma, num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0)``.

HF runs pass ``top_k=0`` so HF's implicit ``top_k=50`` is not applied: both libraries sample from
the same processed distribution (temperature, top-p). Rules (``token|block|hsd``) apply to hierspec
drafting methods at T > 0; at T = 0 every method is greedy and its output is compared token by
token with hierspec AR. HF methods have their own fixed rule (``hf`` in the tables).

Protocol (Spec-Bench style, batch size 1): prompts are tokenised first; every (method, T, gamma,
rule) cell is warmed up ``--warmup`` times on the first prompt (16 new tokens); then for each
prompt and repeat every cell runs in turn (order rotated per prompt) so machine drift hits all
methods alike. Each generation is timed with ``perf_counter`` around the whole call (prefill
included, for hierspec and HF alike). For hierspec drafting methods at T > 0 the engine's
``on_verify`` hook evaluates ``RULES[rule].law`` on every realised draft and sums the exact
E[accepted | draft] next to the measured accepted count; that analysis time is measured inside the
hook and subtracted from the run's time (reported separately, ``--no-expected-acceptance`` turns
it off). Bad input (unknown method or set, malformed Spec-Bench line, missing draft path,
unwritable output directory, bad SSD options) fails with exit status 2 before any model is loaded,
and the report files are only written, each atomically, once everything has run.

SSD rows: one speculator process per (draft, reply timeout) is started before the warm-ups (outside
every timed region) and reused by every SSD cell (all prompts, temperatures, γ, rules, options);
the verifier is this process. It is stopped when the matrix ends, on errors too (try/finally).
`SSDSession` pins the verifier to the first allowed core with one torch thread and the speculator
to the second core: the harness applies that placement only around SSD generations and restores
the bench's affinity and thread count for every other method (so SSD runs on the same two cores
as the others, split one verifier core + one speculator core). After each SSD generation the
harness waits, untimed, until the speculator has finished its last pre-speculation
(`SSDSession.sync`), so none of its work overlaps the next cell. Greedy SSD rows are checked
token by token against AR like every other method.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import platform
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..drafters import ModelDrafter, NgramDrafter
from ..engine import generate
from ..sampling import SamplingParams
from ..verify import RULES
from .prompts import PROMPT_SETS, Prompt, load_prompt_set, specbench_prompts

METHOD_KINDS = (
    "ar",
    "ngram",
    "draft",
    "hierarchy",
    "early-exit",
    "hispec",
    "eagle",
    "eagle-tree",
    "ssd",
    "hf-ngram",
    "hf-draft",
    "hf-early-exit",
)
METHOD_SYNTAX = (
    "ar, ngram, draft:NAME|PATH, hierarchy:LEVEL+LEVEL+... (bottom first; LEVEL = ngram | NAME | PATH, "
    "optionally @GAMMA, default 3), early-exit[:L], hispec[:Ld/Li[/Nd/Ni]], eagle[:PATH], "
    "eagle-tree[:DEPTH/TOPK/BUDGET[:PATH]], "
    "ssd:NAME|PATH[/fanout=uniform|geometric][/budget=B][/c=C][/fallback=jit|fast]"
    "[/backup=ngram|random][/emulate=MS][/timeout=S], hf-ngram, hf-draft:PATH, hf-early-exit:L"
)
# ssd:NAME/KEY=VALUE -> (SSDSession.generate / SSDSession keyword, converter)
SSD_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "fanout": ("fanout", str),
    "budget": ("budget", int),
    "c": ("saguaro_c", float),
    "fallback": ("fallback", str),
    "backup": ("fast_backup", str),
    "emulate": ("emulate_verify_ms", float),
    "timeout": ("reply_timeout_s", float),
}
SSD_REPLY_TIMEOUT_S = 60.0
SPEC_RULES = ("token", "block", "hsd")
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


class BenchError(ValueError):
    """Bad input (a ValueError): printed as one line on stderr, exit status 2, nothing written."""


# ------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class MethodSpec:
    """One method of the matrix: ``kind`` in METHOD_KINDS, ``path`` for draft models."""

    name: str
    kind: str
    path: str | None = None
    levels: tuple[tuple[str, int], ...] = ()  # hierarchy: (ngram | draft path, gamma), bottom first
    exits: tuple[int, ...] = ()  # early-exit: (L_d,); hispec: (L_d, L_i); hf-early-exit: (L,)
    nd: int = 2  # hispec: draft tokens per draft step
    ni: int = 4  # hispec: buffered tokens per full pass (its gamma)
    ssd: tuple[tuple[str, Any], ...] = ()  # ssd: (option key of SSD_OPTIONS, value), in given order
    tree: tuple[int, int, int] = ()  # eagle-tree: (depth, topk, budget)
    head: str | None = None  # eagle / eagle-tree: head file (None = the shipped head)

    @property
    def ssd_kwargs(self) -> dict[str, Any]:
        """The ssd options as keywords of SSDSession / SSDSession.generate."""
        return {SSD_OPTIONS[k][0]: v for k, v in self.ssd}

    @property
    def drafts(self) -> bool:
        return self.kind != "ar"

    @property
    def paths(self) -> list[str]:
        """Draft files this method needs loaded."""
        return [p for p, _ in self.levels if p != "ngram"] + ([self.path] if self.path else [])

    @property
    def hf(self) -> bool:
        return self.kind.startswith("hf-")


def _draft_file(text: str, spec: str) -> str:
    """A shipped draft name (`hierspec.models.shipped.DRAFTS`) or an existing path."""
    from ..models import shipped

    if spec in shipped.DRAFTS:
        try:
            return str(shipped.draft_path(spec))
        except FileNotFoundError as err:
            raise BenchError(f"method {text!r}: {err}") from None
    if not os.path.exists(spec):
        raise BenchError(f"method {text!r}: draft path {spec!r} does not exist")
    return spec


def _ints(text: str, arg: str, n_allowed: tuple[int, ...]) -> list[int]:
    try:
        vals = [int(x) for x in arg.split("/")]
    except ValueError:
        raise BenchError(f"method {text!r}: expected integers separated by '/', got {arg!r}") from None
    if len(vals) not in n_allowed or any(v < 1 for v in vals):
        raise BenchError(f"method {text!r}: expected {' or '.join(map(str, n_allowed))} integers >= 1")
    return vals


def _ssd_method(text: str, arg: str) -> MethodSpec:
    """``ssd:NAME[/KEY=VALUE...]``: the trailing parts holding '=' are options, the rest the draft."""
    from ..ssd.options import FALLBACKS, FAST_BACKUPS
    from ..ssd.saguaro import FANOUTS, check_saguaro_c

    parts = arg.split("/")
    opts: list[tuple[str, Any]] = []
    while len(parts) > 1 and "=" in parts[-1]:
        key, _, val = parts.pop().partition("=")
        if key not in SSD_OPTIONS:
            raise BenchError(f"method {text!r}: unknown SSD option {key!r}; valid: {', '.join(SSD_OPTIONS)}")
        if any(k == key for k, _ in opts):
            raise BenchError(f"method {text!r}: SSD option {key!r} given twice")
        try:
            value = SSD_OPTIONS[key][1](val)
        except ValueError:
            raise BenchError(f"method {text!r}: SSD option {key}={val!r} is not a valid number") from None
        choices = {"fanout": FANOUTS, "fallback": FALLBACKS, "backup": FAST_BACKUPS}.get(key)
        problem = None
        if choices is not None and value not in choices:
            problem = f"expected one of {', '.join(choices)}"
        elif key == "budget" and value < 2:
            problem = "expected an integer >= gamma + 1"
        elif key in ("emulate", "timeout") and (
            not math.isfinite(value) or value < 0 or (key == "timeout" and value == 0)
        ):
            problem = "expected a finite number " + (">= 0" if key == "emulate" else "> 0")
        elif key == "c":
            try:
                check_saguaro_c(value)
            except ValueError:
                problem = "expected a number in (0, 1]"
        if problem:
            raise BenchError(f"method {text!r}: SSD option {key}={val}: {problem}")
        opts.insert(0, (key, value))
    name = "/".join(parts)
    if not name:
        raise BenchError(f"method {text!r}: give the draft model, e.g. ssd:small or ssd:PATH/budget=16")
    return MethodSpec(text, "ssd", _draft_file(text, name), ssd=tuple(opts))


def check_ssd_gammas(m: MethodSpec, gammas: Sequence[int]) -> None:
    """BenchError unless the SSD options of ``m`` are valid with every γ (budget >= γ + 1)."""
    from ..ssd.options import SSDOptions

    gen = {k: v for k, v in m.ssd_kwargs.items() if k not in ("emulate_verify_ms", "reply_timeout_s")}
    for g in gammas:
        try:
            SSDOptions(gamma=g, **gen)
        except ValueError as err:
            raise BenchError(f"method {m.name!r} with γ = {g}: {err}") from None


def parse_method(text: str) -> MethodSpec:
    """One ``--methods`` entry (see METHOD_SYNTAX) -> MethodSpec; BenchError on bad input."""
    from ..models import shipped

    text = text.strip()
    kind, sep, arg = text.partition(":")
    if kind in ("ar", "ngram", "hf-ngram") and not sep:
        return MethodSpec(text, kind)
    if kind in ("draft", "hf-draft") and sep:
        if not arg:
            raise BenchError(f"method {text!r}: give the draft model, e.g. {kind}:PATH")
        return MethodSpec(text, kind, _draft_file(text, arg))
    if kind in ("draft", "hf-draft", "ssd"):
        if kind == "ssd" and sep:
            return _ssd_method(text, arg)
        raise BenchError(f"method {text!r} needs a draft model path or shipped name: {kind}:PATH")
    if kind == "hierarchy":
        levels = []
        for i, part in enumerate(x for x in arg.split("+") if x):
            spec, _, g = part.rpartition("@") if "@" in part else (part, "", "")
            gamma = _ints(text, g, (1,))[0] if g else 3
            if spec == "ngram":
                if i:
                    raise BenchError(f"method {text!r}: 'ngram' can only be the bottom level")
                levels.append(("ngram", 0))
            else:
                levels.append((_draft_file(text, spec), gamma))
        if not any(p != "ngram" for p, _ in levels):
            raise BenchError(
                f"method {text!r}: give at least one draft model level, e.g. hierarchy:ngram+small"
            )
        return MethodSpec(text, kind, levels=tuple(levels))
    if kind in ("early-exit", "hispec"):
        if kind == "early-exit":
            exits = _ints(text, arg, (1,)) if arg else [shipped.DEFAULT_EXITS[0]]
            nd, ni = 2, 4
        else:
            vals = _ints(text, arg, (2, 4)) if arg else list(shipped.DEFAULT_EXITS)
            exits, (nd, ni) = vals[:2], (vals[2:] or [2, 4])
            if not exits[0] < exits[1]:
                raise BenchError(f"method {text!r}: the draft exit must come before the intermediate exit")
        for e in exits:
            if e not in shipped.EXIT_HEADS:
                raise BenchError(f"method {text!r}: no shipped early-exit head at layer {e}")
        return MethodSpec(text, kind, exits=tuple(exits), nd=nd, ni=ni)
    if kind in ("eagle", "eagle-tree"):
        tree: tuple[int, ...] = ()
        if kind == "eagle-tree":
            shape, _, arg = arg.partition(":") if arg and arg[0].isdigit() else ("", "", arg)
            tree = tuple(_ints(text, shape, (3,))) if shape else (5, 4, 16)
            if min(tree) < 1:
                raise BenchError(f"method {text!r}: tree depth, top-k and budget must be >= 1")
        if arg and not os.path.isfile(arg):
            raise BenchError(f"method {text!r}: EAGLE head file {arg!r} does not exist")
        return MethodSpec(text, kind, tree=tree, head=arg or None)
    if kind == "hf-early-exit":
        return MethodSpec(
            text, kind, exits=tuple(_ints(text, arg, (1,)) if arg else [shipped.DEFAULT_EXITS[0]])
        )
    raise BenchError(f"unknown method {text!r}; valid methods: {METHOD_SYNTAX}")


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
    rules: list[str] = field(default_factory=lambda: list(SPEC_RULES))
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
    expected_acceptance: bool = True
    quick: bool = False

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
    "gammas": "3,5",
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
    "gammas": "5",
    "dtype": "float32",
    "max_new_tokens": 64,
    "repeats": 1,
    "warmup": 1,
}


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
        "1.0, gamma 5, rule block, methods ar,ngram,hf-ngram, float32 (explicit flags override it)",
    )
    ap.add_argument(
        "--sets", help="comma list of code, chat, prose, specbench:PATH (default code,chat,prose)"
    )
    ap.add_argument("--n", type=int, help="prompts per set (per category for specbench:PATH); default 10")
    ap.add_argument("--offset", type=int, default=0, help="skip this many prompts of each set")
    ap.add_argument("--methods", help=f"comma list of {METHOD_SYNTAX} (default ar,ngram,hf-ngram)")
    ap.add_argument("--rules", help="verification rules at T > 0: token,block,hsd (default all)")
    ap.add_argument("--temperatures", help="comma list, 0 = greedy (default 0,0.7,1.0)")
    ap.add_argument("--gammas", help="draft lengths, comma list (default 3,5)")
    ap.add_argument("--dtype", choices=DTYPES, help="model dtype (default float32)")
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


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parse_list(text: str, conv: Callable[[str], Any], what: str) -> list:
    out = []
    for item in _split(text):
        try:
            out.append(conv(item))
        except ValueError:
            raise BenchError(f"--{what}: cannot read {item!r}") from None
    if not out:
        raise BenchError(f"--{what}: empty list")
    return list(dict.fromkeys(out))


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Validate parsed arguments (no file is read but draft paths' existence)."""
    base = QUICK_PRESET if args.quick else FULL_DEFAULTS

    def pick(name: str):
        value = getattr(args, name)
        return base[name] if value is None else value

    methods = [parse_method(m) for m in _split(pick("methods"))]
    if not methods:
        raise BenchError("--methods: empty list")
    names = list(dict.fromkeys(m.name for m in methods))
    methods = [next(m for m in methods if m.name == n) for n in names]
    if not any(m.kind == "ar" for m in methods):
        methods.insert(0, MethodSpec("ar", "ar"))  # the reference of every speed-up
    rules = _parse_list(pick("rules"), str, "rules")
    bad = [r for r in rules if r not in SPEC_RULES]
    if bad:
        raise BenchError(f"--rules: unknown rule(s) {bad}; valid: {', '.join(SPEC_RULES)}")
    temps = _parse_list(pick("temperatures"), float, "temperatures")
    if any(not math.isfinite(t) or t < 0 for t in temps):
        raise BenchError(f"--temperatures: expected finite numbers >= 0, got {temps}")
    gammas = _parse_list(pick("gammas"), int, "gammas")
    if any(g < 1 for g in gammas):
        raise BenchError(f"--gammas: expected integers >= 1, got {gammas}")
    for m in methods:
        if m.kind == "ssd":
            check_ssd_gammas(m, gammas)
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
        expected_acceptance=not args.no_expected_acceptance,
        quick=args.quick,
    )
    for name, lo in (("n", 1), ("max_new_tokens", 1), ("repeats", 1), ("warmup", 0), ("offset", 0)):
        if getattr(cfg, name) < lo:
            raise BenchError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(cfg, name)}")
    if not 0 < cfg.top_p <= 1:
        raise BenchError(f"--top-p must be in (0, 1], got {cfg.top_p}")
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
    except OSError as err:
        raise BenchError(
            f"--out {str(out)!r}: directory {str(probe_dir)!r} is not writable ({err})"
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


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: chat prompts through the chat template, raw text as is."""
    if prompt.chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt.text}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt.text)["input_ids"]
    return [int(i) for i in ids]


# ------------------------------------------------------------------------------------ cells
@dataclass(frozen=True)
class Cell:
    """One column of the matrix at one temperature: a method with its gamma and rule."""

    method: MethodSpec
    temperature: float
    gamma: int | None
    rule: str  # "-" (AR), "greedy" (T = 0), token|block|hsd, "hf" (HF's own rule at T > 0)

    @property
    def label(self) -> str:
        if self.method.kind == "ar":
            return "ar"
        name = self.method.name
        if self.method.path:
            name = f"{self.method.kind}:{Path(self.method.path).name or self.method.path}"
            name += "".join(
                f"/{k}={v:g}" if isinstance(v, float) else f"/{k}={v}" for k, v in self.method.ssd
            )
        elif self.method.levels:
            name = "hierarchy:" + "+".join(
                "ngram" if p == "ngram" else f"{Path(p).stem}@{g}" for p, g in self.method.levels
            )
        parts = [name, f"γ{self.gamma}"]
        if self.rule not in ("greedy", "hf"):
            parts.insert(1, self.rule)
        return "/".join(parts)


def plan_cells(cfg: BenchConfig) -> list[Cell]:
    """The cells of the matrix: AR once per temperature; rules only for hierspec drafting at T > 0."""
    cells = []
    for t in cfg.temperatures:
        for m in cfg.methods:
            if m.kind == "ar":
                cells.append(Cell(m, t, None, "-"))
                continue
            for g in [m.ni] if m.kind == "hispec" else [m.tree[0]] if m.tree else cfg.gammas:
                if t == 0:
                    cells.append(Cell(m, t, g, "greedy"))
                elif m.hf:
                    cells.append(Cell(m, t, g, "hf"))
                elif m.tree:  # trees: exact recursive rejection sampling, no chain rule
                    cells.append(Cell(m, t, g, "tree"))
                else:
                    cells.extend(Cell(m, t, g, r) for r in cfg.rules)
    return cells


# ------------------------------------------------------------------------------------ running
class _ForwardCounter:
    """Counts forward calls of a torch module (a pre-hook; ~1 µs per call)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_args) -> None:
        self.calls += 1

    def take(self) -> int:
        n, self.calls = self.calls, 0
        return n


class _LawHook:
    """``on_verify`` hook: sums the exact E[accepted | draft] (and its variance) of every realised
    draft with ``RULES[rule].law``, timing itself so the harness can subtract that time."""

    def __init__(self, rule: str) -> None:
        self.rule = RULES[rule]
        self.expected = 0.0
        self.variance = 0.0
        self.measured = 0
        self.steps = 0
        self.seconds = 0.0

    def __call__(self, info: dict) -> None:
        t0 = time.perf_counter()
        tokens = info["draft_tokens"]
        k = tokens.shape[-1]
        if k:
            q = info["draft_probs"]
            law = self.rule.law(tokens[0], None if q is None else q[0], info["target_rows"][0])
            pk = law.sum(-1, dtype=torch.float64)  # P(num_accepted = j), j = 0..k
            j = torch.arange(k + 1, dtype=torch.float64)
            mean = float((pk * j).sum())
            self.expected += mean
            self.variance += max(0.0, float((pk * j * j).sum()) - mean * mean)
            self.measured += int(info["num_accepted"])
            self.steps += 1
        self.seconds += time.perf_counter() - t0


def _maxrss_mb() -> float:
    """Process peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS) in MiB."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def _hf_module(model) -> torch.nn.Module | None:
    """The transformers model behind an HFModel (None for other LanguageModels)."""
    m = getattr(model, "model", None)
    return m if m is not None and hasattr(m, "generate") else None


def _placement() -> tuple[set[int] | None, int]:
    """This thread's (CPU affinity or None where unsupported, torch thread count)."""
    aff = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return aff, torch.get_num_threads()


def _apply_placement(p: tuple[set[int] | None, int]) -> None:
    if p[0] is not None and os.sched_getaffinity(0) != p[0]:
        os.sched_setaffinity(0, p[0])
    if torch.get_num_threads() != p[1]:
        torch.set_num_threads(p[1])


class SSDSessions:
    """The SSD speculator sessions of a run, one per (draft path, reply timeout).

    Started before the timed loop (`start`) and stopped at its end (`close`, idempotent, on errors
    too). `SSDSession` pins the verifier (this thread) to one core with one torch thread; here that
    placement is captured, the bench's placement restored at once, and the SSD placement applied
    only around SSD generations (`placed`)."""

    def __init__(self) -> None:
        self.sessions: dict[tuple[str, float], Any] = {}
        self.bench = _placement()
        self.verifier: tuple[set[int] | None, int] | None = None
        self.start_s = 0.0
        self.sync_s = 0.0

    @staticmethod
    def key(m: MethodSpec) -> tuple[str, float]:
        return str(m.path), float(m.ssd_kwargs.get("reply_timeout_s", SSD_REPLY_TIMEOUT_S))

    def start(self, methods: Sequence[MethodSpec], target: Any, specs: dict[str, Any]) -> None:
        from ..ssd import SSDSession

        t0 = time.perf_counter()
        try:
            for m in methods:
                if m.kind != "ssd" or self.key(m) in self.sessions:
                    continue
                k = self.key(m)
                try:
                    self.sessions[k] = SSDSession(target, specs[m.path], reply_timeout_s=k[1])
                except (ValueError, RuntimeError) as err:
                    raise BenchError(f"method {m.name}: the SSD speculator did not start: {err}") from None
                self.verifier = _placement()
        finally:
            _apply_placement(self.bench)
            self.start_s += time.perf_counter() - t0

    def session(self, m: MethodSpec) -> Any:
        return self.sessions[self.key(m)]

    @contextlib.contextmanager
    def placed(self) -> Iterator[None]:
        """The SSD verifier's placement inside, the bench's after."""
        try:
            if self.verifier is not None:
                _apply_placement(self.verifier)
            yield
        finally:
            _apply_placement(self.bench)

    def info(self) -> dict:
        bench, ver = self.bench, self.verifier
        cpus = sorted(bench[0]) if bench[0] is not None else []
        return {
            "sessions": len(self.sessions),
            "start_s": self.start_s,
            "sync_s": self.sync_s,
            "bench_cpus": cpus or None,
            "bench_threads": bench[1],
            "verifier_cpus": sorted(ver[0]) if ver and ver[0] is not None else None,
            "verifier_threads": ver[1] if ver else None,
            "speculator_cpu": cpus[1] if len(cpus) > 1 else None,
            "speculator_threads": 1,
        }

    def close(self) -> None:
        try:
            for s in self.sessions.values():
                try:
                    s.close()
                except Exception as err:  # keep closing the others
                    print(f"hierspec bench: warning: closing an SSD session: {err}", file=sys.stderr)
        finally:
            _apply_placement(self.bench)


def _stats_row(res: Any, times: dict[str, float], t_net: float, t_call: float, analysis: float) -> dict:
    """The result row of one hierspec generation (engine or SSD): counts from ``res.stats`` and the
    time breakdown, where ``times`` gives the method's own "draft" and "target_forward" seconds and
    "other" is whatever of ``t_net`` (the call minus untimed analysis) no part accounts for."""
    s = res.stats
    parts = {
        "prefill": s.time_prefill,
        **times,
        "logits_processing": s.time_logits_processing,
        "verify_rule": s.time_verify_rule,
        "rollback": s.time_rollback,
    }
    parts["other"] = max(0.0, t_net - sum(parts.values()))
    return {
        "new_tokens": len(res.token_ids),
        "finish_reason": res.finish_reason,
        "token_ids": res.token_ids,
        "time_s": t_net,
        "time_call_s": t_call,
        "time_analysis_s": analysis,
        "times": parts,
        "target_forwards": s.num_target_forwards,
        "num_spec_steps": s.num_spec_steps,
        "num_draft_tokens": s.num_draft_tokens,
        "num_accepted_draft_tokens": s.num_accepted_draft_tokens,
        "drafted_per_position": s.drafted_per_position,
        "accepted_per_position": s.accepted_per_position,
        "acceptance_histogram": s.acceptance_histogram,
        "mean_acceptance_length": s.mean_acceptance_length,
    }


@dataclass
class Runner:
    """Runs single generations of a cell on one prompt and returns a result row."""

    cfg: BenchConfig
    target: Any
    eos_token_id: int | None
    drafts: dict[str, Any]  # path -> HFModel (LanguageModel with .model)
    heads: dict[int, Any] = field(default_factory=dict)  # exit layer -> EarlyExitHead
    ssd: SSDSessions | None = None  # started SSD sessions (ssd methods)
    _drafters: dict[str, Any] = field(default_factory=dict)
    _counters: dict[str, _ForwardCounter] = field(default_factory=dict)

    def __post_init__(self) -> None:
        hf = _hf_module(self.target)
        if hf is not None:
            self._counters["target"] = _ForwardCounter(hf)
        for path, model in self.drafts.items():
            m = _hf_module(model)
            if m is not None:
                self._counters[path] = _ForwardCounter(m)

    def close(self) -> None:
        for c in self._counters.values():
            c.handle.remove()

    def _drafter(self, m: MethodSpec):
        """(engine target, drafter, self-speculator or None) of a hierspec method (built once)."""
        if m.kind == "ar":
            return self.target, None, None
        if m.name not in self._drafters:
            system = None
            if m.kind == "ngram":
                drafter = NgramDrafter()
            elif m.kind == "draft":
                drafter = ModelDrafter(self.drafts[m.path])
            elif m.kind in ("eagle", "eagle-tree"):
                from ..drafters.eagle import EagleDrafter
                from ..models.eagle import load_eagle
                from ..models.shipped import eagle_path

                drafter = EagleDrafter(load_eagle(m.head or eagle_path(), self.target))
            elif m.kind == "hierarchy":
                from ..hierarchy import SpeculativeDrafter

                drafter = None
                for p, g in m.levels:
                    drafter = (
                        NgramDrafter()
                        if p == "ngram"
                        else SpeculativeDrafter(self.drafts[p], drafter, rule="block", gamma=g)
                    )
            else:
                from ..hispec import build_early_exit_spec, build_hispec

                heads = [self.heads[e] for e in m.exits]
                hf = _hf_module(self.target)
                if m.kind == "hispec":
                    system = build_hispec(hf, heads[0], heads[1], nd=m.nd, ni=m.ni, rule="block")
                else:
                    system = build_early_exit_spec(hf, heads[0])
                drafter = system.drafter
            self._drafters[m.name] = (system.target if system else self.target, drafter, system)
        return self._drafters[m.name]

    def _take(self, key: str | None) -> int | None:
        c = self._counters.get(key) if key else None
        return c.take() if c is not None else None

    def run(self, cell: Cell, ids: list[int], seed: int, max_new_tokens: int, analyse: bool) -> dict:
        m = cell.method
        draft_key = m.path if m.kind in ("draft", "hf-draft") else None
        if m.kind == "hierarchy":
            draft_key = next((p for p, _ in m.levels if p != "ngram"), None)
        self._take("target")
        self._take(draft_key)
        rss0 = _maxrss_mb()
        if m.hf:
            row = self._run_hf(cell, ids, seed, max_new_tokens)
        elif m.kind == "ssd":
            row = self._run_ssd(cell, ids, seed, max_new_tokens)
        else:
            row = self._run_hierspec(cell, ids, seed, max_new_tokens, analyse)
        row["target_calls"] = self._take("target")
        row["draft_forwards"] = self._take(draft_key)
        if m.hf and row["target_calls"] is not None:
            # each HF target call (the first one is the prefill) emits >= 1 token
            row["target_forwards"] = row["target_calls"]
        rss1 = _maxrss_mb()
        row["rss_peak_mb"] = rss1
        row["rss_peak_raise_mb"] = rss1 - rss0
        return row

    def _run_hierspec(self, cell: Cell, ids: list[int], seed: int, max_new: int, analyse: bool) -> dict:
        tree = None
        if cell.method.tree:
            from ..drafters.eagle import TreeSpec

            tree = TreeSpec(*cell.method.tree)
        hook = (
            _LawHook(cell.rule)
            if analyse and cell.method.drafts and cell.temperature > 0 and tree is None
            else None
        )
        params = SamplingParams(
            temperature=cell.temperature, top_p=self.cfg.top_p if cell.temperature else 1.0
        )
        target, drafter, system = self._drafter(cell.method)
        if system is not None:
            for st in system.stack.stats:
                st.__init__()
        t0 = time.perf_counter()
        res = generate(
            target,
            ids,
            drafter=drafter,
            rule=cell.rule if cell.rule in SPEC_RULES else "token",
            gamma=cell.gamma or 1,
            params=params,
            max_new_tokens=max_new,
            eos_token_id=self.eos_token_id,
            seed=seed,
            on_verify=hook,
            tree=tree,
        )
        t_call = time.perf_counter() - t0
        s = res.stats
        analysis = hook.seconds if hook is not None else 0.0
        t_net = t_call - analysis
        times = {"draft": s.time_draft, "target_forward": s.time_target_forward}
        row = _stats_row(res, times, t_net, t_call, analysis)
        if not cell.method.drafts:
            row["mean_acceptance_length"] = None
        if system is not None:
            row["stages"] = system.stage_stats(res)
        if hook is not None:
            row["expected_accepted"] = hook.expected
            row["expected_accepted_var"] = hook.variance
            row["law_steps"] = hook.steps
        return row

    def _run_ssd(self, cell: Cell, ids: list[int], seed: int, max_new: int) -> dict:
        """One SSD generation on the method's running session (verifier here, speculator in its
        process); timed like the others (whole call, prefill included), then an untimed sync."""
        if self.ssd is None:
            raise RuntimeError(f"method {cell.method.name}: no SSD session was started")
        session = self.ssd.session(cell.method)
        kw = {k: v for k, v in cell.method.ssd_kwargs.items() if k != "reply_timeout_s"}
        params = SamplingParams(
            temperature=cell.temperature, top_p=self.cfg.top_p if cell.temperature else 1.0
        )
        with self.ssd.placed():
            t0 = time.perf_counter()
            res = session.generate(
                ids,
                gamma=cell.gamma or 1,
                params=params,
                max_new_tokens=max_new,
                seed=seed % 2**62,
                eos_token_id=self.eos_token_id,
                rule=cell.rule if cell.rule in SPEC_RULES else "token",
                **kw,
            )
            t_call = time.perf_counter() - t0
            t_sync = session.sync()
        self.ssd.sync_s += t_sync
        s = res.stats
        times = {
            "draft": s.time_draft + s.time_wait,  # waiting for the speculator's reply
            "target_forward": s.time_target_forward + s.time_emulated,
        }
        from ..ssd.stats import DERIVED_FIELDS

        pred = s.cost_prediction()
        ssd = {
            name: getattr(s, name)
            for name in (
                *DERIVED_FIELDS,
                "num_rounds",
                "num_predicted_rounds",
                "num_hits",
                "num_misses",
                "num_cold_starts",
                "num_fallback_jit",
                "num_fallback_fast",
                "num_local_rounds",
                "tokens_on_hit",
                "rounds_on_hit",
                "tokens_on_miss",
                "rounds_on_miss",
                "time_verify_rounds",
                "time_wait",
                "time_emulated",
                "time_speculate",
                "num_builds",
                "time_fallback",
                "fallback_events",
            )
        }
        ssd.update(
            predicted_speedup_vs_ar=pred.speedup_vs_ar if pred else None,
            predicted_tokens_per_second=pred.tokens_per_second if pred else None,
            options={**kw, "budget": kw.get("budget") or 3 * ((cell.gamma or 1) + 1)},
            time_sync_s=t_sync,
        )
        return {**_stats_row(res, times, t_call, t_call, 0.0), "ssd": ssd}

    def _run_hf(self, cell: Cell, ids: list[int], seed: int, max_new: int) -> dict:
        model = _hf_module(self.target)
        inp = torch.tensor([ids], dtype=torch.long, device=model.device)
        kw: dict[str, Any] = {
            "input_ids": inp,
            "attention_mask": torch.ones_like(inp),
            "max_new_tokens": max_new,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.eos_token_id,
        }
        if cell.temperature > 0:
            kw.update(do_sample=True, temperature=cell.temperature, top_k=0, top_p=self.cfg.top_p)
        else:
            kw.update(do_sample=False)
        if cell.method.kind == "hf-ngram":
            kw.update(prompt_lookup_num_tokens=cell.gamma, max_matching_ngram_size=HF_PLD_MAX_NGRAM)
        elif cell.method.kind == "hf-early-exit":
            # HF's LayerSkip self-speculation: the first L layers + the model's own norm and LM head
            kw.update(assistant_early_exit=cell.method.exits[0], num_assistant_tokens=cell.gamma)
        else:
            assistant = _hf_module(self.drafts[cell.method.path])
            # HF reads these from the assistant's generation_config; pass them both ways
            gc = assistant.generation_config
            gc.num_assistant_tokens = cell.gamma
            gc.num_assistant_tokens_schedule = "constant"
            gc.assistant_confidence_threshold = 0.0
            kw.update(
                assistant_model=assistant,
                num_assistant_tokens=cell.gamma,
                num_assistant_tokens_schedule="constant",
                assistant_confidence_threshold=0.0,
            )
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**kw)
        t_call = time.perf_counter() - t0
        new = out[0, inp.shape[1] :].tolist()
        finish = "eos" if new and self.eos_token_id is not None and new[-1] == self.eos_token_id else "length"
        return {
            "new_tokens": len(new),
            "finish_reason": finish,
            "token_ids": new,
            "time_s": t_call,
            "time_call_s": t_call,
            "time_analysis_s": 0.0,
            "times": None,
            "target_forwards": None,
            "mean_acceptance_length": None,
        }


def _seed(cfg: BenchConfig, prompt_index: int, repeat: int) -> int:
    return cfg.seed + 100_003 * repeat + prompt_index


def run_bench(
    cfg: BenchConfig,
    target,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    drafts: dict[str, Any] | None = None,
    heads: dict[int, Any] | None = None,
    draft_specs: dict[str, Any] | None = None,
    target_name: str = "target",
    progress: bool = True,
) -> dict:
    """Run the matrix on ``target`` and return ``{"config", "rows", "errors", "timing", ...}``.

    ``drafts`` maps each draft path of ``cfg.methods`` to its loaded HFModel. ``draft_specs``
    maps the draft path of an ``ssd`` method to what its speculator process re-creates the draft
    from (see `hierspec.ssd.SSDSession`; default: the loaded draft itself, pickled to the
    process). Raises BenchError for unusable input (found before anything runs)."""
    from tqdm import tqdm

    drafts = dict(drafts or {})
    if any(m.hf for m in cfg.methods) and _hf_module(target) is None:
        raise BenchError("hf-ngram / hf-draft need a transformers target (HFModel); this target has none")
    heads = dict(heads or {})
    for m in cfg.methods:
        if m.kind in ("early-exit", "hispec"):
            if _hf_module(target) is None:
                raise BenchError(f"method {m.name}: self-speculation needs a transformers target")
            missing = [e for e in m.exits if e not in heads]
            if missing:
                raise BenchError(f"method {m.name}: no early-exit head loaded for exit(s) {missing}")
        for path in [p for p, _ in m.levels if p != "ngram"]:
            if path not in drafts:
                raise BenchError(f"method {m.name}: draft model {path!r} was not loaded")
        if m.kind == "ssd":
            check_ssd_gammas(m, cfg.gammas)
        if m.kind in ("draft", "hf-draft", "ssd"):
            d = drafts.get(m.path)
            if d is None:
                raise BenchError(f"method {m.name}: draft model {m.path!r} was not loaded")
            if d.vocab_size != target.vocab_size:
                raise BenchError(
                    f"method {m.name}: the draft's vocabulary has {d.vocab_size} tokens but the "
                    f"target's has {target.vocab_size}; a draft must share the target's tokenizer"
                )
            if m.kind == "hf-draft" and _hf_module(d) is None:
                raise BenchError(f"method {m.name}: the draft is not a transformers model")
    eos = getattr(tokenizer, "eos_token_id", None)
    encoded: list[tuple[Prompt, list[int]]] = []
    errors: list[dict] = []
    for p in prompts:
        ids = encode_prompt(tokenizer, p)
        problem = None
        if not ids:
            problem = "the prompt encodes to no tokens"
        elif len(ids) >= target.max_length:
            problem = f"{len(ids)} tokens exceed the target's context of {target.max_length}"
        if problem:
            if cfg.on_error == "raise":
                raise BenchError(f"prompt {p.id} ({p.category}): {problem} (--on-error skip skips it)")
            print(f"hierspec bench: warning: skipping prompt {p.id}: {problem}", file=sys.stderr)
            errors.append({"prompt_id": p.id, "category": p.category, "stage": "encode", "error": problem})
            continue
        encoded.append((p, ids))
    if not encoded:
        raise BenchError("no usable prompts")
    cells = plan_cells(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    specs = {
        p: (draft_specs or {}).get(p, drafts.get(p)) for p in {m.path for m in cfg.methods if m.kind == "ssd"}
    }
    ssd = SSDSessions()  # the bench's placement (affinity, threads), restored after every SSD call
    runner: Runner | None = None
    rows: list[dict] = []
    n_timed = len(encoded) * cfg.repeats * len(cells)
    bar = tqdm(
        total=n_timed + cfg.warmup * len(cells),
        desc="hierspec bench",
        unit="run",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    rss_start = _maxrss_mb()
    t_gen = 0.0
    t_analysis = 0.0
    t_warm = 0.0
    warm_rss: dict[tuple[str, float], float] = {}
    try:
        # SSD speculators start here, outside every timed region (and before the forward counters
        # are hooked in, so a draft model passed as its own spec pickles cleanly)
        ssd.start(cfg.methods, target, specs)
        runner = Runner(cfg, target, eos, drafts, heads, ssd=ssd)
        t_wall0 = time.perf_counter()
        sync0 = ssd.sync_s
        first_ids = encoded[0][1]
        for w in range(cfg.warmup):
            for cell in cells:
                t0 = time.perf_counter()
                row = runner.run(
                    cell, first_ids, _seed(cfg, 0, -1 - w), min(WARMUP_TOKENS, cfg.max_new_tokens), False
                )
                t_warm += time.perf_counter() - t0 - row.get("ssd", {}).get("time_sync_s", 0.0)
                key = (cell.label, cell.temperature)
                warm_rss[key] = warm_rss.get(key, 0.0) + row["rss_peak_raise_mb"]
                bar.update()
        for i, (p, ids) in enumerate(encoded):
            for rep in range(cfg.repeats):
                seed = _seed(cfg, i, rep)
                k = (i + rep) % len(cells)
                for cell in cells[k:] + cells[:k]:  # rotate the order per prompt
                    base = {
                        "prompt_id": p.id,
                        "category": p.category,
                        "prompt_tokens": len(ids),
                        "repeat": rep,
                        "seed": seed,
                        "method": cell.method.name,
                        "kind": cell.method.kind,
                        "label": cell.label,
                        "temperature": cell.temperature,
                        "gamma": cell.gamma,
                        "rule": cell.rule,
                    }
                    try:
                        row = runner.run(cell, ids, seed, cfg.max_new_tokens, cfg.expected_acceptance)
                    except Exception as err:
                        if cfg.on_error == "raise":
                            raise
                        print(
                            f"hierspec bench: warning: {cell.label} on {p.id} failed: {err}", file=sys.stderr
                        )
                        errors.append({**base, "stage": "generate", "error": f"{type(err).__name__}: {err}"})
                        bar.update()
                        continue
                    t_gen += row["time_call_s"]
                    t_analysis += row["time_analysis_s"]
                    row["tokens_per_s"] = row["new_tokens"] / row["time_s"] if row["time_s"] > 0 else 0.0
                    rows.append({**base, **row})
                    bar.update()
        wall = time.perf_counter() - t_wall0
        t_sync = ssd.sync_s - sync0
    finally:
        bar.close()
        if runner is not None:
            runner.close()
        ssd.close()  # stops every speculator and restores the bench's affinity and threads
    _mark_identity(rows)
    inside = t_gen + t_warm
    harness_s = wall - inside - t_sync
    timing = {
        "wall_s": wall,
        "generation_calls_s": inside - t_analysis,
        "warmup_calls_s": t_warm,
        "analysis_s": t_analysis,
        "harness_s": harness_s,
        "harness_overhead_pct": 100.0 * harness_s / wall if wall > 0 else 0.0,
        "analysis_pct": 100.0 * t_analysis / wall if wall > 0 else 0.0,
        "ssd_start_s": ssd.start_s,  # speculator start-up, before the matrix (not in wall_s)
        "ssd_sync_s": t_sync,  # untimed waits for idle speculators, in wall_s, not in harness_s
    }
    return {
        "config": cfg.to_dict(),
        "target": target_name,
        "cells": [
            {
                "label": c.label,
                "method": c.method.name,
                "kind": c.method.kind,
                "temperature": c.temperature,
                "gamma": c.gamma,
                "rule": c.rule,
                "draft": c.method.path,
            }
            for c in cells
        ],
        "num_prompts": len(encoded),
        "rows": rows,
        "errors": errors,
        "timing": timing,
        "ssd": ssd.info() if ssd.sessions else None,
        "memory": {
            "method": "resource.getrusage(RUSAGE_SELF).ru_maxrss (process-wide peak RSS; "
            "tracemalloc is not used because it does not see torch's allocations)",
            "peak_rss_mb_before_runs": rss_start,
            "peak_rss_mb_end": _maxrss_mb(),
            "warmup_rss_raise_mb": [
                {"label": k[0], "temperature": k[1], "mb": v} for k, v in warm_rss.items()
            ],
        },
    }


def _mark_identity(rows: list[dict]) -> None:
    """``identical_to_ar`` for greedy rows: same token ids as hierspec AR on that prompt/repeat."""
    ar = {
        (r["prompt_id"], r["repeat"]): r["token_ids"]
        for r in rows
        if r["kind"] == "ar" and r["temperature"] == 0
    }
    for r in rows:
        ref = ar.get((r["prompt_id"], r["repeat"]))
        ok = r["temperature"] == 0 and r["kind"] != "ar" and ref is not None
        r["identical_to_ar"] = (r["token_ids"] == ref) if ok else None


# ------------------------------------------------------------------------------------ machine
def machine_info() -> dict:
    """CPU model and capability, core count, library versions."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:
        capability = "unknown"
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    from .. import __version__ as hs_version

    return {
        "cpu": cpu or "unknown",
        "cpu_capability": capability,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "hierspec": hs_version,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# ------------------------------------------------------------------------------------ main
def load_draft(path: str, dtype: torch.dtype, target: Any = None):
    """A draft model (`hierspec.models.loading.load_draft_model`): a hierspec draft or early-exit
    head file, a transformers directory or a ``.gguf`` file."""
    from ..models.loading import load_draft_model

    return load_draft_model(path, dtype, target)


def prepare(argv: Sequence[str]) -> tuple[BenchConfig, list[Prompt], bool]:
    """Parse and validate everything that can be checked without loading a model."""
    args = build_parser().parse_args(list(argv))
    cfg = config_from_args(args)
    check_output_dir(cfg.out)
    prompts = load_prompts(cfg)
    return cfg, prompts, not args.no_progress


def load_exit_heads(cfg: BenchConfig, target: Any, tokenizer: Any = None) -> dict[int, Any]:
    """The shipped early-exit heads the methods of ``cfg`` use, by exit layer."""
    from ..models import load_early_exit, shipped

    heads = {}
    for m in cfg.methods:
        if m.kind in ("early-exit", "hispec"):
            for e in m.exits:
                if e not in heads:
                    path = shipped.exit_head_path(e)
                    heads[e] = load_early_exit(path, _hf_module(target), tokenizer=tokenizer).head
    return heads


def main(argv: Sequence[str] | None = None) -> int:
    """``hierspec bench ...``: 0 on success, 2 on bad input (one line on stderr)."""
    from .report import format_summary, plots_available, write_report

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, prompts, progress = prepare(argv)
        if not plots_available():
            print("hierspec bench: warning: matplotlib is not installed; no PNG plots", file=sys.stderr)
        dtype = getattr(torch, cfg.dtype)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        from ..models import load_smollm2

        t0 = time.perf_counter()
        try:
            target, tok = load_smollm2(dtype)
            drafts = {}
            for m in cfg.methods:
                for path in m.paths:
                    if path not in drafts:
                        drafts[path] = load_draft(path, dtype, target)
            heads = load_exit_heads(cfg, target, tok)
        except (OSError, ValueError, ImportError) as err:
            raise BenchError(f"loading models: {err}") from None
        # each SSD speculator process loads its draft from the file itself
        from ..ssd.cli import load_draft_spec

        specs = {
            m.path: functools.partial(load_draft_spec, m.path, cfg.dtype)
            for m in cfg.methods
            if m.kind == "ssd"
        }
        load_s = time.perf_counter() - t0
        results = run_bench(
            cfg,
            target,
            tok,
            prompts,
            drafts=drafts,
            heads=heads,
            draft_specs=specs,
            target_name="SmolLM2-135M-Instruct",
            progress=progress,
        )
        results["timing"]["model_load_s"] = load_s
        results["machine"] = machine_info()
        files = write_report(results, cfg.out)
    except BenchError as err:
        print(f"hierspec: error: {err}", file=sys.stderr)
        return 2
    print(format_summary(results))
    print("\nwrote " + ", ".join(str(f) for f in files))
    return 0


__all__ = [
    "BenchConfig",
    "BenchError",
    "Cell",
    "MethodSpec",
    "SSDSessions",
    "check_output_dir",
    "check_ssd_gammas",
    "config_from_args",
    "load_prompts",
    "machine_info",
    "main",
    "parse_method",
    "plan_cells",
    "prepare",
    "run_bench",
]
