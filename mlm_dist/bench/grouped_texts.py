"""The reference's data for `mlm-dist bench convergence` with `objective.name=mlm` (and `electra`,
trained on full rows too): blocks of contiguous text as transformers' run_mlm.py
(examples/pytorch/language-modeling, without --line_by_line) makes them, written again on token
ids so the reference depends on nothing of ours but the shards it reads.

run_mlm.py tokenizes each text with the tokenizer's special tokens around it ([CLS] text [SEP]
for BERT); `group_texts` then concatenates the texts of each `datasets.map` batch of 1,000 and
cuts them into blocks of max_seq_length, dropping the remainder of each batch; the Trainer's
sampler shuffles the blocks anew every epoch. A text here is a document: run_mlm.py reads a
JSON-lines file of documents that way (a plain text file would make every line, here every
sentence, a text of its own). The documents stay in the shards' order, as a dataset's rows do.
"""

from __future__ import annotations

import random

import numpy as np

from mlm_dist.errors import UsageError

GROUP_TEXTS_BATCH = 1000  # datasets' map(batched=True) default: group_texts sees 1,000 texts


def group_texts(documents: list, block_size: int, cls_id: int, sep_id: int) -> np.ndarray:
    """[blocks, block_size] token ids: each document as [CLS] text [SEP], the documents of each
    batch of GROUP_TEXTS_BATCH concatenated and cut into blocks, each batch's remainder
    dropped (run_mlm.py's group_texts under map(batched=True))."""
    texts = [np.concatenate([[cls_id], *document, [sep_id]]).astype(np.int64)
             for document in documents if sum(len(s) for s in document)]
    blocks = []
    for start in range(0, len(texts), GROUP_TEXTS_BATCH):
        stream = np.concatenate(texts[start:start + GROUP_TEXTS_BATCH])
        whole = len(stream) // block_size
        blocks.append(stream[:whole * block_size].reshape(whole, block_size))
    if not texts or not sum(len(b) for b in blocks):
        raise UsageError(f"the train documents hold fewer than {block_size} tokens: no block of "
                         "run_mlm.py's length can be cut from them")
    return np.concatenate(blocks)


def training_blocks(blocks: np.ndarray, needed: int, rng: random.Random
                    ) -> tuple[list[np.ndarray], int]:
    """The first `needed` blocks the Trainer's sampler hands out: every epoch a new random
    order of all blocks. Returns (blocks in training order, epochs begun)."""
    order: list[int] = []
    epochs = 0
    while len(order) < needed:
        epoch = list(range(len(blocks)))
        rng.shuffle(epoch)
        order.extend(epoch)
        epochs += 1
    return [blocks[i] for i in order[:needed]], epochs
