"""English text that ships with Python: the docstrings of the standard library and pydoc's topic pages.

Gathered from source with `ast` (nothing is imported or run), walking the stdlib folder in sorted
order, so one Python version always gives the same text: about 2 MB on CPython 3.11 and 3.12.
Standard library only, so that it runs in any interpreter.
"""
from __future__ import annotations

import ast
import os
import sysconfig
from pathlib import Path
from typing import Iterator

# folders that hold tests, GUIs, third-party packages or build files rather than documented library code
SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages", "dist-packages",
             "__pycache__", "ensurepip", "venv"}
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# statement lists that can hold a documented definition (`if sys.platform...: def ...`); expressions cannot
BODIES = ("body", "orelse", "finalbody", "handlers", "cases")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_files(root: Path) -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith("config-")]
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def module_document(path: Path) -> str:
    """The docstrings of one source file in source order, separated by blank lines ("" if none)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):  # e.g. a file for another Python version
        return ""
    return "\n\n".join(_docstrings(tree))


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Docstrings of `node` and the definitions nested in its statements, in source order."""
    if isinstance(node, DOCUMENTED):
        doc = ast.get_docstring(node)
        if doc and doc.strip():
            yield doc
    for field in BODIES:
        for child in getattr(node, field, ()):
            yield from _docstrings(child)


def pydoc_topics(root: Path) -> list[str]:
    """The language-reference topic pages of `help()` (pydoc_data/topics.py), by topic name."""
    path = root / "pydoc_data" / "topics.py"
    if not path.is_file():
        return []
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.Dict):
            pages = {k.value: v.value for k, v in zip(node.keys, node.values)
                     if isinstance(k, ast.Constant) and isinstance(v, ast.Constant) and isinstance(v.value, str)}
            return [pages[name] for name in sorted(pages)]
    return []


def stdlib_documents(root: Path | None = None) -> Iterator[str]:
    """One document per documented module, then one per pydoc topic."""
    root = root or stdlib_root()
    for path in module_files(root):
        text = module_document(path)
        if text:
            yield text
    yield from pydoc_topics(root)
