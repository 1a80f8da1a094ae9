"""Two offline corpora for `mlm-dist bench convergence`: long documents ("books") and short ones.

NSP pairing and pair shuffling behave very differently on a corpus of books (hundreds of pairs
per document: a trainer that does not mix documents feeds a micro-batch from one book) and on a
corpus of short documents (one or two pairs each: "actual next" is often impossible), so the
convergence benchmark runs on both. Nothing may be downloaded, so the English comes from what
this machine already has: the docstrings of Python's standard library (data/demo_corpus.py) and
of the big packages installed next to mlm_dist (torch, transformers, sympy, numpy, ...), parsed
with `ast`, never imported, and cleaned to prose by the demo corpus's functions.

    books   the docstrings of one package, in source order (files sorted, docstrings in reading
            order), cut into documents of 200-2,000 sentences (lengths drawn from a seeded
            generator): consecutive text about one subject, as a chapter of a manual is.
    short   one docstring, one document, 1-40 sentences (a longer docstring keeps its first 40).

Exact duplicate docstrings (inherited or copied boilerplate: transformers copies docstrings
between model files) are kept once, across packages. The output is the txt corpus format: one
sentence a line, a blank line between documents. It is deterministic for a given Python and set
of installed package versions; the packages missing from an environment are skipped (and named
in the stats).
"""

from __future__ import annotations

import hashlib
import random
import sysconfig
from pathlib import Path
from typing import Iterator

from mlm_dist.data.corpus import write_txt_corpus
from mlm_dist.demo.stdlib_corpus import (docstrings_of, prose_sentences, stdlib_root,
                                       stdlib_source_files)

# Sources in a fixed order: the standard library, then installed packages with a lot of prose
# (about 10 MB of sentences together). A package not installed is skipped.
SOURCES = ("stdlib", "torch", "sympy", "transformers", "networkx", "numpy", "deepspeed",
           "huggingface_hub", "pydantic", "setuptools", "pygments", "jinja2", "rich", "tensorboard")
KINDS = ("books", "short")
BOOK_SENTENCES = (200, 2000)  # a book's length is drawn uniformly from this range
SHORT_MAX_SENTENCES = 40


def source_root(name: str) -> Path | None:
    """Where a source's .py files are: the stdlib, or a package in this Python's site-packages."""
    if name == "stdlib":
        return stdlib_root()
    root = Path(sysconfig.get_paths()["purelib"]) / name
    return root if root.is_dir() else None


def docstrings(sources: tuple[str, ...] = SOURCES) -> Iterator[tuple[str, list[str]]]:
    """(source, sentences) of every distinct docstring with prose, source by source, in order."""
    seen: set[bytes] = set()
    for name in sources:
        root = source_root(name)
        if root is None:
            continue
        # stdlib_source_files walks any tree the same way: sorted, tests and caches pruned.
        for path in stdlib_source_files(root):
            for text in docstrings_of(path):
                sentences = prose_sentences(text)
                if not sentences:
                    continue
                digest = hashlib.sha1("\n".join(sentences).encode()).digest()
                if digest not in seen:
                    seen.add(digest)
                    yield name, sentences


def short_documents(sources: tuple[str, ...] = SOURCES,
                    max_sentences: int = SHORT_MAX_SENTENCES) -> Iterator[list[str]]:
    for _, sentences in docstrings(sources):
        yield sentences[:max_sentences]


def book_documents(sources: tuple[str, ...] = SOURCES,
                   sentences_range: tuple[int, int] = BOOK_SENTENCES,
                   seed: int = 0) -> Iterator[list[str]]:
    """Consecutive docstrings of one source, cut into books of a random length in the range.
    A book never spans two sources; a source's tail shorter than the minimum joins its last book
    (or is a short book of its own when the source has nothing else)."""
    rng = random.Random(seed)
    low, high = sentences_range
    book: list[str] = []
    target = rng.randint(low, high)
    current = None
    for name, sentences in docstrings(sources):
        if name != current:
            if book:
                yield book
            book, current, target = [], name, rng.randint(low, high)
        book.extend(sentences)
        while len(book) >= target:
            # Cut at the target, not at the docstring's end: books keep their drawn lengths,
            # and the rest of a long docstring starts the next book.
            yield book[:target]
            book, target = book[target:], rng.randint(low, high)
    if book:
        yield book


def _merge_short_tails(books: Iterator[list[str]], minimum: int) -> Iterator[list[str]]:
    """Join a book shorter than `minimum` (a source's tail) to the book before it."""
    previous = None
    for book in books:
        if previous is not None and len(book) < minimum:
            previous = previous + book
            continue
        if previous is not None:
            yield previous
        previous = book
    if previous is not None:
        yield previous


def corpus_documents(kind: str, sources: tuple[str, ...] = SOURCES,
                     book_sentences: tuple[int, int] = BOOK_SENTENCES) -> Iterator[list[str]]:
    if kind == "books":
        # A tail may join a book from the previous source; that book then changes subject once,
        # which is rarer than a chapter break and harmless for NSP.
        return _merge_short_tails(book_documents(sources, book_sentences), book_sentences[0])
    if kind == "short":
        return short_documents(sources)
    raise ValueError(f"corpus kind must be one of {KINDS}, got {kind!r}")


def write_corpus(kind: str, path: str | Path, max_documents: int | None = None,
                 sources: tuple[str, ...] = SOURCES,
                 book_sentences: tuple[int, int] = BOOK_SENTENCES) -> dict:
    """Write a `kind` corpus to `path` (txt format) and return its stats."""
    lengths: list[int] = []  # sentences per document, for the stats

    def counted(documents: Iterator[list[str]]) -> Iterator[list[str]]:
        for sentences in documents:
            lengths.append(len(sentences))
            yield sentences

    stats = write_txt_corpus(path, counted(corpus_documents(kind, sources, book_sentences)),
                             max_documents)
    written = lengths[:stats["documents"]]
    return {"kind": kind, **stats, "min_sentences": min(written, default=None),
            "max_sentences": max(written, default=0),
            "sources": [s for s in sources if source_root(s) is not None],
            "missing_sources": [s for s in sources if source_root(s) is None]}
