"""`mlm-dist bench data`: how fast one loader worker turns shards into ready batches.

One reader runs in this process (what each dataloader worker does), reading the train shards
from their start; the figure is sequences per second per worker, to compare with what one
accelerator consumes (BERT-base on an H100: roughly 10-15k sequences/s at 128).
"""

from __future__ import annotations

import time

from mlm_dist.data.pipeline import BatchWriter, ReaderStream, manifest_shards


def bench_loader(shards_dir: str, seq_len: int, micro_batch: int = 32, batches: int = 200,
                 seed: int = 0) -> dict:
    shards = manifest_shards(shards_dir)
    stream = ReaderStream(shards, reader=0, readers=1, seq_len=seq_len, seed=seed,
                          shuffle_buffer=256, short_seq_prob=0.1)
    writer = BatchWriter(micro_batch, seq_len)
    made = 0
    real_tokens = 0
    start = time.perf_counter()
    for a, b, label, _ in stream.examples():
        real_tokens += len(a) + len(b) + 3
        if writer.add(a, b, label):
            writer.take()
            made += 1
            if made == batches:
                break
    elapsed = time.perf_counter() - start
    sequences = made * micro_batch
    return {"seq_len": seq_len, "micro_batch": micro_batch, "sequences": sequences,
            "seconds": round(elapsed, 3),
            "sequences_per_s_per_worker": round(sequences / elapsed),
            "fill": round(real_tokens / (sequences * seq_len), 3),
            "skipped_documents": stream.skips.documents}
