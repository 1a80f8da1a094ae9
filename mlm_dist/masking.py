"""MLM masking on the rank's own device, inside the training step.

Why not a CPU collator: the collator costs loader time per batch and its randomness lives in
dataloader workers, which makes resumes irreproducible. Here masking is a handful of tensor ops on
the batch already on the device, and the random generator is re-seeded from (seed, rank, step,
micro-step), so a resumed run draws exactly the masks the uninterrupted run drew.

Shapes are static: every sequence gets exactly `max_predictions` prediction slots (BERT's
`max_predictions_per_seq`). Chosen positions fill the slots; unused slots carry label -100.
That keeps the MLM head's gather and the vocabulary projection free of data-dependent shapes,
so there is no host synchronisation and CUDA graphs / torch.compile can apply.

Whole-word masking (`mask_whole_words`) chooses words instead of tokens. What a word is comes from
a bool[V] word-start table (SentencePiece: pieces beginning with "▁"; WordPiece: pieces not
beginning with "##"), so the masking itself knows nothing about the tokenizer.
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


def mask_whole_words(
    input_ids: torch.Tensor,
    special: torch.Tensor,
    word_start: torch.Tensor,
    replacement_ids: torch.Tensor,
    mask_id: int,
    max_predictions: int,
    generator: torch.Generator,
    prob: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
) -> MaskedBatch:
    """Whole-word masking: choose each word with `prob` and mask all of its pieces together;
    every chosen piece then gets its own 80/10/10 draw (as Google's BERT WWM does).

    Choosing words (not tokens) with `prob` keeps the expected fraction of masked tokens at `prob`:
    every token is masked exactly when its word is.

    word_start: bool[V] on the device, True for ids that begin a word (specials are treated as
                starts whatever the table says).

    What counts as a word: a word-start piece plus the continuation pieces after it. Every special
    token is a word of its own (never chosen), and continuation pieces right after a special
    token (or at position 0) form a word of their own too: that is a segment truncated at the
    front so it begins mid-word, whose leading pieces must not be glued to the [CLS]/[SEP]
    before them.
    """
    device = input_ids.device
    batch, seq_len = input_ids.shape
    k = max_predictions

    def uniform(*shape):
        return torch.rand(shape, generator=generator, device=device)

    # On a CPU every fresh [B, S] temporary costs page faults (glibc maps large blocks anew), which
    # outweighs the arithmetic; hence int32 and bool where an index is not needed, and in-place
    # updates. (Tensor indices must be int64.)
    flat_ids = input_ids.reshape(-1)  # table lookups as a flat gather: half the cost of table[ids]
    is_special = special.gather(0, flat_ids).view(batch, seq_len)
    ordinary = ~is_special
    starts = word_start.gather(0, flat_ids).view(batch, seq_len)
    starts |= is_special
    starts[:, 1:] |= is_special[:, :-1]  # continuation pieces after a special start a word
    starts[:, 0] = True
    index = torch.arange(seq_len, device=device).expand(batch, seq_len)
    # The position of the word start each token belongs to: a running max over start positions.
    word_of = torch.where(starts, index, 0).cummax(dim=1).values  # [B, S]
    # Pieces per word, stored at the word's start position (0 elsewhere).
    ones = torch.ones(1, 1, dtype=torch.int32, device=device).expand(batch, seq_len)
    word_len = torch.zeros(batch, seq_len, dtype=torch.int32, device=device)
    word_len.scatter_add_(1, word_of, ones)

    chosen = uniform(batch, seq_len) < prob
    chosen &= starts
    chosen &= ordinary  # chosen at word starts only, never a special

    # The K slots must never hold part of a word, so words are admitted whole, in order, until
    # the next one would overflow K; later words are dropped whole (input untouched, no label),
    # like tokens that miss a slot in mask_tokens. The order is the row read from a random start
    # position, wrapping around, so any word can be the one cut off, not always the last ones
    # (random sort keys would be fairer still, but cost a sort per step for an overflow that the
    # K margin makes rare). The start is drawn up to the row's last ordinary token, so padding
    # does not make position 0 the start more often than any other.
    index_from_1 = torch.arange(1, seq_len + 1, dtype=torch.int32, device=device)
    span = torch.where(ordinary, index_from_1, 0).amax(dim=1, keepdim=True)  # [B, 1]
    offset = (uniform(batch, 1) * span).long()  # [B, 1], < span (or 0 for an all-special row)
    chosen_len = word_len.mul_(chosen)
    # Pieces of the chosen words that start at or before each position (a word's pieces count
    # at its start, so at a start this runs to the end of that word).
    through = torch.cumsum(chosen_len, dim=1, dtype=torch.int32)
    total = through[:, -1:]
    before_offset = through.gather(1, offset) - chosen_len.gather(1, offset)
    # Read from `offset` with wrap-around, the count up to the end of the word starting here is
    # through - before_offset, plus total where the position comes after the wrap.
    wrapped = index < offset
    fits = torch.where(wrapped, through <= k + before_offset - total,
                       through <= k + before_offset)
    fits &= chosen
    kept = fits.gather(1, word_of)  # [B, S]: every piece of a kept word; at most K per row

    # Kept positions fill the slots in order; every other position writes to a spare slot K
    # that is cut off, which keeps the scatter's shape static.
    slot = torch.cumsum(kept, dim=1).sub_(1).masked_fill_(~kept, k)
    slots = torch.zeros(batch, k + 1, dtype=torch.long, device=device)
    positions = slots.scatter_(1, slot, index)[:, :k]
    used = torch.arange(k, device=device) < kept.sum(dim=1, keepdim=True)  # [B, K]
    originals = torch.gather(input_ids, 1, positions)
    labels = originals.masked_fill(~used, IGNORE_INDEX)

    action = uniform(batch, k)
    to_mask = used & (action < mask_frac)
    to_random = used & (action >= mask_frac) & (action < mask_frac + random_frac)
    draw = torch.randint(len(replacement_ids), (batch, k), generator=generator, device=device)
    new_tokens = torch.where(to_random, replacement_ids[draw], originals)
    new_tokens.masked_fill_(to_mask, mask_id)
    # Unused slots point at position 0, which a used slot may also hold; a scatter with two
    # different values for one position keeps either. So unused slots repeat slot 0's write
    # (the same position and value; in a row with no used slot that is position 0's own id).
    target = torch.where(used, positions, positions[:, :1])
    values = torch.where(used, new_tokens, new_tokens[:, :1])
    masked_ids = input_ids.scatter(1, target, values)
    return MaskedBatch(masked_ids, positions, labels)


class TokenMasker:
    """Holds the device-side lookup tables and the generator; one per rank.

    word_starts: bool[V] (e.g. Tokenizer.word_start_table()) turns on whole-word masking;
    None masks single tokens.
    """

    def __init__(self, special_table: np.ndarray, mask_id: int, max_predictions: int,
                 seed: int, rank: int, device: torch.device | str,
                 prob: float = 0.15, mask_frac: float = 0.8, random_frac: float = 0.1,
                 word_starts: np.ndarray | None = None):
        device = torch.device(device)
        self.special = torch.as_tensor(special_table, dtype=torch.bool, device=device)
        self.replacement_ids = torch.as_tensor(np.flatnonzero(~special_table), dtype=torch.long,
                                               device=device)
        if len(self.replacement_ids) == 0:
            raise ValueError("the vocabulary has no non-special tokens to draw replacements from")
        self.word_starts = None
        if word_starts is not None:
            if np.shape(word_starts) != np.shape(special_table):
                raise ValueError(f"word_starts has {np.shape(word_starts)} entries but the special "
                                 f"table {np.shape(special_table)}: both must cover the vocabulary")
            self.word_starts = torch.as_tensor(word_starts, dtype=torch.bool, device=device)
        self.mask_id = mask_id
        self.max_predictions = max_predictions
        self.seed, self.rank = seed, rank
        self.prob, self.mask_frac, self.random_frac = prob, mask_frac, random_frac
        self.generator = torch.Generator(device=device)

    def __call__(self, input_ids: torch.Tensor, step: int, micro_step: int = 0) -> MaskedBatch:
        self.generator.manual_seed(mask_seed(self.seed, self.rank, step, micro_step))
        if self.word_starts is not None:
            return mask_whole_words(input_ids, self.special, self.word_starts,
                                    self.replacement_ids, self.mask_id, self.max_predictions,
                                    self.generator, self.prob, self.mask_frac, self.random_frac)
        return mask_tokens(input_ids, self.special, self.replacement_ids, self.mask_id,
                           self.max_predictions, self.generator,
                           self.prob, self.mask_frac, self.random_frac)
