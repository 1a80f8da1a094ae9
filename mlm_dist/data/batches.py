"""Examples (data/examples.py: pairs, or single segments) into fixed-shape batches: one a row
(BatchWriter), or several (PackedBatchWriter, `data.pack`), chosen by `writer_for`; `assemble`,
the one loop that feeds a writer a stream of examples, for the loader, evaluation and the
benchmarks alike; and the Batch the training step and evaluation take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from mlm_dist.data.examples import Pair
from mlm_dist.data.shards import token_ids, word_starts
from mlm_dist.model import IGNORE_INDEX, Packing
from mlm_dist.tokenizer import Vocabulary


@dataclass
class Batch:
    input_ids: torch.Tensor  # long [B, S]
    token_type_ids: torch.Tensor  # long [B, S]
    attention_mask: torch.Tensor  # long [B, S], 1 = real token
    # The objective's label of each example (NSP: is B random; SOP: swapped; mlm: 0): long [B],
    # or [B, P] packed. IGNORE_INDEX marks filler rows and empty slots: no example there.
    example_label: torch.Tensor
    word_starts: torch.Tensor  # bool [B, S], True where a token begins a word (from the shards)
    packing: Packing | None = None  # several pairs a row (data.pack)
    # Whether any row has padding, known where the batch is built: the model then needs no
    # mask at all (see `padding_mask`), and nobody has to ask the device. True when unknown.
    padded: bool = True
    # Bookkeeping for resume, not sent to the device.
    reader: int = 0
    position: tuple[int, int, int] = (0, 0, 0)
    skipped: int = 0  # documents this reader has skipped so far

    @property
    def padding_mask(self) -> torch.Tensor | None:
        """The attention mask the model takes: None when no row has padding, so that attention
        runs without a mask (on CUDA, PyTorch's SDPA can then pick FlashAttention)."""
        return self.attention_mask if self.padded else None

    def to(self, device: torch.device, non_blocking: bool = True) -> "Batch":
        return self._apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self._apply(lambda t: t.pin_memory())

    def _apply(self, move) -> "Batch":
        # Field by field, never dataclasses.astuple: it deep-copies tensors, so the copy sent
        # to the device would be a pageable duplicate of what the DataLoader pinned, and the
        # non_blocking host->device copy would run synchronously.
        p = self.packing
        packing = p and Packing(move(p.position_ids), move(p.sequence_ids),
                                move(p.cls_positions))
        return Batch(move(self.input_ids), move(self.token_type_ids),
                     move(self.attention_mask), move(self.example_label), move(self.word_starts),
                     packing, self.padded, self.reader, self.position, self.skipped)


def example_length(a: np.ndarray, b: np.ndarray | None) -> int:
    """Tokens of the example written: the segments, [CLS] and a [SEP] after each."""
    return len(a) + 2 if b is None else len(a) + len(b) + 3


class BatchWriter:
    """Packs [CLS] A [SEP] B [SEP] rows (or [CLS] A [SEP] when B is None) straight into
    preallocated batch arrays; the segments' tokens carry their word-start flags
    (shards.WORD_START), which go to their own array."""

    def __init__(self, micro_batch: int, seq_len: int, vocab: Vocabulary):
        self.micro_batch, self.seq_len = micro_batch, seq_len
        self.cls_id, self.sep_id, self.pad_id = vocab.cls, vocab.sep, vocab.pad
        self._new()

    def _new(self) -> None:
        shape = (self.micro_batch, self.seq_len)
        self.ids = np.full(shape, self.pad_id, dtype=np.int64)
        self.types = np.zeros(shape, dtype=np.int64)
        self.mask = np.zeros(shape, dtype=np.int64)
        self.labels = np.zeros(self.micro_batch, dtype=np.int64)
        self.starts = np.zeros(shape, dtype=bool)
        self.rows = 0

    def fits(self, a: np.ndarray, b: np.ndarray | None) -> bool:
        """Whether the example has room in this batch."""
        return self.rows < self.micro_batch

    def add(self, a: np.ndarray, b: np.ndarray | None, label: int) -> bool:
        """Add one example; True when the batch is full."""
        self.write(self.rows, a, b, label, 0)
        self.rows += 1
        return self.rows == self.micro_batch

    def write(self, r: int, a: np.ndarray, b: np.ndarray | None, label: int,
              start: int) -> None:
        """[CLS] a [SEP] b [SEP] (b None: [CLS] a [SEP]) into row `r` from column `start`."""
        la, s = len(a), start
        ids = self.ids[r]
        ids[s] = self.cls_id
        ids[s + 1:s + 1 + la] = token_ids(a)
        ids[s + 1 + la] = self.sep_id
        self.starts[r, s + 1:s + 1 + la] = word_starts(a)
        self.labels[r] = label
        if b is None:
            self.mask[r, s:s + 2 + la] = 1
            return
        lb = len(b)
        ids[s + 2 + la:s + 2 + la + lb] = token_ids(b)
        ids[s + 2 + la + lb] = self.sep_id
        self.starts[r, s + 2 + la:s + 2 + la + lb] = word_starts(b)
        self.types[r, s + 2 + la:s + 3 + la + lb] = 1
        self.mask[r, s:s + 3 + la + lb] = 1

    def take(self) -> Batch:
        out = Batch(*(torch.from_numpy(x)
                      for x in (self.ids, self.types, self.mask, self.labels, self.starts)),
                    padded=self.padded())
        self._new()
        return out

    def padded(self) -> bool:
        """Whether any row of the batch has padding (on the host, from the arrays)."""
        return not self.mask.all()

    def take_partial(self) -> tuple[torch.Tensor, ...]:
        """The rows added so far in a full-shape batch, the rest filler rows that count for
        nothing: `[CLS] [SEP] [SEP]` (no token to mask, attention never empty) with example
        label IGNORE_INDEX. For a pass that must end exactly where the data ends (evaluation)."""
        for r in range(self.rows, self.micro_batch):
            self.ids[r, :3] = (self.cls_id, self.sep_id, self.sep_id)
            self.mask[r, :3] = 1
            self.types[r, 2] = 1
            self.labels[r] = IGNORE_INDEX
        return self.take()


# A packed row holds at most this many pairs: static shapes for the NSP head. A pair is
# [CLS] A [SEP] B [SEP] with A and B of a sentence or more, rarely under 32 tokens.
MIN_PACKED_PAIR = 32


def pairs_per_row(seq_len: int) -> int:
    """NSP slots of a packed row of `seq_len` tokens."""
    return max(1, seq_len // MIN_PACKED_PAIR)


class PackedBatchWriter:
    """Several [CLS] A [SEP] B [SEP] pairs a row, as Graphcore's packed BERT packs them: each
    pair's positions restart at 0, its tokens carry its slot number (attention stays inside a
    pair, model.Packing) and its [CLS] gets a slot of its own for the pair classifier (NSP,
    SOP), `pairs` slots a row.

    Pairs are placed in stream order, each into the first row with room (first fit); the first
    pair that fits in no row closes the batch and opens the next. So a batch is a run of the
    stream, and "after the last pair of the batch" stays an exact resume position."""

    def __init__(self, micro_batch: int, seq_len: int, vocab: Vocabulary, pairs: int):
        self.micro_batch, self.seq_len, self.pairs = micro_batch, seq_len, pairs
        self.dense = BatchWriter(micro_batch, seq_len, vocab)  # the arrays and how a pair is written
        self._new()

    def _new(self) -> None:
        self.dense._new()
        shape, slots = (self.micro_batch, self.seq_len), (self.micro_batch, self.pairs)
        self.position_ids = np.zeros(shape, dtype=np.int64)
        self.sequence_ids = np.zeros(shape, dtype=np.int64)
        self.cls_positions = np.zeros(slots, dtype=np.int64)
        self.labels = np.full(slots, IGNORE_INDEX, dtype=np.int64)
        self.used = np.zeros(self.micro_batch, dtype=np.int64)  # tokens in each row
        self.count = np.zeros(self.micro_batch, dtype=np.int64)  # pairs in each row

    def _row_for(self, length: int) -> int:
        room = (self.used + length <= self.seq_len) & (self.count < self.pairs)
        return int(np.argmax(room)) if room.any() else -1

    def fits(self, a: np.ndarray, b: np.ndarray | None) -> bool:
        return self._row_for(example_length(a, b)) >= 0

    def add(self, a: np.ndarray, b: np.ndarray | None, label: int) -> bool:
        """Add an example that fits (see `fits`); returns False: only one that fits nowhere
        closes a batch."""
        length = example_length(a, b)
        r = self._row_for(length)
        start, slot = int(self.used[r]), int(self.count[r])
        self.dense.write(r, a, b, label, start)
        end = start + length
        self.position_ids[r, start:end] = np.arange(length)
        self.sequence_ids[r, start:end] = slot + 1
        self.cls_positions[r, slot] = start
        self.labels[r, slot] = label
        self.used[r], self.count[r] = end, slot + 1
        return False

    def take(self) -> Batch:
        d = self.dense
        batch = Batch(*(torch.from_numpy(x) for x in (d.ids, d.types, d.mask)),
                      torch.from_numpy(self.labels), torch.from_numpy(d.starts),
                      Packing(*(torch.from_numpy(x) for x in (
                          self.position_ids, self.sequence_ids, self.cls_positions))),
                      padded=d.padded())
        self._new()
        return batch


def writer_for(micro_batch: int, seq_len: int, vocab: Vocabulary, *,
               pack: bool) -> BatchWriter | PackedBatchWriter:
    """The writer of `data.pack`: several examples a row, or one."""
    if pack:
        return PackedBatchWriter(micro_batch, seq_len, vocab, pairs_per_row(seq_len))
    return BatchWriter(micro_batch, seq_len, vocab)


def assemble(examples: Iterable[tuple[Pair, tuple]], writer: BatchWriter | PackedBatchWriter, *,
             partial: bool = False) -> Iterator[tuple[Batch, tuple]]:
    """Each batch `writer` makes of `examples` ((example, position after it), as
    ReaderStream.examples yields them), with the position after its last example: where a
    resumed stream starts for the next batch. A packed batch is closed by the first example
    that fits in none of its rows, so its position is the one *before* that example, which
    then opens the next batch.

    `partial`: when the examples run out, the examples still in the writer as one more batch,
    filled up with rows that count for nothing (BatchWriter.take_partial; one example a row
    only). Without it they are dropped: the loader's streams never end."""
    previous = None  # where the stream stands after the last example in the writer
    for pair, position in examples:
        if not writer.fits(pair.a, pair.b):
            yield writer.take(), previous
        if writer.add(pair.a, pair.b, pair.label):
            yield writer.take(), position
        previous = position
    if partial and writer.rows:
        yield writer.take_partial(), previous
