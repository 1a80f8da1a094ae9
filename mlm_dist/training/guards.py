"""What stops or rewinds a run: stop signals (Slurm's warning before a time limit or
preemption) and the divergence guard (too many optimizer steps skipped in a row)."""

from __future__ import annotations

import signal

from mlm_dist.config import TrainConfig


class DivergenceError(RuntimeError):
    pass


class StopSignals:
    """SIGTERM and SIGUSR1 (what Slurm sends before a time limit or preemption) only raise a
    flag here; the loop turns it into an agreed step, a checkpoint and a clean exit."""

    def __init__(self):
        self.received: int | None = None
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.received = signum


class DivergenceGuard:
    """Counts optimizer steps skipped in a row for non-finite gradients (DeepSpeed's check, or
    optim.SkipsNonFiniteSteps at ZeRO 0 with fp32 weights); every rank skips together, so
    every rank decides the same. After train.max_consecutive_skips: stop, or roll back."""

    def __init__(self, train: TrainConfig):
        self.limit, self.on_divergence = train.max_consecutive_skips, train.on_divergence
        self.skips = 0

    def should_roll_back(self, applied: bool, step: int, *, can_roll_back: bool) -> bool:
        """After each optimizer step; raises DivergenceError when the run must stop."""
        self.skips = 0 if applied else self.skips + 1
        if self.skips < self.limit:
            return False
        if self.on_divergence == "error" or not can_roll_back:
            raise DivergenceError(
                f"{self.skips} optimizer steps in a row had non-finite gradients (last at step "
                f"{step}); lower optim.lr, or set train.on_divergence=rollback to restart from "
                "the last checkpoint")
        self.skips = 0
        return True
