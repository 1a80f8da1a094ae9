"""Sentence-order pairs (ALBERT's SOP): two consecutive segments of one document, swapped with
probability `swap_prob` (label 1 = swapped, 0 = in order, as `sentence_order_label` in Hugging
Face's AlbertForPreTraining).

The chunks are NSP's (data/nsp.py): consecutive sentences up to a target length drawn per pair
(short_seq_prob of the time a shorter one), split at a random sentence boundary into A and B,
trimmed by truncate_pair. Where NSP gives a one-sentence chunk a random B, order has no other
document to take B from: ALBERT's script falls back to a random B there (labelled "swapped",
the same label as a swap), which teaches topic again. Here the sentence is cut in two at a
random token instead, so every pair is an order question on one text. A one-token sentence
alone in its chunk gives no pair.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from mlm_dist.data.examples import OpenDocument, Pair
from mlm_dist.data.nsp import NspPairBuilder, truncate_pair

IN_ORDER, SWAPPED = 0, 1


class SentenceOrderBuilder(NspPairBuilder):
    """Documents -> SOP pairs that fit `seq_len` tokens with [CLS] and two [SEP]s, interleaved
    across `open_documents` documents."""

    def __init__(self, seq_len: int, rng: np.random.Generator, *, short_seq_prob: float = 0.1,
                 open_documents: int = 1, swap_prob: float = 0.5):
        super().__init__(seq_len, rng, short_seq_prob=short_seq_prob,
                         open_documents=open_documents, other_docs=0)
        self.swap_prob = swap_prob

    def _opened(self, opening: list[OpenDocument]) -> None:
        pass  # B always comes from A's own document: no other documents to keep

    def _pairs(self, doc: OpenDocument) -> Iterator[Pair]:
        rng, sentences = self.rng, doc.sentences
        target = self._target_length()
        chunk: list = []
        length = 0
        for i, sentence in enumerate(sentences):
            chunk.append(sentence)
            length += len(sentence)
            if i < len(sentences) - 1 and length < target:
                continue
            if len(chunk) >= 2:
                a_end = int(rng.integers(1, len(chunk)))
                a, b = np.concatenate(chunk[:a_end]), np.concatenate(chunk[a_end:])
            elif len(sentence) >= 2:
                cut = int(rng.integers(1, len(sentence)))
                a, b = sentence[:cut], sentence[cut:]
            else:
                chunk, length = [], 0
                continue
            swapped = bool(rng.random() < self.swap_prob)
            if swapped:
                a, b = b, a
            a, b = truncate_pair(a, b, self.max_tokens, rng)
            yield Pair(a, b, SWAPPED if swapped else IN_ORDER, doc.index)
            chunk, length = [], 0
            target = self._target_length()
