"""The llama.cpp plumbing under `hierspec.models.llamacpp.LlamaCppModel`: llama.cpp's log routed
through one callback and captured while a model loads (`CapturedLog`), the GGUF file check, the
lazy import of llama-cpp-python, the thread default, C strings and freeing the handles."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from hierspec.host import cpu_flags

__all__ = [
    "GGUF_MAGIC",
    "CapturedLog",
    "c_string",
    "check_gguf_file",
    "default_threads",
    "free_all",
    "host_has_amx",
    "import_llama_cpp",
    "install_log_callback",
]

GGUF_MAGIC = b"GGUF"

# --------------------------------------------------------------------------- llama.cpp logging
# ggml.h's enum ggml_log_level (NONE = untagged output, CONT = continues the previous line);
# llama-cpp-python's own _logger still uses an older numbering.
_LOG_LEVELS = {0: logging.INFO, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_log_lock = threading.Lock()
_log_state: dict[str, Any] = {"callback": None, "capture": None, "verbose": False, "last": logging.INFO}


def install_log_callback(lcp: Any, verbose: bool = False) -> None:
    """Route llama.cpp's log through one process-wide callback (idempotent): lines are captured
    while a model loads, else printed only if verbose (once asked for, by any model) or
    llama-cpp-python's logger allows."""
    if verbose:
        _log_state["verbose"] = True
    if _log_state["callback"] is not None:
        return
    lcp_logger = logging.getLogger("llama-cpp-python")

    def _log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        py_level = _LOG_LEVELS.get(level, _log_state["last"])  # 5 = continuation of the last line
        _log_state["last"] = py_level
        capture = _log_state["capture"]
        if capture is not None:
            capture.append((py_level, text.decode("utf-8", "replace")))
            return
        explicit = lcp_logger.level != logging.NOTSET and lcp_logger.level <= py_level
        if _log_state["verbose"] or explicit:
            print(text.decode("utf-8", "replace"), end="", file=sys.stderr, flush=True)

    callback = lcp.llama_log_callback(_log)
    _log_state["callback"] = callback  # keep a reference: llama.cpp holds only the pointer
    lcp.llama_log_set(callback, ctypes.c_void_p(0))


class CapturedLog:
    """Context manager collecting llama.cpp's log lines (printed at the end if verbose)."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.lines: list[tuple[int, str]] = []

    def __enter__(self) -> CapturedLog:
        _log_lock.acquire()
        _log_state["capture"] = self.lines
        return self

    def __exit__(self, *exc: object) -> None:
        _log_state["capture"] = None
        _log_lock.release()
        if self.verbose:
            sys.stderr.write("".join(text for _, text in self.lines))

    def errors(self) -> str:
        """The captured warning/error lines, joined (for an exception message)."""
        text = "".join(t for level, t in self.lines if level >= logging.WARNING).strip()
        return " ".join(text.split())[-600:]


# --------------------------------------------------------------------------- file checks
def check_gguf_file(path: str | os.PathLike[str]) -> Path:
    """The path as a Path if it names a readable file starting with the GGUF magic, else
    FileNotFoundError / ValueError naming it (cheap: reads 8 bytes)."""
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"GGUF model {str(p)!r} does not exist")
    if not p.is_file():
        raise ValueError(f"GGUF model {str(p)!r} is not a file")
    try:
        with p.open("rb") as f:
            head = f.read(8)
    except OSError as err:
        raise ValueError(f"GGUF model {str(p)!r} is not readable: {err}") from None
    if head[:4] != GGUF_MAGIC:
        raise ValueError(
            f"{str(p)!r} is not a GGUF file (it starts with {head[:4]!r}, a GGUF file with {GGUF_MAGIC!r})"
        )
    if len(head) < 8:
        raise ValueError(f"GGUF model {str(p)!r} is truncated ({p.stat().st_size} bytes)")
    return p


def host_has_amx() -> bool:
    """Whether this CPU advertises Intel AMX (``amx_tile`` in /proc/cpuinfo; False elsewhere)."""
    return "amx_tile" in cpu_flags()


def import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as err:
        raise ImportError(
            f"the llama.cpp backend needs llama-cpp-python (pip install llama-cpp-python): {err}"
        ) from err
    return llama_cpp


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def c_string(fill: Any, size: int = 256) -> str:
    """Call ``fill(buf, size)`` (a llama.cpp string getter returning the full length) and decode."""
    buf = ctypes.create_string_buffer(size)
    n = fill(buf, size)
    if n >= size:
        buf = ctypes.create_string_buffer(n + 1)
        n = fill(buf, n + 1)
    return buf.value.decode("utf-8", "replace") if n >= 0 else ""


def free_all(lcp: Any, handles: dict[str, Any]) -> None:
    """Free batch, context and model (idempotent; a finalizer, so it never raises)."""
    try:
        if handles.pop("batch_alive", False):
            lcp.llama_batch_free(handles["batch"])
        ctx = handles.pop("ctx", None)
        if ctx:
            lcp.llama_free(ctx)
        model = handles.pop("model", None)
        if model:
            lcp.llama_model_free(model)
    except Exception:  # interpreter shutdown may have torn down ctypes already
        pass
