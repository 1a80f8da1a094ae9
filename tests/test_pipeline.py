"""The loader: every document read once per epoch by exactly one reader, whatever the number
of shards, ranks and workers; fixed-shape batches; exact resume; bad data skipped and counted."""

import itertools
import logging
import os
import shutil
import signal
import threading
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch

from data_fixtures import corpus_documents, write_shards
from mlm_dist.data.pipeline import (Consumed, LoaderSettings, ReaderStream, ResumableLoader,
                                    Shard, manifest_shards, regroup, work_units)
from mlm_dist.config import DataConfig
from mlm_dist.data.nsp import nsp_pairs
from mlm_dist.data.shards import WORD_START, Manifest
from mlm_dist.tokenizer import CLS_ID, SEP_ID, Tokenizer


def take(loader, n):
    return list(itertools.islice(loader, n))


def loader(shards_dir, rank=0, world=2, workers=0, seed=0, seq_len=64, micro=4, state=None,
           open_documents=1):
    """open_documents=1: one work unit per shard, as the shard-level tests below expect."""
    vocab = Tokenizer.load(Manifest.load(shards_dir).tokenizer.path).vocabulary
    settings = LoaderSettings(manifest_shards(shards_dir), seq_len=seq_len, micro_batch=micro,
                              rank=rank, world_size=world, seed=seed, vocab=vocab,
                              data=DataConfig(num_workers=workers, shuffle_buffer=16,
                                              open_documents=open_documents))
    return ResumableLoader(settings, state=state)


def ids(batches):
    return [b.input_ids for b in batches]


def same(xs, ys):
    return len(xs) == len(ys) and all(torch.equal(x, y) for x, y in zip(xs, ys))


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory, tiny_corpus, tiny_tokenizer):
    """Five shards of very different sizes: 1, 3, 7, 40 and 120 documents."""
    docs = corpus_documents(tiny_corpus, tiny_tokenizer)
    return write_shards(tmp_path_factory.mktemp("uneven") / "shards", docs, [1, 3, 7, 40, 120],
                        tiny_tokenizer)


@pytest.mark.parametrize("sizes, readers", [([5, 9, 2, 7], 2), ([5, 9, 2, 7], 4),
                                            ([5, 9, 2], 8), ([3], 4), ([1, 30], 5)])
def test_every_document_once_per_epoch_whatever_the_reader_count(sizes, readers):
    shards = [Shard(f"s{i}", n) for i, n in enumerate(sizes)]
    for epoch in range(3):
        seen = []
        for r in range(readers):
            for u in work_units(shards, epoch, 7, reader=r, readers=readers, documents=12):
                seen += [(s.path, d) for s in u.shards for d in range(s.documents)
                         if d % u.modulus == u.remainder]
        assert sorted(seen) == sorted((s.path, d) for s in shards for d in range(s.documents))


def test_batches_have_fixed_shape_and_bert_layout(tiny_shards):
    for b in take(loader(tiny_shards, seq_len=64, micro=8), 20):
        assert b.input_ids.shape == b.token_type_ids.shape == b.attention_mask.shape == (8, 64)
        assert b.input_ids.dtype == torch.long and b.example_label.shape == (8,)
        assert (b.input_ids[:, 0] == CLS_ID).all()
        assert ((b.input_ids == SEP_ID).sum(1) == 2).all()


def test_same_seed_same_stream_and_ranks_read_different_data(tiny_shards):
    a = take(loader(tiny_shards, workers=2, seed=3), 10)
    b = take(loader(tiny_shards, workers=2, seed=3), 10)
    other_rank = take(loader(tiny_shards, rank=1, workers=2, seed=3), 10)
    assert same(ids(a), ids(b))
    assert not torch.equal(a[0].input_ids, other_rank[0].input_ids)


# 3 workers on this machine's 2 cores: torch warns of slowness, beside the point here.
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize("world, workers", [(2, 2), (4, 2), (2, 3)])
def test_uneven_shards_and_more_readers_than_shards_never_run_dry(uneven_shards, world, workers):
    # 5 shards of 1..120 documents; up to 8 readers. Every rank's stream goes on through
    # many epochs (a few hundred pairs in all), so no rank can wait on another.
    for rank in range(world):
        assert len(take(loader(uneven_shards, rank, world, workers), 150)) == 150


