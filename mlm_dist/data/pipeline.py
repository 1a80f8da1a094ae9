"""Shards -> fixed-shape batches, one loader per rank.

Each rank reads a disjoint slice of the shards, each dataloader worker a disjoint slice of that,
re-dealt every epoch from a seeded permutation. The stream is infinite (epochs follow one another),
so training length is counted in steps and no rank ever waits at an epoch boundary for another.
Everything random (shard order, document shuffle, NSP pairing) is seeded from
(seed, epoch, rank, worker), so the same topology reproduces the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import webdataset as wds

from mlm_dist.data.nsp import Example, NspPairBuilder
from mlm_dist.data.shards import decode_document


@dataclass
class Batch:
    input_ids: torch.Tensor  # long [B, S]
    token_type_ids: torch.Tensor  # long [B, S]
    attention_mask: torch.Tensor  # long [B, S], 1 = real token
    nsp_label: torch.Tensor  # long [B]

    def to(self, device: torch.device, non_blocking: bool = True) -> "Batch":
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in
                       (self.input_ids, self.token_type_ids, self.attention_mask, self.nsp_label)))

    def pin_memory(self) -> "Batch":
        return Batch(*(t.pin_memory() for t in
                       (self.input_ids, self.token_type_ids, self.attention_mask, self.nsp_label)))


def collate(examples: list[Example]) -> Batch:
    return Batch(
        torch.from_numpy(np.stack([e.input_ids for e in examples]).astype(np.int64)),
        torch.from_numpy(np.stack([e.token_type_ids for e in examples]).astype(np.int64)),
        torch.from_numpy(np.stack([e.attention_mask for e in examples]).astype(np.int64)),
        torch.tensor([e.nsp_label for e in examples], dtype=torch.long),
    )


def shards_for(shards: list[str], epoch: int, seed: int, rank: int, world_size: int,
               worker: int, num_workers: int) -> list[str]:
    """The shards one (rank, worker) reads in one epoch: a seeded deal of the whole list."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    mine = order[rank::world_size][worker::num_workers]
    return [shards[i] for i in mine]


class PretrainingStream(torch.utils.data.IterableDataset):
    def __init__(self, shards: list[str], seq_len: int, micro_batch: int, rank: int,
                 world_size: int, num_workers: int, seed: int, shuffle_buffer: int = 256,
                 short_seq_prob: float = 0.1):
        readers = world_size * max(1, num_workers)
        if len(shards) < readers:
            raise ValueError(
                f"data.shards: {len(shards)} train shards cannot feed {world_size} ranks × "
                f"{max(1, num_workers)} workers (each reader needs at least one shard); "
                "re-run `mlm-dist prepare` with a smaller --docs-per-shard or lower data.num_workers")
        self.shards = shards
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(1, num_workers)
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.short_seq_prob = short_seq_prob

    def _documents(self, urls: list[str], rng: np.random.Generator) -> Iterator[list]:
        samples = wds.tarfile_to_samples(handler=wds.reraise_exception)(
            iter([{"url": u} for u in urls]))
        buffer: list = []
        for sample in samples:
            buffer.append(decode_document(sample))
            if len(buffer) >= self.shuffle_buffer:
                # Swap-remove a random element: a shuffle buffer with O(1) pops.
                j = int(rng.integers(len(buffer)))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        epoch = 0
        pending: list[Example] = []
        while True:
            rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
            urls = shards_for(self.shards, epoch, self.seed, self.rank, self.world_size,
                              worker, self.num_workers)
            builder = NspPairBuilder(self.seq_len, rng, self.short_seq_prob)
            for example in builder(self._documents(urls, rng)):
                pending.append(example)
                if len(pending) == self.micro_batch:
                    yield collate(pending)
                    pending = []
            epoch += 1


def build_loader(shards: list[str], seq_len: int, micro_batch: int, rank: int,
                 world_size: int, num_workers: int, seed: int, shuffle_buffer: int = 256,
                 short_seq_prob: float = 0.1, pin_memory: bool = False) -> Iterator[Batch]:
    stream = PretrainingStream(shards, seq_len, micro_batch, rank, world_size, num_workers,
                               seed, shuffle_buffer, short_seq_prob)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None)
    return iter(loader)
