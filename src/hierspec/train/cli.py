"""``hierspec train-draft``: prepare data, cache the teacher, pick the vocabulary, distil, export.

Every stage resumes: token shards and teacher files already on disk are kept, and ``--resume``
continues training from ``OUT/checkpoint.pt`` (the model comes from the checkpoint then; the
size flags are ignored). Outputs in ``--out``::

    data/                   token shards, teacher top-k, eval set (or --data-dir, shareable
                            between runs with the same data parameters)
    vocab.json              the reduced vocabulary and its coverage
    checkpoint.pt           resumable training state
    train_log.jsonl         training / eval metrics
    draft.safetensors       (standalone) or early_exit.safetensors: the small exported file
    summary.json            throughputs and final metrics

`main(argv)` loads the embedded SmolLM2 as target; `run(args, target, tokenizer)` takes any
transformers causal LM (or HFModel) and tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hierspec.models.draft import DraftConfig, DraftLM, target_identity
from hierspec.models.eagle import EagleConfig, EagleHead, build_eagle_head, save_eagle
from hierspec.models.early_exit import EarlyExitConfig, EarlyExitDraft, EarlyExitHead, build_early_exit
from hierspec.train.data import DataConfig, DataError, build_eval_set, codec_from_tokenizer, prepare_data
from hierspec.train.distill import (
    CheckpointError,
    Evaluator,
    TrainConfig,
    TrainError,
    describe_student,
    export_student,
    init_draft_from_target,
    init_draft_from_target_layers,
    load_checkpoint,
    train,
    trainable_module,
)
from hierspec.train.eagle import EagleEvaluator, EagleStudent, cache_features, feature_rms
from hierspec.train.teacher import TargetPass, cache_teacher
from hierspec.train.vocab import count_tokens, select_vocab, vocab_coverage

DEFAULT_DATA = "raw:stdlib@1M,raw:shakespeare@500k,gen:sharegpt@3000"
DEFAULT_EVAL = "gen:sharegpt@16"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hierspec train-draft",
        description="Distil a draft model for the embedded SmolLM2 (standalone or early-exit head).",
    )
    ap.add_argument("--kind", required=True, choices=["standalone", "early-exit", "eagle"])
    ap.add_argument("--out", required=True, type=Path, help="output directory")
    g = ap.add_argument_group("data")
    g.add_argument("--data", default=DEFAULT_DATA, help=f"training sources (default {DEFAULT_DATA})")
    g.add_argument("--data-dir", type=Path, default=None, help="data directory (default OUT/data)")
    g.add_argument("--eval", default=DEFAULT_EVAL, help="held-out eval sources, or 'none'")
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--shard-rows", type=int, default=128)
    g.add_argument("--gen-max-new", type=int, default=192, help="max response tokens for gen: sources")
    g.add_argument("--gen-temperature", type=float, default=0.0, help="0 = greedy responses")
    g.add_argument("--gen-batch", type=int, default=16)
    g.add_argument("--topk", type=int, default=64, help="teacher top-k cached per position")
    g.add_argument("--teacher-batch", type=int, default=4, help="rows per teacher forward")
    g.add_argument("--prepare-only", action="store_true", help="stop after data + teacher caching")
    m = ap.add_argument_group("model")
    m.add_argument("--vocab", type=int, default=8192, help="reduced vocabulary R (0 = full / tied head)")
    m.add_argument("--layers", type=int, default=2, help="standalone: decoder layers")
    m.add_argument("--d-model", type=int, default=256)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--kv-heads", type=int, default=None)
    m.add_argument("--d-ff", type=int, default=None)
    m.add_argument("--no-init-from-target", action="store_true", help="standalone: random embeddings")
    m.add_argument(
        "--copy-layers",
        default=None,
        help="standalone: initialise as a copy of these target layers, e.g. 0,1,29 (the draft then has "
        "the target's width; --layers/--d-model/--heads/--kv-heads/--d-ff are taken from the target)",
    )
    m.add_argument("--exit-layer", type=int, default=4, help="early-exit: target layers kept")
    m.add_argument("--adapter-dim", type=int, default=0, help="early-exit: residual adapter width")
    m.add_argument("--unroll", type=int, default=3, help="eagle: drafting steps unrolled in the loss")
    m.add_argument("--noise", type=float, default=0.1, help="eagle: input-feature noise (relative)")
    t = ap.add_argument_group("training")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--ce-weight", type=float, default=0.1, help="hard-label CE share of the loss")
    t.add_argument("--ckpt-every", type=int, default=100)
    t.add_argument("--eval-every", type=int, default=500)
    t.add_argument("--gamma", type=int, default=5, help="block size of the simulated acceptance length")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--export-dtype", choices=["float16", "bfloat16"], default="float16")
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    t.add_argument("--no-progress", action="store_true")
    return ap


def rope_theta(config: Any) -> float:
    """RoPE base of a transformers config (``rope_parameters`` in transformers 5, ``rope_theta``
    before)."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    theta = theta or getattr(config, "rope_theta", None)
    if not theta:
        raise TrainError("the target's config has no RoPE base (rope_parameters / rope_theta)")
    return float(theta)


