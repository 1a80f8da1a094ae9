"""MLM masking on the rank's own device, inside the training step.

Why not a CPU collator: the collator costs loader time per batch and its randomness lives in
dataloader workers, which makes resumes irreproducible. Here masking is a handful of tensor ops on
the batch already on the device, and the random generator is re-seeded from (seed, rank, step,
micro-step), so a resumed run draws exactly the masks the uninterrupted run drew.

How many: like Google's create_pretraining_data.py, each row masks a fixed share of its
eligible tokens (not an independent coin per token): `prob · n` of its n eligible tokens, rounded
up or down at random so that the expectation is exactly `prob · n`. The effective rate is then
`masking.prob`, whatever the row lengths, and `max_predictions` slots derived from it
(`max_predictions` below) never cut a row short.

Shapes are static: every sequence gets exactly `max_predictions` prediction slots (BERT's
`max_predictions_per_seq`). Chosen positions fill the slots; unused slots carry label -100.
That keeps the MLM head's gather and the vocabulary projection free of data-dependent shapes,
so there is no host synchronisation and CUDA graphs / torch.compile can apply.

Whole-word masking chooses words instead of tokens. Where words begin comes with the batch,
one flag per token, decided at `prepare` time (data/words.py: a segmenter for Japanese and
Chinese, the tokenizer's "▁" / "##" otherwise), so the masking knows nothing of languages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlm_dist.config import MaskingConfig, SequencePhase
from mlm_dist.model import IGNORE_INDEX
from mlm_dist.tokenizer import Vocabulary


@dataclass
class MaskedBatch:
    input_ids: torch.Tensor  # [B, S] ids after [MASK]/random/keep replacement
    positions: torch.Tensor  # [B, K] positions the MLM head predicts
    labels: torch.Tensor  # [B, K] original ids at `positions`, IGNORE_INDEX on unused slots
    eligible: torch.Tensor  # scalar: tokens that could have been chosen (the rate's denominator)
    # The seed these masks were drawn with, f(seed, rank, step, micro-step): an objective that
    # draws more at random on top of the masks (ELECTRA's replacements) seeds from it, so a
    # resumed run and every evaluation draw the same again.
    seed: int = 0


def max_predictions(phase: SequencePhase, masking: MaskingConfig) -> int:
    """Predicted positions per sequence: configured, or derived so that no row is cut short."""
    return phase.max_predictions or min(phase.seq_len, masking.slots_needed(phase.seq_len))


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
    *,
    special: torch.Tensor,
    word_starts: torch.Tensor | None,
    replacement_ids: torch.Tensor,
    mask_id: int,
    max_predictions: int,
    generator: torch.Generator,
    prob: float,
    mask_frac: float,
    random_frac: float,
) -> MaskedBatch:
    """BERT masking on the device: choose `prob` of each row's eligible tokens (whole words when
    `word_starts` is given); of the chosen 80 % -> [MASK], 10 % -> a random ordinary token,
    10 % unchanged.

    special:          bool[V], True for ids never chosen ([PAD] [CLS] [SEP] [MASK] [UNK])
    word_starts:      bool[B, S], True where a token begins a word; None masks single tokens
    replacement_ids:  long[R], the non-special ids a random replacement is drawn from

    Whole words: every special is a word of its own (never chosen), and continuation pieces
    right after a special (or at position 0) form a word of their own: a segment truncated at the
    front begins mid-word, and its leading pieces must not be glued to the [CLS]/[SEP] before it.
    """
    device = input_ids.device
    batch, seq_len = input_ids.shape
    k = max_predictions

    def uniform(*shape):
        return torch.rand(shape, generator=generator, device=device)

    flat_ids = input_ids.reshape(-1)  # table lookups as a flat gather: half the cost of table[ids]
    is_special = special.gather(0, flat_ids).view(batch, seq_len)
    eligible = ~is_special
    index = torch.arange(seq_len, device=device).expand(batch, seq_len)
    if word_starts is None:
        starts = eligible
    else:
        starts = word_starts | is_special
        starts[:, 1:] |= is_special[:, :-1]  # continuation pieces after a special start a word
        starts[:, 0] = True
        starts &= eligible
        # The position of the word start each token belongs to: a running max over starts.
        word_of = torch.where(starts | is_special, index, 0).cummax(dim=1).values  # [B, S]
        # Pieces per word, stored at the word's start position (0 elsewhere).
        word_len = torch.zeros(batch, seq_len, dtype=torch.int32, device=device)
        word_len.scatter_add_(1, word_of, eligible.int())

    # How many tokens this row masks: prob · n rounded at random (floor(x + u) has mean x).
    n = eligible.sum(dim=1, keepdim=True)  # [B, 1]
    target = (n * prob + uniform(batch, 1)).floor_()

    # Words in a random order: random keys, sorted; only eligible word starts can come first.
    # Each word has at least one piece, so no word after the K-th can ever fit: top-K suffices.
    key = uniform(batch, seq_len).masked_fill_(~starts, 2.0)
    top_key, candidates = torch.topk(key, min(k, seq_len), dim=1, largest=False, sorted=True)
    valid = top_key < 2.0
    if word_starts is None:
        # Single tokens: the first `target` of the random order, exactly.
        chosen = valid & (torch.arange(candidates.shape[1], device=device) < target)
    else:
        length = word_len.gather(1, candidates) * valid  # [B, K]
        through = torch.cumsum(length, dim=1)  # tokens up to and including this word
        before = through - length
        # Whole words while they fit the target. The word that would cross it is taken with
        # the probability that makes the expected count exactly the target (always dropping it
        # would mask too little, always taking it too much); nothing may overflow the K slots.
        crossing = (before < target) & (through > target)
        take = uniform(batch, candidates.shape[1]) * length < target - before
        chosen = valid & ((through <= target) | (crossing & take)) & (through <= k)
    chosen_at = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
    chosen_at.scatter_(1, candidates, chosen)
    kept = chosen_at if word_starts is None else chosen_at.gather(1, word_of) & eligible

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
    where = torch.where(used, positions, positions[:, :1])
    values = torch.where(used, new_tokens, new_tokens[:, :1])
    masked_ids = input_ids.scatter(1, where, values)
    return MaskedBatch(masked_ids, positions, labels, n.sum())


class TokenMasker:
    """Holds the device-side lookup tables and the generator; one per rank."""

    def __init__(self, vocab: Vocabulary, masking: MaskingConfig, *, max_predictions: int,
                 seed: int, rank: int, device: torch.device | str):
        device = torch.device(device)
        if len(vocab.replacement_ids) == 0:
            raise ValueError("the vocabulary has no non-special tokens to draw replacements from")
        self.whole_word = masking.whole_word
        self.tables = dict(
            special=torch.as_tensor(vocab.special, dtype=torch.bool, device=device),
            replacement_ids=torch.as_tensor(vocab.replacement_ids, dtype=torch.long,
                                            device=device),
            mask_id=vocab.mask, max_predictions=max_predictions, prob=masking.prob,
            mask_frac=masking.mask_frac, random_frac=masking.random_frac)
        self.seed, self.rank = seed, rank
        self.generator = torch.Generator(device=device)

    def __call__(self, input_ids: torch.Tensor, step: int, micro_step: int = 0,
                 word_starts: torch.Tensor | None = None) -> MaskedBatch:
        """`word_starts`: bool [B, S] (Batch.word_starts), needed for whole-word masking."""
        if self.whole_word and word_starts is None:
            raise ValueError("whole-word masking needs the batch's word_starts")
        seed = mask_seed(self.seed, self.rank, step, micro_step)
        self.generator.manual_seed(seed)
        masked = mask_tokens(input_ids, generator=self.generator,
                             word_starts=word_starts if self.whole_word else None, **self.tables)
        masked.seed = seed
        return masked
