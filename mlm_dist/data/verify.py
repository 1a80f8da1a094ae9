"""`mlm-dist prepare --verify DIR`: check every shard against manifest.json.

Per shard: it exists, has the listed size and sha256, and every sample decodes (with the
loader's own tar reader and decode_document) into the listed numbers of documents, sentences
and tokens. Each shard is read once: the sha256 is computed from the same bytes the tar reader
consumes. Problems are collected, never raised, so one bad shard does not hide the next.
DIR may be a URL (remote.py): each shard is then streamed once, and a connection that breaks
is reported as a problem of that shard (the loader would retry it; a check reports it).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from mlm_dist.data import remote
from mlm_dist.data.reader import DamagedTar, tar_samples
from mlm_dist.data.shards import MANIFEST_FILE, Manifest, ShardInfo, decode_document
from mlm_dist.data.workers import check_workers, ordered_map

COUNTS = ("documents", "sentences", "tokens")
MAX_SAMPLE_PROBLEMS = 5  # per shard; a shard of garbage should not print a million lines


@dataclass
class ShardCheck:
    path: Path | str  # a URL for remote shards
    problems: list[str] = field(default_factory=list)
    found: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))


def verify_shards(directory: str | Path, workers: int = 1, progress: bool = False) -> list[ShardCheck]:
    """One ShardCheck per shard listed in the manifest, in manifest order.

    A missing or malformed manifest, or one naming a path outside `directory`, is raised
    (Manifest.load): there is nothing to check shards against.
    """
    check_workers(workers)
    root = str(directory) if remote.is_remote(str(directory)) else Path(directory)
    manifest = Manifest.load(root)
    shards = [shard for split in manifest.splits.values() for shard in split]
    checks = ordered_map(partial(check_shard, root), shards, workers)
    return list(tqdm(checks, total=len(shards), desc="verify", unit=" shards", file=sys.stderr,
                     disable=None if progress else True))


def check_shard(root: Path | str, shard: ShardInfo) -> ShardCheck:
    if isinstance(root, str):
        return _check_remote_shard(root, shard)
    path = root / shard.path  # stays inside root: Manifest.load checked every path
    check = ShardCheck(path)
    try:
        stream = open(path, "rb")
    except FileNotFoundError:
        check.problems.append(f"{path}: missing (listed in {MANIFEST_FILE})")
        return check
    except OSError as e:
        check.problems.append(f"{path}: cannot be opened ({e.strerror or e})")
        return check
    with stream:
        hashing = HashingReader(stream)
        try:
            _count_samples(hashing, check)
            hashing.read_to_end()
        except OSError as e:
            check.problems.append(f"{path}: read error ({e.strerror or e})")
            return check
    return _compare(check, hashing, shard)


def _check_remote_shard(location: str, shard: ShardInfo) -> ShardCheck:
    url = remote.join(location, shard.path)  # stays inside: Manifest.load checked every path
    check = ShardCheck(remote.redacted(url))
    stream = None
    try:
        stream = remote.open_stream(url, 0, remote.StreamSettings())
        hashing = HashingReader(stream)
        _count_samples(hashing, check)
        hashing.read_to_end()
    except remote.transport_errors() as e:
        check.problems.append(f"{check.path}: cannot be read ({remote.reason(e)})")
        return check
    finally:
        if stream is not None:
            stream.close()
    return _compare(check, hashing, shard)


def _compare(check: ShardCheck, hashing: "HashingReader", shard: ShardInfo) -> ShardCheck:
    """The bytes read against the manifest's size and sha256, the samples against its counts."""
    path = check.path
    if hashing.size != shard.bytes:
        check.problems.insert(0, f"{path}: {hashing.size} bytes, {MANIFEST_FILE} says "
                                 f"{shard.bytes} (truncated or replaced)")
    elif hashing.digest.hexdigest() != shard.sha256:
        check.problems.insert(0, f"{path}: sha256 {hashing.digest.hexdigest()}, {MANIFEST_FILE} "
                                 f"says {shard.sha256} (the file is damaged or was replaced)")
    listed = {k: getattr(shard, k) for k in COUNTS}
    if check.found != listed:
        check.problems.append(f"{path}: holds " + ", ".join(f"{check.found[k]} {k}" for k in COUNTS)
                              + f"; {MANIFEST_FILE} says "
                              + ", ".join(f"{listed[k]} {k}" for k in COUNTS))
    return check


def _count_samples(stream: BinaryIO, check: ShardCheck):
    bad_samples = 0
    try:
        for sample in tar_samples(stream):
            sample["__url__"] = str(check.path)
            try:
                sentences = decode_document(sample)
            except ValueError as e:
                bad_samples += 1
                if bad_samples <= MAX_SAMPLE_PROBLEMS:
                    check.problems.append(str(e))
                continue
            check.found["documents"] += 1
            check.found["sentences"] += len(sentences)
            check.found["tokens"] += sum(len(s) for s in sentences)
    except DamagedTar as e:
        check.problems.append(f"{check.path}: damaged tar after {check.found['documents']} "
                              f"good documents ({e})")
    except (ArithmeticError, LookupError, TypeError, ValueError) as e:
        # Whatever else garbage bytes can provoke is still a finding about this shard, not a
        # reason to stop checking the others.
        check.problems.append(f"{check.path}: unreadable after {check.found['documents']} good "
                              f"documents ({type(e).__name__}: {e})")
    if bad_samples > MAX_SAMPLE_PROBLEMS:
        check.problems.append(f"{check.path}: {bad_samples - MAX_SAMPLE_PROBLEMS} more samples "
                              "do not decode")


class HashingReader:
    """A read-only stream that hashes and counts every byte read through it."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data

    def read_to_end(self):
        while self.read(1 << 20):
            pass
