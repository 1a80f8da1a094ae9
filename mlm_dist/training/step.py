"""One optimizer step: the only place a micro-batch is masked, run forward and backward.

The training loop and every benchmark call `train_step`, so what a bench times or measures is
the step training runs. `engine` is a DeepSpeed engine, or anything with its four calls (the
train bench wraps a plain model and optimizer). What the forward pass predicts and how its loss
is made is the objective's (mlm_dist/objectives).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterator

from mlm_dist.data.batches import Batch
from mlm_dist.masking import TokenMasker
from mlm_dist.objectives import Objective
from mlm_dist.training import faults


def train_step(engine, batches: Iterator[Batch], masker: TokenMasker, objective: Objective, *,
               step: int, accumulation: int, record: Callable | None = None,
               after_backward: Callable[[int], None] | None = None) -> float:
    """Run `accumulation` micro-batches of `batches` into one optimizer step; return the
    seconds spent waiting for data. `record(losses, batch, masked)` sees each micro-batch's
    losses (tensors: nothing here waits for the device); `after_backward(micro)` runs between
    backward and the engine's step (the memory bench measures there)."""
    waited = 0.0
    faults.maybe_hang(step)
    for micro in range(accumulation):
        # Our step decides where DeepSpeed's accumulation ends, not its run-global micro-step
        # counter, which phases with other accumulation and resumes would shift off our steps.
        engine.set_gradient_accumulation_boundary(micro == accumulation - 1)
        start = time.perf_counter()
        batch = next(batches).to(engine.device)
        waited += time.perf_counter() - start
        masked = masker(batch.input_ids, step, micro, batch.word_starts)
        losses = objective.losses(engine, batch, masked)
        if faults.nan_loss(step):
            losses["loss"] = losses["loss"] * math.nan
        engine.backward(losses["loss"])
        if after_backward is not None:
            after_backward(micro)
        engine.step()
        if record is not None:
            record(losses, batch, masked)
    return waited
