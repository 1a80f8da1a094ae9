"""What stops or rewinds a run: stop signals (Slurm's warning before a time limit or
preemption) and the divergence guard (too many optimizer steps skipped in a row)."""

from __future__ import annotations

import signal

import torch

from mlm_dist.config import TrainConfig
from mlm_dist.errors import UserError


class DivergenceError(UserError, RuntimeError):
    pass


class StopSignals:
    """SIGTERM and SIGUSR1 (what Slurm sends before a time limit or preemption) only raise a
    flag here; the Checkpointer turns it into an agreed step and a checkpoint, the loop into a
    clean exit."""

    def __init__(self):
        self.received: int | None = None
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.received = signum


class DivergenceGuard:
    """Counts optimizer steps skipped in a row for non-finite gradients (DeepSpeed's check, or
    optim.SkipsNonFiniteSteps at ZeRO 0 with fp32 weights); every rank skips together, so
    every rank decides the same. After train.max_consecutive_skips: stop, or roll back.

    The counts live on the device: `record` runs every step and never waits for it (at ZeRO 0
    the verdict is itself a device tensor); `should_roll_back` reads them, and the loop calls
    it only at steps that wait for the device anyway (log, evaluation and checkpoint steps).
    A run of skips is therefore acted on up to that many steps late; the skipped steps left
    the weights alone meanwhile, so nothing is lost by the wait."""

    def __init__(self, train: TrainConfig, device: torch.device):
        self.limit, self.on_divergence = train.max_consecutive_skips, train.on_divergence
        # [skips in a row now, the longest run since the last read, skips in all]; float32
        # counts exactly to 2**24, and the verdict it is fed is a float 0/1.
        self.counts = torch.zeros(3, dtype=torch.float32, device=device)
        self.skipped = 0  # skips in all, as of the last read

    def record(self, skipped: bool | torch.Tensor) -> None:
        """After each optimizer step: `skipped` is a Python bool or a 0-d 0/1 tensor."""
        run, longest, total = self.counts.unbind()
        run.add_(1).mul_(skipped)  # +1, or back to 0 after an applied step
        torch.maximum(longest, run, out=longest)
        total.add_(skipped)

    def should_roll_back(self, step: int, *, can_roll_back) -> bool:
        """Reads the counts (a host read); raises DivergenceError when the run must stop.
        `can_roll_back()` says whether a checkpoint exists to go back to."""
        run, longest, total = self.counts.tolist()
        self.skipped = int(total)
        self.counts[1] = run  # the next read judges the runs from here on
        if longest < self.limit:
            return False
        if self.on_divergence == "error" or not can_roll_back():
            raise DivergenceError(
                f"{int(longest)} optimizer steps in a row had non-finite gradients (seen at "
                f"step {step}); lower optim.lr, or set train.on_divergence=rollback to restart "
                "from the last checkpoint")
        self.counts[:2] = 0
        return True
