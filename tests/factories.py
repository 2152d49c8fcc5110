"""Tiny randomly initialised transformers models shared by the tests (CPU, built in milliseconds).

``tiny_hf("Llama", seed=0, dtype=torch.float64, num_hidden_layers=4)`` builds a seeded
``LlamaForCausalLM`` from `TINY` with the given config overrides; any architecture whose classes
are named ``{arch}Config`` / ``{arch}ForCausalLM`` works (Mistral, Qwen2, ...). The seed is set
right before the weights are drawn, so a given call always builds the same weights.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

TINY: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def tiny_hf(arch: str = "Llama", *, seed: int = 0, dtype: torch.dtype | None = None, **config: Any) -> Any:
    """A seeded ``{arch}ForCausalLM`` of config `TINY` | ``config``, in eval mode (``dtype``:
    cast to it; None keeps float32)."""
    transformers = pytest.importorskip("transformers")
    cfg = getattr(transformers, f"{arch}Config")(**{**TINY, **config})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg)
    return (model if dtype is None else model.to(dtype)).eval()
