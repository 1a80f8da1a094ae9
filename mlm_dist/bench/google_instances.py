"""The reference's data for `mlm-dist bench convergence` with the pair objectives: NSP instances
made from token ids the way Google's create_pretraining_data.py makes them (its NSP part,
written again here so the reference depends on nothing of ours but the shards it reads), and
sentence-order instances as ALBERT's create_pretraining_data.py makes them (the same script
with one more branch), but for a chunk of one sentence (create_instances_from_document says
why).

Every train document is read, the documents are shuffled, each is cut into [CLS] A [SEP] B
[SEP] pairs by Google's rules (create_instances_from_document), as many passes over the corpus
as the run needs (Google's dupe_factor: each pass pairs anew), and then ALL the instances are
shuffled together, before training starts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlm_dist.data.pipeline import manifest_shards
from mlm_dist.data.reader import SkipCounter, read_documents
from mlm_dist.data.shards import ShardFormatError, token_ids


@dataclass
class Instance:
    tokens_a: np.ndarray
    tokens_b: np.ndarray
    # Label 1 of the pair classifier, named as both scripts name it: for NSP, B is from another
    # document; for sentence order, the segments are swapped.
    is_random_next: bool


def truncate_seq_pair(tokens_a, tokens_b, max_num_tokens: int, rng: random.Random):
    """Google's truncate_seq_pair on arrays: while the pair is too long, take one token off the
    longer segment (b on a tie), from the front or the back with probability 1/2 each. The same
    decisions as the original's list loop, one rng.random() per token removed."""
    a0, a1, b0, b1 = 0, len(tokens_a), 0, len(tokens_b)
    while (a1 - a0) + (b1 - b0) > max_num_tokens:
        if a1 - a0 > b1 - b0:
            if rng.random() < 0.5:
                a0 += 1
            else:
                a1 -= 1
        else:
            if rng.random() < 0.5:
                b0 += 1
            else:
                b1 -= 1
    return tokens_a[a0:a1], tokens_b[b0:b1]


