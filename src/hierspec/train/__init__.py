"""Draft training for the embedded model (issue #4): data shards, teacher top-k cache, reduced
vocabulary, distillation with exact resume, held-out evaluation, export.

Pipeline (each stage resumable; see `hierspec.train.cli` for the command line)::

    prepare_data      text sources -> token-id shards (raw text chunks, target-generated responses)
    cache_teacher     target top-k log-probs + logsumexp per position, once per shard
    select_vocab      R most frequent target tokens + specials (reduced draft vocabulary)
    train             KL(teacher || student) on the cached top-k, AdamW, cosine, checkpoints
    TargetPass        the target over the held-out rows, run once (features, greedy choices)
    Evaluator         greedy agreement, sum min(p, q), simulated acceptance length (held out)
    export_student    the small safetensors file of `hierspec.models.draft` / `early_exit`

Needs transformers (the target) and safetensors: ``pip install -e .[hf]``.
"""

from hierspec.train.data import (
    DataConfig,
    DataError,
    Source,
    TextCodec,
    build_eval_set,
    codec_from_tokenizer,
    generate_responses,
    parse_sources,
    prepare_data,
)
from hierspec.train.distill import (
    CheckpointError,
    Evaluator,
    ShardLoader,
    TrainConfig,
    TrainError,
    export_student,
    init_draft_from_target,
    kd_loss,
    load_checkpoint,
    save_checkpoint,
    simulate_acceptance_length,
    train,
)
from hierspec.train.teacher import TargetPass, cache_teacher, load_teacher, teacher_topk
from hierspec.train.vocab import count_tokens, inverse_map, select_vocab, vocab_coverage

__all__ = [
    "CheckpointError",
    "DataConfig",
    "DataError",
    "Evaluator",
    "ShardLoader",
    "Source",
    "TargetPass",
    "TextCodec",
    "TrainConfig",
    "TrainError",
    "build_eval_set",
    "cache_teacher",
    "codec_from_tokenizer",
    "count_tokens",
    "export_student",
    "generate_responses",
    "init_draft_from_target",
    "inverse_map",
    "kd_loss",
    "load_checkpoint",
    "load_teacher",
    "parse_sources",
    "prepare_data",
    "save_checkpoint",
    "select_vocab",
    "simulate_acceptance_length",
    "teacher_topk",
    "train",
    "vocab_coverage",
]
