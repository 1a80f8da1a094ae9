"""Reading raw corpora into documents of sentences.

Two formats, chosen by file suffix:
  *.txt (or anything else)  one sentence per line, a blank line between documents
  *.jsonl                   one JSON object per line with a "text" field; one document per line,
                            split into sentences here
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket, which stays
# with its sentence) followed by whitespace and something that starts a sentence.
# Deliberately simple: NSP needs plausible sentence boundaries, not linguistic perfection.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    sentences = []
    for paragraph in text.splitlines():
        paragraph = paragraph.strip()
        if paragraph:
            sentences.extend(s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip())
    return sentences


def _text_documents(path: Path) -> Iterator[list[str]]:
    doc: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if line:
                doc.append(line)
            elif doc:
                yield doc
                doc = []
    if doc:
        yield doc


def _jsonl_documents(path: Path) -> Iterator[list[str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); "
                                 "each line of a .jsonl file must be one object") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f'{path}:{lineno}: expected an object with a "text" string')
            sentences = split_sentences(text)
            if sentences:
                yield sentences


def iter_documents(paths: Iterable[str | Path]) -> Iterator[list[str]]:
    """Yield each document (a list of sentences) of each file, in order."""
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"input {path} does not exist or is not a file")
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path)
        else:
            yield from _text_documents(path)
