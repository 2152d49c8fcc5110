"""The copy-heavy prompt set (``--sets copy``): tasks whose answers repeat much of the prompt,
where lookup drafters (n-gram, suffix) shine, as in real editing and refactoring workloads.

Each prompt gives a real Python standard-library function (read from this interpreter's own
source, so nothing is downloaded) and asks to return it edited: add type hints, add a docstring,
rename a variable, convert to a class method... Functions are chosen deterministically: the first
top-level functions of 8 to 40 lines in a fixed list of modules, in file order.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from .prompt import Prompt, _select

__all__ = ["copy_prompts"]

MODULES = (
    "textwrap",
    "shlex",
    "fnmatch",
    "glob",
    "calendar",
    "difflib",
    "html",
    "base64",
    "colorsys",
    "bisect",
)
TASKS = (
    "Add Python type hints to this function. Return the complete function, unchanged otherwise.",
    "Add a Google-style docstring to this function. Return the complete function.",
    "Rename every local variable of this function to a more descriptive name. Return the complete function.",
    "Add a comment above each line of this function that explains it. Return the complete function.",
)


def _functions(module: str, max_per_module: int = 3) -> list[tuple[str, str]]:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []
    src = Path(spec.origin).read_text(encoding="utf-8")
    lines = src.splitlines()
    out = []
    for node in ast.parse(src).body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and node.end_lineno:
            n = node.end_lineno - node.lineno + 1
            if 8 <= n <= 40:
                out.append((f"{module}.{node.name}", "\n".join(lines[node.lineno - 1 : node.end_lineno])))
        if len(out) == max_per_module:
            break
    return out


def copy_prompts(n: int | None = None, offset: int = 0) -> list[Prompt]:
    """Copy-heavy chat prompts over standard-library functions (see module docstring)."""
    items = []
    funcs = [f for m in MODULES for f in _functions(m)]
    if not funcs:
        raise ValueError("copy prompts: no Python standard-library source found on this interpreter")
    for i, (name, code) in enumerate(funcs):
        task = TASKS[i % len(TASKS)]
        items.append(Prompt(f"copy:{name}", "copy", f"{task}\n\n```python\n{code}\n```", True))
    return _select(items, n, offset)
