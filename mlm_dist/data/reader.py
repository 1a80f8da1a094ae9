"""Reading documents out of one WebDataset shard, surviving bad data.

A missing shard, a truncated or corrupt tar and a sample whose fields do not decode are each
skipped with a warning that names the shard. What was lost is counted against the manifest's
per-shard document count, so the number is exact even when a tar breaks off halfway and we
cannot know which samples it would have held.

A shard behind a URL (remote.py) whose stream breaks or stalls is opened again at the byte
where its last whole sample ended and read on from there, so a dropped connection loses and
repeats nothing; only after data.stream_retries attempts in a row that bring no new sample
does the rest of the shard count as skipped, as for a corrupt tar.
"""

from __future__ import annotations

import logging
import time
from typing import BinaryIO, Iterator

import numpy as np

from mlm_dist.data.remote import (StreamSettings, is_remote, open_stream, reason, redacted,
                                  transport_errors)
from mlm_dist.data.shards import decode_document
from mlm_dist.errors import UserError

log = logging.getLogger("mlm_dist.data")


class BadDataError(UserError, ValueError):
    """More data was lost than the run allows (data.max_skipped_samples)."""


class SkipCounter:
    """Documents lost to bad data, by this reader, since it started."""

    def __init__(self) -> None:
        self.documents = 0

    def skip(self, count: int, shard: str, reason: str) -> None:
        if count > 0:
            self.documents += count
            log.warning("skipped %d document(s) of shard %s: %s", count, shard, reason)


class DamagedTar(Exception):
    pass


class TruncatedTar(DamagedTar):
    """The tar stops before its end: on a local disk a damaged file, in a stream what a dropped
    connection leaves behind."""


class BrokenStream(OSError):
    """A remote shard's stream failed data.stream_retries + 1 times in a row."""


def tar_members(stream: BinaryIO, offset: int = 0,
                whole: bool = False) -> Iterator[tuple[str, bytes, int]]:
    """(name, content, end) of each regular file in a tar stream, in order; `end` is the offset
    just past the member and its padding, counting from `offset`, where `stream` starts.

    A lean reader for the ustar/pax tars WebDataset's TarWriter produces: one read per header
    and one per member, much cheaper than the tarfile module, which matters when a loader
    worker must keep an accelerator fed (`mlm-dist bench data` prints its sequences/s). Headers are checksummed, so corruption
    is detected rather than parsed into garbage; long names (GNU 'L' or pax 'path') work.
    Names are only used as sample keys here: nothing is ever written to disk.

    It is also why a remote shard survives a dropped connection (fsspec and WebDataset's own
    tar readers keep no byte offsets): the exact offset where each sample ends lets a broken
    stream be opened again right after the last whole sample, by a range request, instead of
    reading the shard again from its start. `whole=True` (streams) counts an end without the
    tar's end-of-archive block as truncated: a connection cut between two members looks
    exactly like that.
    """
    long_name = None
    while True:
        header = stream.read(512)
        if len(header) < 512:
            if header or whole:
                raise TruncatedTar("truncated header" if header else
                                   "ended before the end-of-archive block")
            return  # a tar without its end-of-archive blocks: everything before is whole
        if header == b"\0" * 512:
            return  # end of archive
        try:
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
            checksum = int(header[148:156].rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            raise DamagedTar("unreadable header") from None
        if checksum != sum(header[:148]) + 256 + sum(header[156:]):
            raise DamagedTar("header checksum mismatch")
        data = stream.read(size)
        if len(data) < size:
            raise TruncatedTar("truncated member")
        padding = -size % 512  # to the next block: a tar cut inside it is damaged too
        if len(stream.read(padding)) < padding:
            raise TruncatedTar("truncated member")
        offset += 512 + size + padding
        kind = header[156:157]
        if kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
        elif kind in (b"x", b"g"):
            for record in data.decode("utf-8", "replace").splitlines():
                if " path=" in record:
                    long_name = record.split(" path=", 1)[1]
        elif kind in (b"0", b"\0"):
            name = long_name or header[:100].rstrip(b"\0").decode("utf-8", "replace")
            prefix = header[345:500].rstrip(b"\0")  # ustar prefix for names > 100 bytes
            if prefix and long_name is None:
                name = prefix.decode("utf-8", "replace") + "/" + name
            long_name = None
            yield name, data, offset


def tar_samples(stream: BinaryIO, offset: int = 0, whole: bool = False) -> Iterator[dict]:
    """WebDataset grouping: consecutive members `key.field` form one sample {field: bytes}.
    "__end__" is the offset where the sample's last member ends (see tar_members)."""
    sample: dict | None = None
    for name, data, end in tar_members(stream, offset, whole):
        base = name.rsplit("/", 1)[-1]
        if "." not in base:
            continue
        key, field = name[: len(name) - len(base)] + base.split(".", 1)[0], base.split(".", 1)[1]
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key}
        sample[field] = data
        sample["__end__"] = end
    if sample is not None:
        yield sample


