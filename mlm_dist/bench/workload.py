"""What `bench train` (and `bench memory`) feed the steps they time: a synthetic batch of nearly
full rows, or real micro-batches made from shards as the loader makes them (one pair a row or
packed); the Vocabulary of their ids; and the same pairs as the examples a Hugging Face
Trainer hands its collator."""

from __future__ import annotations

import itertools

import numpy as np
import tokenizers
import torch
from transformers import PreTrainedTokenizerFast

from mlm_dist.config import DataConfig, SequencePhase
from mlm_dist.data.batches import Batch, assemble, writer_for
from mlm_dist.data.pipeline import ReaderStream, manifest_shards
from mlm_dist.data.shards import Manifest
from mlm_dist.errors import UsageError
from mlm_dist.model import IGNORE_INDEX
from mlm_dist.tokenizer import (CLS_ID, MASK_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS, UNK_ID, Tokenizer,
                                Vocabulary)


def synthetic_batch(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> dict:
    """[CLS] A [SEP] B [SEP] rows of random ordinary ids; one row in ten shorter and padded (as
    BERT's short_seq_prob), every row's A/B split at a random point; NSP labels 0/1."""
    rng = np.random.default_rng(seed)
    first = len(SPECIAL_TOKENS)
    input_ids = np.full((batch, seq_len), PAD_ID, dtype=np.int64)
    token_type_ids = np.zeros((batch, seq_len), dtype=np.int64)
    attention_mask = np.zeros((batch, seq_len), dtype=np.int64)
    for row in range(batch):
        n = seq_len - 3 if rng.random() >= 0.1 else int(rng.integers(2, seq_len - 2))
        cut = int(rng.integers(1, n))
        body = rng.integers(first, vocab_size, size=n)
        input_ids[row, :n + 3] = np.concatenate([[CLS_ID], body[:cut], [SEP_ID], body[cut:], [SEP_ID]])
        token_type_ids[row, cut + 2:n + 3] = 1
        attention_mask[row, :n + 3] = 1
    nsp = rng.integers(0, 2, size=batch)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids,
            "attention_mask": attention_mask, "next_sentence_label": nsp}


def synthetic_vocabulary(vocab_size: int):
    """The Vocabulary of synthetic_batch's ids: our SentencePiece specials, every id a word."""
    special = np.zeros(vocab_size, dtype=bool)
    special[:len(SPECIAL_TOKENS)] = True
    return Vocabulary(vocab_size, PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID, special,
                      np.ones(vocab_size, dtype=bool))


def hf_collator_tokenizer(vocab, model_max_length: int):
    """A transformers fast tokenizer over `vocab`'s ids (a tokenizer.Vocabulary), word-level,
    its specials at their ids: all DataCollatorForLanguageModeling needs (mask id, special ids,
    vocabulary size, pad)."""
    special_ids = (vocab.pad, vocab.unk, vocab.cls, vocab.sep, vocab.mask)
    words = {f"w{i}": i for i in range(vocab.size)}
    words.update({tok: i for tok, i in zip(SPECIAL_TOKENS, special_ids)})
    words = {w: i for w, i in words.items() if w.startswith("[") or i not in special_ids}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token=SPECIAL_TOKENS[1]))
    names = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"),
                     SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length,
                                  model_input_names=["input_ids", "token_type_ids", "attention_mask"],
                                  **names)
    assert tok.mask_token_id == vocab.mask and tok.pad_token_id == vocab.pad
    assert len(tok) == vocab.size
    return tok


def as_batch(rows: dict, device=None):
    """synthetic_batch's rows as the loader's Batch, on `device` (each id its own word)."""
    t = {k: torch.as_tensor(v, device=device) for k, v in rows.items()}
    return Batch(t["input_ids"], t["token_type_ids"], t["attention_mask"],
                 t["next_sentence_label"], torch.ones_like(t["input_ids"], dtype=torch.bool),
                 padded=not rows["attention_mask"].all())  # on the host, as the loader does


def shard_batches(shards_dir: str, phase: SequencePhase, vocab, *, count: int,
                  seed: int = 0, pack: bool = False) -> list:
    """`count` micro-batches of real pairs from the train shards, made as the loader makes them
    (one reader from the start; rows padded to seq_len): the fill of real data, not of
    synthetic near-full rows."""
    stream = ReaderStream(manifest_shards(shards_dir), reader=0, readers=1,
                          seq_len=phase.seq_len, seed=seed, data=DataConfig(shards=shards_dir))
    writer = writer_for(phase.micro_batch, phase.seq_len, vocab, pack=pack)
    return [batch for batch, _ in itertools.islice(assemble(stream.examples(), writer), count)]


def shards_vocabulary(shards: str, vocab_size: int):
    """The Vocabulary of the shards' tokenizer, checked against the model's size."""
    vocab = Tokenizer.load(Manifest.load(shards).tokenizer.path).vocabulary
    if vocab.size != vocab_size:
        raise UsageError(f"--shards {shards}: its tokenizer has {vocab.size} ids, the model "
                         f"{vocab_size}; drop model.vocab_size / --vocab-size (they are taken "
                         "from the shards) or use shards of this model's tokenizer")
    return vocab


def hf_examples(batch) -> list[dict]:
    """The pairs of a Batch, one example each (a packed row gives several)."""
    if batch.packing is None:
        spans = [(row, 0, int(n), int(batch.example_label[row]))
                 for row, n in enumerate(batch.attention_mask.sum(1).tolist())]
    else:
        p = batch.packing
        spans = [(row, int(p.cls_positions[row, slot]),
                  int((p.sequence_ids[row] == slot + 1).sum()), int(batch.example_label[row, slot]))
                 for row in range(len(batch.input_ids)) for slot in range(p.cls_positions.shape[1])
                 if batch.example_label[row, slot] != IGNORE_INDEX]
    return [{"input_ids": batch.input_ids[row, start:start + n].tolist(),
             "token_type_ids": batch.token_type_ids[row, start:start + n].tolist(),
             "attention_mask": [1] * n, "next_sentence_label": label}
            for row, start, n, label in spans]
