"""Validation: MLM loss, perplexity, MLM accuracy and NSP accuracy on the validation shards.

One deterministic pass: the validation split is read once, from its start, by a single reader
with its own seed (`eval.seed`), and cut into global micro-batches 0, 1, 2, ... Batch g is
scored by rank g mod ranks and masked with a generator seeded by (eval seed, g), with the run's
masking settings (rate, 80/10/10, whole words). So every evaluation of the same weights sees the
same pairs and the same masks, on 1 rank or on 8, and the per-batch sums are added up in batch
order on every rank: the numbers do not depend on the number of ranks. `eval.max_pairs` caps the
pass at the split's first pairs (0 = the whole split).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from mlm_dist.config import RunConfig, SequencePhase, max_predictions
from mlm_dist.data.pipeline import BatchWriter, ReaderStream, manifest_shards
from mlm_dist.masking import TokenMasker
from mlm_dist.model import IGNORE_INDEX, pretraining_loss
from mlm_dist.tokenizer import Vocabulary

# Per batch: mlm loss sum, mlm correct, mlm count, nsp loss sum, nsp correct, nsp count, eligible
_SUMS = 7


def validation_batches(cfg: RunConfig, phase: SequencePhase, vocab: Vocabulary,
                       shards: str) -> Iterator[tuple[torch.Tensor, ...]]:
    """(input_ids, token_type_ids, attention_mask, nsp_label, word_starts) of each global
    micro-batch of the pass; the last one is filled up with rows that count for nothing."""
    stream = ReaderStream(manifest_shards(shards, "valid"), reader=0, readers=1,
                          seq_len=phase.seq_len, seed=cfg.eval.seed, data=cfg.data)
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
    """`forward(input_ids, token_type_ids, attention_mask, positions) -> (mlm, nsp) logits`.
    `shards`: another shard directory than the run's `data.shards` (same tokenizer)."""
    device = torch.device(device)
    masker = TokenMasker(vocab, cfg.masking, max_predictions=max_predictions(phase, cfg.masking),
                         seed=cfg.eval.seed, rank=0, device=device)

    def score(batch: tuple[torch.Tensor, ...], g: int) -> torch.Tensor:
        ids, types, attention, nsp_labels, starts = (t.to(device) for t in batch)
        masked = masker(ids, step=g, word_starts=starts)
        mlm_logits, nsp_logits = forward(masked.input_ids, types, attention, masked.positions)
        out = pretraining_loss(mlm_logits, masked.labels, nsp_logits, nsp_labels)
        nsp_count = (nsp_labels != IGNORE_INDEX).sum()
        return torch.stack([out["mlm_loss"] * out["mlm_count"],
                            out["mlm_acc"] * out["mlm_count"], out["mlm_count"],
                            out["nsp_loss"] * nsp_count, out["nsp_acc"] * nsp_count, nsp_count,
                            masked.eligible]).double()

    # Every rank builds the whole stream (cheap next to the forward passes) and scores batch g
    # when g % ranks == rank, holding one batch at a time.
    rows, first, total = [], None, 0
    for g, batch in enumerate(validation_batches(cfg, phase, vocab, shards or cfg.data.shards)):
        first, total = first or batch, g + 1
        if g % world_size == rank:
            rows.append(score(batch, g))
    if not total:
        raise ValueError(f"the validation split of {shards or cfg.data.shards} gives no NSP pairs; "
                         "re-run `mlm-dist prepare` with a larger --valid-fraction")
    # Every rank runs the same number of forward passes (ZeRO-3 gathers parameters in each):
    # a rank short of one scores batch 0 again and throws the result away.
    per_rank = math.ceil(total / world_size)
    while len(rows) < per_rank:
        score(first, 0)
        rows.append(torch.zeros(_SUMS, dtype=torch.float64, device=device))
    sums = torch.stack(rows)
    if world_size > 1:
        gathered = [torch.empty_like(sums) for _ in range(world_size)]
        dist.all_gather(gathered, sums)
        # [rank, i] holds batch i * world_size + rank: back into batch order before adding up.
        sums = torch.stack(gathered, dim=1).reshape(-1, _SUMS)
    mlm_loss_sum, mlm_correct, mlm_count, nsp_loss_sum, nsp_correct, sequences, eligible = (
        float(v) for v in torch.cumsum(sums.cpu(), dim=0)[-1])
    mlm_loss = mlm_loss_sum / max(1.0, mlm_count)
    return {
        "val/mlm_loss": mlm_loss,
        "val/perplexity": math.exp(min(mlm_loss, 50.0)),
        "val/mlm_acc": mlm_correct / max(1.0, mlm_count),
        "val/nsp_loss": nsp_loss_sum / max(1.0, sequences),
        "val/nsp_acc": nsp_correct / max(1.0, sequences),
        "val/mask_rate": mlm_count / max(1.0, eligible),
        "val/sequences": sequences,
        "val/predictions": mlm_count,
    }