@pytest.mark.parametrize("workers, consumed", [(0, 7), (2, 7), (2, 30)])
def test_resume_continues_with_the_exact_next_batches(tiny_shards, workers, consumed):
    full = take(loader(tiny_shards, workers=workers), consumed + 12)
    first = loader(tiny_shards, workers=workers)
    take(first, consumed)
    state = first.state_dict()
    resumed = take(loader(tiny_shards, workers=workers, state=state), 12)
    assert same(ids(resumed), ids(full[consumed:]))
    assert [b.example_label.tolist() for b in resumed] == [b.example_label.tolist()
                                                       for b in full[consumed:]]


def worker_processes(stream):
    """The process ids of a loader's workers (torch keeps their Process objects privately)."""
    return [w.pid for w in stream.iterator._workers]


def test_workers_are_fresh_interpreters_and_children_of_the_rank(tiny_shards):
    """Not forked: a fork of a rank with threads can hang on a lock one of them held (CPython
    gh-112275). Children of the rank: torch's watchdog ends them when the rank dies."""
    # closing: workers ignore SIGTERM, so ones left running would hang pytest's exit.
    with closing(loader(tiny_shards, workers=2)) as stream:
        take(stream, 4)
        for pid in worker_processes(stream):
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert b"--multiprocessing-fork" in command  # spawned, not a copy of pytest
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            assert parent == os.getpid()


def test_a_stop_signal_while_workers_start_does_not_kill_them(tiny_shards):
    """Slurm signals every process of the step; a worker still importing torch (the seconds
    before it can ignore the signal) must survive it and read the same batches."""
    expected = take(loader(tiny_shards, workers=2), 6)
    received = []
    previous = signal.signal(signal.SIGTERM, lambda *_: received.append(True))
    try:
        with closing(loader(tiny_shards, workers=2)) as stream:
            for pid in worker_processes(stream):  # they are starting now: torch takes seconds
                os.kill(pid, signal.SIGTERM)
            assert same(ids(take(stream, 6)), ids(expected))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not received  # the signal was theirs, not ours


def pairs_beside_a_thread_in_torch(seq_len, rng, data, vocab):
    """NSP pairs, in a worker that also runs a daemon thread living in torch's C++ (shared
    memory, as the queue's feeder does when it sends a batch) until the worker exits."""
    def share_forever():
        while True:
            torch.empty(1024).share_memory_()

    threading.Thread(target=share_forever, daemon=True).start()
    return nsp_pairs(seq_len, rng, data, vocab)


def test_workers_end_cleanly_with_a_thread_inside_torch(tiny_shards):
    """A spawned worker shutting its interpreter down while a daemon thread is in torch's C++
    aborts (CPython gh-87135), and the rank reports its worker killed; ours exit as forked
    ones do, before the interpreter finalizes."""
    vocab = Tokenizer.load(Manifest.load(tiny_shards).tokenizer.path).vocabulary
    settings = LoaderSettings(manifest_shards(tiny_shards), seq_len=64, micro_batch=4, rank=0,
                              world_size=1, seed=0, vocab=vocab,
                              data=DataConfig(num_workers=2, shuffle_buffer=16),
                              examples_of=pairs_beside_a_thread_in_torch)
    with closing(ResumableLoader(settings)) as stream:
        workers = list(stream.iterator._workers)
        take(stream, 4)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0


