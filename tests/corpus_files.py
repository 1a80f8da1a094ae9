"""Corpus files as people download them, written by the libraries that write them in the wild:
Parquet by pyarrow, zstd by zstandard (as `zstd --long` and `cat a.zst b.zst` make them), and
a Wikipedia CirrusSearch dump in its bulk layout."""

from __future__ import annotations

import bz2
import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard


def write_parquet(path: Path, columns: dict[str, list], row_group_size: int | None = None) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def zstd_frames(data: bytes) -> bytes:
    """`data` as two zstd frames one after the other: the first with its size in the header,
    the second streamed (no size) with a 256 MB window, which zstandard's default decoder
    refuses ("Frame requires too much memory") as it refuses files made with `zstd --long`."""
    half = len(data) // 2
    first = zstandard.ZstdCompressor(level=3).compress(data[:half])
    long_window = zstandard.ZstdCompressionParameters.from_level(3, window_log=28)
    buffer = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=long_window).stream_writer(
            buffer, closefd=False) as writer:
        writer.write(data[half:])
    return first + buffer.getvalue()


def compressed(name: str, data: bytes) -> bytes:
    """`data` compressed as the suffix of `name` says (gzip without a timestamp: the same
    bytes every time)."""
    if name.endswith(".gz"):
        return gzip.compress(data, mtime=0)
    if name.endswith(".bz2"):
        return bz2.compress(data)
    if name.endswith(".zst"):
        return zstd_frames(data)
    return data


def cirrus_dump(pages: list[dict]) -> bytes:
    """A CirrusSearch dump's lines: an Elasticsearch bulk action line before each page, as
    Wikimedia writes them (compact JSON, non-ASCII as written)."""
    lines = []
    for number, page in enumerate(pages, 1):
        lines.append({"index": {"_type": "page", "_id": str(number)}})
        lines.append({"namespace": 0, "title": f"Page {number}", "category": [], "heading": [],
                      "timestamp": "2024-01-01T00:00:00Z", "version": number, **page})
    return "".join(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n"
                   for line in lines).encode()
