"""Corpus files as people download them: which reader a file gets, and the texts it yields.

Compression, by the last suffix, each read as a stream (memory holds a buffer, never the file):
  .gz    gzip (several members one after another too)
  .bz2   bzip2
  .zst   zstd: several frames one after another (as `cat a.zst b.zst` makes), windows up to
         2 GB (`zstd --long=31`); a file cut short is an error, where zstandard's own stream
         reader would end quietly with what it had
Then the format, by the name without that suffix:
  .parquet        one document per row, its text in the string column `text_field`; read one
                  record batch at a time through pyarrow, so memory holds a batch of one row
                  group's column, never the file (Hugging Face datasets, FineWeb, CC-100 mirrors)
  .jsonl, .json   one JSON object per line, the document's text in the field `text_field`
                  (the Pile, RedPajama, SlimPajama as .jsonl.zst; WikiExtractor's --json output)
  .txt            plain text: one sentence a line, a blank line between documents
  any other name  JSON lines when its first non-blank line is a JSON object (WikiExtractor
                  names its files wiki_00, wiki_01, …), plain text otherwise

`text_field` is a name or a dotted path into nested objects ("meta.body"); in Parquet, a dotted
path goes down struct columns. A record (JSON line, Parquet row) without the field, or with
null there, is skipped and counted in FileCounts.missing_text, as invalid UTF-8 is counted.

Wikipedia's CirrusSearch dumps (jawiki-…-cirrussearch-content.json.gz) are JSON lines in
Elasticsearch's bulk layout: an action line ({"index": {...}}) before each page line. A line
without the text field that is such an action is skipped without being counted. It is told
line by line, by its content, not by the file's name: a dump is renamed, split and
recompressed on its way to a cluster, a split may fall between an action and its page, and
each line still says what it is; no corpus document is a lone {"index": {...}}. Only
`text_field` of a page is read, so its title, headings and opening text never become sentences.
"""

from __future__ import annotations

import bz2
import gzip
import io
import itertools
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import zstandard

from mlm_dist.errors import UserError

TEXT_FIELD = "text"
# What a directory contributes. Not plain .json: directories of downloaded datasets hold
# .json configuration files (dataset_info.json); name .json corpus files directly or by a glob.
KNOWN_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz", ".txt.zst", ".jsonl.zst",
                  ".txt.bz2", ".jsonl.bz2", ".json.gz", ".json.zst", ".json.bz2", ".parquet")
TEXT, JSON_LINES, PARQUET = "text", "JSON lines", "Parquet"

# Magic numbers: a file named for a compression it does not have stops the run up front.
_COMPRESSIONS = {".gz": ("gzip", (b"\x1f\x8b",)), ".bz2": ("bzip2", (b"BZh",)),
                 ".zst": ("zstd", (b"\x28\xb5\x2f\xfd",) + tuple(  # frames, skippable frames
                     bytes([0x50 + k]) + b"\x2a\x4d\x18" for k in range(16)))}
_ZSTD_MAX_WINDOW = 2**31  # zstd --long=31; the library refuses frames above 128 MB by default
_READ_SIZE = 1 << 20
_SNIFF_BYTES = 1 << 24  # of a first line, to tell JSON lines from text (a line longer is text)
_SNIFF_RECORDS = 100  # records read up front to find the text field in a JSON-lines file
PARQUET_BATCH_ROWS = 256  # rows converted to Python at a time; pyarrow reads a row group's column
_ENCODED_REPLACEMENT = "\ufffd".encode()
# JSON can spell unpaired surrogates ("\ud800"), which no UTF-8 encoder (SentencePiece's
# included) accepts; they are invalid text like bad bytes are, and are replaced and counted too.
_SURROGATE = re.compile("[\ud800-\udfff]")


class CorpusError(UserError, ValueError):
    """An input corpus that cannot be read as given (a file, a field, a line), or a corpus
    that cannot make shards; the message names the file and the fix."""


