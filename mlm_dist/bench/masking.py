"""What masking costs: our on-device `TokenMasker` against Hugging Face's MLM data collator.

Both mask the same batch: BERT pairs ([CLS] A [SEP] B [SEP], some short and padded) cut from
real text of the stdlib demo corpus, so word lengths and padding look like training data. Ours
gets it as the [B, S] tensor the training step holds; `transformers.DataCollatorForLanguageModeling`
gets it as the list of dicts a Trainer passes: input_ids, token_type_ids and attention_mask as
lists of ints, padded to seq_len (as with `padding="max_length"`, so both see the same shape).
No `special_tokens_mask` (run_mlm.py passes one): padding that list too costs the collator more
than the special-token lookup it saves, so leaving it out times HF at its fastest.

Calls are interleaved in one process after a warm-up, and each figure is the median of
`repeats`, so a noisy neighbour on a shared machine shifts all of them alike. Nothing is
downloaded: without `tokenizer_dir` a small tokenizer is trained on the demo corpus.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import DataCollatorForLanguageModeling

from mlm_dist.config import MaskingConfig, SequencePhase
from mlm_dist.data.corpus import iter_documents
from mlm_dist.demo.stdlib_corpus import write_stdlib_corpus
from mlm_dist.errors import UsageError
from mlm_dist.interop.hf_tokenizer import hf_tokenizer
from mlm_dist.masking import TokenMasker
from mlm_dist.masking import max_predictions as derived_max_predictions
from mlm_dist.tokenizer import Tokenizer, sentences_of, train_tokenizer

DEMO_DOCUMENTS = 300
DEMO_VOCAB_SIZE = 1500  # 300 stdlib documents support at most ~1900 pieces
MLM_PROB = 0.15


def _text_batch(tokenizer: Tokenizer, corpus: Path, batch: int, seq_len: int,
                seed: int = 0) -> dict[str, np.ndarray]:
    """[batch, seq_len] arrays of [CLS] A [SEP] B [SEP] + padding cut from the corpus's tokens.

    Segments are cut at random token offsets of the whole corpus's token stream (A and B are
    adjacent), so some begin mid-word, as truncated segments do in training; one row in ten is
    shorter and padded, as with BERT's short_seq_prob.
    """
    rng = np.random.default_rng(seed)
    sentences = list(sentences_of(iter_documents([corpus])))
    stream = np.concatenate([np.asarray(ids, dtype=np.int64)
                             for ids in tokenizer.encode_batch(sentences) if ids])
    stream = np.tile(stream, -(-seq_len // len(stream)) + 1)  # a tiny corpus still fills a row
    vocab = tokenizer.vocabulary
    input_ids = np.full((batch, seq_len), vocab.pad, dtype=np.int64)
    token_type_ids = np.zeros((batch, seq_len), dtype=np.int64)
    attention_mask = np.zeros((batch, seq_len), dtype=np.int64)
    for row in range(batch):
        n = seq_len - 3 if rng.random() >= 0.1 else int(rng.integers(2, seq_len - 2))
        start = int(rng.integers(len(stream) - n))
        cut = int(rng.integers(1, n))
        a, b = stream[start:start + cut], stream[start + cut:start + n]
        input_ids[row, :n + 3] = np.concatenate([[vocab.cls], a, [vocab.sep], b, [vocab.sep]])
        token_type_ids[row, cut + 2:n + 3] = 1
        attention_mask[row, :n + 3] = 1
    return {"input_ids": input_ids, "token_type_ids": token_type_ids,
            "attention_mask": attention_mask}


def _time_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # our masking is asynchronous on a GPU
    return (time.perf_counter() - start) * 1e3


def bench_masking(tokenizer_dir: str | None = None, *, batch: int = 256, seq_len: int = 512,
                  repeats: int = 5, whole_word: bool = False,
                  device: str | torch.device = "cpu", max_predictions: int | None = None) -> dict:
    """Median milliseconds per batch of ours (token-level and whole-word) and of HF's collator.

    `ratio` is ours / HF's for the masking the run uses: whole-word if `whole_word`, else
    token-level. HF's collator always runs on the CPU (it lives in the data loader); ours runs on
    `device` (the rank's device in training). `max_predictions` is our K slots per sequence;
    None derives it as training does (masking.max_predictions).
    """
    if seq_len < 8 or batch < 1 or repeats < 1:
        raise UsageError(f"bench_masking needs seq_len >= 8, batch >= 1 and repeats >= 1; got "
                         f"seq_len={seq_len}, batch={batch}, repeats={repeats}")
    device = torch.device(device)
    with tempfile.TemporaryDirectory(prefix="bench-masking-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        write_stdlib_corpus(corpus, max_documents=DEMO_DOCUMENTS)
        if tokenizer_dir is None:
            tokenizer_dir = str(Path(tmp) / "tokenizer")
            train_tokenizer(sentences_of(iter_documents([corpus])), tokenizer_dir,
                            vocab_size=DEMO_VOCAB_SIZE, seed=0)
        tokenizer = Tokenizer.load(tokenizer_dir)
        hf_tok = hf_tokenizer(tokenizer_dir, seq_len)
        rows = _text_batch(tokenizer, corpus, batch, seq_len)

    input_ids = torch.from_numpy(rows["input_ids"]).to(device)
    hf_examples = [{name: values[row].tolist() for name, values in rows.items()}
                   for row in range(batch)]

    masking = MaskingConfig(prob=MLM_PROB)
    whole_words = MaskingConfig(prob=MLM_PROB, whole_word=True)
    phase = SequencePhase(seq_len=seq_len, max_predictions=max_predictions or 0)
    ours = TokenMasker(tokenizer.vocabulary, masking,
                       max_predictions=derived_max_predictions(phase, masking),
                       seed=0, rank=0, device=device)
    ours_whole_word = TokenMasker(tokenizer.vocabulary, whole_words,
                                  max_predictions=derived_max_predictions(phase, whole_words),
                                  seed=0, rank=0, device=device)
    collator = DataCollatorForLanguageModeling(tokenizer=hf_tok, mlm_probability=MLM_PROB)

    # the batch's word starts, as the loader delivers them from the shards
    word_starts = torch.as_tensor(tokenizer.vocabulary.word_start, device=device)[input_ids]
    runs = {"ours_ms": lambda step: ours(input_ids, step),
            "ours_whole_word_ms": lambda step: ours_whole_word(input_ids, step,
                                                               word_starts=word_starts),
            "hf_collator_ms": lambda step: collator(hf_examples)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(repeats + 1):  # step 0 is the warm-up (allocator, lazy imports, caches)
        for name, run in runs.items():
            ms = _time_ms(lambda: run(step), device)
            if step:
                times[name].append(ms)

    result = {"batch": batch, "seq_len": seq_len}
    result.update({name: statistics.median(ms) for name, ms in times.items()})
    numerator = result["ours_whole_word_ms"] if whole_word else result["ours_ms"]
    result["ratio"] = numerator / result["hf_collator_ms"]
    result["threads"] = torch.get_num_threads()
    return result


if __name__ == "__main__":
    print(json.dumps(bench_masking(), indent=2))