def test_resume_skips_whole_shards_without_reading_them(uneven_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(uneven_shards, shards)
    # One reader, 120 batches of 1: well into the second epoch.
    full = take(loader(shards, world=1, micro=1), 140)
    first = loader(shards, world=1, micro=1)
    take(first, 120)
    state = first.state_dict()
    (epoch, unit, _), = state["positions"].values()
    # Remove every shard the resumed reader should not need to open.
    units = work_units(manifest_shards(shards), epoch, 0, reader=0, readers=1)
    needed = {s.path for u in units[unit:] for s in u.shards} | {
        s.path for u in work_units(manifest_shards(shards), epoch + 1, 0, reader=0, readers=1) for s in u.shards}
    for s in manifest_shards(shards):
        if s.path not in needed:
            (shards / s.path.rsplit("/", 1)[1]).unlink()
    resumed = loader(shards, world=1, micro=1, state=state)
    assert same(ids(take(resumed, 20)), ids(full[120:]))
    assert resumed.skipped_documents == 0


def test_resume_refuses_a_different_topology(tiny_shards):
    first = loader(tiny_shards)
    take(first, 3)
    with pytest.raises(ValueError, match="same seed, shards, ranks, data.open_documents and "
                                         "data.num_workers"):
        loader(tiny_shards, workers=2, state=first.state_dict())


def test_bad_data_is_skipped_counted_and_named(uneven_shards, tmp_path, caplog):
    shards = tmp_path / "shards"
    shutil.copytree(uneven_shards, shards)
    (shards / "train-000001.tar").unlink()  # 3 documents, missing
    big = shards / "train-000004.tar"  # 120 documents, cut in half
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="mlm_dist.data"):
        # One reader, one epoch's worth of pairs and more: it must get past both.
        stream = loader(shards, world=1, micro=1)
        batches = take(stream, 500)  # more than one epoch
    assert len(batches) == 500
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "train-000001.tar" in messages and "train-000004.tar" in messages
    # 3 missing + the 59 documents past the cut, counted against the manifest, every epoch
    assert stream.skipped_documents >= 3 + 59


def test_small_shards_are_joined_into_units_of_enough_documents():
    shards = [Shard(f"s{i}", 5) for i in range(23)]
    for reader in range(2):
        units = work_units(shards, 0, 7, reader=reader, readers=2, documents=16)
        sizes = [sum(s.documents for s in u.shards) for u in units]
        assert all(n >= 16 for n in sizes) and max(sizes) < 2 * 16 + 5, sizes


@pytest.mark.parametrize("old_world, new_world", [(2, 1), (1, 2), (2, 3)])
def test_regroup_onto_another_rank_count_never_repeats_a_shard(uneven_shards, old_world,
                                                               new_world):
    shards = manifest_shards(uneven_shards)
    old = [loader(uneven_shards, rank=r, world=old_world, micro=2) for r in range(old_world)]
    for r, stream in enumerate(old):
        take(stream, 40 + 25 * r)  # readers at different places, some in a later epoch
    state = regroup([s.state_dict() for s in old], shards, new_world, num_workers=0)
    consumed = state["consumed"]
    epoch = consumed["epoch"]
    new_units = [u for r in range(new_world)
                 for u in work_units(shards, epoch, 0, reader=r, readers=new_world,
                                     consumed=Consumed(epoch, frozenset(consumed["shards"])))]
    new_paths = [s.path for u in new_units for s in u.shards]
    consumed_paths = {shards[i].path for i in consumed["shards"]}
    assert not consumed_paths & set(new_paths)  # nothing read twice in the epoch
    assert consumed_paths | set(new_paths) == {s.path for s in shards}  # and nothing lost
    # the regrouped loaders run, and keep the exclusion in their own state
    resumed = loader(uneven_shards, rank=0, world=new_world, micro=2, state=state)
    assert len(take(resumed, 5)) == 5
    assert resumed.state_dict()["consumed"] == consumed


def test_a_stretch_of_steps_samples_every_part_of_the_books(tiny_tokenizer, tmp_path):
    """Interleaving alone moves through all open books together, so a stretch of consecutive
    pairs would all come from the same region of each book (the same chapter of every manual).
    Google shuffles all instances; each open book handing out its pairs in random order brings
    that back: any window of the stream holds pairs from anywhere in the books (in book order,
    the mean spread of a window was 0.05)."""
    n_books, n_sentences = 24, 500  # ids stay below the tiny vocabulary's 600
    # A sentence's ids are its index in its book, so a pair tells where in the book A is.
    books = [[[10 + s] * 7 for s in range(n_sentences)] for _ in range(n_books)]
    shards = write_shards(tmp_path / "shards", books, [12, 12], tiny_tokenizer)

    stream = ReaderStream(manifest_shards(shards), reader=0, readers=1, seq_len=64, seed=3,
                          data=DataConfig())
    where = np.array([((int(p.a[0]) & (WORD_START - 1)) - 10) / n_sentences
                      for p, _ in stream.examples(epochs=1)])
    assert len(where) > 1500
    windows = where[:len(where) // 64 * 64].reshape(-1, 64)
    assert windows.std(axis=1).mean() > 0.25  # uniform over the book: 0.29
