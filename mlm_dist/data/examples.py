"""What an example builder hands the batch writers, and the interleaving every builder shares.

An objective turns a stream of documents into examples (objectives/: NSP pairs, sentence-order
pairs, full rows), each written as one row, or one slot of a packed row, by data/batches.py:
`[CLS] a [SEP] b [SEP]` for a pair, `[CLS] a [SEP]` when `b` is None.

Google shuffles all instances of the corpus, so a batch holds examples of many documents.
Emitting one document's examples back to back instead puts a whole batch inside one book: the
gradient then follows one text at a time. A stream cannot hold the corpus, so it interleaves:
`open_documents` documents are open at once, each hands out its examples in random order, and
examples come from them in random rounds, weighted by the examples each has left, so they all
run out at about the same time: like a global shuffle of their examples, with consecutive
examples from distinct documents.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np

Document = list  # list of 1-D int arrays, one per sentence


class Pair(NamedTuple):
    """One example: token arrays (ids with their word-start flags, data/shards.py) and the
    objective's label of the whole example (NSP: is B random; SOP: are A and B swapped; mlm: 0,
    nothing is predicted from it)."""

    a: np.ndarray
    b: np.ndarray | None  # None: a single segment, [CLS] a [SEP]
    label: int
    document: int  # which document of the stream `a` comes from (0, 1, ...: for statistics)


# How a reader gets its objective's builder for one work unit: (seq_len, rng, data config) ->
# a callable from documents to examples. The objective chooses it (Objective.example_builder).
ExampleBuilder = Callable[..., Callable[[Iterable[Document]], Iterator[Pair]]]


class OpenDocument:
    """A document whose examples are being handed out, and the examples it has left."""

    def __init__(self, index: int, sentences: Document):
        self.index, self.sentences = index, sentences
        self.pairs: list[Pair] = []


class InterleavingBuilder:
    """Documents -> examples, interleaved across `open_documents` documents (1 = one document
    after the other). A subclass says what the examples of one document are (`_pairs`); it may
    keep state across documents (`_opened` sees each group of documents as it opens)."""

    def __init__(self, rng: np.random.Generator, open_documents: int = 1):
        self.rng = rng
        self.open_documents = open_documents

    def __call__(self, documents: Iterable[Document]) -> Iterator[Pair]:
        rng = self.rng
        incoming = (doc for doc in ([s for s in d if len(s)] for d in documents) if doc)
        pool: list[OpenDocument] = []
        opened = 0
        while True:
            opening = []
            while len(pool) + len(opening) < self.open_documents:
                sentences = next(incoming, None)
                if sentences is None:
                    break
                opening.append(OpenDocument(opened, sentences))
                opened += 1
            self._opened(opening)
            # A document's examples are built when it opens, once all the documents opening
            # with it are known (NSP takes random Bs from them), and handed out in random
            # order. In document order, all open documents would advance together, and a
            # stretch of steps would see the same region of every book (the model would learn
            # that region, not the corpus).
            for doc in opening:
                doc.pairs = list(self._pairs(doc))
                rng.shuffle(doc.pairs)
            pool += [doc for doc in opening if doc.pairs]
            if not pool:
                if not opening:
                    return
                continue
            # One round: a quarter of the open documents, drawn without replacement with
            # probabilities that grow with the examples they have left (Gumbel top-k), each
            # gives one. Consecutive examples thus come from distinct documents, and long
            # documents are drawn more often, so the open documents run out at about the same
            # time.
            weights = np.log([len(d.pairs) for d in pool])
            keys = weights - np.log(-np.log(rng.random(len(pool))))
            for i in np.argsort(-keys, kind="stable")[:max(1, len(pool) // 4)]:
                yield pool[i].pairs.pop()
            pool = [doc for doc in pool if doc.pairs]

    def _opened(self, opening: list[OpenDocument]) -> None:
        """Documents about to be opened, before any of their examples is built."""

    def _pairs(self, doc: OpenDocument) -> Iterator[Pair]:
        raise NotImplementedError
