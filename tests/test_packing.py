"""Packed rows (data.pack): several NSP pairs a row, none seeing another, each predicted on its
own: the logits of the dense path, BERT's layout per pair, the loader's exact resume, the mask
rate and NSP balance (in one process and in a 2-rank run) and more real tokens per row."""

import itertools

import numpy as np
import pytest
import torch

from launch import metrics, train
from mlm_dist.config import DataConfig, MaskingConfig, ModelConfig
from mlm_dist.data.batches import PackedBatchWriter, pairs_per_row
from mlm_dist.data.pipeline import LoaderSettings, ResumableLoader, manifest_shards
from mlm_dist.data.shards import Manifest
from mlm_dist.masking import TokenMasker
from mlm_dist.model import IGNORE_INDEX, BertForPretraining, Packing
from mlm_dist.tokenizer import CLS_ID, PAD_ID, SEP_ID, Tokenizer


def test_packed_pairs_give_the_logits_of_one_pair_a_row():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=100, hidden_size=32, num_layers=3, num_heads=4,
                      intermediate_size=64, max_positions=64, dropout=0.0,
                      attention_dropout=0.0)
    model = BertForPretraining(cfg).eval()
    seq_len, pairs = 48, [(5, 7), (3, 4), (9, 2)]  # (len A, len B)
    rows = []
    for la, lb in pairs:
        ids = torch.cat([torch.tensor([CLS_ID]), torch.randint(5, 100, (la,)),
                         torch.tensor([SEP_ID]), torch.randint(5, 100, (lb,)),
                         torch.tensor([SEP_ID])])
        rows.append((ids, torch.cat([torch.zeros(la + 2), torch.ones(lb + 1)]).long()))
    n = len(rows)
    dense = [torch.zeros(n, seq_len, dtype=torch.long) for _ in range(3)]  # ids, types, mask
    packed = [torch.zeros(1, seq_len, dtype=torch.long) for _ in range(4)]  # + positions, pair
    cls, offsets, at = torch.zeros(1, 4, dtype=torch.long), [], 0
    for i, (ids, types) in enumerate(rows):
        length = len(ids)
        dense[0][i, :length], dense[1][i, :length], dense[2][i, :length] = ids, types, 1
        for t, v in zip(packed, (ids, types, torch.arange(length), i + 1)):
            t[0, at:at + length] = v
        cls[0, i] = at
        offsets.append(at)
        at += length
    ids, types, positions, pair_ids = packed
    packing = Packing(positions, pair_ids, cls)
    masked = torch.tensor([[1, 3], [2, 4], [1, 10]])
    packed_masked = torch.cat([masked[i] + offsets[i] for i in range(n)])[None]
    with torch.no_grad():
        mlm, nsp = model(*dense, masked)
        packed_mlm, packed_nsp = model(ids, types, (pair_ids > 0).long(), packed_masked,
                                       packing=packing)
        every_mlm, every_nsp = model(ids, types, (pair_ids > 0).long(), None, packing=packing)
    assert (mlm.reshape(-1, 100) - packed_mlm.reshape(-1, 100)).abs().max() < 1e-4
    assert (nsp - packed_nsp[0, :n]).abs().max() < 1e-4
    assert (mlm.reshape(-1, 100) - every_mlm[0, packed_masked[0]]).abs().max() < 1e-4
    assert (nsp - every_nsp[0, :n]).abs().max() < 1e-4


def vocab_of(shards):
    return Tokenizer.load(Manifest.load(shards).tokenizer.path).vocabulary


def test_a_packed_row_holds_each_pair_in_berts_layout(tiny_shards):
    vocab = vocab_of(tiny_shards)
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(10, 500, rng.integers(1, 12)), rng.integers(10, 500, rng.integers(1, 12)),
              int(rng.integers(0, 2))) for _ in range(40)]
    writer = PackedBatchWriter(4, 64, vocab, pairs_per_row(64))
    placed = []
    for a, b, label in pairs:
        if not writer.fits(a, b):
            break
        writer.add(a, b, label)
        placed.append((a, b, label))
    batch = writer.take()
    ids, types, mask = batch.input_ids.numpy(), batch.token_type_ids.numpy(), batch.attention_mask.numpy()
    pos, pair, cls = (t.numpy() for t in (batch.packing.position_ids,
                                          batch.packing.sequence_ids,
                                          batch.packing.cls_positions))
    labels = batch.example_label.numpy()
    found = []
    for r in range(4):
        for slot in range(pairs_per_row(64)):
            if labels[r, slot] == IGNORE_INDEX:
                assert not (pair[r] == slot + 1).any()
                continue
            where = np.flatnonzero(pair[r] == slot + 1)
            start, length = cls[r, slot], len(where)
            assert (where == np.arange(start, start + length)).all()
            assert (pos[r, where] == np.arange(length)).all() and mask[r, where].all()
            row = ids[r, where]
            sep = np.flatnonzero(row == SEP_ID)
            assert row[0] == CLS_ID and len(sep) == 2 and sep[1] == length - 1
            assert (types[r, where[:sep[0] + 1]] == 0).all()
            assert (types[r, where[sep[0] + 1:]] == 1).all()
            found.append((row[1:sep[0]].tolist(), row[sep[0] + 1:-1].tolist(), labels[r, slot]))
        assert (ids[r][pair[r] == 0] == PAD_ID).all() and not mask[r][pair[r] == 0].any()
    assert sorted(found) == sorted((a.tolist(), b.tolist(), label) for a, b, label in placed)
    assert len(placed) > 4  # more pairs than rows: that is the point


