"""On-device MLM masking: rates, 80/10/10, specials, static shapes, reproducibility."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mlm_dist.bench.masking import _text_batch
from mlm_dist.config import load_config

from mlm_dist.config import MaskingConfig
from mlm_dist.masking import IGNORE_INDEX, TokenMasker, mask_seed, max_predictions
from mlm_dist.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID, Vocabulary

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VOCAB = 1000
SPECIAL = np.zeros(VOCAB, dtype=bool)
SPECIAL[:5] = True


def vocabulary(special=SPECIAL, word_start=None):
    word_start = np.ones(len(special), dtype=bool) if word_start is None else word_start
    return Vocabulary(len(special), PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID, special, word_start)


def masker(k=200, seed=0, rank=0, special=SPECIAL, word_starts=None, **kw):
    """kw: MaskingConfig fields (prob, mask_frac, random_frac). With a word-start table, the
    batches' per-token word starts are read off it (as `prepare` does for "▁" / "##")."""
    masking = MaskingConfig(whole_word=word_starts is not None, **kw)
    m = TokenMasker(vocabulary(special), masking, max_predictions=k, seed=seed, rank=rank,
                    device="cpu")
    if word_starts is None:
        return m
    table = torch.as_tensor(word_starts)
    return lambda ids, step, micro_step=0: m(ids, step, micro_step, word_starts=table[ids])


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


def test_vocabulary_without_ordinary_tokens_is_an_error():
    with pytest.raises(ValueError, match="non-special"):
        masker(k=10, special=np.ones(VOCAB, dtype=bool))


def test_each_row_masks_its_share_exactly():
    # Rows of very different lengths: each masks prob·n of its n eligible tokens, rounded down
    # or up at random (never an independent coin per token, whose count would spread widely).
    ids = ordinary_ids(batch=256, seq=128)
    lengths = torch.randint(4, 129, (256,), generator=torch.Generator().manual_seed(1))
    ids[torch.arange(128) >= lengths[:, None]] = PAD_ID
    out = masker(k=20)(ids, step=0)
    counts = (out.labels != IGNORE_INDEX).sum(1)
    exact = 0.15 * lengths
    assert ((counts == exact.floor()) | (counts == exact.ceil())).all()
    assert out.eligible == lengths.sum()
    # rounded at random, not always down: the total is the expectation
    assert abs(counts.sum().item() - exact.sum().item()) < 4 * np.sqrt(256 * 0.25)


# ---------------------------------------------------------------------------------------------
# Whole-word masking. Synthetic vocabulary: ids 5..499 start a word, 500..999 continue one.

FIRST_CONTINUATION = 500
WORD_STARTS = np.ones(VOCAB, dtype=bool)
WORD_STARTS[FIRST_CONTINUATION:] = False


def word_masker(k=512, seed=0, rank=0, word_starts=WORD_STARTS, special=SPECIAL, **kw):
    return masker(k, seed, rank, special=special, word_starts=word_starts, **kw)