def create_instances_from_document(all_documents: list, document_index: int,
                                   max_seq_length: int, short_seq_prob: float,
                                   rng: random.Random, sentence_order: bool = False
                                   ) -> list[Instance]:
    """The NSP instances of one document, as create_pretraining_data.py builds them; with
    `sentence_order`, the sentence-order instances, as ALBERT's builds them.

    Segments (sentences) are accumulated until they reach a target length (max_seq_length - 3,
    or with probability short_seq_prob a random length from 2 up, drawn once per document);
    the chunk is split at a random segment boundary a_end into A and B. B is the actual rest of
    the chunk, or (probability 1/2, and always when the chunk is a single segment) text from a
    random other document, in which case the chunk's unused segments are put back to start the
    next chunk. Then the pair is truncated to fit [CLS] A [SEP] B [SEP].

    Sentence order (ALBERT, random_next_sentence=False): B is always the actual rest of the
    chunk, and A and B are swapped with probability 1/2. A chunk of a single segment is cut
    in two at a random token, A its start and B its rest (then swapped or not), as ours does
    (data/sop.py). This is the one place the reference leaves ALBERT's script, whose B for such
    a chunk comes from another document, labelled as a swap: on a corpus of one-sentence
    documents half its instances become NSP's random pairs, filled to the target length, so
    that reference trained on a third more real tokens than ours for the same sequences
    (`short`, sop, seed 1234: 5.47M against 4.10M) and the comparison measured the rule, not
    the trainer. A one-token segment alone in its chunk gives no instance, as in ours.
    """
    document = all_documents[document_index]
    max_num_tokens = max_seq_length - 3  # [CLS], [SEP], [SEP]
    target_seq_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_seq_length = rng.randint(2, max_num_tokens)

    instances = []
    current_chunk: list = []
    current_length = 0
    i = 0
    while i < len(document):
        segment = document[i]
        current_chunk.append(segment)
        current_length += len(segment)
        if i == len(document) - 1 or current_length >= target_seq_length:
            # Sentence order cuts a lone segment in two: one of one token gives no instance.
            uncuttable = sentence_order and len(current_chunk) == 1 and len(segment) < 2
            if current_chunk and not uncuttable:
                a_end = 1
                if len(current_chunk) >= 2:
                    a_end = rng.randint(1, len(current_chunk) - 1)
                tokens_a = np.concatenate(current_chunk[:a_end])

                if sentence_order and len(current_chunk) == 1:
                    cut = rng.randint(1, len(tokens_a) - 1)
                    tokens_a, tokens_b = tokens_a[:cut], tokens_a[cut:]
                    is_random_next = rng.random() < 0.5  # ALBERT's name for "swapped"
                    if is_random_next:
                        tokens_a, tokens_b = tokens_b, tokens_a
                elif len(current_chunk) == 1 or (not sentence_order and rng.random() < 0.5):
                    is_random_next = True
                    target_b_length = target_seq_length - len(tokens_a)
                    # Ten tries at another document (a corpus of one document has none).
                    for _ in range(10):
                        random_document_index = rng.randint(0, len(all_documents) - 1)
                        if random_document_index != document_index:
                            break
                    random_document = all_documents[random_document_index]
                    random_start = rng.randint(0, len(random_document) - 1)
                    taken, length = [], 0
                    for j in range(random_start, len(random_document)):
                        taken.append(random_document[j])
                        length += len(random_document[j])
                        if length >= target_b_length:
                            break
                    tokens_b = np.concatenate(taken)
                    # The segments after A were not used: they go back to the document.
                    i -= len(current_chunk) - a_end
                elif sentence_order and rng.random() < 0.5:
                    is_random_next = True  # ALBERT's name for "swapped"
                    tokens_a, tokens_b = np.concatenate(current_chunk[a_end:]), tokens_a
                else:
                    is_random_next = False
                    tokens_b = np.concatenate(current_chunk[a_end:])
                tokens_a, tokens_b = truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
                assert len(tokens_a) >= 1 and len(tokens_b) >= 1
                instances.append(Instance(tokens_a, tokens_b, is_random_next))
            current_chunk, current_length = [], 0
        i += 1
    return instances


def create_training_instances(documents: list, max_seq_length: int, short_seq_prob: float,
                              rng: random.Random, min_instances: int = 0,
                              sentence_order: bool = False) -> tuple[list[Instance], int]:
    """All documents shuffled, instances made from each, as many passes over the corpus as it
    takes to have `min_instances` (Google's dupe_factor: each pass pairs anew), then ALL
    instances shuffled together. Returns (instances, passes). `sentence_order`: ALBERT's
    sentence-order instances instead of NSP's."""
    documents = [[s for s in doc if len(s)] for doc in documents]
    documents = [doc for doc in documents if doc]
    if not documents:
        raise ValueError("no document with any tokens to make instances from")
    rng.shuffle(documents)
    instances: list[Instance] = []
    passes = 0
    while passes == 0 or len(instances) < min_instances:
        for document_index in range(len(documents)):
            instances.extend(create_instances_from_document(
                documents, document_index, max_seq_length, short_seq_prob, rng,
                sentence_order))
        passes += 1
    rng.shuffle(instances)
    return instances, passes


def read_train_documents(shards_dir: str | Path) -> list:
    """Every train document of the shards (lists of sentence id arrays), in manifest order."""
    skips = SkipCounter()
    documents = []
    for shard in manifest_shards(shards_dir, "train"):
        documents.extend([token_ids(s) for s in document]  # ids only: the reference masks tokens
                         for document in read_documents(shard.path, shard.documents, 1, 0, skips))
    if skips.documents:
        raise ShardFormatError(f"{skips.documents} train documents of {shards_dir} could not be read "
                               "(warnings above); check the shards with `mlm-dist prepare --verify`")
    return documents
