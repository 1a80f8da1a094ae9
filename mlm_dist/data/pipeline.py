"""Shards -> fixed-shape batches, one loader per rank, resumable to the exact batch.

Readers. A rank with W dataloader workers runs W readers; the R = ranks x W readers of the job
split the data among themselves. Every epoch each reader is dealt its *work units* from a
seeded permutation of the shards: whole shards when there are at least R of them, otherwise a
1/k slice of one shard (every k-th document), so any number of readers can share any number of
shards. Each reader's stream is infinite (epoch after epoch), so every rank always has a next
batch: training is counted in steps and nothing ever waits at an epoch boundary.

Examples. What a row holds is the objective's choice: its example builder (data/examples.py;
NSP pairs by default, the `bert` objective's) turns a unit's documents into examples.

Mixing. Inside a work unit the documents are shuffled and their examples interleaved across
`data.open_documents` documents at a time (examples.py), so a micro-batch holds examples of
many documents even when each document is a book.

Determinism. Inside a work unit everything random (document shuffle, pairing) is seeded by
(seed, epoch, reader, unit), and nothing is carried from one unit to the next. So a reader's
position is three integers, (epoch, unit, examples already emitted from it), and restoring it
skips whole shards unread and regenerates only the current unit. Each batch carries the
position its reader reached; the loader keeps the position of the last batch consumed from
every reader, which is what a checkpoint saves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mlm_dist.config import ConfigError, DataConfig
from mlm_dist.data.batches import Batch, assemble, writer_for
from mlm_dist.data.examples import ExampleBuilder, Pair
from mlm_dist.data.loader_workers import START_METHOD, prepare_worker, start_workers
from mlm_dist.data.nsp import nsp_pairs
from mlm_dist.data.reader import SkipCounter, read_documents
from mlm_dist.data.remote import StreamSettings, shard_location
from mlm_dist.data.shards import Manifest, ShardFormatError
from mlm_dist.tokenizer import Vocabulary


@dataclass(frozen=True)
class Shard:
    path: str
    documents: int  # from the manifest
    bytes: int | None = None  # from the manifest


def manifest_shards(directory: str | Path, split: str = "train") -> list[Shard]:
    """The shards of a split as the manifest in `directory` lists them, read now (a training
    run takes them from the manifest its pre-flight read: split_shards)."""
    return split_shards(Manifest.load(directory), directory, split)


def split_shards(manifest: Manifest, location: str | Path, split: str = "train") -> list[Shard]:
    """The shards of a split of the `manifest` read from `location`. A missing file is not an
    error here: the reader skips it with a warning and counts its documents (see reader.py).
    `location` may be a URL (remote.py): then each shard's path is a URL too."""
    if split not in manifest.splits or not manifest.splits[split]:
        raise ShardFormatError(f"data.shards: {location} has no {split!r} shards; "
                               "re-run `mlm-dist prepare`")
    return [Shard(shard_location(location, s.path), s.documents, s.bytes)
            for s in manifest.splits[split]]


@dataclass(frozen=True)
class Consumed:
    """Shards (indices into the shard list) already read in `epoch` by an earlier topology."""
    epoch: int
    shards: frozenset


@dataclass(frozen=True)
class WorkUnit:
    shards: tuple[Shard, ...]  # read one after the other, their documents' pairs mixed together
    modulus: int  # this unit is the documents whose index % modulus == remainder
    remainder: int


