"""Open any target by name or path on a chosen backend: ``--model`` and ``--backend`` of every
command, and the Python API.

    open_target("smollm2-135m")                         the embedded SmolLM2 (default)
    open_target("qwen2.5-coder-1.5b", backend="llama.cpp")
    open_target("/models/x.gguf", backend="torch", dtype="bfloat16")
    open_target("/models/hf-dir")                       a transformers directory (torch only)

Backends: ``llama.cpp`` runs a GGUF file natively (quantised as shipped, no conversion);
``torch`` runs HF transformers (a GGUF is de-quantised; SmolLM2's converted copy is cached).
``auto`` = llama.cpp for a GGUF on CPU when llama-cpp-python is installed and every requested
method can run on it (no early exits, EAGLE features, trees or HF peers), torch otherwise.

The tokenizer is always transformers' (from the GGUF's metadata or the directory), so chat
templates and decoding are the same on both backends; for a GGUF it is cached under
``hierspec.cache.cache_root() / "tokenizers"`` (a self-healing entry) since reading it from a
large GGUF takes seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Mapping, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["BACKENDS", "Opened", "choose_backend", "load_gguf_tokenizer", "open_target"]

BACKENDS = ("auto", "torch", "llama.cpp")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Opened:
    """An opened target: the `LanguageModel`, its tokenizer, a display name, the backend it
    runs on, and its file (GGUF) or folder."""

    model: Any
    tokenizer: Any
    name: str
    backend: str
    path: Path | None = None


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def choose_backend(
    backend: str, fmt: str, needs: Mapping[str, Set[str]] | None = None, device: str = "cpu"
) -> str:
    """The backend to run on (see module docstring); ValueError naming ``--backend`` when the
    choice cannot work. ``needs`` maps each requested method's name to the capabilities it needs
    of the target (``hf``/``tree``: torch; ``llama``: llama.cpp; see `hierspec.methods.needs`)."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    needs = needs or {}
    needs_torch = [name for name, n in needs.items() if n & {"hf", "tree"}]
    needs_llama = [name for name, n in needs.items() if "llama" in n]
    if backend == "auto":
        if fmt == "gguf" and device == "cpu" and llama_cpp_available() and not needs_torch:
            return "llama.cpp"
        backend = "torch"
    if backend == "llama.cpp":
        if fmt != "gguf":
            raise ValueError(
                "--backend llama.cpp: the model must be a GGUF file (a transformers folder needs torch)"
            )
        if not llama_cpp_available():
            raise ValueError(
                "--backend llama.cpp: llama-cpp-python is not installed (`make venv` installs it; "
                "or use --backend torch)"
            )
        if device != "cpu":
            raise ValueError(
                f"--backend llama.cpp runs on the CPU here; --device {device} needs --backend torch"
            )
        if needs_torch:
            raise ValueError(
                f"--backend llama.cpp: method(s) {', '.join(needs_torch)} need the torch backend "
                "(layers, hidden states or tree attention); use --backend torch"
            )
    elif needs_llama:
        raise ValueError(f"method(s) {', '.join(needs_llama)} need --backend llama.cpp and a GGUF model")
    return backend


def load_gguf_tokenizer(path: Path) -> Any:
    """transformers' tokenizer of a GGUF file, cached (self-healing) after the first read."""
    from transformers import AutoTokenizer

    from ..cache import cache_root, load_verified

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    entry = cache_root() / "tokenizers" / f"{path.stem}-{key}"

    def build(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tok.save_pretrained(tmp)
        if tok.chat_template:
            (tmp / "chat_template.jinja").write_text(tok.chat_template, encoding="utf-8")

    def load(p: Path) -> Any:
        tok = AutoTokenizer.from_pretrained(str(p))
        template = p / "chat_template.jinja"
        if not tok.chat_template and template.is_file():
            tok.chat_template = template.read_text(encoding="utf-8")
        return tok

    return load_verified(entry, build, load, directory=True)


def open_target(
    model: str = "smollm2-135m",
    *,
    backend: str = "auto",
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    needs: Mapping[str, Set[str]] | None = None,
    n_ctx: int | None = None,
) -> Opened:
    """Open ``model`` (a catalogue name or a path) on ``backend`` (see module docstring).

    ``dtype`` applies to the torch backend (llama.cpp runs the GGUF's own types); ``needs`` (what
    each requested method needs of the target, `hierspec.methods.needs`) steers ``auto`` and is
    checked against the backend; ``n_ctx`` caps the context on llama.cpp. Errors name
    ``--model`` / ``--backend``. No progress bar is drawn where ``HF_HUB_DISABLE_PROGRESS_BARS``
    is set (``--json``), not even the GGUF conversion's (`hierspec.models.loading.quiet_progress`)."""
    from .catalog import resolve_model
    from .loading import quiet_progress

    try:
        ref = resolve_model(model)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"--model: {err}") from None
    chosen = choose_backend(backend, ref.format, needs, device)
    with quiet_progress():
        return _open(ref, chosen, dtype, device, n_ctx)


def _open(ref: Any, chosen: str, dtype: str | torch.dtype, device: str, n_ctx: int | None) -> Opened:
    """`open_target` on the chosen backend, the checks done."""
    name = ref.name or ref.path.name
    if chosen == "llama.cpp":
        from .llamacpp import LlamaCppModel

        lm = LlamaCppModel(ref.path, n_ctx=n_ctx)
        return Opened(lm, load_gguf_tokenizer(ref.path), name, chosen, ref.path)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if ref.name == "smollm2-135m":
        from .. import models  # through the package, so tests can stand in a tiny target

        lm, tok = models.load_smollm2(torch_dtype)
    else:
        from transformers import AutoTokenizer

        from .hf import HFModel

        where, kw = ref.pretrained_args()
        lm = HFModel.from_pretrained(where, dtype=torch_dtype, **kw)
        tok = load_gguf_tokenizer(ref.path) if ref.format == "gguf" else AutoTokenizer.from_pretrained(where)
    if device != "cpu":
        lm.model.to(device)
    return Opened(lm, tok, name, chosen, ref.path)