def remote_samples(url: str, settings: StreamSettings,
                   size: int | None = None) -> Iterator[dict]:
    """The samples of a shard behind a URL, each once and in order, whatever breaks between.

    A transport error, a stall past data.stream_timeout or an early end opens the stream again
    where the last sample yielded ended; attempts in a row that bring no new sample are
    bounded by data.stream_retries, with a doubling wait between them, and then BrokenStream
    is raised. Corruption (a bad checksum) is not retried: reading it again reads it again."""
    offset = failures = 0
    while True:
        stream = None
        try:
            stream = open_stream(url, offset, settings, size)
            for sample in tar_samples(stream, offset, whole=True):
                offset, failures = sample["__end__"], 0
                yield sample
            return
        except Exception as e:
            if not isinstance(e, (TruncatedTar, *transport_errors())):
                raise
            failures += 1
            if failures > settings.retries:
                raise BrokenStream(f"gave up after {failures} attempt(s) in a row without a new "
                                   f"sample, the last at byte {offset}: {reason(e)}") from None
            wait = settings.backoff * 2 ** (failures - 1)
            log.warning("shard %s: the stream broke at byte %d (%s); reading on from there in "
                        "%.3g s (retry %d of %d)", redacted(url), offset, reason(e), wait,
                        failures, settings.retries)
            time.sleep(wait)
        finally:
            if stream is not None:
                _close_quietly(stream)


def _close_quietly(stream) -> None:
    """Closing a broken connection can fail again; its failure was already handled."""
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - whatever the transport raises on a dead connection
        pass


def read_documents(path: str, expected: int, modulus: int, remainder: int,
                   skips: SkipCounter,
                   streams: StreamSettings | None = None,
                   size: int | None = None) -> Iterator[list[np.ndarray]]:
    """Documents of one shard whose index (in shard order) is `remainder` mod `modulus`.

    `expected` is the shard's document count from the manifest; whatever of our share of it
    does not come out of the tar is counted as skipped. `path`: a file, or a URL read with
    `streams` (remote.py); `size`, the shard's bytes from the manifest, saves a URL's stream
    one request.
    """
    ours = len(range(remainder, expected, modulus))
    produced = 0
    stream = None
    if is_remote(path):
        samples = remote_samples(path, streams or StreamSettings(), size)
    else:
        try:
            stream = open(path, "rb")
        except OSError as e:
            skips.skip(ours, path, f"cannot open ({e.strerror or e})")
            return
        samples = tar_samples(stream)
    index = -1
    try:
        for sample in samples:
            sample["__url__"] = path
            index += 1
            if index % modulus != remainder:
                continue
            try:
                document = decode_document(sample)
            except ValueError as e:
                skips.skip(1, path, str(e))
                produced += 1  # accounted for
                continue
            produced += 1
            yield document
    except (DamagedTar, OSError) as e:  # a broken tar: everything after this point is lost
        log.warning("shard %s breaks off after %d sample(s): %s", path, index + 1, e)
    finally:
        samples.close()
        if stream is not None:
            stream.close()
    skips.skip(ours - produced, path, "missing from the tar (truncated or corrupt)")