def work_units(shards: list[Shard], epoch: int, seed: int, *, reader: int, readers: int,
               consumed: Consumed | None = None, documents: int = 1) -> list[WorkUnit]:
    """What one reader reads in one epoch. Over all readers: every document exactly once
    (less the shards already consumed in that epoch by a run on another number of ranks).

    A reader's shards are joined into units of at least `documents` documents (the run's
    data.open_documents): pairs are mixed within a unit, so a corpus of books cut into small
    shards still mixes as many books as one of short documents."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    if consumed is not None and epoch == consumed.epoch:
        order = np.array([i for i in order if i not in consumed.shards], dtype=np.int64)
        if len(order) == 0:
            return []
    n = len(order)
    if n >= readers:
        units, unit = [], []
        for i in order[reader::readers]:
            unit.append(shards[i])
            if sum(s.documents for s in unit) >= documents:
                units.append(WorkUnit(tuple(unit), 1, 0))
                unit = []
        if unit and units:  # a short rest joins the last unit rather than mixing poorly alone
            units[-1] = WorkUnit(units[-1].shards + tuple(unit), 1, 0)
        elif unit:
            units.append(WorkUnit(tuple(unit), 1, 0))
        return units
    # Fewer shards than readers: readers r, r+n, r+2n, ... share shard order[r % n].
    sharing = len(range(reader % n, readers, n))
    return [WorkUnit((shards[order[reader % n]],), sharing, reader // n)]


@dataclass
class ReaderStream:
    """One reader's infinite stream of examples, startable at any saved position. `vocab`:
    the shards' (a builder may write special tokens: full rows separate documents by [SEP])."""

    shards: list[Shard]
    reader: int
    readers: int
    seq_len: int
    seed: int
    data: DataConfig
    consumed: Consumed | None = None
    skips: SkipCounter = field(default_factory=SkipCounter)
    examples_of: ExampleBuilder = nsp_pairs
    vocab: Vocabulary | None = None

    def examples(self, start: tuple[int, int, int] = (0, 0, 0),
                 epochs: int | None = None) -> Iterator[tuple[Pair, tuple[int, int, int]]]:
        """Yield (pair, position after this pair); forever, or for `epochs` epochs."""
        epoch, unit_index, offset = start
        while epochs is None or epoch < epochs:
            units = work_units(self.shards, epoch, self.seed, reader=self.reader,
                               readers=self.readers, consumed=self.consumed,
                               documents=self.data.open_documents)
            for u in range(unit_index, len(units)):
                skip = offset if u == unit_index else 0
                emitted = 0
                for pair in self._unit_examples(units[u], epoch, u):
                    emitted += 1
                    if emitted > skip:
                        yield pair, (epoch, u, emitted)
            epoch, unit_index, offset = epoch + 1, 0, 0

    def _unit_examples(self, unit: WorkUnit, epoch: int, u: int):
        rng = np.random.default_rng([self.seed, epoch, self.reader, u])
        documents = (document for shard in unit.shards
                     for document in read_documents(shard.path, shard.documents, unit.modulus,
                                                    unit.remainder, self.skips,
                                                    StreamSettings.of(self.data), shard.bytes))
        builder = self.examples_of(self.seq_len, rng, self.data, self.vocab)
        return builder(shuffled(documents, self.data.shuffle_buffer, rng))


def shuffled(items: Iterator, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """A streaming shuffle: hold `buffer_size` items, emit a random one as each new one arrives."""
    buffer: list = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]  # swap-remove: O(1) pop
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


@dataclass(frozen=True)
class LoaderSettings:
    """What one rank's stream of batches is made of, fixed for a phase: built once by whoever
    asks for a loader and handed down to the stream its workers run. `vocab`: of the tokenizer
    the shards were made with; `examples_of`: the objective's example builder
    (Objective.example_builder)."""

    shards: list[Shard]
    seq_len: int
    micro_batch: int
    rank: int
    world_size: int
    seed: int
    data: DataConfig
    vocab: Vocabulary
    examples_of: ExampleBuilder = nsp_pairs

    @property
    def workers(self) -> int:
        """Readers per rank: one per dataloader worker, one when the rank reads itself."""
        return max(1, self.data.num_workers)

    @property
    def readers(self) -> int:
        """Readers of the whole job, among which the shards are dealt."""
        return self.world_size * self.workers


class PretrainingStream(torch.utils.data.IterableDataset):
    """The batches of one rank; each dataloader worker runs one reader."""

    def __init__(self, settings: LoaderSettings, *, positions: dict[int, tuple[int, int, int]],
                 worker_offset: int, consumed: Consumed | None):
        self.settings = settings
        self.positions = positions
        self.worker_offset = worker_offset
        self.consumed = consumed

    def __iter__(self) -> Iterator[Batch]:
        s = self.settings
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        # The DataLoader always asks worker 0 first; after a resume the next batch is due from
        # worker (batches consumed % W), so worker w plays that role. See ResumableLoader.
        role = (worker + self.worker_offset) % s.workers
        reader = s.rank * s.workers + role
        stream = ReaderStream(s.shards, reader, s.readers, s.seq_len, s.seed, s.data,
                              self.consumed, examples_of=s.examples_of, vocab=s.vocab)
        writer = writer_for(s.micro_batch, s.seq_len, s.vocab, pack=s.data.pack)
        examples = stream.examples(self.positions.get(reader, (0, 0, 0)))
        for batch, position in assemble(examples, writer):
            batch.reader, batch.position = reader, position
            batch.skipped = stream.skips.documents
            yield batch


