"""On-device MLM masking: rates, 80/10/10, specials, static shapes, reproducibility."""

import numpy as np
import pytest
import torch

from mlm_dist.masking import IGNORE_INDEX, TokenMasker, mask_seed
from mlm_dist.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID

VOCAB = 1000
SPECIAL = np.zeros(VOCAB, dtype=bool)
SPECIAL[:5] = True


def masker(k=200, seed=0, rank=0, **kw):
    return TokenMasker(SPECIAL, MASK_ID, k, seed=seed, rank=rank, device="cpu", **kw)


def ordinary_ids(batch=64, seq=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, VOCAB, (batch, seq), generator=g)


def test_rate_and_80_10_10():
    ids = ordinary_ids()
    out = masker()(ids, step=0)
    assert out.positions.shape == out.labels.shape == (64, 200)
    used = out.labels != IGNORE_INDEX
    rate = used.sum().item() / ids.numel()
    assert abs(rate - 0.15) < 0.005
    orig = torch.gather(ids, 1, out.positions)[used]
    new = torch.gather(out.input_ids, 1, out.positions)[used]
    assert torch.equal(out.labels[used], orig)
    n = used.sum().item()
    frac_mask = (new == MASK_ID).sum().item() / n
    frac_same = (new == orig).sum().item() / n
    frac_random = 1 - frac_mask - frac_same
    assert abs(frac_mask - 0.8) < 0.025
    assert abs(frac_random - 0.1) < 0.02  # ~4 sigma at n≈4900
    assert abs(frac_same - 0.1) < 0.02


def test_input_changes_only_where_labelled():
    ids = ordinary_ids()
    out = masker()(ids, step=3)
    changed = out.input_ids != ids
    labelled = torch.zeros_like(ids, dtype=torch.bool)
    rows = torch.arange(ids.shape[0])[:, None].expand_as(out.positions)
    labelled[rows[out.labels != IGNORE_INDEX], out.positions[out.labels != IGNORE_INDEX]] = True
    assert not (changed & ~labelled).any()


def test_specials_never_chosen_and_random_tokens_never_special():
    ids = ordinary_ids(batch=256, seq=128)
    # Half of every row is special tokens of every kind.
    specials = torch.tensor([PAD_ID, CLS_ID, SEP_ID, MASK_ID, UNK_ID])
    ids[:, ::2] = specials[torch.arange(64) % 5]
    m = masker(k=64, random_frac=0.9, mask_frac=0.0)  # mostly random replacements
    out = m(ids, step=1)
    used = out.labels != IGNORE_INDEX
    chosen_originals = torch.gather(ids, 1, out.positions)[used]
    assert not SPECIAL[chosen_originals.numpy()].any()
    assert torch.equal(out.input_ids[:, ::2], ids[:, ::2])  # specials untouched
    new = torch.gather(out.input_ids, 1, out.positions)[used]
    replaced = new != chosen_originals
    assert replaced.sum() > 1000
    assert not SPECIAL[new[replaced].numpy()].any()


def test_reproducible_from_seed_rank_step():
    ids = ordinary_ids(batch=8, seq=128)
    a = masker(k=40, seed=7, rank=1)(ids, step=5, micro_step=2)
    b = masker(k=40, seed=7, rank=1)(ids, step=5, micro_step=2)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    for other in (masker(k=40, seed=7, rank=0)(ids, step=5, micro_step=2),
                  masker(k=40, seed=7, rank=1)(ids, step=6, micro_step=2),
                  masker(k=40, seed=8, rank=1)(ids, step=5, micro_step=2)):
        assert not torch.equal(a.input_ids, other.input_ids)
    assert len({mask_seed(1, r, s, m) for r in range(4) for s in range(50) for m in range(4)}) == 800


def test_overflow_beyond_max_predictions_leaves_input_untouched():
    ids = ordinary_ids(batch=16, seq=128)
    out = masker(k=5, prob=0.5)(ids, step=0)
    used = out.labels != IGNORE_INDEX
    assert used.sum(1).max() <= 5 and used.all()  # prob 0.5 of 128 always fills 5 slots
    assert ((out.input_ids != ids).sum(1) <= 5).all()


@pytest.mark.parametrize("bad", [np.ones(VOCAB, dtype=bool)])
def test_vocabulary_without_ordinary_tokens_is_an_error(bad):
    with pytest.raises(ValueError, match="non-special"):
        TokenMasker(bad, MASK_ID, 10, seed=0, rank=0, device="cpu")