def word_ids(batch=64, seq=512, lengths=(1, 2, 3, 4), seed=0):
    """Rows of [CLS] words… [SEP] words… [SEP] [PAD]…; word lengths drawn from `lengths`."""
    rng = np.random.default_rng(seed)
    rows = np.full((batch, seq), PAD_ID, dtype=np.int64)
    for r in range(batch):
        pieces = [CLS_ID]
        end = seq - int(rng.integers(0, seq // 8))  # some padding
        while len(pieces) < end - 1:
            if len(pieces) == end // 2:
                pieces.append(SEP_ID)
            n = int(rng.choice(lengths))
            pieces += [int(rng.integers(5, FIRST_CONTINUATION))]
            pieces += rng.integers(FIRST_CONTINUATION, VOCAB, n - 1).tolist()
        rows[r, :end - 1] = pieces[:end - 1]
        rows[r, end - 1] = SEP_ID
    return torch.from_numpy(rows)


def reference_words(row, word_starts, special) -> list[list[int]]:
    """The ordinary words of one row as lists of positions, by the documented rule, in Python:
    a word starts at a word-start piece or at any piece right after a special (or at position 0)."""
    words, after_special = [], True
    for i, t in enumerate(row):
        if special[t]:
            after_special = True
            continue
        if word_starts[t] or after_special:
            words.append([i])
        else:
            words[-1].append(i)
        after_special = False
    return words


def labelled_mask(out, shape):
    labelled = torch.zeros(shape, dtype=torch.bool)
    used = out.labels != IGNORE_INDEX
    rows = torch.arange(shape[0])[:, None].expand_as(out.positions)
    labelled[rows[used], out.positions[used]] = True
    assert labelled.sum() == used.sum()  # no position in two slots
    return labelled


def check_whole_words(ids, out, word_starts=WORD_STARTS, special=SPECIAL):
    """Every word is labelled entirely or not at all; returns (labelled words, all words) by row."""
    labelled = labelled_mask(out, ids.shape).numpy()
    chosen, words_by_row = [], []
    for r, row in enumerate(ids.numpy()):
        words = reference_words(row, word_starts, special)
        flags = [labelled[r, w] for w in words]
        assert all(f.all() or not f.any() for f in flags), f"row {r}: a word is split"
        chosen.append([w for w, f in zip(words, flags) if f.all()])
        words_by_row.append(words)
    assert not labelled[special[ids.numpy()]].any()
    return chosen, words_by_row


def test_whole_word_masks_all_pieces_together_and_labels_them():
    ids = word_ids()
    out = word_masker(k=128)(ids, step=0)
    assert out.positions.shape == out.labels.shape == (64, 128)
    assert out.input_ids.shape == ids.shape and out.input_ids.is_contiguous()
    chosen, _ = check_whole_words(ids, out)
    assert any(len(w) == 4 for row in chosen for w in row)
    used = out.labels != IGNORE_INDEX
    assert torch.equal(out.labels[used], torch.gather(ids, 1, out.positions)[used])
    changed = out.input_ids != ids
    assert not (changed & ~labelled_mask(out, ids.shape)).any()


def test_whole_word_expected_token_fraction_is_prob():
    ids = word_ids(batch=128, lengths=(1, 1, 2, 3, 5, 8), seed=1)
    prob = 0.15
    out = word_masker(k=512, prob=prob)(ids, step=2)  # K = seq_len: nothing is ever dropped
    chosen, words = check_whole_words(ids, out)
    lengths = np.array([len(w) for row in words for w in row])
    masked_tokens = sum(len(w) for row in chosen for w in row)
    # Each row masks prob·n tokens in expectation: whole words in random order up to that count,
    # the word that would cross it taken with the probability that keeps the mean exact.
    assert abs(masked_tokens / lengths.sum() - prob) < 0.003
    # Words of every length are chosen, at about `prob`: the last word of a row is the only one
    # whose length matters, so long words lose only a little.
    chosen_lengths = np.array([len(w) for row in chosen for w in row])
    for n in (1, 2, 3, 5, 8):
        words_n, chosen_n = (lengths == n).sum(), (chosen_lengths == n).sum()
        assert 0.8 * prob < chosen_n / words_n < 1.2 * prob, n


def test_whole_word_80_10_10_per_token():
    ids = word_ids(batch=128, seed=2)
    out = word_masker(k=512)(ids, step=0)
    used = out.labels != IGNORE_INDEX
    orig = torch.gather(ids, 1, out.positions)[used]
    new = torch.gather(out.input_ids, 1, out.positions)[used]
    n = used.sum().item()
    frac_mask = (new == MASK_ID).sum().item() / n
    frac_same = (new == orig).sum().item() / n
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_same - 0.1) < 0.015  # ~4 sigma at n≈9800
    random = (new != orig) & (new != MASK_ID)
    assert random.sum() > 500 and not SPECIAL[new[random].numpy()].any()


@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_whole_word_never_splits_a_word_at_a_tight_k(k):
    # Words of 6 pieces never fit K ≤ 5: they must never be labelled, not even in part.
    ids = word_ids(batch=64, seq=128, lengths=(1, 2, 3, 6), seed=3)
    out = word_masker(k=k, prob=0.5)(ids, step=1)
    chosen, _ = check_whole_words(ids, out)
    used = out.labels != IGNORE_INDEX
    # Words are admitted whole until one does not fit, so a row with more chosen than K (all
    # rows here) loses fewer than the longest word's pieces: at most 5 slots stay empty.
    assert (used.sum(1) <= k).all() and (used.sum(1) >= k - 5).all()
    if k < 6:
        assert all(len(w) < 6 for row in chosen for w in row)
    # Used slots come first; unlabelled positions keep their input.
    assert torch.equal(used, used.cummin(dim=1).values)
    assert not ((out.input_ids != ids) & ~labelled_mask(out, ids.shape)).any()


def test_whole_word_every_labelled_position_is_replaced():
    # With mask_frac=1 every labelled position must read [MASK]: catches a slot whose write is
    # undone by an unused slot pointing at the same position. Rows start without [CLS], so
    # position 0 is an ordinary word that can be chosen.
    ids = word_ids(batch=64, seq=64, seed=4)[:, 1:]
    ids[:, 0] = 7
    for step in range(5):
        out = word_masker(k=16, mask_frac=1.0, random_frac=0.0)(ids, step=step)
        labelled = labelled_mask(out, ids.shape)
        assert labelled[:, 0].any()
        assert (out.input_ids[labelled] == MASK_ID).all()
        assert torch.equal(out.input_ids[~labelled], ids[~labelled])


def test_whole_word_continuation_after_a_special_is_its_own_word():
    # A segment truncated at the front begins mid-word: [CLS] c c w c [SEP] c w [SEP].
    c, w = FIRST_CONTINUATION + 1, 9
    row = [CLS_ID, c, c, w, c, SEP_ID, c, w, SEP_ID]
    ids = torch.tensor([row] * 2000)
    out = word_masker(k=9, prob=0.3)(ids, step=0)
    chosen, words = check_whole_words(ids, out)
    assert words[0] == [[1, 2], [3, 4], [6], [7]]
    seen = {tuple(w) for row in chosen for w in row}
    assert seen == {(1, 2), (3, 4), (6,), (7,)}


def test_whole_word_specials_never_chosen():
    ids = word_ids(batch=64, seq=128, seed=5)
    specials = torch.tensor([PAD_ID, CLS_ID, SEP_ID, MASK_ID, UNK_ID])
    ids[:, 1::3] = specials[torch.arange(ids[:, 1::3].shape[1]) % 5]
    out = word_masker(k=64, prob=0.5)(ids, step=0)
    check_whole_words(ids, out)
    is_special = torch.from_numpy(SPECIAL)[ids]
    assert torch.equal(out.input_ids[is_special], ids[is_special])
    assert (out.labels != IGNORE_INDEX).sum() > 1000


def test_whole_word_reproducible_from_seed_rank_step():
    ids = word_ids(batch=8, seq=128)
    a = word_masker(k=40, seed=7, rank=1)(ids, step=5, micro_step=2)
    b = word_masker(k=40, seed=7, rank=1)(ids, step=5, micro_step=2)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.positions, b.positions)
    for other in (word_masker(k=40, seed=7, rank=0)(ids, step=5, micro_step=2),
                  word_masker(k=40, seed=7, rank=1)(ids, step=5, micro_step=3),
                  word_masker(k=40, seed=8, rank=1)(ids, step=5, micro_step=2)):
        assert not torch.equal(a.input_ids, other.input_ids)


