"""The run's checkpointer: when to save, saving, and restoring, on the same or another number of
ranks. The loop asks it (`should_save`, `save`, `restore`, `has_checkpoint`) and knows no paths;
the files and their crash-safety are checkpoint.py's.

When to save is decided by `save_decision`, a pure function of the step and of what the ranks
agreed on; only the agreement is collective. Stop signals and the every_minutes clock differ
between ranks, so they count only once one all-reduce has made every rank see the same, and
that happens at a few steps only (checkpoint.agrees_every): its host read waits for the device.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from mlm_dist.config import RunConfig
from mlm_dist.engine import Topology, to_universal
from mlm_dist.training import checkpoint
from mlm_dist.training.guards import StopSignals


class Agreed(NamedTuple):
    """What every rank agreed on at an agreement step (nothing, at the other steps)."""
    stop: bool = False  # some rank received a stop signal
    timed: bool = False  # checkpoint.every_minutes have passed since the last save (rank 0's clock)


class SaveDecision(NamedTuple):
    save: bool
    stop: bool  # after saving: a stop signal was received


def save_decision(step: int, cfg: RunConfig, agreed: Agreed) -> SaveDecision:
    """Save every checkpoint.every steps, at the last step, when the clock says so and on a
    stop signal, which also ends the run. The same on every rank, given what they agreed on."""
    every = cfg.checkpoint.every
    save_now = (agreed.stop or agreed.timed or step == cfg.schedule.total_steps
                or bool(every and step % every == 0))
    return SaveDecision(save_now, agreed.stop)


class Checkpointer:
    """One per run and rank, made before the engine (which may need `needs_universal_load`)."""

    def __init__(self, run_dir: Path, cfg: RunConfig, topo: Topology,
                 tokenizer_files: list[Path], stop: StopSignals):
        self.run_dir, self.cfg, self.topo = run_dir, cfg, topo
        self.tokenizer_files, self.stop = tokenizer_files, stop
        self.root = run_dir / checkpoint.CHECKPOINTS
        # Decided once, before the engine is built: a checkpoint written by another number of
        # ranks is loaded in DeepSpeed's universal form, which the engine must be told of.
        newest = checkpoint.latest_complete(self.root) if cfg.checkpoint.resume else None
        self.needs_universal_load = (newest is not None
                                     and checkpoint.saved_world_size(newest) != topo.world_size)
        self.last_save_time = time.monotonic()

    def should_save(self, step: int) -> SaveDecision:
        """Collective: every rank calls it after every step."""
        return save_decision(step, self.cfg, self.agree(step))

    def agrees_at(self, step: int) -> bool:
        """The steps the ranks agree on signals and the clock: every checkpoint.agrees_every
        steps, and the last."""
        c = self.cfg.checkpoint
        return (step % c.agrees_every(self.cfg.train.log_every) == 0
                or step == self.cfg.schedule.total_steps)

    def waits_at(self, step: int) -> bool:
        """Whether the checkpointer waits for the device at `step`: to agree, or to save."""
        every = self.cfg.checkpoint.every
        return self.agrees_at(step) or bool(every and step % every == 0)

    def agree(self, step: int) -> Agreed:
        """At the agreement steps, one all-reduce of the stop signals and rank 0's clock;
        elsewhere nothing, and no wait."""
        if not self.agrees_at(step):
            return Agreed()
        c = self.cfg.checkpoint
        # Its host read waits for the device: by default only at log steps, which wait anyway.
        due = (c.every_minutes > 0 and self.topo.rank == 0
               and time.monotonic() - self.last_save_time >= 60 * c.every_minutes)
        flags = torch.tensor([self.stop.received is not None, due], dtype=torch.int32,
                             device=self.topo.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return Agreed(*(bool(f) for f in flags.tolist()))

    def save(self, engine, step: int, client_state: dict) -> None:
        """Collective: the engine and `client_state` (TrainState.client_state) as the
        checkpoint of `step`, crash-safe (checkpoint.save)."""
        path = checkpoint.save(engine, self.run_dir, step, cfg=self.cfg,
                               tokenizer_files=self.tokenizer_files, client_state=client_state,
                               rank=self.topo.rank, keep=self.cfg.checkpoint.keep)
        self.last_save_time = time.monotonic()
        if self.topo.rank == 0:
            print(f"saved checkpoint {path}", flush=True)

    def restore(self, engine) -> dict | None:
        """Collective: the newest complete checkpoint into `engine` (through the universal form
        when needs_universal_load); its client state, or None when there is none."""
        client = checkpoint.resume(engine, self.run_dir,
                                   to_universal if self.needs_universal_load else None)
        if client is not None and self.topo.rank == 0:
            print(f"resumed from step {client['step']}", flush=True)
        return client

    def has_checkpoint(self) -> bool:
        """Whether a complete checkpoint exists to restore (the divergence guard's rollback)."""
        return checkpoint.latest_complete(self.root) is not None
