"""Next-sentence-prediction pairs, built the way BERT's create_pretraining_data.py builds them.

From a document, consecutive sentences fill a target length (short_seq_prob of the time a shorter
one, drawn for every pair as Megatron does, not once a document); the chunk is split at a random
sentence boundary into segment A and segment B. With probability 1/2, B is replaced by text from
another document (label 1 = random, 0 = actual next, as in Hugging Face's `next_sentence_label`).
Pairs are built at whatever seq_len the current phase asks for, so shards never depend on it.

Pairs are interleaved across open documents (data/examples.py), so a batch mixes documents.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator

import numpy as np

from mlm_dist.data.examples import InterleavingBuilder, OpenDocument, Pair

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


class NspPairBuilder(InterleavingBuilder):
    """Turns a stream of documents into NSP pairs that fit `seq_len` tokens with [CLS] and two
    [SEP]s, interleaved across `open_documents` documents (1 = one document after the other).

    Random "B" segments come from a rolling buffer of recently opened documents (never A's own),
    the streaming stand-in for BERT's "any other document of the corpus".
    """

    def __init__(self, seq_len: int, rng: np.random.Generator, *, short_seq_prob: float = 0.1,
                 open_documents: int = 1, other_docs: int = 64):
        super().__init__(rng, open_documents)
        self.max_tokens = seq_len - 3  # [CLS] A [SEP] B [SEP]
        self.short_seq_prob = short_seq_prob
        self.recent: deque[OpenDocument] = deque(maxlen=max(other_docs, open_documents))

    def _opened(self, opening: list[OpenDocument]) -> None:
        self.recent.extend(opening)

    def _pairs(self, doc: OpenDocument) -> Iterator[Pair]:
        rng, max_tokens, sentences = self.rng, self.max_tokens, doc.sentences
        target = self._target_length()
        chunk: list = []
        length = 0
        i = 0
        while i < len(sentences):
            chunk.append(sentences[i])
            length += len(sentences[i])
            if i == len(sentences) - 1 or length >= target:
                coin = rng.random() < 0.5
                a_end = 1 if len(chunk) < 2 else int(rng.integers(1, len(chunk)))
                a = np.concatenate(chunk[:a_end])
                # As BERT: a chunk of one sentence (a sentence as long as the target, the end
                # of a document, a one-sentence document) always gets a random B, taken up to
                # the target length from another document. Borrowing the next sentence for an
                # actual-next pair instead would change the task: on a book whose target is
                # short, every pair would be two whole consecutive sentences, half of them
                # "next", where BERT's are all "random". On a corpus of short documents this
                # leans NSP towards "random", but the sequence is spent on text rather than
                # padding (splitting the sentence into A and B would leave most of the row empty).
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
                        continue
                    cut = len(a) // 2
                    a, b, label = a[:cut], a[cut:], IS_NEXT
                a, b = truncate_pair(a, b, max_tokens, rng)
                yield Pair(a, b, label, doc.index)
                chunk, length = [], 0
                target = self._target_length()
            i += 1

    def _target_length(self) -> int:
        """The length the next chunk fills: short_seq_prob of the time a shorter one, so the
        model sees short inputs too. Drawn for every pair, as Megatron's BERT dataset does, not
        once a document as Google's script does: on a corpus of books a per-document draw makes
        one book in ten short from end to end, multiplying its pairs (all of them random ones
        when its target is shorter than a sentence), so the share of short rows and the NSP
        balance would swing from epoch to epoch with which books drew it."""
        if self.rng.random() < self.short_seq_prob:
            return int(self.rng.integers(2, self.max_tokens + 1))
        return self.max_tokens

    def _has_other(self, doc: OpenDocument) -> bool:
        return len(self.recent) > 1 or (len(self.recent) == 1 and self.recent[0] is not doc)

    def _random_segment(self, target: int, doc: OpenDocument) -> np.ndarray:
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


def nsp_pairs(seq_len: int, rng: np.random.Generator, data, vocab) -> NspPairBuilder:
    """The `bert` objective's example builder (data.examples.ExampleBuilder): NSP pairs with
    the run's data settings (`data`: config.DataConfig)."""
    return NspPairBuilder(seq_len, rng, short_seq_prob=data.short_seq_prob,
                          open_documents=data.open_documents)