@dataclass
class FileCounts:
    """What reading one file skipped or repaired; the readers add to it as they go."""
    invalid_utf8: int = 0  # invalid UTF-8 sequences (and JSON's lone surrogates) replaced
    missing_text: int = 0  # records without the text field (or null there), skipped


# ----------------------------------------------------------------------------- naming

def check_text_field(text_field: str) -> str:
    if not isinstance(text_field, str) or not all(text_field.split(".")):
        raise CorpusError(f"--text-field {text_field!r} is not a field name: give NAME, or a "
                          "dotted path into nested objects such as meta.body")
    return text_field


def format_of(path: Path) -> str:
    """TEXT, JSON_LINES or PARQUET: by the name, and for a name we do not know by the first line."""
    name = _without_compression(path.name)
    if name.endswith(".parquet"):
        return PARQUET
    if name.endswith((".jsonl", ".json")):
        return JSON_LINES
    if name.endswith(".txt"):
        return TEXT
    return JSON_LINES if isinstance(_json_value(_first_line(path)), dict) else TEXT


def _without_compression(name: str) -> str:
    for suffix in _COMPRESSIONS:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def _compression(path: Path) -> str | None:
    return next((suffix for suffix in _COMPRESSIONS if path.name.endswith(suffix)), None)


# ----------------------------------------------------------------------------- up-front checks

def check_file(path: Path, text_field: str = TEXT_FIELD):
    """Everything about `path` that can be seen without reading it through: it opens, it is
    compressed as named, and a Parquet or JSON-lines file has `text_field`. A typo in
    --text-field stops the run here, not after every record was skipped."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CorpusError(f"input {path} cannot be read ({e.strerror or e}); fix its "
                          "permissions or leave it out") from None
    suffix = _compression(path)
    if suffix and head:
        kind, magics = _COMPRESSIONS[suffix]
        if not head.startswith(magics):
            raise CorpusError(f"input {path} is named {suffix} but is not {kind}-compressed; "
                              f"rename it without {suffix}, or compress it")
    kind = format_of(path)
    if kind == PARQUET:
        _parquet_text_column(path, text_field).close()
    elif kind == JSON_LINES:
        _check_json_field(path, text_field)


def _check_json_field(path: Path, text_field: str):
    """The first record is an object, and one of the first few has `text_field` (null counts:
    the field is there). A few, not one: a corpus may have a record without text here and
    there, and those are skipped and counted when it is read."""
    records = (record for _, record in _json_records(path, _lines(path, FileCounts()), text_field)
               if not _is_bulk_action(record))
    first_keys = None
    for record in itertools.islice(records, _SNIFF_RECORDS):
        if first_keys is None:
            first_keys = list(record)
        if _lookup(record, text_field) is not _MISSING:
            return
    if first_keys is not None:
        raise CorpusError(f"input {path}: none of its first records has the field "
                          f"{text_field!r} (the first has: {', '.join(first_keys) or 'no fields'}); "
                          "name the text field with --text-field (dotted for nested objects: "
                          "meta.body)")


# ----------------------------------------------------------------------------- reading

def read_texts(path: Path, counts: FileCounts, text_field: str = TEXT_FIELD
               ) -> Iterator[tuple[str, list[str] | None]]:
    """(text, sentences) of each document of `path`; sentences is None where the text is still
    to be split (JSON lines, Parquet: the reader splits it once it knows the language), and the
    lines themselves for plain text (one sentence a line already)."""
    kind = format_of(path)
    if kind == PARQUET:
        return _parquet_texts(path, counts, text_field)
    lines = _lines(path, counts)
    if kind == JSON_LINES:
        return _json_texts(path, lines, counts, text_field)
    return _text_documents(lines)


def _text_documents(lines: Iterator[tuple[int, str]]) -> Iterator[tuple[str, list[str]]]:
    """(the start of its text, for language detection; its sentences) of each document."""
    doc: list[str] = []
    for _, physical_line in lines:
        # Lines end in \n, \r\n or a lone \r (old Mac files), as in Python's text mode.
        for line in physical_line.rstrip("\r\n").split("\r"):
            line = line.strip()
            if line:
                doc.append(line)
            elif doc:
                yield " ".join(doc[:50]), doc
                doc = []
    if doc:
        yield " ".join(doc[:50]), doc


def _json_texts(path: Path, lines: Iterator[tuple[int, str]], counts: FileCounts,
                text_field: str) -> Iterator[tuple[str, None]]:
    for lineno, record in _json_records(path, lines, text_field):
        text = _lookup(record, text_field)
        if text is _MISSING or text is None:
            if not _is_bulk_action(record):
                counts.missing_text += 1
            continue
        if not isinstance(text, str):
            raise CorpusError(f"{path}:{lineno}: the field {text_field!r} holds a "
                              f"{type(text).__name__}, not a string; name the text field with "
                              "--text-field (dotted for nested objects: meta.body)")
        text, surrogates = _SURROGATE.subn("\ufffd", text)
        counts.invalid_utf8 += surrogates
        yield text, None


def _json_records(path: Path, lines: Iterator[tuple[int, str]], text_field: str
                  ) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line."""
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line of a "
                              "JSON-lines file must be one object") from None
        if not isinstance(record, dict):
            raise CorpusError(f'{path}:{lineno}: expected an object with a "{text_field}" '
                              f"string, got a {type(record).__name__}")
        yield lineno, record


