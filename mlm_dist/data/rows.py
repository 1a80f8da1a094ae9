"""Full rows of contiguous text for MLM without a pair task (RoBERTa's FULL-SENTENCES).

Each row is `[CLS] text [SEP]` with exactly seq_len - 2 tokens of text, in one segment (token
type 0). A document is cut into rows of its own contiguous text (sentences whole where they
fit; the sentence at a row's end is cut there and goes on in the document's next row, as
transformers' run_mlm.py cuts grouped texts). What is left of a document, shorter than a row,
joins the rest of other documents in a row that crosses documents, a [SEP] between them, as
RoBERTa's FULL-SENTENCES crosses them. So every row is full but the last of a work unit, on a
corpus of books and on one of one-line reviews alike.

Why not rows within documents, several per row with packing (data.pack)? A packed row has a
fixed number of slots (seq_len / 32): at 128 tokens four, so documents of 20 tokens fill 60 %
of it; and packing pays for a block-diagonal attention mask in every layer. RoBERTa found
within-document rows (DOC-SENTENCES) a little better at 512 tokens but chose FULL-SENTENCES
for the fixed batch shape, which is what a static-shape step needs too.

The rows of the open documents are interleaved as NSP pairs are (data/examples.py), so a batch
mixes documents even when each is a book.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from mlm_dist.data.examples import Document, InterleavingBuilder, OpenDocument, Pair
from mlm_dist.data.shards import WORD_START

NO_LABEL = 0  # a full row has no label of its own: MLM predicts its masked tokens only


def opening_a_word(tokens: np.ndarray) -> np.ndarray:
    """`tokens` with the first one flagged as a word start: a row cut inside a word begins one
    (whole-word masking then masks the piece the row holds as a word of its own)."""
    if len(tokens) and tokens[0] < WORD_START:
        tokens = tokens.copy()
        tokens[0] |= WORD_START
    return tokens


class FullRowBuilder(InterleavingBuilder):
    """Documents -> rows of seq_len - 2 tokens of contiguous text ([CLS] and [SEP] around)."""

    def __init__(self, seq_len: int, rng: np.random.Generator, *, sep_id: int,
                 open_documents: int = 1):
        super().__init__(rng, open_documents)
        self.row_tokens = seq_len - 2
        self.separator = np.array([sep_id | WORD_START], dtype=np.int64)
        self.carry: list[np.ndarray] = []  # the row crossing documents, being filled
        self.carried = 0  # its tokens so far

    def __call__(self, documents: Iterable[Document]) -> Iterator[Pair]:
        last = -1
        for pair in super().__call__(documents):
            last = max(last, pair.document)
            yield pair
        if self.carried:  # the end of the stream: a row that stays short
            yield Pair(np.concatenate(self.carry), None, NO_LABEL, last)
            self.carry, self.carried = [], 0

    def _pairs(self, doc: OpenDocument) -> Iterator[Pair]:
        text, n = np.concatenate(doc.sentences), self.row_tokens
        whole = len(text) // n
        for k in range(whole):
            yield Pair(opening_a_word(text[k * n:(k + 1) * n]), None, NO_LABEL, doc.index)
        if len(text) > whole * n:
            yield from self._cross(text[whole * n:], doc.index)

    def _cross(self, rest: np.ndarray, index: int) -> Iterator[Pair]:
        """A document's rest into the row crossing documents; the rows it completes (they go
        out among this document's rows)."""
        if self.carried:
            self.carry.append(self.separator)
            self.carried += 1
        self.carry.append(opening_a_word(rest))
        self.carried += len(rest)
        while self.carried >= self.row_tokens:
            tokens = np.concatenate(self.carry)
            yield Pair(tokens[:self.row_tokens], None, NO_LABEL, index)
            left = tokens[self.row_tokens:]
            if len(left) and left[0] == self.separator[0]:
                left = left[1:]  # a row never opens with the separator of the row before
            self.carry = [opening_a_word(left)] if len(left) else []
            self.carried = len(left)