class ResumableLoader:
    """Iterator of Batches for one rank with a state_dict() that restores the exact stream.

    The state is the position of every reader of this rank after the last batch *consumed*
    (prefetched batches do not count), plus the number of batches consumed.
    """

    def __init__(self, settings: LoaderSettings, *, pin_memory: bool = False,
                 state: dict | None = None):
        """state: a state_dict() to resume from (None: from the start)."""
        if not settings.shards:
            raise ShardFormatError("data.shards: the manifest lists no train shards")
        state = state or {}
        self.positions = {int(k): tuple(v) for k, v in state.get("positions", {}).items()}
        self.batches = int(state.get("batches", 0))
        self.skipped = {int(k): v for k, v in state.get("skipped", {}).items()}
        self.signature = {"seed": settings.seed, "readers": settings.readers,
                          "shards": len(settings.shards),
                          "open_documents": settings.data.open_documents}
        if state and state.get("signature") != self.signature:
            raise ConfigError(
                f"the saved data position was made with {state.get('signature')} and this run "
                f"has {self.signature}; resume with the same seed, shards, ranks, "
                "data.open_documents and "
                "data.num_workers")
        consumed = state.get("consumed")
        self.consumed = consumed and Consumed(consumed["epoch"], frozenset(consumed["shards"]))
        stream = PretrainingStream(settings, positions=self.positions,
                                   worker_offset=self.batches % settings.workers,
                                   consumed=self.consumed)
        num_workers = settings.data.num_workers
        self.loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
            prefetch_factor=4 if num_workers > 0 else None,
            # Its own generator: creating a loader must not advance the global torch RNG that
            # dropout draws from, or a resumed run would drift from the uninterrupted one.
            generator=torch.Generator().manual_seed(settings.seed),
            worker_init_fn=prepare_worker,
            multiprocessing_context=START_METHOD if num_workers > 0 else None)
        self.iterator = start_workers(self.loader)
        self.skipped_base = dict(self.skipped)

    def __iter__(self) -> "ResumableLoader":
        return self

    def __next__(self) -> Batch:
        batch = next(self.iterator)
        self.positions[batch.reader] = batch.position
        # A reader's skip count restarts at 0 with the process; add what it had before.
        self.skipped[batch.reader] = self.skipped_base.get(batch.reader, 0) + batch.skipped
        self.batches += 1
        return batch

    @property
    def skipped_documents(self) -> int:
        return sum(self.skipped.values())

    def close(self) -> None:
        """Stop the workers now, in order. Dropping the iterator shuts them down through their
        queues; left to interpreter exit, multiprocessing would SIGTERM them instead, which
        they ignore (loader_workers.STOP_SIGNALS), and wait forever."""
        self.iterator = self.loader = None

    def state_dict(self) -> dict:
        state = {"positions": {str(k): list(v) for k, v in self.positions.items()},
                 "batches": self.batches,
                 "skipped": {str(k): v for k, v in self.skipped.items()},
                 "signature": self.signature}
        if self.consumed is not None:
            state["consumed"] = {"epoch": self.consumed.epoch,
                                 "shards": sorted(int(i) for i in self.consumed.shards)}
        return state


def carry_to_next_unit(state: dict) -> dict:
    """A loader state moved to the start of each reader's next work unit: how the data position
    crosses into a phase with another sequence length (its examples are built differently)."""
    positions = {k: [epoch, unit + 1, 0] for k, (epoch, unit, _) in state["positions"].items()}
    return {**state, "positions": positions}


def regroup(states: list[dict], shards: list[Shard], world_size: int, num_workers: int) -> dict:
    """The data position of a run on other ranks, for this run's readers, at shard granularity.

    Readers are dealt shards differently when their number changes, so positions cannot carry
    over one by one. Instead: find the earliest epoch any old reader was in, collect every shard
    an old reader had started or finished in that epoch, and let the new readers share the rest
    of that epoch. A shard that was partly read is not read again: nothing is repeated, at the
    cost of the unread rest of at most one shard per old reader.
    """
    signature = states[0]["signature"]
    seed, old_readers, grouped = (signature["seed"], signature["readers"],
                                  signature["open_documents"])
    positions = {int(k): v for st in states for k, v in st["positions"].items()}
    at = {r: positions.get(r, (0, 0, 0)) for r in range(old_readers)}
    epoch = min(e for e, _, _ in at.values())
    previous = states[0].get("consumed")
    earlier = (Consumed(previous["epoch"], frozenset(previous["shards"]))
               if previous else None)
    index = {s.path: i for i, s in enumerate(shards)}
    consumed = set(earlier.shards) if earlier and earlier.epoch == epoch else set()
    for r, (e, unit, offset) in at.items():
        units = work_units(shards, epoch, seed, reader=r, readers=old_readers, consumed=earlier,
                           documents=grouped)
        done = units if e > epoch else units[:unit + (1 if offset else 0)]
        consumed.update(index[s.path] for u in done for s in u.shards)
    readers = world_size * max(1, num_workers)
    return {"positions": {str(r): [epoch, 0, 0] for r in range(readers)},
            "batches": 0, "skipped": {},
            "signature": {"seed": seed, "readers": readers, "shards": len(shards),
                          "open_documents": grouped},
            "consumed": {"epoch": epoch, "shards": sorted(consumed)}}
