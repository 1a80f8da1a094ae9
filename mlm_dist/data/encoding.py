"""Documents of sentences → the token-id samples of a shard: the work `prepare` spreads over cores.

Kept apart from prepare.py so that a worker process imports only numpy and SentencePiece
(webdataset alone takes a second to import, paid again by every worker).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from mlm_dist.data.corpus import Document
from mlm_dist.data.shards import encode_document
from mlm_dist.tokenizer import Tokenizer

# Sentences per batch handed to a worker: large enough to amortize the hand-over and the
# SentencePiece call, small enough that memory stays a few MB per batch in flight.
SENTENCES_PER_BATCH = 8192


class EncodedDocument(NamedTuple):
    file_index: int  # identity of the document (see corpus.Document)
    index: int
    fields: dict[str, bytes]  # the sample's tar members, all but "__key__"
    sentences: int
    tokens: int


class DocumentEncoder:
    """Callable on a batch of Documents; picklable, so each worker process loads its own model."""

    def __init__(self, tokenizer_path: str | Path, dtype: np.dtype):
        self.tokenizer_path = Path(tokenizer_path)
        self.dtype = np.dtype(dtype)
        self._tokenizer: Tokenizer | None = None

    def __getstate__(self):
        # A SentencePiece processor does not cross processes; its path does.
        return {"tokenizer_path": self.tokenizer_path, "dtype": self.dtype, "_tokenizer": None}

    def __call__(self, documents: list[Document]) -> list[EncodedDocument]:
        """The documents that have any tokens, encoded; empty sentences dropped."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.load(self.tokenizer_path)
        ids = self._tokenizer.encode_batch([s for document in documents for s in document.sentences])
        encoded, start = [], 0
        for document in documents:
            sentences = [s for s in ids[start:start + len(document.sentences)] if s]
            start += len(document.sentences)
            if sentences:
                encoded.append(EncodedDocument(document.file_index, document.index,
                                               encode_document(sentences, self.dtype),
                                               len(sentences), sum(map(len, sentences))))
        return encoded


def document_batches(documents: Iterable[Document],
                     sentences_per_batch: int | None = None) -> Iterator[list[Document]]:
    sentences_per_batch = sentences_per_batch or SENTENCES_PER_BATCH  # read late: tests shrink it
    batch: list[Document] = []
    sentences = 0
    for document in documents:
        batch.append(document)
        sentences += len(document.sentences)
        if sentences >= sentences_per_batch:
            yield batch
            batch, sentences = [], 0
    if batch:
        yield batch
