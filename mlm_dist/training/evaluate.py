"""Validation: the objective's figures (MLM loss, perplexity, MLM accuracy; NSP or SOP loss and
accuracy: objectives/) on the validation shards, and the mask rate.

One deterministic pass: the validation split is read once, from its start, by a single reader
with its own seed (`eval.seed`), and cut into global micro-batches 0, 1, 2, ... Batch g is
scored by rank g mod ranks and masked with a generator seeded by (eval seed, g), with the run's
masking settings (rate, 80/10/10, whole words). So every evaluation of the same weights sees the
same examples and the same masks, on 1 rank or on 8, and the per-batch sums are added up in
batch order on every rank: the numbers do not depend on the number of ranks. `eval.max_pairs`
caps the pass at the split's first examples (0 = the whole split).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from mlm_dist.config import RunConfig, SequencePhase, max_predictions
from mlm_dist.data.batches import Batch, BatchWriter
from mlm_dist.data.pipeline import ReaderStream, manifest_shards
from mlm_dist.data.shards import Manifest
from mlm_dist.masking import TokenMasker
from mlm_dist.model import IGNORE_INDEX
from mlm_dist.objectives import objective_for
from mlm_dist.tokenizer import Vocabulary


def validation_batches(cfg: RunConfig, phase: SequencePhase, vocab: Vocabulary,
                       shards: str) -> Iterator[Batch]:
    """Each global micro-batch of the pass, one example a row whatever `data.pack` (so the
    figures do not depend on it); the last one is filled up with rows that count for nothing."""
    stream = ReaderStream(manifest_shards(shards, "valid"), reader=0, readers=1,
                          seq_len=phase.seq_len, seed=cfg.eval.seed, data=cfg.data,
                          examples_of=objective_for(cfg).example_builder, vocab=vocab)
    writer = BatchWriter(phase.micro_batch, phase.seq_len, vocab)
    cap = cfg.eval.max_pairs or math.inf
    pairs = 0
    for pair, _ in stream.examples(epochs=1):
        pairs += 1
        if writer.add(pair.a, pair.b, pair.label):
            yield writer.take()
        if pairs >= cap:
            break
    if writer.rows:
        yield writer.take_partial()


@torch.no_grad()
def evaluate(forward: Callable, cfg: RunConfig, phase: SequencePhase, vocab: Vocabulary, *,
             shards: str | None = None, rank: int = 0, world_size: int = 1,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """`forward`: the model of the run's objective (or anything called as it is: see the
    objective's `losses`); attention_mask None when the batch has no padding
    (Batch.padding_mask). `shards`: another shard directory than the run's `data.shards`
    (same tokenizer)."""
    device = torch.device(device)
    objective = objective_for(cfg)
    masker = TokenMasker(vocab, cfg.masking, max_predictions=max_predictions(phase, cfg.masking),
                         seed=cfg.eval.seed, rank=0, device=device)
    names: list[str] = []  # of the per-batch sums, in their order

    def score(batch: Batch, g: int) -> torch.Tensor:
        batch = batch.to(device)
        masked = masker(batch.input_ids, step=g, word_starts=batch.word_starts)
        terms = {**objective.eval_terms(objective.losses(forward, batch, masked), batch),
                 "predicted": (masked.labels != IGNORE_INDEX).sum(),
                 "eligible": masked.eligible,
                 "examples": (batch.example_label != IGNORE_INDEX).sum()}
        names[:] = terms
        return torch.stack(list(terms.values())).double()

    # Every rank builds the whole stream (cheap next to the forward passes) and scores batch g
    # when g % ranks == rank, holding one batch at a time.
    rows, first, total = [], None, 0
    for g, batch in enumerate(validation_batches(cfg, phase, vocab, shards or cfg.data.shards)):
        first, total = first or batch, g + 1
        if g % world_size == rank:
            rows.append(score(batch, g))
    if not total:
        raise ValueError(f"the validation split of {shards or cfg.data.shards} gives no "
                         f"examples at seq_len {phase.seq_len}; re-run `mlm-dist prepare` with a "
                         "larger --valid-fraction")
    # Every rank runs the same number of forward passes (ZeRO-3 gathers parameters in each):
    # a rank short of one scores batch 0 again and throws the result away.
    per_rank = math.ceil(total / world_size)
    while len(rows) < per_rank:
        score(first, 0)
        rows.append(torch.zeros(len(names), dtype=torch.float64, device=device))
    sums = torch.stack(rows)
    if world_size > 1:
        gathered = [torch.empty_like(sums) for _ in range(world_size)]
        dist.all_gather(gathered, sums)
        # [rank, i] holds batch i * world_size + rank: back into batch order before adding up.
        sums = torch.stack(gathered, dim=1).reshape(-1, len(names))
    s = dict(zip(names, (float(v) for v in torch.cumsum(sums.cpu(), dim=0)[-1])))
    return {
        **objective.eval_record(s),
        "val/mask_rate": s["predicted"] / max(1.0, s["eligible"]),
        "val/sequences": s["examples"],
        "val/predictions": s["predicted"],
    }


def evaluate_saved_model(source: str | Path, *, data: str | None = None, seq_len: int = 0,
                         micro_batch: int = 16, max_pairs: int | None = None,
                         seed: int = 0) -> dict:
    """`mlm-dist eval`: the figures of a checkpoint (run dir, checkpoints dir or step dir), or
    of a Hugging Face BERT folder (the "before" of a domain adaptation), on `data`'s validation
    split (default: the run's shards), at `seq_len` (default: the run's last phase)."""
    from mlm_dist.config import ConfigError, load_config
    from mlm_dist.tokenizer import Tokenizer

    source = Path(source)
    if (source / "config.json").is_file():
        from mlm_dist.interop.huggingface import load_pretrained
        from mlm_dist.training.preflight import resolve_data

        if not data:
            raise ConfigError("--data is required to evaluate a Hugging Face folder")
        cfg, _ = resolve_data(load_config(None, [f"data.shards={data}",
                                                 f"model.init_from={source}"]))
        model, tokenizer_dir = load_pretrained(cfg.model), source
    else:
        from mlm_dist.training.checkpoint import load_checkpoint

        model, cfg, tokenizer_dir = load_checkpoint(source)
    phase = SequencePhase(seq_len=seq_len) if seq_len else cfg.schedule.phases[-1]
    phase = dataclasses.replace(phase, micro_batch=micro_batch)
    if phase.seq_len > cfg.model.max_positions:
        raise ConfigError(f"--seq-len {phase.seq_len} exceeds the model's max_positions "
                          f"{cfg.model.max_positions}")
    cfg.eval = dataclasses.replace(cfg.eval, seed=seed, max_pairs=(
        cfg.eval.max_pairs if max_pairs is None else max_pairs))
    tokenizer = Tokenizer.load(tokenizer_dir)
    data = data or cfg.data.shards
    if Manifest.load(data).tokenizer.sha256 != tokenizer.sha256:
        raise ValueError(f"--data {data} was not prepared with this model's tokenizer "
                         f"({tokenizer.path}); the ids would not mean what the model learned")
    model.eval()
    return {"seq_len": phase.seq_len,
            **evaluate(model, cfg, phase, tokenizer.vocabulary, shards=data)}
