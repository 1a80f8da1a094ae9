"""`mlm-dist bench data`: how fast one loader worker turns shards into ready batches, and what
the batches hold.

One reader runs in this process (what each dataloader worker does), reading the train shards
from their start; the figure is sequences per second per worker once the first micro-batch is
out (the steady rate, to compare with what one accelerator consumes), and beside it the
seconds to that first micro-batch (a remote store's first connection, the shuffle buffer
filling). And what the batches hold: the fill (real tokens / positions, one example a row:
the objective's, `--objective`) and the distinct documents per micro-batch (how well examples of
different documents are mixed; the micro-batch size at most).
"""

from __future__ import annotations

import json
import time

from mlm_dist.bench.masking import bench_masking
from mlm_dist.config import DataConfig, ObjectiveConfig
from mlm_dist.data.batches import assemble, example_length, writer_for
from mlm_dist.data.pipeline import ReaderStream, manifest_shards
from mlm_dist.data.shards import Manifest
from mlm_dist.objectives import objective_for
from mlm_dist.tokenizer import Tokenizer


def bench_loader(shards_dir: str, vocab, data: DataConfig, *, seq_len: int,
                 micro_batch: int = 32, batches: int = 200, seed: int = 0,
                 objective: str = "bert") -> dict:
    """One reader's figures at `seq_len`: see the module's docstring. `vocab`: the shards'
    tokenizer.Vocabulary; `objective`: whose examples (objective.name)."""
    shards = manifest_shards(shards_dir)
    builder = objective_for(ObjectiveConfig(name=objective)).example_builder
    stream = ReaderStream(shards, reader=0, readers=1, seq_len=seq_len, seed=seed, data=data,
                          examples_of=builder, vocab=vocab)
    real_tokens = distinct = 0
    documents: set = set()  # of the micro-batch being made

    def counted(examples):
        """The examples, their tokens and documents counted as they go into a batch."""
        nonlocal real_tokens
        for pair, position in examples:
            epoch, unit, _ = position
            real_tokens += example_length(pair.a, pair.b)
            documents.add((epoch, unit, pair.document))
            yield pair, position

    writer = writer_for(micro_batch, seq_len, vocab, pack=False)
    start = time.perf_counter()
    for made, _ in enumerate(assemble(counted(stream.examples()), writer), start=1):
        distinct += len(documents)
        documents.clear()
        if made == 1:
            first_batch = time.perf_counter() - start
            start = time.perf_counter()
        if made == batches + 1:
            break
    elapsed = time.perf_counter() - start
    sequences = batches * micro_batch
    return {"objective": objective, "seq_len": seq_len, "micro_batch": micro_batch,
            "sequences": sequences,
            "seconds": round(elapsed, 3),
            "first_batch_seconds": round(first_batch, 3),
            "sequences_per_s_per_worker": round(sequences / elapsed),
            "fill": round(real_tokens / (made * micro_batch * seq_len), 3),
            "documents_per_micro_batch": round(distinct / max(1, made), 2),
            "open_documents": data.open_documents,
            "skipped_documents": stream.skips.documents}


def data_command(args) -> None:
    tokenizer = args.tokenizer or Manifest.load(args.shards).tokenizer.path
    vocab = Tokenizer.load(tokenizer).vocabulary
    data = DataConfig(shards=args.shards, open_documents=args.open_documents)
    loader = [bench_loader(args.shards, vocab, data, seq_len=seq_len,
                           micro_batch=args.micro_batch, batches=args.batches,
                           objective=args.objective)
              for seq_len in args.seq_len]
    masking = bench_masking(tokenizer, batch=args.mask_batch, seq_len=args.mask_seq_len,
                            repeats=args.repeats)
    print(json.dumps({"loader": loader, "masking": masking}, indent=2))

