"""Next-sentence-prediction pairs, built the way BERT's create_pretraining_data.py builds them.

From a document, consecutive sentences fill a target length; the chunk is split at a random
sentence boundary into segment A and segment B. With probability 1/2, B is replaced by text from
another document (label 1 = random, 0 = actual next, as in Hugging Face's `next_sentence_label`).
Pairs are built at whatever seq_len the current phase asks for, so shards never depend on it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from mlm_dist.tokenizer import CLS_ID, PAD_ID, SEP_ID

Document = list  # list of 1-D int arrays, one per sentence

IS_NEXT, IS_RANDOM = 0, 1


@dataclass
class Example:
    input_ids: np.ndarray  # int32 [seq_len]
    token_type_ids: np.ndarray  # int8 [seq_len]
    attention_mask: np.ndarray  # int8 [seq_len]
    nsp_label: int


def truncate_pair(a: list, b: list, max_tokens: int, rng: np.random.Generator) -> None:
    """Trim the longer segment, one token at a time from a random end (BERT's truncate_seq_pair)."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def pack_example(a: list, b: list, label: int, seq_len: int) -> Example:
    ids = np.full(seq_len, PAD_ID, dtype=np.int32)
    types = np.zeros(seq_len, dtype=np.int8)
    n_a, n_b = len(a), len(b)
    ids[0] = CLS_ID
    ids[1:1 + n_a] = a
    ids[1 + n_a] = SEP_ID
    ids[2 + n_a:2 + n_a + n_b] = b
    ids[2 + n_a + n_b] = SEP_ID
    types[2 + n_a:3 + n_a + n_b] = 1
    mask = np.zeros(seq_len, dtype=np.int8)
    mask[:3 + n_a + n_b] = 1
    return Example(ids, types, mask, label)


class NspPairBuilder:
    """Turns a stream of documents into NSP examples of exactly `seq_len` tokens (padded).

    Random "B" segments come from a rolling buffer of recently seen documents, the streaming
    stand-in for BERT's "any other document of the corpus".
    """

    def __init__(self, seq_len: int, rng: np.random.Generator, short_seq_prob: float = 0.1,
                 other_docs: int = 64):
        self.seq_len = seq_len
        self.rng = rng
        self.short_seq_prob = short_seq_prob
        self.recent: deque[Document] = deque(maxlen=other_docs)

    def __call__(self, documents: Iterable[Document]) -> Iterator[Example]:
        for doc in documents:
            doc = [s for s in doc if len(s)]
            if doc:
                yield from self._pairs(doc)
                self.recent.append(doc)

    def _pairs(self, doc: Document) -> Iterator[Example]:
        rng = self.rng
        max_tokens = self.seq_len - 3  # [CLS] A [SEP] B [SEP]
        target = max_tokens
        if rng.random() < self.short_seq_prob:
            target = int(rng.integers(2, max_tokens + 1))
        chunk: list = []
        length = 0
        i = 0
        while i < len(doc):
            chunk.append(doc[i])
            length += len(doc[i])
            if i == len(doc) - 1 or length >= target:
                is_random = rng.random() < 0.5 and len(self.recent) > 0
                if not is_random and len(chunk) == 1 and i + 1 < len(doc):
                    # An actual-next pair needs two sentences; borrow the next one.
                    i += 1
                    chunk.append(doc[i])
                a_end = 1 if len(chunk) < 2 else int(rng.integers(1, len(chunk)))
                a = [t for s in chunk[:a_end] for t in s.tolist()]
                if is_random:
                    b = self._random_segment(max(1, target - len(a)))
                    # The sentences not used for A go back to the document for the next pair.
                    i -= len(chunk) - a_end
                    label = IS_RANDOM
                elif len(chunk) >= 2:
                    b = [t for s in chunk[a_end:] for t in s.tolist()]
                    label = IS_NEXT
                else:
                    # One sentence left and the coin said "actual next": split the sentence
                    # itself, which keeps the labels balanced (BERT would force a random B here,
                    # skewing NSP towards "random" on corpora of short documents).
                    if len(a) < 2:
                        chunk, length, i = [], 0, i + 1
                        continue
                    cut = len(a) // 2
                    a, b, label = a[:cut], a[cut:], IS_NEXT
                truncate_pair(a, b, max_tokens, rng)
                yield pack_example(a, b, label, self.seq_len)
                chunk, length = [], 0
            i += 1

    def _random_segment(self, target: int) -> list:
        other = self.recent[int(self.rng.integers(len(self.recent)))]
        start = int(self.rng.integers(len(other)))
        b: list = []
        for s in other[start:]:
            b.extend(s.tolist())
            if len(b) >= target:
                break
        return b
