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
from mlm_dist.data.words import SEGMENTERS, WordSegmenter, piece_word_starts, token_word_starts
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
    """Callable on a batch of Documents; picklable, so each worker process loads its own model.

    Word starts come from a segmenter for a document in a segmented language (words.py: ja,
    zh), from the tokenizer's pieces ("▁" / "##") for any other."""

    def __init__(self, tokenizer_path: str | Path, dtype: np.dtype):
        self.tokenizer_path = Path(tokenizer_path)
        self.dtype = np.dtype(dtype)
        self._tokenizer: Tokenizer | None = None
        self._segmenters = {code: WordSegmenter(code) for code in SEGMENTERS}

    def __getstate__(self):
        # A SentencePiece processor does not cross processes; its path does.
        return {**self.__dict__, "_tokenizer": None}

    def __call__(self, documents: list[Document]) -> list[EncodedDocument]:
        """The documents that have any tokens, encoded; empty sentences dropped."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.load(self.tokenizer_path)
        encoded = []
        for document, sentences in zip(documents, self._encode(documents)):
            sentences = [(ids, starts) for ids, starts in sentences if len(ids)]
            if sentences:
                ids, starts = zip(*sentences)
                encoded.append(EncodedDocument(document.file_index, document.index,
                                               encode_document(ids, starts, self.dtype),
                                               len(ids), sum(map(len, ids))))
        return encoded

    def _encode(self, documents: list[Document]) -> list[list[tuple[list[int], np.ndarray]]]:
        """(ids, word starts) of every sentence of every document. One tokenizer call for all
        the sentences the tokenizer's own word marks serve, one per segmented language."""
        tokenizer = self._tokenizer
        langs = [document.lang for document in documents]
        out: list[list] = [[] for _ in documents]
        for lang in dict.fromkeys(langs):
            mine = [d for d, doc_lang in enumerate(langs) if doc_lang == lang]
            texts = [s for d in mine for s in documents[d].sentences]
            if lang in self._segmenters:
                segmenter = self._segmenters[lang]
                encoded = [(ids, token_word_starts(text, spans, segmenter.word_starts(text)))
                           for text, (ids, spans) in zip(texts, tokenizer.encode_spans(texts))]
            else:
                table = tokenizer.vocabulary.word_start
                encoded = [(ids, piece_word_starts(table, ids))
                           for ids in tokenizer.encode_batch(texts)]
            position = 0
            for d in mine:
                out[d] = encoded[position:position + len(documents[d].sentences)]
                position += len(documents[d].sentences)
        return out


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
