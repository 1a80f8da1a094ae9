"""Validation: MLM loss, perplexity, MLM accuracy and NSP accuracy on the validation shards.

Everything random is fixed: the validation stream starts from the beginning with its own seed
every time and the masks are drawn from (eval seed, rank, batch index). Two evaluations of the
same weights on the same number of ranks therefore give the same numbers, unlike a collator
that draws fresh masks each time.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from mlm_dist.data.pipeline import ResumableLoader, manifest_shards
from mlm_dist.masking import TokenMasker
from mlm_dist.model import pretraining_loss
from mlm_dist.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID


@torch.no_grad()
def evaluate(forward: Callable, shards_dir: str, special_table, seq_len: int, micro_batch: int,
             batches: int, max_predictions: int, mask_prob: float, rank: int, world_size: int,
             device: torch.device, seed: int = 0,
             special_ids: tuple[int, int, int, int] = (CLS_ID, SEP_ID, PAD_ID, MASK_ID)
             ) -> dict[str, float]:
    """`forward(input_ids, token_type_ids, attention_mask, positions) -> (mlm, nsp) logits`.
    special_ids: the tokenizer's ([CLS], [SEP], [PAD], [MASK])."""
    stream = ResumableLoader(manifest_shards(shards_dir, "valid"), seq_len, micro_batch, rank,
                             world_size, num_workers=0, seed=seed, shuffle_buffer=1,
                             special_ids=special_ids[:3])
    masker = TokenMasker(special_table, special_ids[3], max_predictions, seed=seed, rank=rank,
                         device=device, prob=mask_prob)
    # mlm loss sum, mlm correct, mlm count, nsp loss sum, nsp correct, sequences
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    for i in range(batches):
        batch = next(stream).to(device)
        masked = masker(batch.input_ids, step=i)
        mlm_logits, nsp_logits = forward(masked.input_ids, batch.token_type_ids,
                                         batch.attention_mask, masked.positions)
        out = pretraining_loss(mlm_logits, masked.labels, nsp_logits, batch.nsp_label)
        n = batch.nsp_label.numel()
        sums += torch.stack([out["mlm_loss"] * out["mlm_count"], out["mlm_acc"] * out["mlm_count"],
                             out["mlm_count"], out["nsp_loss"] * n, out["nsp_acc"] * n,
                             torch.tensor(n, device=device)]).double()
    if world_size > 1:
        dist.all_reduce(sums)
    mlm_loss_sum, mlm_correct, mlm_count, nsp_loss_sum, nsp_correct, sequences = sums.tolist()
    mlm_loss = mlm_loss_sum / max(1.0, mlm_count)
    return {
        "val/mlm_loss": mlm_loss,
        "val/perplexity": math.exp(min(mlm_loss, 50.0)),
        "val/mlm_acc": mlm_correct / max(1.0, mlm_count),
        "val/nsp_loss": nsp_loss_sum / max(1.0, sequences),
        "val/nsp_acc": nsp_correct / max(1.0, sequences),
        "val/sequences": sequences,
        "val/predictions": mlm_count,
    }
