"""What a checkpoint holds besides the engine's weights and optimizer: the step, and each rank's
data position and random streams; how a run gets them back, on the same or another number of
ranks; and how the data position becomes the loader of each sequence phase."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from mlm_dist.config import RunConfig
from mlm_dist.data.pipeline import (LoaderSettings, ResumableLoader, Shard, carry_to_next_unit,
                                    regroup)
from mlm_dist.objectives import objective_for
from mlm_dist.tokenizer import Vocabulary


@dataclass
class DataPosition:
    phase: int  # the phase whose loader was at `loader`
    loader: dict  # that loader's state_dict(): where each of this rank's readers is


class TrainState:
    """The step the run is at and where this rank's data stream stands."""

    def __init__(self, step: int = 0, position: DataPosition | None = None):
        self.step = step
        self.position = position

    def loader(self, cfg: RunConfig, shards: list[Shard], phase_index: int, *, rank: int,
               world_size: int, vocab: Vocabulary, device: torch.device) -> ResumableLoader:
        """This rank's loader for a phase, from the saved position: exactly there within the
        phase it was saved in; at each reader's next work unit in a later phase, whose examples
        (another sequence length) are made differently."""
        state = None
        if self.position is not None:
            state = self.position.loader
            if self.position.phase != phase_index:
                state = carry_to_next_unit(state)
        phase = cfg.schedule.phases[phase_index]
        settings = LoaderSettings(shards, seq_len=phase.seq_len, micro_batch=phase.micro_batch,
                                  rank=rank, world_size=world_size, seed=cfg.train.seed,
                                  data=cfg.data, vocab=vocab,
                                  examples_of=objective_for(cfg).example_builder)
        return ResumableLoader(settings, pin_memory=device.type == "cuda", state=state)

    def remember(self, phase_index: int, loader: ResumableLoader) -> None:
        """Keep `loader`'s position: the next phase's loader (or a rolled-back one) starts
        from it, so data is never replayed."""
        self.position = DataPosition(phase_index, loader.state_dict())

    def client_state(self, phase_index: int, loader: ResumableLoader, world_size: int) -> dict:
        """Collective: what a checkpoint saves beside the engine, every rank's position and
        random streams gathered (each rank writes the same copy)."""
        return {"step": self.step, "phase": phase_index,
                "data": gather(loader.state_dict(), world_size),
                "rng": gather(rng_state(), world_size)}

    @classmethod
    def from_client_state(cls, client: dict, shards: list[Shard], *, rank: int, world_size: int,
                          num_workers: int) -> "TrainState":
        """The state a checkpoint saved. On the ranks that saved it, each gets its own position
        and random streams back (the resumed run is bit-exact). On another number of ranks
        the position carries over shard by shard (data.pipeline.regroup): nothing is read
        twice, and the run is no longer identical to an uninterrupted one."""
        if len(client["data"]) == world_size:
            set_rng_state(client["rng"][rank])
            loader = client["data"][rank]
        else:
            if rank == 0:
                print(f"resuming a {len(client['data'])}-rank checkpoint on {world_size} ranks",
                      flush=True)
            loader = regroup(client["data"], shards, world_size, num_workers)
        return cls(client["step"], DataPosition(client["phase"], loader))


def gather(obj, world_size: int) -> list:
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def rng_state() -> dict:
    """This rank's random streams: the host's, and the generator of its own GPU only (the
    device init_distributed made current). The rank of a resumed run may see that GPU under
    another index, or see fewer GPUs (srun binding one per task): the states of all the GPUs
    visible now could not always go back. On a CPU rank the host's generator is the device's."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["device"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    own = torch.cuda.current_device()
    if "device" in state:
        torch.cuda.set_rng_state(state["device"], own)
    elif "cuda" in state and len(state["cuda"]) == torch.cuda.device_count():
        # Checkpoints before the "device" key hold every visible GPU's state; their ranks used
        # the GPU of their local rank, which is the current device again when the GPUs are
        # shown the same way. Shown otherwise, which state was this rank's is unknown and none
        # is restored: dropout then draws other numbers than an uninterrupted run would.
        torch.cuda.set_rng_state(state["cuda"][own], own)
