"""Reading documents out of one WebDataset shard, surviving bad data.

A missing shard, a truncated or corrupt tar and a sample whose fields do not decode are each
skipped with a warning that names the shard. What was lost is counted against the manifest's
per-shard document count, so the number is exact even when a tar breaks off halfway and we
cannot know which samples it would have held.
"""

from __future__ import annotations

import logging
from typing import BinaryIO, Iterator

import numpy as np

from mlm_dist.data.shards import decode_document

log = logging.getLogger("mlm_dist.data")


class BadDataError(ValueError):
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


def tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each regular file in a tar stream, in order.

    A lean reader for the ustar/pax tars WebDataset's TarWriter produces: one read per header
    and one per member, much cheaper than the tarfile module, which matters when a loader
    worker must keep an accelerator fed (`mlm-dist bench data` prints its sequences/s). Headers are checksummed, so corruption
    is detected rather than parsed into garbage; long names (GNU 'L' or pax 'path') work.
    Names are only used as sample keys here: nothing is ever written to disk.
    """
    long_name = None
    while True:
        header = stream.read(512)
        if len(header) < 512:
            if header:
                raise DamagedTar("truncated header")
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
            raise DamagedTar("truncated member")
        padding = -size % 512  # to the next block: a tar cut inside it is damaged too
        if len(stream.read(padding)) < padding:
            raise DamagedTar("truncated member")
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
            yield name, data


def tar_samples(stream: BinaryIO) -> Iterator[dict]:
    """WebDataset grouping: consecutive members `key.field` form one sample {field: bytes}."""
    sample: dict | None = None
    for name, data in tar_members(stream):
        base = name.rsplit("/", 1)[-1]
        if "." not in base:
            continue
        key, field = name[: len(name) - len(base)] + base.split(".", 1)[0], base.split(".", 1)[1]
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key}
        sample[field] = data
    if sample is not None:
        yield sample


def read_documents(path: str, expected: int, modulus: int, remainder: int,
                   skips: SkipCounter) -> Iterator[list[np.ndarray]]:
    """Documents of one shard whose index (in shard order) is `remainder` mod `modulus`.

    `expected` is the shard's document count from the manifest; whatever of our share of it
    does not come out of the tar is counted as skipped.
    """
    ours = len(range(remainder, expected, modulus))
    produced = 0
    try:
        stream = open(path, "rb")
    except OSError as e:
        skips.skip(ours, path, f"cannot open ({e.strerror or e})")
        return
    index = -1
    try:
        for sample in tar_samples(stream):
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
        log.warning("shard %s is damaged after %d sample(s): %s", path, index + 1, e)
    finally:
        stream.close()
    skips.skip(ours - produced, path, "missing from the tar (truncated or corrupt)")