def _is_bulk_action(record: dict) -> bool:
    """An Elasticsearch bulk action line, as CirrusSearch dumps have before each page."""
    return len(record) == 1 and isinstance(record.get("index"), dict)


_MISSING = object()


def _lookup(record: dict, text_field: str):
    value = record
    for key in text_field.split("."):
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


# ----------------------------------------------------------------------------- Parquet
# pyarrow is imported by the functions that read Parquet: it takes a second to import, and
# every `prepare` worker and loader imports this module, mostly for text and JSON lines.

def _parquet_texts(path: Path, counts: FileCounts, text_field: str) -> Iterator[tuple[str, None]]:
    import pyarrow as pa
    import pyarrow.compute as pc

    nested = text_field.split(".")[1:]
    try:
        with _parquet_text_column(path, text_field) as parquet:
            # Only the text column is read, a batch at a time: memory holds one row group's
            # column, never the file, and the other columns (URLs, metadata) cost no I/O.
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS,
                                              columns=[text_field]):
                column = batch.column(0)
                for key in nested:  # struct_field keeps a null parent null
                    column = pc.struct_field(column, key)
                for text in _column_texts(column, counts):
                    if text is None:
                        counts.missing_text += 1
                    else:
                        yield text, None
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"input {path} is a damaged Parquet file ({e}); download it "
                          "again") from None


def _column_texts(column, counts: FileCounts) -> list[str | None]:
    import pyarrow as pa

    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        # Parquet writers need not check UTF-8: the bad bytes are replaced and counted, as in
        # a text file.
        return [None if raw is None else _decode(raw, counts)
                for raw in column.cast(pa.large_binary()).to_pylist()]