def test_vocabulary_tables_must_cover_the_vocabulary():
    with pytest.raises(ValueError, match="word_start"):
        vocabulary(SPECIAL, WORD_STARTS[:-1])


def test_whole_word_masking_needs_the_batchs_word_starts():
    m = TokenMasker(vocabulary(), MaskingConfig(whole_word=True), max_predictions=8, seed=0,
                    rank=0, device="cpu")
    with pytest.raises(ValueError, match="word_starts"):
        m(ordinary_ids(batch=2, seq=16), step=0)


def test_whole_word_on_a_real_sentencepiece_tokenizer(tiny_tokenizer):
    tok = tiny_tokenizer
    special, starts = tok.vocabulary.special, tok.vocabulary.word_start
    assert starts[special].all() and not starts.all()
    text = ("Return the canonical string representation of the object. "
            "Raise ValueError if the argument is not a valid configuration.")
    pieces = tok.encode(text)
    row = [CLS_ID] + pieces[3:] + [SEP_ID] + pieces + [SEP_ID]  # segment A starts mid-text
    ids = torch.full((256, len(row) + 4), PAD_ID)
    ids[:, :len(row)] = torch.tensor(row)
    masker_ = masker(k=16, special=special, word_starts=starts, prob=0.3)
    out = masker_(ids, step=0)
    chosen, words = check_whole_words(ids, out, starts, special)
    # The reference's words are SentencePiece's: each begins with "▁" unless it follows a special.
    for w in words[0]:
        if ids[0, w[0] - 1].item() not in (CLS_ID, SEP_ID):
            assert tok.id_to_piece(ids[0, w[0]].item()).startswith("\u2581")
        assert not any(tok.id_to_piece(ids[0, i].item()).startswith("\u2581") for i in w[1:])
    assert any(len(w) > 1 for w in words[0])
    assert any(len(w) > 1 for row in chosen for w in row)  # multi-piece words do get masked


SHIPPED_PHASES = [(path.name, i, phase) for path in sorted(REPO_CONFIGS.glob("*.yaml"))
                  for i, phase in enumerate(load_config(path, ["data.shards=x"]).schedule.phases)]


@pytest.mark.parametrize("whole_word", [False, True])
@pytest.mark.parametrize("name, index, phase", SHIPPED_PHASES,
                         ids=[f"{n}-{i}" for n, i, _ in SHIPPED_PHASES])
def test_effective_rate_is_prob_for_every_shipped_phase(tiny_tokenizer, tiny_corpus, name, index,
                                                        phase, whole_word):
    """Full rows of real text (the worst case for the K slots), the config's own K."""
    cfg = load_config(REPO_CONFIGS / name, ["data.shards=x", f"masking.whole_word={whole_word}"])
    k = max_predictions(phase, cfg.masking)
    rows = _text_batch(tiny_tokenizer, tiny_corpus, batch=256, seq_len=phase.seq_len)
    m = TokenMasker(tiny_tokenizer.vocabulary, cfg.masking, max_predictions=k, seed=0, rank=0,
                    device="cpu")
    ids = torch.from_numpy(rows["input_ids"])
    starts = torch.from_numpy(tiny_tokenizer.vocabulary.word_start)[ids]
    masked = predicted = 0
    for step in range(4):
        out = m(ids, step=step, word_starts=starts)
        masked += (out.labels != IGNORE_INDEX).sum().item()
        predicted += out.eligible.item()
    assert abs(masked / predicted - cfg.masking.prob) <= 0.002, (k, masked / predicted)
