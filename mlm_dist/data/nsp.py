"""Next-sentence-prediction pairs, built the way BERT's create_pretraining_data.py builds them.

From a document, consecutive sentences fill a target length; the chunk is split at a random
sentence boundary into segment A and segment B. With probability 1/2, B is replaced by text from
another document (label 1 = random, 0 = actual next, as in Hugging Face's `next_sentence_label`).
Pairs are built at whatever seq_len the current phase asks for, so shards never depend on it.

Google shuffles all instances of the corpus, so a batch holds pairs of many documents. Emitting
one document's pairs back to back instead puts a whole batch inside one book: the gradient then
follows one text at a time, and NSP's random B (another document) is trivially told from the
actual next. A stream cannot hold the corpus, so it interleaves: `open_documents` documents are
open at once and pairs come from them in random rounds, weighted by the tokens each has left, so
they all run out at about the same time, like a global shuffle of their pairs.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator, NamedTuple

import numpy as np

Document = list  # list of 1-D int arrays, one per sentence


class Pair(NamedTuple):
    a: np.ndarray
    b: np.ndarray
    label: int
    document: int  # which document of the stream A comes from (0, 1, ...: for statistics)

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


class _OpenDocument:
    """A document whose pairs are being emitted, and how many of its tokens are left."""

    def __init__(self, index: int, sentences: Document):
        self.index, self.sentences = index, sentences
        # tokens from sentence i to the end, for i = 0..len
        self.suffix = np.concatenate([np.cumsum([len(s) for s in sentences[::-1]])[::-1], [0]])
        self.remaining = int(self.suffix[0])
        self.pairs: Iterator[Pair] | None = None


class NspPairBuilder:
    """Turns a stream of documents into NSP pairs that fit `seq_len` tokens with [CLS] and two
    [SEP]s, interleaved across `open_documents` documents (1 = one document after the other).

    Random "B" segments come from a rolling buffer of recently opened documents (never A's own),
    the streaming stand-in for BERT's "any other document of the corpus".
    """

    def __init__(self, seq_len: int, rng: np.random.Generator, *, short_seq_prob: float = 0.1,
                 open_documents: int = 1, other_docs: int = 64):
        self.max_tokens = seq_len - 3  # [CLS] A [SEP] B [SEP]
        self.rng = rng
        self.short_seq_prob = short_seq_prob
        self.open_documents = open_documents
        self.recent: deque[_OpenDocument] = deque(maxlen=max(other_docs, open_documents))

    def __call__(self, documents: Iterable[Document]) -> Iterator[Pair]:
        rng = self.rng
        incoming = (doc for doc in ([s for s in d if len(s)] for d in documents) if doc)
        pool: list[_OpenDocument] = []
        opened = 0
        while True:
            while len(pool) < self.open_documents:
                sentences = next(incoming, None)
                if sentences is None:
                    break
                doc = _OpenDocument(opened, sentences)
                opened += 1
                doc.pairs = self._pairs(doc)
                self.recent.append(doc)
                pool.append(doc)
            if not pool:
                return
            # One round: a quarter of the open documents, drawn without replacement with
            # probabilities that grow with the tokens they have left (Gumbel top-k), each gives
            # one pair. Consecutive pairs thus come from distinct documents, and long documents
            # are drawn more often, so the open documents run out at about the same time.
            # (+1: a document whose tokens are all used may still owe its generator's end.)
            weights = np.log([d.remaining + 1.0 for d in pool])
            keys = weights - np.log(-np.log(rng.random(len(pool))))
            drawn = np.argsort(-keys, kind="stable")[:max(1, len(pool) // 4)]
            finished = []
            for i in drawn:
                pair = next(pool[i].pairs, None)
                if pair is None:
                    finished.append(pool[i])
                else:
                    yield pair
            for doc in finished:
                pool.remove(doc)

    def _pairs(self, doc: _OpenDocument) -> Iterator[Pair]:
        rng, max_tokens, sentences = self.rng, self.max_tokens, doc.sentences
        target = max_tokens
        if rng.random() < self.short_seq_prob:
            target = int(rng.integers(2, max_tokens + 1))
        chunk: list = []
        length = 0
        i = 0
        while i < len(sentences):
            chunk.append(sentences[i])
            length += len(sentences[i])
            if i == len(sentences) - 1 or length >= target:
                coin = rng.random() < 0.5
                if not coin and len(chunk) == 1 and i + 1 < len(sentences):
                    # An actual-next pair needs two sentences; borrow the next one.
                    i += 1
                    chunk.append(sentences[i])
                a_end = 1 if len(chunk) < 2 else int(rng.integers(1, len(chunk)))
                a = np.concatenate(chunk[:a_end])
                # As BERT: a lone sentence (the end of a document, or a one-sentence document)
                # always gets a random B, taken up to the target length from another document.
                # On a corpus of short documents that leans NSP towards "random", but the
                # sequence is spent on text rather than padding (splitting the sentence into A
                # and B would leave most of the row empty).
                is_random = (coin or len(chunk) == 1) and self._has_other(doc)
                if is_random:
                    b = self._random_segment(max(1, target - len(a)), doc)
                    # The sentences not used for A go back to the document for the next pair.
                    i -= len(chunk) - a_end
                    label = IS_RANDOM
                elif len(chunk) >= 2:
                    b = np.concatenate(chunk[a_end:])
                    label = IS_NEXT
                else:
                    # A lone sentence and no other document yet to take B from: the sentence
                    # itself, split in two.
                    if len(a) < 2:
                        chunk, length, i = [], 0, i + 1
                        doc.remaining = int(doc.suffix[i])
                        continue
                    cut = len(a) // 2
                    a, b, label = a[:cut], a[cut:], IS_NEXT
                a, b = truncate_pair(a, b, max_tokens, rng)
                doc.remaining = int(doc.suffix[i + 1])
                yield Pair(a, b, label, doc.index)
                chunk, length = [], 0
            i += 1

    def _has_other(self, doc: _OpenDocument) -> bool:
        return len(self.recent) > 1 or (len(self.recent) == 1 and self.recent[0] is not doc)

    def _random_segment(self, target: int, doc: _OpenDocument) -> np.ndarray:
        other = doc
        while other is doc:  # _has_other(doc) holds, so this ends
            other = self.recent[int(self.rng.integers(len(self.recent)))]
        sentences = other.sentences
        start = int(self.rng.integers(len(sentences)))
        taken, length = [], 0
        for s in sentences[start:]:
            taken.append(s)
            length += len(s)
            if length >= target:
                break
        return np.concatenate(taken)