def test_moving_a_packed_batch_moves_the_tensors_it_holds(tiny_shards):
    """Batch.pin_memory / Batch.to move the batch's own tensors, packing's included: what the
    DataLoader pinned is what the step copies to the device (non_blocking). A copy in between
    (dataclasses.astuple deep-copies) would be pageable memory, and the copy synchronous.
    Pinning needs CUDA; moving to the device the batch is already on returns each tensor
    itself, so the same objects and storages come out exactly when nothing was copied."""
    rng = np.random.default_rng(1)
    writer = PackedBatchWriter(2, 64, vocab_of(tiny_shards), pairs_per_row(64))
    a, b = rng.integers(10, 500, 6), rng.integers(10, 500, 5)
    while writer.fits(a, b):
        writer.add(a, b, 0)
    batch = writer.take()
    assert (batch.packing.sequence_ids == 2).any()  # rows of several pairs
    batch.reader, batch.position, batch.skipped = 3, (0, 2, 7), 1
    moved = batch.to(torch.device("cpu"))
    fields = ("input_ids", "token_type_ids", "attention_mask", "example_label", "word_starts")
    for name in fields:
        assert getattr(moved, name) is getattr(batch, name), name
    for name in ("position_ids", "sequence_ids", "cls_positions"):
        before, after = getattr(batch.packing, name), getattr(moved.packing, name)
        assert after is before and after.data_ptr() == before.data_ptr(), name
    assert (moved.padded, moved.reader, moved.position, moved.skipped) == (True, 3, (0, 2, 7), 1)


def loader(shards, state=None, pack=True, micro=4, workers=0):
    settings = LoaderSettings(manifest_shards(shards), seq_len=64, micro_batch=micro, rank=0,
                              world_size=1, seed=3, vocab=vocab_of(shards),
                              data=DataConfig(num_workers=workers, pack=pack))
    return ResumableLoader(settings, state=state)


@pytest.mark.parametrize("workers", [0, 2])
def test_packed_batches_resume_exactly(tiny_shards, workers):
    full = list(itertools.islice(loader(tiny_shards, workers=workers), 20))
    first = loader(tiny_shards, workers=workers)
    list(itertools.islice(first, 8))
    resumed = list(itertools.islice(loader(tiny_shards, state=first.state_dict(),
                                           workers=workers), 12))
    for a, b in zip(resumed, full[8:]):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.example_label, b.example_label)
        assert torch.equal(a.packing.sequence_ids, b.packing.sequence_ids)


def test_packing_fills_rows_and_keeps_the_pairs_and_the_mask_rate(tiny_shards):
    """The same stream of pairs, packed: more real tokens a row, the same NSP labels in order,
    and TokenMasker's rate still masking.prob."""
    dense = list(itertools.islice(loader(tiny_shards, pack=False), 60))
    packed = list(itertools.islice(loader(tiny_shards), 20))

    def fill(batches):
        return sum(int(b.attention_mask.sum()) for b in batches) / sum(
            b.attention_mask.numel() for b in batches)

    assert fill(packed) > fill(dense) + 0.02  # the tiny corpus has long pairs: little to gain
    # Pairs stay in stream order: packed labels (row-major, slot order) are a rearrangement of
    # the dense ones, batch by batch, with the same count of each label over the same pairs.
    packed_pairs = sum(int((b.example_label != IGNORE_INDEX).sum()) for b in packed)
    dense_labels = torch.cat([b.example_label for b in dense])[:packed_pairs]
    packed_labels = torch.cat([b.example_label[b.example_label != IGNORE_INDEX] for b in packed])
    assert sorted(packed_labels.tolist()) == sorted(dense_labels.tolist())
    vocab = vocab_of(tiny_shards)
    masker = TokenMasker(vocab, MaskingConfig(), max_predictions=10, seed=0, rank=0,
                         device="cpu")
    chosen = eligible = 0
    for step, b in enumerate(packed):
        m = masker(b.input_ids, step, 0, b.word_starts)
        chosen += int((m.labels != IGNORE_INDEX).sum())
        eligible += int(m.eligible)
    assert abs(chosen / eligible - 0.15) < 0.01


def test_a_packed_run_on_two_ranks_keeps_the_mask_rate_and_the_nsp_balance(tiny_shards,
                                                                             tmp_path):
    """The same 2-rank DeepSpeed run, dense and packed: the training log's effective mask rate
    is masking.prob in both, and the share of random NSP pairs is the stream's in both (packing
    moves pairs into rows, it must not drop or favour either label)."""
    logged = {}
    for pack in (False, True):
        out = tmp_path / f"pack_{pack}"
        train(tiny_shards, out, f"data.pack={str(pack).lower()}", "train.log_every=1",
              "schedule.phases=[{seq_len: 64, micro_batch: 8, global_batch: 16, until_step: 12}]")
        logged[pack] = metrics(out)
    for pack, records in logged.items():
        assert len(records) == 12
        mask_rate = np.mean([r["data/mask_rate"] for r in records])
        assert abs(mask_rate - 0.15) < 0.002, (pack, mask_rate)
    # A packed row holds up to 2 pairs at seq 64: the packed run's pairs are the dense run's
    # and some more, in more of each row, and the fill says so.
    random_share = {pack: np.mean([r["data/nsp_random"] for r in records])
                    for pack, records in logged.items()}
    assert all(0.5 <= share <= 0.75 for share in random_share.values()), random_share
    assert abs(random_share[True] - random_share[False]) < 0.08, random_share
    fill = {pack: np.mean([r["data/fill"] for r in records]) for pack, records in logged.items()}
    assert fill[True] > fill[False] + 0.02, fill
