"""The EAGLE feature cache: the target's last hidden states per token shard, stored next to the
teacher cache as ``<data_dir>/features/<shard stem>.safetensors`` (``h`` [rows, T, H], bf16).

Written by `hierspec.train.eagle.cache_features`; read by `load_features` (the training data
loader, `hierspec.train.distill.ShardLoader`, and the EAGLE trainer).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hierspec.models.draft import read_safetensors

__all__ = ["FEATURES_FORMAT", "feature_path", "load_features"]

FEATURES_FORMAT = "hierspec.eagle-features"


def feature_path(token_shard: str | os.PathLike[str]) -> Path:
    """Where the features of ``token_shard`` (``<data_dir>/tokens/<name>``) are stored."""
    p = Path(token_shard)
    return p.parent.parent / "features" / p.name


def load_features(token_shard: str | os.PathLike[str]) -> torch.Tensor:
    """The cached features [rows, T, H] of ``token_shard`` (`DraftFileError` if missing / corrupt)."""
    tensors, _ = read_safetensors(
        feature_path(token_shard), what="feature cache", expect_format=FEATURES_FORMAT
    )
    return tensors["h"]
