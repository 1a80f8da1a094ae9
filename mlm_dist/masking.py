"""MLM masking on the rank's own device, inside the training step.

Why not a CPU collator: the collator costs loader time per batch and its randomness lives in
dataloader workers, which makes resumes irreproducible. Here masking is a handful of tensor ops on
the batch already on the device, and the random generator is re-seeded from (seed, rank, step,
micro-step), so a resumed run draws exactly the masks the uninterrupted run drew.

Shapes are static: every sequence gets exactly `max_predictions` prediction slots (BERT's
`max_predictions_per_seq`). Chosen positions fill the slots; unused slots carry label -100.
That keeps the MLM head's gather and the vocabulary projection free of data-dependent shapes,
so there is no host synchronisation and CUDA graphs / torch.compile can apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mlm_dist.model import IGNORE_INDEX


@dataclass
class MaskedBatch:
    input_ids: torch.Tensor  # [B, S] ids after [MASK]/random/keep replacement
    positions: torch.Tensor  # [B, K] positions the MLM head predicts
    labels: torch.Tensor  # [B, K] original ids at `positions`, IGNORE_INDEX on unused slots


def mask_seed(seed: int, rank: int, step: int, micro_step: int) -> int:
    """A 63-bit seed that differs for every (seed, rank, step, micro_step), via splitmix64."""
    x = 0
    for part in (seed, rank, step, micro_step):
        x = (x ^ (part & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def mask_tokens(
    input_ids: torch.Tensor,
    special: torch.Tensor,
    replacement_ids: torch.Tensor,
    mask_id: int,
    max_predictions: int,
    generator: torch.Generator,
    prob: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
) -> MaskedBatch:
    """BERT masking: choose each non-special token with `prob`; of those 80 % -> [MASK],
    10 % -> a random non-special token, 10 % unchanged.

    special:          bool[V] on the device, True for ids never chosen ([PAD] [CLS] [SEP] [MASK] …)
    replacement_ids:  long[R], the non-special ids a random replacement is drawn from
    """
    device = input_ids.device
    batch, seq_len = input_ids.shape
    k = max_predictions

    def uniform(*shape):
        return torch.rand(shape, generator=generator, device=device)

    chosen = ~special[input_ids] & (uniform(batch, seq_len) < prob)

    # Fill K slots per row: chosen positions score in [1, 2), others 0, so top-k takes the chosen
    # ones first (in random order, which also picks a random subset if more than K were chosen).
    score = chosen * (1.0 + uniform(batch, seq_len))
    top_score, positions = torch.topk(score, k, dim=1, sorted=False)
    used = top_score >= 1.0  # [B, K]: slot holds a chosen position
    # Chosen positions that did not fit in K slots are left untouched rather than masked
    # without a label: the input only changes where the loss looks.
    originals = torch.gather(input_ids, 1, positions)
    labels = torch.where(used, originals, torch.full_like(originals, IGNORE_INDEX))

    action = uniform(batch, k)
    to_mask = used & (action < mask_frac)
    to_random = used & (action >= mask_frac) & (action < mask_frac + random_frac)
    draw = torch.randint(len(replacement_ids), (batch, k), generator=generator, device=device)
    random_tokens = replacement_ids[draw]
    new_tokens = torch.where(to_mask, torch.full_like(originals, mask_id),
                             torch.where(to_random, random_tokens, originals))
    masked_ids = input_ids.scatter(1, positions, new_tokens)
    return MaskedBatch(masked_ids, positions, labels)


class TokenMasker:
    """Holds the device-side lookup tables and the generator; one per rank."""

    def __init__(self, special_table: np.ndarray, mask_id: int, max_predictions: int,
                 seed: int, rank: int, device: torch.device | str,
                 prob: float = 0.15, mask_frac: float = 0.8, random_frac: float = 0.1):
        device = torch.device(device)
        self.special = torch.as_tensor(special_table, dtype=torch.bool, device=device)
        self.replacement_ids = torch.as_tensor(np.flatnonzero(~special_table), dtype=torch.long,
                                               device=device)
        if len(self.replacement_ids) == 0:
            raise ValueError("the vocabulary has no non-special tokens to draw replacements from")
        self.mask_id = mask_id
        self.max_predictions = max_predictions
        self.seed, self.rank = seed, rank
        self.prob, self.mask_frac, self.random_frac = prob, mask_frac, random_frac
        self.generator = torch.Generator(device=device)

    def __call__(self, input_ids: torch.Tensor, step: int, micro_step: int = 0) -> MaskedBatch:
        self.generator.manual_seed(mask_seed(self.seed, self.rank, step, micro_step))
        return mask_tokens(input_ids, self.special, self.replacement_ids, self.mask_id,
                           self.max_predictions, self.generator,
                           self.prob, self.mask_frac, self.random_frac)