def _parquet_text_column(path: Path, text_field: str):
    """The opened ParquetFile, once its schema is known to hold `text_field` as a string."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # pre_buffer (pyarrow's default) reads the column chunks of every row group asked for
        # ahead, all of them for iter_batches: memory would grow with the file. Without it a
        # row group's column is read when its batches are reached.
        parquet = pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"input {path} is not a readable Parquet file ({e}); download it "
                          "again, or rename it if it is another format") from None
    try:
        _check_parquet_column(path, parquet.schema_arrow, text_field)
    except ValueError:
        parquet.close()
        raise
    return parquet


def _check_parquet_column(path: Path, schema, text_field: str):
    import pyarrow as pa

    keys = text_field.split(".")
    if keys[0] not in schema.names:
        raise CorpusError(f"input {path} has no column {keys[0]!r} (its columns: "
                          f"{', '.join(schema.names)}); name the text column with --text-field")
    kind = schema.field(keys[0]).type
    for depth, key in enumerate(keys[1:], 1):
        if not pa.types.is_struct(kind) or kind.get_field_index(key) < 0:
            has = (f"its fields: {', '.join(kind.field(i).name for i in range(kind.num_fields))}"
                   if pa.types.is_struct(kind) else f"it is {kind}")
            raise CorpusError(f"input {path}: column {'.'.join(keys[:depth])!r} has no field "
                              f"{key!r} ({has}); name the text column with --text-field")
        kind = kind.field(key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind)):
        raise CorpusError(f"input {path}: column {text_field!r} is {kind}, not a string; name "
                          "the text column with --text-field")


# ----------------------------------------------------------------------------- bytes to lines

def _lines(path: Path, counts: FileCounts) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line; invalid UTF-8 replaced and added to counts.

    Read as bytes and decoded line by line, because a text-mode file replaces bad bytes
    without telling anyone how many there were.
    """
    suffix = _compression(path)
    with _open(path) as f:
        try:
            for lineno, raw in enumerate(f, 1):
                yield lineno, _decode(raw, counts)
        # What each decompressor raises on damaged data (gzip's BadGzipFile and bz2's
        # "Invalid data stream" are OSErrors); an uncompressed file's OSError is the disk's.
        except (EOFError, OSError, zlib.error, zstandard.ZstdError, _ZstdTruncated) as e:
            if suffix is None:
                raise
            raise CorpusError(f"input {path} is a damaged {_COMPRESSIONS[suffix][0]} file ({e}); "
                              "compress or download it again") from None


def _decode(raw: bytes, counts: FileCounts) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # Each invalid sequence became one U+FFFD; U+FFFDs that were validly encoded in the
        # file already are not ours to count.
        counts.invalid_utf8 += text.count("\ufffd") - raw.count(_ENCODED_REPLACEMENT)
        return text


def _first_line(path: Path) -> str:
    """The first non-blank line (at most _SNIFF_BYTES of it), for telling formats apart; ""
    when the file cannot be decompressed (reading it reports that, with its name)."""
    try:
        with _open(path) as f:
            while line := f.readline(_SNIFF_BYTES):
                if line.strip():
                    return line.decode("utf-8", errors="replace")
    except (EOFError, OSError, zlib.error, zstandard.ZstdError, _ZstdTruncated):
        pass
    return ""


def _json_value(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _open(path: Path) -> BinaryIO:
    suffix = _compression(path)
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".zst":
        return io.BufferedReader(_ZstdReader(path), _READ_SIZE)
    return open(path, "rb")


class _ZstdTruncated(Exception):
    pass


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a .zst file, frame after frame, read as a stream.

    zstandard's stream_reader ends quietly when the file stops inside a frame, so a truncated
    download would lose its tail unnoticed; here each frame's decompressor must reach the
    frame's end, and a file that stops before raises _ZstdTruncated.
    """

    def __init__(self, path: Path):
        self._file = open(path, "rb")
        self._context = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
        self._frame = None  # the decompressor of the frame being read
        self._pending = memoryview(b"")  # decompressed, not yet returned

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = self._file.read(_READ_SIZE)
            if not chunk:
                if self._frame is not None:
                    raise _ZstdTruncated("the file ends inside a zstd frame: it was cut short")
                return 0
            self._pending = memoryview(self._decompress(chunk))
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]  # a view: no copy of what is left
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            if self._frame is None:
                self._frame = self._context.decompressobj()
            out.append(self._frame.decompress(chunk))
            if self._frame.eof:  # the rest of the chunk starts the next frame
                chunk, self._frame = self._frame.unused_data, None
            else:
                chunk = b""
        return b"".join(out)

    def close(self):
        self._file.close()
        super().close()
