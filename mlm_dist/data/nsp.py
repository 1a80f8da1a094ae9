"""Next-sentence-prediction pairs, built the way BERT's create_pretraining_data.py builds them.

From a document, consecutive sentences fill a target length; the chunk is split at a random
sentence boundary into segment A and segment B. With probability 1/2, B is replaced by text from
another document (label 1 = random, 0 = actual next, as in Hugging Face's `next_sentence_label`).
Pairs are built at whatever seq_len the current phase asks for, so shards never depend on it.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

import numpy as np

Document = list  # list of 1-D int arrays, one per sentence
Pair = tuple  # (a: int array, b: int array, label: int)

IS_NEXT, IS_RANDOM = 0, 1


def truncate_pair(a: np.ndarray, b: np.ndarray, max_tokens: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """BERT's truncate_seq_pair without its token-at-a-time loop: the longer segment is trimmed
    until the two are equal, then both alternately; each trimmed token comes off the front or
    the back with probability 1/2 (so the front share is binomial)."""
    excess = len(a) + len(b) - max_tokens
    if excess <= 0:
        return a, b
    la, lb = len(a), len(b)
    if abs(la - lb) >= excess:
        cut_a, cut_b = (excess, 0) if la > lb else (0, excess)
    else:
        # Equalise, then split the rest; BERT's loop trims b on ties, so b takes the odd one.
        rest = excess - abs(la - lb)
        cut_a = max(0, la - lb) + rest // 2
        cut_b = max(0, lb - la) + rest - rest // 2
    front_a, front_b = rng.binomial(cut_a, 0.5), rng.binomial(cut_b, 0.5)
    return a[front_a:la - (cut_a - front_a)], b[front_b:lb - (cut_b - front_b)]


class NspPairBuilder:
    """Turns a stream of documents into NSP pairs (a, b, label) that fit `seq_len` tokens
    with [CLS] and two [SEP]s.

    Random "B" segments come from a rolling buffer of recently seen documents, the streaming
    stand-in for BERT's "any other document of the corpus".
    """

    def __init__(self, seq_len: int, rng: np.random.Generator, short_seq_prob: float = 0.1,
                 other_docs: int = 64):
        self.max_tokens = seq_len - 3  # [CLS] A [SEP] B [SEP]
        self.rng = rng
        self.short_seq_prob = short_seq_prob
        self.recent: deque[Document] = deque(maxlen=other_docs)

    def __call__(self, documents: Iterable[Document]) -> Iterator[Pair]:
        for doc in documents:
            doc = [s for s in doc if len(s)]
            if doc:
                yield from self._pairs(doc)
                self.recent.append(doc)

    def _pairs(self, doc: Document) -> Iterator[Pair]:
        rng, max_tokens = self.rng, self.max_tokens
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
                a = np.concatenate(chunk[:a_end])
                if is_random:
                    b = self._random_segment(max(1, target - len(a)))
                    # The sentences not used for A go back to the document for the next pair.
                    i -= len(chunk) - a_end
                    label = IS_RANDOM
                elif len(chunk) >= 2:
                    b = np.concatenate(chunk[a_end:])
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
                a, b = truncate_pair(a, b, max_tokens, rng)
                yield a, b, label
                chunk, length = [], 0
            i += 1

    def _random_segment(self, target: int) -> np.ndarray:
        other = self.recent[int(self.rng.integers(len(self.recent)))]
        start = int(self.rng.integers(len(other)))
        taken, length = [], 0
        for s in other[start:]:
            taken.append(s)
            length += len(s)
            if length >= target:
                break
        return np.concatenate(taken)
