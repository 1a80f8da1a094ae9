"""Corpus → token-id shards: the `mlm-dist prepare` step.

Documents stream through: read (corpus.CorpusReader) in this process, tokenized in batches on
`workers` processes (results taken back in order, so the shards are byte-identical whatever the
number of workers), assigned to train or valid, shuffled in a bounded buffer, written into
numbered tar shards. Memory holds a few batches and the shuffle buffer, never the corpus. Each shard is written as `<name>.tmp` and renamed once
complete, and the manifest is written last, so a directory with a manifest is always whole; a
failed run removes what it wrote.

With --num-partitions P --partition-index i only partition i of the input files is read, and
names carry the partition (see partitions.py) so that P jobs can share one --out directory.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

from mlm_dist.data.corpus import CorpusReader, check_readable, resolve_inputs
from mlm_dist.data.encoding import DocumentEncoder, EncodedDocument, document_batches
from mlm_dist.data.formats import TEXT_FIELD, CorpusError
from mlm_dist.data.partitions import (check_out_dir, check_partition, inputs_sha256,
                                      partial_manifest_name, partition_file_indices, shard_prefix)
from mlm_dist.data.shards import (MANIFEST_FILE, Manifest, PrepareInfo, ShardInfo, TokenizerInfo,
                                  document_key, encode_sample, tar_end, token_dtype)
from mlm_dist.data.words import check_language
from mlm_dist.data.workers import check_workers, ordered_map
from mlm_dist.errors import UsageError
from mlm_dist.tokenizer import Tokenizer

SPLITS = ("train", "valid")
T = TypeVar("T")


def prepare_shards(
    inputs: Iterable[str | Path] | str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    docs_per_shard: int = 2000,
    valid_fraction: float = 0.02,
    seed: int = 0,
    workers: int = 1,
    num_partitions: int = 1,
    partition_index: int = 0,
    progress: bool = False,
    lang: str = "en",
    shuffle_mb: int = 512,
    text_field: str = TEXT_FIELD,
) -> Manifest:
    """Tokenize `inputs` into train/valid shards in `out_dir`; return the manifest (it has the stats).

    `inputs` are files, directories and glob patterns (corpus.resolve_inputs). Each document
    goes to valid with probability `valid_fraction`, by a draw seeded with `seed` and the
    document's identity (its file's place in the input list, its place in the file), so the
    split of a document does not depend on the number of workers or partitions.
    `lang` ("en", "ja", "zh", …, or "auto": per document) chooses how JSONL and Parquet text is
    split into sentences and how word boundaries are found (data/words.py). `text_field` names
    the field of a JSON-lines or Parquet record that holds its text (dotted for nested ones).
    Documents reach the shards through a shuffle buffer of `shuffle_mb` MB (shuffled_documents).
    """
    out = Path(out_dir)
    _check_options(docs_per_shard, valid_fraction, seed, shuffle_mb)
    check_workers(workers)
    check_partition(num_partitions, partition_index)
    lang = check_language(lang)
    all_files = resolve_inputs(inputs)
    file_indices = partition_file_indices(len(all_files), num_partitions, partition_index)
    files = [all_files[k] for k in file_indices]
    check_readable(files, text_field)
    check_out_dir(out, num_partitions, partition_index)
    tokenizer = Tokenizer.load(tokenizer_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    partition = partition_index if num_partitions > 1 else None
    out.mkdir(parents=True, exist_ok=True)

    writers = {split: SplitWriter(out, shard_prefix(split, partition), docs_per_shard)
               for split in SPLITS}
    bar = tqdm(desc="prepare", unit=" docs", file=sys.stderr, dynamic_ncols=True,
               disable=None if progress else True)  # None: only when stderr is a terminal
    reader = CorpusReader(files, file_indices, report=lambda line: bar.write(line, file=sys.stderr),
                          lang=lang, text_field=text_field)
    try:
        batches = ordered_map(DocumentEncoder(Path(tokenizer.path).parent, dtype),
                              document_batches(reader.documents()), workers)
        with bar, closing(batches):
            documents = _counted(batches, bar, reader)
            drawn = ((split_of(doc, seed, valid_fraction), (index, doc))
                     for index, doc in enumerate(documents))
            shuffled = shuffled_documents(assign_splits(drawn, valid_fraction),
                                          shuffle_mb * 2**20, random.Random(f"{seed}/{partition}"))
            for split, (index, doc) in shuffled:
                writers[split].write(document_key(index, partition), doc)
        for writer in writers.values():
            writer.close()
        if partition is None and not writers["train"].shards:
            raise CorpusError(f"no document in {_named(files)} has any text"
                              + _missing_text_hint(reader) + "; inputs must be text (one "
                              "sentence a line, blank line between documents), JSON lines or "
                              "Parquet with a text field (--text-field), optionally compressed")
        manifest = Manifest(
            tokenizer=TokenizerInfo(sha256=tokenizer.sha256, vocab_size=tokenizer.vocab_size,
                                    path=str(Path(tokenizer.path).resolve().parent)),
            dtype=dtype.name,
            splits={split: writer.shards for split, writer in writers.items()},
            prepare=PrepareInfo(files=len(files), inputs_sha256=inputs_sha256(all_files),
                                seed=seed, valid_fraction=float(valid_fraction),
                                invalid_utf8=sum(reader.invalid_utf8.values()),
                                invalid_utf8_files=len(reader.invalid_utf8),
                                num_partitions=num_partitions, partition=partition,
                                lang=lang, shuffle_mb=shuffle_mb, text_field=text_field,
                                missing_text=sum(reader.missing_text.values()),
                                missing_text_files=len(reader.missing_text)),
        )
        manifest.save(out, MANIFEST_FILE if partition is None
                      else partial_manifest_name(partition, num_partitions))
    except BaseException:
        # Half a shard set is useless and would make the next attempt refuse this directory.
        for writer in writers.values():
            writer.discard()
        raise
    return manifest


def _check_options(docs_per_shard: int, valid_fraction: float, seed: int, shuffle_mb: int):
    """Every mistake we can see up front is reported before a single document is tokenized."""
    if isinstance(shuffle_mb, bool) or not isinstance(shuffle_mb, int) or shuffle_mb < 0:
        raise UsageError(f"shuffle_mb (--shuffle-mb) must be an integer >= 0 (0: keep the corpus "
                         f"order), got {shuffle_mb!r}")
    if isinstance(docs_per_shard, bool) or not isinstance(docs_per_shard, int) or docs_per_shard < 1:
        raise UsageError(f"docs_per_shard must be a positive integer, got {docs_per_shard!r}")
    if not 0.0 <= valid_fraction < 1.0:
        raise UsageError(f"valid_fraction must be in [0, 1), got {valid_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"seed must be an integer, got {seed!r}")


def _missing_text_hint(reader: CorpusReader) -> str:
    missing = sum(reader.missing_text.values())
    return (f" ({missing} records have no field {reader.text_field!r})" if missing else "")


def _named(files: list[Path]) -> str:
    return ", ".join(map(str, files[:3])) + (f" and {len(files) - 3} more files" if len(files) > 3 else "")


def _counted(batches: Iterator[list[EncodedDocument]], bar: tqdm,
             reader: CorpusReader) -> Iterator[EncodedDocument]:
    """The documents of each batch, counted on the progress bar (documents/s and tokens/s)."""
    tokens, start = 0, time.monotonic()
    for batch in batches:
        yield from batch
        tokens += sum(doc.tokens for doc in batch)
        rate = tokens / max(time.monotonic() - start, 1e-9)
        bar.set_postfix_str(f"{rate:,.0f} tokens/s, file {reader.files_opened}/{len(reader.files)}",
                            refresh=False)
        bar.update(len(batch))


# ----------------------------------------------------------------------------- train / valid

def split_of(document: EncodedDocument, seed: int, valid_fraction: float) -> str:
    """The split a document draws: a hash of (seed, file index, index in file), so uniform and
    independent of anything but the document (unlike a stream of draws, which would depend on
    how many documents came before it in this partition)."""
    digest = hashlib.blake2b(f"{seed}/{document.file_index}/{document.index}".encode(),
                             digest_size=8).digest()
    return "valid" if int.from_bytes(digest, "little") < valid_fraction * 2.0**64 else "train"


def assign_splits(drawn: Iterable[tuple[str, T]], valid_fraction: float) -> Iterator[tuple[str, T]]:
    """Pass on (split, document) as drawn, except where a split would end up empty.

    Two guarantees on top of the draws: train is never empty, and when valid_fraction > 0 and
    there are two or more documents, valid is not either. Only a stream in which every draw
    chose the same split needs a fix, so while that is so the latest document is held back; if
    the stream ends that way, the held document goes to the other split (to valid only when
    valid_fraction > 0 and there are two or more documents).
    """
    drawn = iter(drawn)
    held = next(drawn, None)  # (split, document): the latest, while all draws chose one split
    if held is None:
        return
    same = 1
    for split, document in drawn:
        yield held
        if split != held[0]:  # both splits have a document: nothing left to guarantee
            yield split, document
            yield from drawn
            return
        held, same = (split, document), same + 1
    split, document = held
    if split == "valid":
        split = "train"
    elif valid_fraction > 0 and same >= 2:
        split = "valid"
    yield split, document


# ----------------------------------------------------------------------------- shuffling

def shuffled_documents(documents: Iterable[tuple[str, tuple[int, EncodedDocument]]],
                       capacity: int, rng: random.Random
                       ) -> Iterator[tuple[str, tuple[int, EncodedDocument]]]:
    """(split, (index, document)) in a random order, through a buffer of `capacity` bytes.

    Corpora come in an order that means something (a dump sorted by title, one source after
    another, the chapters of a book series), and a shard written in that order holds one
    region of the corpus. The loader reads one shard at a time per reader, so a rank's batches
    would follow that region for thousands of steps while validation samples the whole corpus,
    and the validation loss lags (README, "bench convergence"). Google and Hugging Face shuffle
    the whole corpus; a stream cannot, so every shard takes its documents from a window as
    large as `capacity` (a corpus smaller than the buffer is shuffled whole). Bounded by bytes,
    not documents: one book weighs as much as thousands of reviews. Seeded and fed in input
    order, so the shards stay the same whatever the number of workers. capacity 0 keeps the
    corpus order.
    """
    buffer: list = []
    held = 0
    for item in documents:
        buffer.append(item)
        held += _weight(item)
        while held > capacity and buffer:
            # Swap a random document to the end and emit it: O(1), order of the rest kept.
            k = rng.randrange(len(buffer))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            out = buffer.pop()
            held -= _weight(out)
            yield out
    rng.shuffle(buffer)
    yield from buffer


def _weight(item: tuple[str, tuple[int, EncodedDocument]]) -> int:
    return sum(len(v) for v in item[1][1].fields.values())


# ----------------------------------------------------------------------------- writing

class SplitWriter:
    """Writes one split's documents into numbered shards of at most `docs_per_shard` documents."""

    def __init__(self, out_dir: Path, prefix: str, docs_per_shard: int):
        self.out_dir = out_dir
        self.prefix = prefix  # "train", or "train-p00003" for partition 3
        self.docs_per_shard = docs_per_shard
        self.shards: list[ShardInfo] = []
        self.written: list[Path] = []  # every file this writer created, finished or not
        self._file = None
        self._sha256 = None
        self._size = 0
        self._counts = {}

    def write(self, key: str, document: EncodedDocument):
        if self._file is None:
            self._open_shard()
        self._append(encode_sample(key, document.fields))
        self._counts["documents"] += 1
        self._counts["sentences"] += document.sentences
        self._counts["tokens"] += document.tokens
        if self._counts["documents"] >= self.docs_per_shard:
            self._close_shard()

    def close(self):
        if self._file is not None:
            self._close_shard()

    def discard(self):
        """Remove everything this writer created (used when the run fails)."""
        if self._file is not None:
            self._file.close()
        for path in self.written:
            path.unlink(missing_ok=True)

    def _shard_name(self) -> str:
        return f"{self.prefix}-{len(self.shards):06d}.tar"

    def _open_shard(self):
        tmp = self.out_dir / (self._shard_name() + ".tmp")
        self.written.append(tmp)
        self._file = open(tmp, "wb")
        # Hashed as written: reading every shard back would double the I/O of a big corpus.
        self._sha256 = hashlib.sha256()
        self._size = 0
        self._counts = {"documents": 0, "sentences": 0, "tokens": 0}

    def _append(self, data: bytes):
        self._file.write(data)
        self._sha256.update(data)
        self._size += len(data)

    def _close_shard(self):
        self._append(tar_end(self._size))
        self._file.flush()
        # On disk before the rename, so a crash cannot leave a finished name over unwritten data.
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        name = self._shard_name()
        tmp, final = self.out_dir / (name + ".tmp"), self.out_dir / name
        tmp.replace(final)
        self.written.append(final)
        self.shards.append(ShardInfo(path=name, sha256=self._sha256.hexdigest(), bytes=self._size,
                                     **self._counts))
