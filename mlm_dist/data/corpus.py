"""Reading raw corpora into documents of sentences.

The formats are data/formats.py's: plain text (one sentence per line, a blank line between
documents), JSON lines and Parquet (a document per record, its text in one field, split into
sentences by data/sentences.py in the reader's language: "en", "ja", "zh", …, or "auto",
detected per document), Wikipedia's CirrusSearch dumps; gzip, bzip2 or zstd-compressed.

Inputs are files, directories (every file with a known suffix below them, sorted) and glob
patterns (expanded here with the glob module, sorted, never by a shell). Bytes that are not
UTF-8 are replaced by U+FFFD and records without the text field are skipped, both counted per
file, so a damaged corpus is reported, not hidden.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

from mlm_dist.data.formats import (KNOWN_SUFFIXES, TEXT_FIELD, FileCounts, check_file,
                                   check_text_field, read_texts)
from mlm_dist.data.sentences import AUTO, check_language, detect_language, split_sentences
from mlm_dist.data.formats import CorpusError
from mlm_dist.errors import PathExistsError, PathNotFoundError

_GLOB_CHARS = re.compile(r"[*?\[]")


# ----------------------------------------------------------------------------- naming inputs

def resolve_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """The input files named by files, directories and glob patterns, in a fixed order.

    Each argument keeps its place; what a directory or pattern expands to is sorted, so every
    node of a partitioned run computes the same list. A file named twice is an error: its
    documents would be trained on twice and could land in both train and valid.
    """
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not inputs:
        raise CorpusError("no inputs given; pass --input files, directories or glob patterns "
                          f"({', '.join(KNOWN_SUFFIXES)})")
    files: list[Path] = []
    named_by: dict[Path, str] = {}
    for argument in inputs:
        for path in _expand(str(argument)):
            real = path.resolve()
            if real in named_by:
                raise CorpusError(f"input {path} is named twice (by {named_by[real]!r} and "
                                  f"{str(argument)!r}); name each file once")
            named_by[real] = str(argument)
            files.append(path)
    return files


def _expand(argument: str) -> list[Path]:
    path = Path(argument)
    if path.is_file():
        return [path]
    if path.is_dir():
        return _files_below(path)
    if _GLOB_CHARS.search(argument):  # a literal name with [ ] in it was taken above
        matches = sorted(glob.glob(argument, recursive=True))
        if not matches:
            raise PathNotFoundError(f"--input pattern {argument!r} matches nothing; check the "
                                    "pattern (it is expanded by mlm-dist, not by a shell)")
        return [file for match in matches for file in _expand_match(Path(match))]
    raise PathNotFoundError(f"input {argument} does not exist; give files, directories or glob "
                            "patterns")


def _expand_match(path: Path) -> list[Path]:
    # A pattern may match directories ("corpus/*"), which contribute their files like any other.
    return _files_below(path) if path.is_dir() else [path] if path.is_file() else []


def _files_below(directory: Path) -> list[Path]:
    """Files with a known suffix anywhere below `directory`, sorted; hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        # Pruning in place steers os.walk; hidden directories (.git, .cache) are not corpus.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / name for name in filenames
                     if name.endswith(KNOWN_SUFFIXES) and not name.startswith("."))
    if not found:
        raise PathNotFoundError(f"directory {directory} holds no input files: looked for "
                                f"{', '.join(KNOWN_SUFFIXES)} files (name files with other "
                                "suffixes directly or with a glob pattern)")
    return sorted(found, key=lambda p: p.parts)


def check_readable(files: Iterable[Path], text_field: str = TEXT_FIELD):
    """Open each file once, so a permission problem, a mislabelled .gz or a --text-field that a
    file does not have stops the run up front (formats.check_file)."""
    check_text_field(text_field)
    for path in files:
        check_file(path, text_field)


# ----------------------------------------------------------------------------- writing

def distinct_documents(documents: Iterable[list[str]],
                       min_sentences: int) -> Iterator[list[str]]:
    """The documents with at least `min_sentences` sentences, each exact duplicate once
    (inherited docstrings, man pages installed under two names)."""
    seen: set[bytes] = set()
    for sentences in documents:
        if len(sentences) < min_sentences:
            continue
        digest = hashlib.sha1("\n".join(sentences).encode()).digest()
        if digest not in seen:
            seen.add(digest)
            yield sentences


