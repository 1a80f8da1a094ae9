"""The loader: shards dealt across ranks and workers, fixed-shape batches, seeded order."""

import itertools

import pytest
import torch

from mlm_dist.data.pipeline import build_loader, shards_for
from mlm_dist.data.shards import shard_paths
from mlm_dist.tokenizer import CLS_ID, SEP_ID


@pytest.mark.parametrize("n_shards, world, workers", [(8, 2, 2), (5, 2, 1), (7, 3, 2)])
def test_each_epoch_deals_every_shard_to_exactly_one_reader(n_shards, world, workers):
    shards = [f"s{i}" for i in range(n_shards)]
    for epoch in range(3):
        dealt = [shards_for(shards, epoch, 0, r, world, w, workers)
                 for r in range(world) for w in range(workers)]
        flat = [s for d in dealt for s in d]
        assert sorted(flat) == sorted(shards)
    # the deal changes between epochs
    assert shards_for(shards, 0, 0, 0, world, 0, workers) != shards_for(shards, 1, 0, 0, world,
                                                                        0, workers) or n_shards < 4


def take(loader, n):
    return list(itertools.islice(loader, n))


def test_batches_have_fixed_shape_and_bert_layout(tiny_shards):
    paths = shard_paths(tiny_shards, "train")
    batches = take(build_loader(paths, 64, 8, rank=0, world_size=2, num_workers=0, seed=1), 20)
    for b in batches:
        assert b.input_ids.shape == b.token_type_ids.shape == b.attention_mask.shape == (8, 64)
        assert b.input_ids.dtype == torch.long and b.nsp_label.shape == (8,)
        assert (b.input_ids[:, 0] == CLS_ID).all()
        assert ((b.input_ids == SEP_ID).sum(1) == 2).all()


def test_same_seed_same_stream_and_ranks_read_different_data(tiny_shards):
    paths = shard_paths(tiny_shards, "train")
    a = take(build_loader(paths, 64, 4, 0, 2, num_workers=2, seed=3), 10)
    b = take(build_loader(paths, 64, 4, 0, 2, num_workers=2, seed=3), 10)
    other_rank = take(build_loader(paths, 64, 4, 1, 2, num_workers=2, seed=3), 10)
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    assert not torch.equal(a[0].input_ids, other_rank[0].input_ids)


def test_stream_is_infinite_across_epochs(tiny_shards):
    paths = shard_paths(tiny_shards, "train")
    # The tiny corpus has a few hundred pairs per rank; 200 batches of 8 span several epochs.
    assert len(take(build_loader(paths, 64, 8, 0, 2, num_workers=0, seed=0), 200)) == 200


def test_too_few_shards_for_the_readers_is_a_clear_error(tiny_shards):
    paths = shard_paths(tiny_shards, "train")
    with pytest.raises(ValueError, match="--docs-per-shard"):
        build_loader(paths, 64, 8, 0, world_size=len(paths), num_workers=2, seed=0)
