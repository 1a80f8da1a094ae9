"""A small corpus of real English that every machine already has: the standard library's docstrings.

Tests, the tiny config and first-time users need prose to train a tokenizer and a model on, and
must not depend on a download. Python's own standard library carries about 1.2 MB of such
prose once cleaned (Python 3.11: ~3,500 documents, ~14,000 sentences): its docstrings, plus the
language reference topics that `help()` shows (pydoc_data/topics.py). Files are parsed with `ast`, never imported: importing
would run arbitrary module code (and some stdlib modules open windows or need missing C
extensions).

The result is deterministic for a given Python version: files are visited in sorted order and
docstrings in source order. Different Python versions ship different docstrings, so the corpus
(and anything trained on it) differs between them.
"""

from __future__ import annotations

import ast
import os
import re
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator

from mlm_dist.data.corpus import distinct_documents, split_sentences, write_txt_corpus
from mlm_dist.errors import PathNotFoundError

# Directories that hold tests, third-party packages, demos or generated code rather than
# documented library modules. (pydoc_data's help topics are read on their own, at the end.)
SKIPPED_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "dist-packages",
    "__pycache__", "turtledemo", "pydoc_data",
})

_DOCUMENTED_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# reST underlines and table borders: "-----", "=====  =======", "~~~~"
_RULE_LINE = re.compile(r"^\s*(?:([-=~^*+#_`'\".:])\1{2,}\s*)+$")
_CODE_START = re.compile(r"^(>>>|\.\.\.|\$ |% |#|import |from \S+ import |def |class |return |raise |"
                         r"@|\.\. )")
_LIST_ITEM = re.compile(r"^(?:\d+\.|[*+\-\u2022]|#\.)\s+")
_DEFINITION = re.compile(r"^[a-z_][\w.]*\s*(?:\([^)]*\))?\s*(?::|--)\s")  # "maxlevels: the ..."
_ASSIGNMENT_OR_COMMENT = re.compile(r"^[\w.\[\]]+\s*=[^=]| # ")
_REST_ROLE = re.compile(r":[a-z:]+:`~?([^`]*)`")  # :func:`os.path.join` -> os.path.join
_REST_MARKUP = re.compile(r"``|\*\*|(?<!\w)`|`(?!\w)")
_PROSE_CHARS = re.compile(r"[A-Za-z ,.;:'\"!?()\-]")
_WHITESPACE = re.compile(r"\s+")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_MIN_SENTENCE_WORDS = 3
_MIN_DOCUMENT_SENTENCES = 2


def write_stdlib_corpus(path: str | Path, max_documents: int | None = None) -> dict:
    """Write the stdlib docstring corpus to `path` in txt format and return its stats.

    One docstring with at least two sentences is one document: one sentence per line, a blank
    line between documents. Exact duplicate docstrings (inherited boilerplate) are kept once.
    """
    return write_txt_corpus(path, stdlib_documents(), max_documents)


def stdlib_documents() -> Iterator[list[str]]:
    """Yield each distinct stdlib docstring (then help topic) that cleans to two or more sentences."""
    return distinct_documents(map(prose_sentences, stdlib_texts()), _MIN_DOCUMENT_SENTENCES)


def stdlib_texts() -> Iterator[str]:
    root = stdlib_root()
    for source in stdlib_source_files(root):
        yield from docstrings_of(source)
    yield from help_topics_of(root / "pydoc_data" / "topics.py")


def stdlib_root() -> Path:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise PathNotFoundError(f"Python's standard library source is not at {root}; the demo "
                                "corpus needs it: use a Python installation that ships its .py files")
    return root


def stdlib_source_files(root: Path) -> Iterator[Path]:
    """Every .py file of the standard library, in a fixed (sorted) order."""
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning and sorting in place steers os.walk: skipped dirs are never entered, and
        # the visiting order is the same on every filesystem.
        dirnames[:] = sorted(d for d in dirnames
                             if d not in SKIPPED_DIRS and not d.startswith(("config-", ".")))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def docstrings_of(source: Path) -> list[str]:
    """Module, class and function docstrings of one file in source order; [] if it won't parse."""
    tree = parse_or_none(source)
    if tree is None:
        return []
    nodes = [n for n in ast.walk(tree) if isinstance(n, _DOCUMENTED_NODES)]
    # ast.walk is breadth-first; sorting by position gives reading order (the module comes first).
    nodes.sort(key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))
    docstrings = (ast.get_docstring(n, clean=True) for n in nodes)
    return [d for d in docstrings if d]


def help_topics_of(source: Path) -> list[str]:
    """The texts of `topics = {"name": "text", ...}`: the language reference pages of help()."""
    tree = parse_or_none(source) if source.is_file() else None
    if tree is None:
        return []
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets)):
            return [v.value for v in node.value.values
                    if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return []


def parse_or_none(source: Path) -> ast.Module | None:
    try:
        with warnings.catch_warnings():
            # Old stdlib files trip SyntaxWarnings (invalid escapes) that are not our business.
            warnings.simplefilter("ignore")
            return ast.parse(source.read_bytes(), filename=str(source))
    except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError, OSError):
        return None


def prose_sentences(docstring: str) -> list[str]:
    """The sentences of a docstring's prose, with code, examples and markup removed."""
    sentences = []
    for paragraph in _PARAGRAPH_BREAK.split(docstring):
        text = prose_of_paragraph(paragraph.splitlines())
        if text:
            sentences.extend(s for s in split_sentences(text) if looks_like_sentence(s))
    return sentences


def prose_of_paragraph(lines: list[str]) -> str:
    """Join the prose lines of one paragraph into one line (undoing hard wrapping)."""
    kept = []
    item_indent = None  # column where the text of the current list item ("1. ", "- ") starts
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(">>>"):
            break  # a doctest runs to the end of its paragraph, output included
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            item = _LIST_ITEM.match(line)
            item_indent = item.end() if item else None
        elif indent != item_indent:
            # The common indentation is already removed (get_docstring(clean=True)), so a line
            # still indented is a nested block: a code sample, an argument table or a literal.
            # Only the wrapped continuation of a list item is prose.
            continue
        next_line = lines[i + 1] if i + 1 < len(lines) else ""
        if _RULE_LINE.match(line) or _RULE_LINE.match(next_line):
            continue  # an underline, or the heading it underlines
        if i == 0 and stripped.endswith(":") and len(stripped.split()) <= 3:
            continue  # a heading such as "Args:" or "Example usage:"
        if is_code_like(stripped):
            continue
        kept.append(stripped)
    text = _REST_ROLE.sub(r"\1", " ".join(kept))
    text = _REST_MARKUP.sub("", text)
    return _WHITESPACE.sub(" ", text).strip()


def is_code_like(line: str) -> bool:
    """Code, directives, "name: description" tables and lines dense with symbols are not prose."""
    if not line or _CODE_START.match(line) or "::" in line:
        return True
    if _DEFINITION.match(line) or _ASSIGNMENT_OR_COMMENT.search(line):
        return True
    prose = len(_PROSE_CHARS.findall(line))
    return prose < 0.85 * len(line)


def looks_like_sentence(sentence: str) -> bool:
    words = sentence.split()
    letters = sum(c.isalpha() for c in sentence)
    return len(words) >= _MIN_SENTENCE_WORDS and letters >= 0.5 * len(sentence)