def write_txt_corpus(path: str | Path, documents: Iterable[list[str]],
                     max_documents: int | None = None) -> dict:
    """Write documents (lists of sentences) to `path` in the txt format: one sentence a line, a
    blank line between documents; the first `max_documents`. Returns documents, sentences and
    bytes written. Written under a temporary name, so a crash never leaves a truncated corpus
    under the real one; an existing file is never replaced."""
    target = Path(path)
    if target.exists():
        raise PathExistsError(f"{target} already exists; choose another path or remove it")
    if max_documents is not None and max_documents < 1:
        raise CorpusError(f"max_documents must be at least 1, got {max_documents}")
    target.parent.mkdir(parents=True, exist_ok=True)
    stats = {"documents": 0, "sentences": 0}
    tmp = target.with_name(target.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for sentences in documents:
                if max_documents is not None and stats["documents"] >= max_documents:
                    break
                f.write("\n".join(sentences) + "\n\n")
                stats["documents"] += 1
                stats["sentences"] += len(sentences)
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {**stats, "bytes": target.stat().st_size}


# ----------------------------------------------------------------------------- reading

class Document(NamedTuple):
    file_index: int  # where its file stands in the whole input list (all partitions)
    index: int  # where it stands among its file's documents
    sentences: list[str]
    lang: str  # the reader's language, or the one detected for this document under "auto"


class CorpusReader:
    """Streams the documents of `files`, counting invalid UTF-8 and records without text per file.

    `file_indices` are the files' places in the whole input list when this reader gets only
    some of them (one partition); they make a document's identity independent of partitioning.
    `report` is called with a line such as "x.txt: 3 invalid UTF-8 sequences replaced" or
    "x.jsonl: 2 records without the field 'text' skipped" as soon as such a file has been read.
    `lang` is the language JSONL and Parquet documents are split into sentences in ("auto":
    detected per document); plain text is one sentence a line already. `text_field` names the
    field (dotted for nested objects) that holds a JSON-lines or Parquet document's text.
    """

    def __init__(self, files: list[Path], file_indices: list[int] | None = None,
                 report: Callable[[str], None] | None = None, lang: str = "en",
                 text_field: str = TEXT_FIELD):
        self.lang = check_language(lang)  # an unknown code stops here, before any file is read
        self.text_field = check_text_field(text_field)
        self.files = files
        self.file_indices = list(range(len(files))) if file_indices is None else file_indices
        self.report = report
        self.invalid_utf8: dict[Path, int] = {}  # only files that had any
        self.missing_text: dict[Path, int] = {}  # only files that had any
        self.files_opened = 0  # for progress reports

    def documents(self) -> Iterator[Document]:
        for file_index, path in zip(self.file_indices, self.files):
            self.files_opened += 1
            counts = FileCounts()  # the file's readers add to it as they go
            index = 0
            for text, sentences in read_texts(path, counts, self.text_field):
                # Under "auto" each document's language is detected once, for its sentence
                # splitting (JSONL) and for its word segmentation (data/words.py).
                lang = detect_language(text) if self.lang == AUTO else self.lang
                sentences = split_sentences(text, lang) if sentences is None else sentences
                if sentences:
                    yield Document(file_index, index, sentences, lang)
                    index += 1
            self._tally(path, counts)

    def _tally(self, path: Path, counts: FileCounts):
        """Keep and report what reading `path` replaced or skipped."""
        if counts.invalid_utf8:
            self.invalid_utf8[path] = counts.invalid_utf8
            self._report(invalid_utf8_message(path, counts.invalid_utf8))
        if counts.missing_text:
            self.missing_text[path] = counts.missing_text
            self._report(missing_text_message(path, counts.missing_text, self.text_field))

    def _report(self, line: str):
        if self.report is not None:
            self.report(line)


def iter_documents(inputs: Iterable[str | Path], lang: str = "en",
                   text_field: str = TEXT_FIELD) -> Iterator[list[str]]:
    """Yield each document (a list of sentences) of each input, in order; JSONL and Parquet
    documents are split into sentences in `lang` (see CorpusReader)."""
    reader = CorpusReader(resolve_inputs(inputs), lang=lang, text_field=text_field)
    for document in reader.documents():
        yield document.sentences


def invalid_utf8_message(path: Path, count: int) -> str:
    return f"{path}: {count} invalid UTF-8 sequence{'s' if count != 1 else ''} replaced"


def missing_text_message(path: Path, count: int, text_field: str) -> str:
    return (f"{path}: {count} record{'s' if count != 1 else ''} without the field "
            f"{text_field!r} skipped")
