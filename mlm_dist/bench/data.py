"""`mlm-dist bench data`: how fast one loader worker turns shards into ready batches, and what
the batches hold.

One reader runs in this process (what each dataloader worker does), reading the train shards
from their start; the figure is sequences per second per worker, to compare with what one
accelerator consumes. Beside it: the fill (real tokens / positions) and the distinct documents
per micro-batch (how well pairs of different documents are mixed; the micro-batch size at most).
"""

from __future__ import annotations

import time

from mlm_dist.config import DataConfig
from mlm_dist.data.pipeline import BatchWriter, ReaderStream, manifest_shards
from mlm_dist.tokenizer import Vocabulary


def bench_loader(shards_dir: str, vocab: Vocabulary, data: DataConfig, *, seq_len: int,
                 micro_batch: int = 32, batches: int = 200, seed: int = 0) -> dict:
    shards = manifest_shards(shards_dir)
    stream = ReaderStream(shards, reader=0, readers=1, seq_len=seq_len, seed=seed, data=data)
    writer = BatchWriter(micro_batch, seq_len, vocab)
    made = real_tokens = distinct = 0
    documents: set = set()
    start = time.perf_counter()
    for pair, (epoch, unit, _) in stream.examples():
        real_tokens += len(pair.a) + len(pair.b) + 3
        documents.add((epoch, unit, pair.document))
        if writer.add(pair.a, pair.b, pair.label):
            writer.take()
            made += 1
            distinct += len(documents)
            documents.clear()
            if made == batches:
                break
    elapsed = time.perf_counter() - start
    sequences = made * micro_batch
    return {"seq_len": seq_len, "micro_batch": micro_batch, "sequences": sequences,
            "seconds": round(elapsed, 3),
            "sequences_per_s_per_worker": round(sequences / elapsed),
            "fill": round(real_tokens / (sequences * seq_len), 3),
            "documents_per_micro_batch": round(distinct / max(1, made), 2),
            "open_documents": data.open_documents,
            "skipped_documents": stream.skips.documents}
