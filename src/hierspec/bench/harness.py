"""Benchmark harness: methods x prompt sets x temperatures x gamma x rules, on one target, one run.

    hierspec bench --quick --out bench-out/quick
    hierspec bench --out bench-out/full --sets code,chat,prose --n 10 \\
        --methods ar,ngram,hf-ngram,draft:PATH,hf-draft:PATH --rules token,block,hsd \\
        --temperatures 0,0.7,1.0 --gammas 3,5 --repeats 3

Methods (method specs of `hierspec.methods`, built through its registry; the target is
``--model``, default the embedded SmolLM2-135M-Instruct):

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
  gamma, num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0)``; at gamma
  ``auto``, HF's own defaults (20 tokens, confidence threshold 0.4).

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
unwritable output directory, bad SSD options, a prompt longer than the target's or a draft's
context) fails with exit status 2 before any model is loaded or any run starts, and the report
files are written, each atomically, once everything has run. A run that stops early keeps what
it finished: on Ctrl-C (exit status 130, marked as interrupted) and on an error in a generation
with ``--on-error raise`` (exit status 1: one line on stderr naming the cell, the prompt and
where the finished runs were written; results.json records the failure with its traceback).
With ``--on-error skip`` a failing cell is recorded and the matrix goes on (warm-ups included).

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

import os
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..host import cpu_model
from ..methods import (
    MethodSpec,
    backend_of,
    check_gammas,
    check_ssd_gammas,
    entry_of,
    hf_module,
    parse_method,
)
from ..prompts import Prompt
from .config import (
    TIME_COMPONENTS,
    BenchConfig,
    BenchError,
    Cell,
    build_parser,
    check_output_dir,
    config_from_args,
    contexts,
    encode_prompts,
    load_prompts,
    method_gammas,
    plan_cells,
)
from .matrix import Matrix, mark_identity, oracle, seed_of, timing
from .runner import Runner, SSDSessions, _maxrss_mb

_seed = seed_of  # the seed of a run (`hierspec.bench.matrix.seed_of`)

#: what a method's ``needs`` asks of the target, and the error when the target lacks it
_TARGET_NEEDS = {
    "hf": (
        lambda target: hf_module(target) is not None,
        "needs a transformers target (HFModel); this target has none",
    ),
    "llama": (
        lambda target: backend_of(target) == "llama.cpp",
        "needs a llama.cpp target (--backend llama.cpp)",
    ),
}


# ------------------------------------------------------------------------------------ steps
def check_methods(cfg: BenchConfig, target: Any, drafts: dict[str, Any], heads: dict[int, Any]) -> None:
    """BenchError for a method that cannot run on this target with what was loaded (what it
    ``needs``, its early-exit heads and drafts) or at the matrix's draft lengths."""
    for m in cfg.methods:
        entry = entry_of(m)
        for need in sorted(entry.needs & _TARGET_NEEDS.keys()):
            has, what = _TARGET_NEEDS[need]
            if not has(target):
                raise BenchError(f"method {m.name} {what}")
        missing = [e for e, _ in entry.heads(m) if e not in heads]
        if missing:
            raise BenchError(f"method {m.name}: no early-exit head loaded for exit(s) {missing}")
        for path in m.paths:
            d = drafts.get(path)
            if d is None:
                raise BenchError(f"method {m.name}: draft model {path!r} was not loaded")
            if d.vocab_size != target.vocab_size:
                raise BenchError(
                    f"method {m.name}: the draft's vocabulary has {d.vocab_size} tokens but the "
                    f"target's has {target.vocab_size}; a draft must share the target's tokenizer"
                )
            if entry.peer and "hf" in entry.needs and hf_module(d) is None:
                raise BenchError(f"method {m.name}: the draft is not a transformers model")
        if not entry.plain:
            check_gammas(m, method_gammas(m, cfg.gammas))


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

    ``drafts`` maps each draft reference of ``cfg.methods`` to its loaded model, ``heads`` each
    exit layer to its early-exit head. ``draft_specs`` maps the draft of an ``ssd`` method to
    what its speculator process re-creates the draft from (see `hierspec.ssd.SSDSession`;
    default: the loaded draft itself, pickled to the process). Raises BenchError for unusable
    input (found before anything runs). On KeyboardInterrupt the rows finished so far are
    returned with ``"interrupted": True`` (the caller writes them, marked as interrupted). When a
    run fails with ``on_error="raise"`` its exception propagates (SSD speculators stopped first)
    carrying the rows finished so far as ``err.bench_results``, with ``"failed"``: the failed
    run's record (cell, prompt, stage, error, traceback); `main` writes them.

    Steps: check the methods; encode the prompts; start SSD speculators; warm up every cell; run
    the timed matrix; summarise timing and memory."""
    from tqdm import tqdm

    drafts, heads = dict(drafts or {}), dict(heads or {})
    check_methods(cfg, target, drafts, heads)
    encoded, encode_errors = encode_prompts(cfg, tokenizer, prompts, contexts(target, drafts))
    cells = plan_cells(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    remote = {m.path for m in cfg.methods if entry_of(m).remote}
    specs = {p: (draft_specs or {}).get(p, drafts.get(p)) for p in remote}
    ssd = SSDSessions()  # the bench's placement (affinity, threads), restored after every SSD call
    runner: Runner | None = None
    n_runs = len(encoded) * cfg.repeats * len(cells) + cfg.warmup * len(cells)
    bar = tqdm(total=n_runs, desc="hierspec bench", unit="run", file=sys.stderr, disable=not progress)
    rss_start = _maxrss_mb()
    matrix: Matrix | None = None
    t_wall0 = time.perf_counter()
    sync0 = 0.0
    failure: Exception | None = None
    try:
        # SSD speculators start here, outside every timed region (and before the forward counters
        # are hooked in, so a draft model passed as its own spec pickles cleanly)
        ssd.start(cfg.methods, target, specs)
        eos = getattr(tokenizer, "eos_token_id", None)
        runner = Runner(cfg, target, eos, drafts, heads, ssd, target_name=target_name)
        matrix = Matrix(cfg, runner, cells, bar)
        t_wall0, sync0 = time.perf_counter(), ssd.sync_s
        try:
            matrix.warm_up(*encoded[0])
            runner.clear_caches()
            matrix.run(encoded)
        except KeyboardInterrupt:
            matrix.interrupted = True
        except Exception as err:  # keep the finished runs (re-raised below, carrying them)
            failure = err
            if matrix.failed is None:  # outside a generation call
                tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
                matrix.failed = {"stage": "harness", "error": f"{type(err).__name__}: {err}", "traceback": tb}
    finally:
        bar.close()
        if runner is not None:
            runner.close()
        ssd.close()  # stops every speculator and restores the bench's affinity and threads
    wall = time.perf_counter() - t_wall0
    mark_identity(matrix.rows)
    bound = oracle(target) if failure is None and any(c.gamma == 0 for c in cells) else None
    results = {
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
                "draft_sampling": c.draft_sampling,
            }
            for c in cells
        ],
        "num_prompts": len(encoded),
        "rows": matrix.rows,
        "errors": encode_errors + matrix.errors,
        "interrupted": matrix.interrupted,
        "failed": matrix.failed,
        "oracle": bound,
        "timing": timing(matrix, ssd, wall, ssd.sync_s - sync0),
        "ssd": ssd.info() if ssd.sessions else None,
        "memory": {
            "method": "resource.getrusage(RUSAGE_SELF).ru_maxrss (process-wide peak RSS; "
            "tracemalloc is not used because it does not see torch's allocations)",
            "peak_rss_mb_before_runs": rss_start,
            "peak_rss_mb_end": _maxrss_mb(),
            "warmup_rss_raise_mb": [
                {"label": k[0], "temperature": k[1], "mb": v} for k, v in matrix.warm_rss.items()
            ],
        },
    }
    if failure is not None:
        failure.bench_results = results  # type: ignore[attr-defined]
        raise failure
    return results


# ------------------------------------------------------------------------------------ machine
def machine_info() -> dict:
    """CPU model and capability, core count, library versions."""
    cpu = cpu_model() or platform.processor() or ""
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
def prepare(argv: Sequence[str]) -> tuple[BenchConfig, list[Prompt], bool]:
    """Parse and validate everything that can be checked without loading a model."""
    args = build_parser().parse_args(list(argv))
    cfg = config_from_args(args)
    check_output_dir(cfg.out)
    prompts = load_prompts(cfg)
    return cfg, prompts, not args.no_progress


def load_models(cfg: BenchConfig) -> tuple[Any, Any, dict[str, Any], dict[int, Any], str]:
    """The target (``--model`` on ``--backend``), every draft and exit head the methods use (via
    the registry's `ModelSet`, so each is loaded once, by the one loader)."""
    from ..methods import ModelSet, needs
    from ..models.open import open_target

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    opened = open_target(
        cfg.model, backend=cfg.backend, dtype=cfg.dtype, device=device, needs=needs(cfg.methods)
    )
    models = ModelSet(
        opened.model,
        opened.tokenizer,
        dtype=getattr(torch, cfg.dtype),
        backend=opened.backend,
        name=opened.name,
    )
    for m in cfg.methods:
        for ref in m.paths:
            models.draft(ref)
        for e, p in entry_of(m).heads(m):
            models.exit_head(e, p)
    return opened.model, opened.tokenizer, models.drafts, models.heads, opened.name


def _stopped(results: dict, out: Path, load_s: float) -> int:
    """A run failed (``--on-error raise``): write what finished, say so in one line; status 1."""
    from .report import format_summary, write_partial

    results["timing"]["model_load_s"] = load_s
    results["machine"] = machine_info()
    files = write_partial(results, out)
    if results["rows"]:
        print(format_summary(results))
    f = results["failed"]
    where = f"{f['label']} on prompt {f['prompt_id']}" if "label" in f else "the harness"
    error = (f["error"].splitlines() or [""])[0]
    print(
        f"hierspec: error: {where} failed ({f['stage']}): {error}; wrote the {len(results['rows'])} "
        f"finished runs and the failure to {files[0]} (--on-error skip goes on past failures)",
        file=sys.stderr,
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """``hierspec bench ...``: 0 on success, 2 on bad input (one line on stderr), 130 when
    interrupted, 1 when a run failed (``--on-error raise``); in both what finished is written."""
    from ..methods.ssd import draft_spec
    from .report import format_summary, plots_available, write_report

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, prompts, progress = prepare(argv)
        if not plots_available():
            print("hierspec bench: warning: matplotlib is not installed; no PNG plots", file=sys.stderr)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        t0 = time.perf_counter()
        try:
            target, tok, drafts, heads, name = load_models(cfg)
        except (OSError, ImportError) as err:
            raise BenchError(f"loading models: {err}") from None
        # each SSD speculator process loads its draft from the file itself, with the one loader
        specs = {m.path: draft_spec(m, getattr(torch, cfg.dtype)) for m in cfg.methods if entry_of(m).remote}
        load_s = time.perf_counter() - t0
        try:
            results = run_bench(
                cfg,
                target,
                tok,
                prompts,
                drafts=drafts,
                heads=heads,
                draft_specs=specs,
                target_name=name,
                progress=progress,
            )
        except Exception as err:
            partial = getattr(err, "bench_results", None)
            if partial is None:
                raise
            return _stopped(partial, cfg.out, load_s)
        results["timing"]["model_load_s"] = load_s
        results["machine"] = machine_info()
        files = write_report(results, cfg.out)
    except BenchError as err:
        print(f"hierspec: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hierspec: interrupted before the benchmark started; nothing written", file=sys.stderr)
        return 130
    print(format_summary(results))
    print("\nwrote " + ", ".join(str(f) for f in files))
    if results.get("interrupted"):
        print(
            f"hierspec: interrupted: kept the {len(results['rows'])} runs that finished "
            f"(marked as interrupted in {cfg.out}/report.md and results.json)",
            file=sys.stderr,
        )
        return 130
    return 0


__all__ = [
    "TIME_COMPONENTS",
    "BenchConfig",
    "BenchError",
    "Cell",
    "MethodSpec",
    "Runner",
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