def _student_from_checkpoint(ck: dict[str, Any], target: Any) -> DraftLM | EarlyExitDraft | EagleStudent:
    desc, state = ck["student"], ck["model_state"]
    vm = state.get("vocab_map")
    if desc["kind"] == "standalone":
        return DraftLM(DraftConfig.from_dict(desc["config"]), vm)
    if desc["kind"] == "eagle":
        head = EagleHead(EagleConfig.from_dict(desc["config"]), vm, target.get_input_embeddings())
        kw = {k: desc[k] for k in ("unroll", "noise", "reg_weight", "feature_scale")}
        return EagleStudent(head, **kw)
    head = EarlyExitHead(EarlyExitConfig.from_dict(desc["config"]), vm)
    return EarlyExitDraft(target, head)


def run(args: argparse.Namespace, target: Any, tokenizer: Any) -> dict[str, Any]:
    """The whole pipeline on ``target`` (see module docstring); returns the summary."""
    from hierspec.models.hf import HFModel

    hf = target.model if isinstance(target, HFModel) else target
    hf.eval()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_dir or out / "data"
    progress = not args.no_progress
    vocab_size = int(hf.get_output_embeddings().weight.shape[0])
    codec = codec_from_tokenizer(tokenizer, vocab_size)
    identity = target_identity(hf, tokenizer, name=getattr(args, "target_name", None))
    summary: dict[str, Any] = {
        "kind": args.kind,
        "data_dir": str(data_dir),
        "data_sources": args.data,
        "topk": args.topk,
        "gamma": args.gamma,
        "export_dtype": args.export_dtype,
        "eval_sources": args.eval,
    }

    t0 = time.perf_counter()
    dcfg = DataConfig(
        sources=args.data,
        seq_len=args.seq_len,
        shard_rows=args.shard_rows,
        gen_max_new_tokens=args.gen_max_new,
        gen_temperature=args.gen_temperature,
        gen_batch_size=args.gen_batch,
        seed=args.seed,
    )
    summary["data"] = prepare_data(data_dir, dcfg, codec, hf, progress=progress)
    summary["data"]["seconds"] = time.perf_counter() - t0
    eval_rows = None
    if args.eval and args.eval != "none":
        eval_rows = build_eval_set(data_dir / "eval.safetensors", args.eval, codec, hf, seq_len=args.seq_len)
    if args.kind == "eagle":  # features first: their forward also writes missing teacher files
        summary["features"] = cache_features(
            hf, data_dir, batch_rows=args.teacher_batch, progress=progress, teacher_k=args.topk
        )
        hf.requires_grad_(False)  # the head reads the target's embedding; it is never trained
    summary["teacher"] = cache_teacher(
        hf, data_dir, k=args.topk, batch_rows=args.teacher_batch, progress=progress
    )
    if args.prepare_only:
        return summary

    ckpt_path = out / "checkpoint.pt"
    resuming = args.resume and ckpt_path.exists()
    if resuming:
        if (out / "vocab.json").is_file():
            summary["vocab"] = {
                k: v for k, v in json.loads((out / "vocab.json").read_text()).items() if k != "ids"
            }
        ck = load_checkpoint(ckpt_path)
        student = _student_from_checkpoint(ck, hf)
        cfg = TrainConfig.from_dict({**ck["train_config"], "steps": args.steps})
        vocab_map = student.vocab_map
    else:
        counts = count_tokens(data_dir, vocab_size)
        vocab_map = None
        if args.vocab:
            vocab_map = select_vocab(counts, min(args.vocab, vocab_size), codec.special_ids)
            report = vocab_coverage(data_dir, vocab_map, vocab_size, counts=counts)
            (out / "vocab.json").write_text(json.dumps({**report, "ids": vocab_map.tolist()}))
            summary["vocab"] = report
        elif args.kind == "standalone":
            raise SystemExit("a standalone draft needs --vocab R > 0")
        copy = [int(x) for x in args.copy_layers.split(",")] if args.copy_layers else None
        if args.kind == "standalone" and copy:
            tc = hf.config.get_text_config(decoder=True)
            args.layers, args.d_model = len(copy), int(tc.hidden_size)
            args.heads, args.kv_heads = int(tc.num_attention_heads), int(tc.num_key_value_heads)
            args.d_ff = int(tc.intermediate_size)
        if args.kind == "standalone":
            config = DraftConfig(
                vocab_size=vocab_size,
                n_vocab=int(vocab_map.numel()),
                n_layer=args.layers,
                d_model=args.d_model,
                n_head=args.heads,
                n_kv_head=args.kv_heads,
                d_ff=args.d_ff,
                rope_theta=rope_theta(hf.config),
                norm_eps=float(getattr(hf.config.get_text_config(decoder=True), "rms_norm_eps", 1e-5)),
                max_length=int(hf.config.max_position_embeddings),
            )
            student = DraftLM(config, vocab_map, seed=args.seed)
            if copy:
                init_draft_from_target_layers(student, hf, copy)
            elif not args.no_init_from_target:
                init_draft_from_target(student, hf)
        elif args.kind == "eagle":
            head = build_eagle_head(hf, vocab_map, seed=args.seed)
            scale = feature_rms(data_dir)
            student = EagleStudent(head, unroll=args.unroll, noise=args.noise, feature_scale=scale)
        else:
            student = build_early_exit(hf, args.exit_layer, vocab_map=vocab_map, adapter_dim=args.adapter_dim)
        cfg = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup_steps=args.warmup,
            weight_decay=args.weight_decay,
            grad_clip=args.grad_clip,
            ce_weight=args.ce_weight,
            ckpt_every=args.ckpt_every,
            eval_every=args.eval_every,
            seed=args.seed,
        )
    evaluator = None
    if eval_rows is not None:
        held_out = TargetPass(hf, *eval_rows)
        if args.kind == "eagle":
            evaluator = EagleEvaluator(held_out, gamma=args.gamma)
        else:
            evaluator = Evaluator(held_out, gamma=args.gamma)
        step0 = out / "eval_step0.json"
        if not resuming or not step0.is_file():
            step0.write_text(json.dumps(evaluator(student)))
        summary["eval_step0"] = json.loads(step0.read_text())
    summary["train"] = train(
        student, data_dir, out, cfg, resume=args.resume, evaluator=evaluator, progress=progress
    )
    if evaluator is not None:
        summary["eval_final"] = evaluator(student)
    name = {"standalone": "draft", "early-exit": "early_exit", "eagle": "eagle"}[args.kind] + ".safetensors"
    info = {"steps": cfg.steps, "data": args.data, "eval": summary.get("eval_final")}
    dtype = getattr(torch, args.export_dtype)
    if args.kind == "eagle":
        save_eagle(student.head, out / name, hf, tokenizer, dtype=dtype, extra=info)
        summary["export"] = str(out / name)
    else:
        summary["export"] = str(export_student(student, out / name, identity, dtype=dtype, info=info))
    summary["train_seconds_total"] = _total_train_seconds(out / "train_log.jsonl", summary["train"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    card = Path(summary["export"]).with_suffix(".md")
    card.write_text(model_card(summary, student, Path(summary["export"]), argv=getattr(args, "argv", None)))
    return summary


def _total_train_seconds(log: Path, train_summary: dict[str, Any]) -> float:
    """Training seconds over every (resumed) segment: the largest elapsed time of each segment in
    train_log.jsonl, summed; falls back to this segment's time."""
    try:
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return float(train_summary.get("seconds", 0.0))
    total, prev = 0.0, 0.0
    for r in rows:
        e = r.get("elapsed")
        if not isinstance(e, (int, float)):
            continue
        if e < prev:  # a new segment started
            total += prev
        prev = e
    return total + prev if total + prev > 0 else float(train_summary.get("seconds", 0.0))


def model_card(summary: dict[str, Any], student: Any, path: Path, argv: Sequence[str] | None = None) -> str:
    """Markdown model card of an exported draft / early-exit head: what it is, its data, training
    time, size and the held-out metrics measured at the end of training."""
    n_params = sum(p.numel() for p in trainable_module(student).parameters())
    kind = summary["kind"]
    cfg = describe_student(student)["config"]
    ev0, ev1 = summary.get("eval_step0") or {}, summary.get("eval_final") or {}
    tr = summary.get("train", {})
    data = summary.get("data", {})
    lines = [
        f"# {path.stem}",
        "",
        {
            "standalone": "A standalone draft model",
            "early-exit": "An early-exit head on the frozen target",
            "eagle": "An EAGLE feature-level draft head on the frozen target",
        }[kind]
        + " "
        "for SmolLM2-135M-Instruct (the model embedded in hierspec), distilled on CPU with "
        "`hierspec train-draft`.",
        "",
        "## What it is",
        "",
        f"- kind: `{kind}`; config: `{json.dumps(cfg)}`",
        f"- trainable parameters: {n_params / 1e6:.2f} M; file: `{path.name}`, "
        f"{path.stat().st_size / 2**20:.1f} MiB ({summary.get('export_dtype', 'float16')})",
        f"- vocabulary: {_vocab_line(summary)}",
        "",
        "## Data",
        "",
        f"- sources: `{summary.get('data_sources', '?')}` (held-out prompts excluded: ShareGPT < 1000, "
        "HumanEval < 82)",
        f"- rows: {data.get('raw_rows', '?')} raw + {data.get('gen_rows', '?')} target-generated (greedy "
        f"responses); teacher: top-{summary.get('topk', '?')} log-probabilities + logsumexp per position",
        "",
        "## Training",
        "",
        f"- steps: {tr.get('step', '?')}, tokens seen: {tr.get('tokens', '?')}, training time "
        f"{summary.get('train_seconds_total', 0.0) / 60:.1f} min on this 2-core AVX2 CPU "
        f"(last segment {tr.get('tokens_per_s', 0.0):.0f} tokens/s)",
        f"- command: `{' '.join(argv) if argv else '?'}`",
        "",
        "## Held-out metrics (end of training)",
        "",
        f"Eval set `{summary.get('eval_sources', '?')}`: prompts never trained on, with the target's "
        "greedy responses.",
        "",
        "| metric | before training | after |",
        "|---|---|---|",
    ]
    for key, label in (
        ("agree", "greedy agreement with the target"),
        ("accept_t1", "expected acceptance per token at T = 1 (sum min(p, q))"),
        (
            f"mal_g{summary.get('gamma', 5)}",
            f"simulated mean acceptance length, greedy, gamma = {summary.get('gamma', 5)}",
        ),
        ("coverage", "target mass inside the draft vocabulary"),
    ):
        if key in ev1:
            before = f"{ev0[key]:.3f}" if key in ev0 else "-"
            lines.append(f"| {label} | {before} | {ev1[key]:.3f} |")
    lines += [
        "",
        "## Measured in the engine",
        "",
        "See the closing notes of issue #4 and the bench report.",
        "",
    ]
    return "\n".join(lines)


def _vocab_line(summary: dict[str, Any]) -> str:
    v = summary.get("vocab")
    if not v:
        return "the target's full vocabulary (tied head)"
    cov = {k: v[k] for k in v if "coverage" in k and isinstance(v[k], (int, float))}
    return f"reduced to R = {v.get('size', v.get('R', '?'))} target ids; coverage {json.dumps(cov)}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hierspec train-draft`` (argv without the sub-command name)."""
    args = build_parser().parse_args(argv)
    args.argv = ["hierspec", "train-draft", *(sys.argv[2:] if argv is None else argv)]
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from hierspec.models.smollm2 import load_smollm2

        target, tokenizer = load_smollm2(torch.float32)
        args.target_name = "SmolLM2-135M-Instruct"
        summary = run(args, target, tokenizer)
    except (DataError, TrainError, CheckpointError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"hierspec train-draft: error: {err}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {k: v for k, v in summary.items() if k != "train"}
            | {"train": {k: v for k, v in summary.get("train", {}).items() if k != "history"}},
            indent=1,
            default=str,
        )
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
