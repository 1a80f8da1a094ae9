"""Corpus → token-id shards: the `mlm-dist prepare` step.

Documents stream through: read (corpus.iter_documents), tokenized a batch of sentences at a
time, assigned to train or valid, written into numbered tar shards. Memory holds one batch, never
the corpus. Each shard is written as `<name>.tmp` and renamed once complete, and manifest.json is
written last, so a directory with a manifest is always whole; a failed run removes what it wrote.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds

from mlm_dist.data.corpus import iter_documents
from mlm_dist.data.shards import (MANIFEST_FILE, Manifest, ShardInfo, TokenizerInfo, document_key,
                                  encode_document, file_sha256, token_dtype)
from mlm_dist.tokenizer import Tokenizer

# Sentences handed to SentencePiece per call: large enough to amortize the call, small enough
# that memory stays a few MB whatever the corpus size.
TOKENIZE_BATCH_SENTENCES = 8192
SPLITS = ("train", "valid")


def prepare_shards(
    inputs: list[str | Path],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    docs_per_shard: int = 2000,
    valid_fraction: float = 0.02,
    seed: int = 0,
) -> Manifest:
    """Tokenize `inputs` into train/valid shards in `out_dir`; return the manifest (it has the stats).

    Each document goes to valid with probability `valid_fraction`, drawn from a generator seeded
    with `seed`, so the same inputs always give the same split and the same shard bytes.
    """
    inputs = [Path(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    out = Path(out_dir)
    _check_arguments(inputs, out, docs_per_shard, valid_fraction)
    tokenizer = Tokenizer.load(tokenizer_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    out.mkdir(parents=True, exist_ok=True)

    writers = {split: SplitWriter(out, split, dtype, docs_per_shard) for split in SPLITS}
    try:
        documents = tokenized_documents(iter_documents(inputs), tokenizer)
        for split, index, sentences in assign_splits(documents, valid_fraction, seed):
            writers[split].write(index, sentences)
        for writer in writers.values():
            writer.close()
        if not writers["train"].shards:
            raise ValueError(f"no document in {', '.join(map(str, inputs))} has any text; inputs must "
                             "be .txt (one sentence a line, blank line between documents) or "
                             '.jsonl ({"text": ...} per line)')
        manifest = Manifest(
            tokenizer=TokenizerInfo(sha256=tokenizer.sha256, vocab_size=tokenizer.vocab_size,
                                    path=str(Path(tokenizer.path).resolve().parent)),
            dtype=dtype.name,
            splits={split: writer.shards for split, writer in writers.items()},
        )
        manifest.save(out)
    except BaseException:
        # Half a shard set is useless and would make the next attempt refuse this directory.
        for writer in writers.values():
            writer.discard()
        raise
    return manifest


def _check_arguments(inputs: list[Path], out: Path, docs_per_shard: int, valid_fraction: float):
    """Every mistake we can see up front is reported before a single document is tokenized."""
    if not inputs:
        raise ValueError("no inputs given; pass at least one --input file (.txt or .jsonl)")
    for path in inputs:
        if not path.is_file():
            raise FileNotFoundError(f"input {path} does not exist or is not a file")
    if isinstance(docs_per_shard, bool) or not isinstance(docs_per_shard, int) or docs_per_shard < 1:
        raise ValueError(f"docs_per_shard must be a positive integer, got {docs_per_shard!r}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction!r}")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a directory for the shards")
    if (out / MANIFEST_FILE).exists() or any(out.glob("*.tar")):
        raise FileExistsError(f"{out} already holds shards; choose a new --out directory "
                              "(shards are never overwritten)")


def tokenized_documents(documents: Iterable[list[str]], tokenizer: Tokenizer) -> Iterator[list[list[int]]]:
    """Each document as token ids per sentence; empty sentences and empty documents dropped."""
    batch: list[list[str]] = []
    batch_sentences = 0
    for document in documents:
        batch.append(document)
        batch_sentences += len(document)
        if batch_sentences >= TOKENIZE_BATCH_SENTENCES:
            yield from _encode_documents(batch, tokenizer)
            batch, batch_sentences = [], 0
    yield from _encode_documents(batch, tokenizer)


def _encode_documents(documents: list[list[str]], tokenizer: Tokenizer) -> Iterator[list[list[int]]]:
    if not documents:
        return
    ids = tokenizer.encode_batch([s for document in documents for s in document])
    start = 0
    for document in documents:
        sentences = [s for s in ids[start:start + len(document)] if s]
        start += len(document)
        if sentences:
            yield sentences


def assign_splits(documents: Iterable, valid_fraction: float, seed: int) -> Iterator[tuple[str, int, list]]:
    """Yield (split, document index, document), deciding each document with one seeded draw.

    Two guarantees on top of the draws: the first document always goes to train (so train is
    never empty), and when valid_fraction > 0 and there are two or more documents, valid gets at
    least one. For the second, while valid is still empty the latest train document is held back
    one step; if the stream ends with valid empty, that held document goes to valid instead.
    """
    rng = np.random.default_rng(seed)
    held = None  # (index, document) of the latest train document, while valid is empty
    valid_seen = False
    for index, document in enumerate(documents):
        draws_valid = rng.random() < valid_fraction  # drawn for every document: stable sequence
        if index > 0 and draws_valid:
            if held is not None:
                yield ("train", *held)
                held = None
            valid_seen = True
            yield "valid", index, document
        elif index > 0 and valid_fraction > 0 and not valid_seen:
            if held is not None:
                yield ("train", *held)
            held = (index, document)
        else:
            yield "train", index, document
    if held is not None:
        yield ("valid", *held)


class SplitWriter:
    """Writes one split's documents into numbered shards of at most `docs_per_shard` documents."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, docs_per_shard: int):
        self.out_dir = out_dir
        self.split = split
        self.dtype = dtype
        self.docs_per_shard = docs_per_shard
        self.shards: list[ShardInfo] = []
        self.written: list[Path] = []  # every file this writer created, finished or not
        self._file = None
        self._tar = None
        self._counts = {}

    def write(self, index: int, sentences: list[list[int]]):
        if self._tar is None:
            self._open_shard()
        self._tar.write({"__key__": document_key(index), **encode_document(sentences, self.dtype)})
        self._counts["documents"] += 1
        self._counts["sentences"] += len(sentences)
        self._counts["tokens"] += sum(len(s) for s in sentences)
        if self._counts["documents"] >= self.docs_per_shard:
            self._close_shard()

    def close(self):
        if self._tar is not None:
            self._close_shard()

    def discard(self):
        """Remove everything this writer created (used when the run fails)."""
        if self._file is not None:
            self._file.close()
        for path in self.written:
            path.unlink(missing_ok=True)

    def _shard_name(self) -> str:
        return f"{self.split}-{len(self.shards):06d}.tar"

    def _open_shard(self):
        tmp = self.out_dir / (self._shard_name() + ".tmp")
        self.written.append(tmp)
        self._file = open(tmp, "wb")
        # mtime=0: the same corpus gives byte-identical shards, hence the same sha256.
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0)
        self._counts = {"documents": 0, "sentences": 0, "tokens": 0}

    def _close_shard(self):
        self._tar.close()
        self._file.flush()
        # On disk before the rename, so a crash cannot leave a finished name over unwritten data.
        os.fsync(self._file.fileno())
        self._file.close()
        self._tar = self._file = None
        name = self._shard_name()
        tmp, final = self.out_dir / (name + ".tmp"), self.out_dir / name
        tmp.replace(final)
        self.written.append(final)
        self.shards.append(ShardInfo(path=name, sha256=file_sha256(final),
                                     bytes=final.stat().st_size, **self._counts))
