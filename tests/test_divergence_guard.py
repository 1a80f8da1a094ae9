"""The divergence guard counts skipped steps on the device and judges only when read: a run of
skips that ended between two reads is still caught, and its verdicts may be DeepSpeed's
Python bools or our optimizer's 0-d tensors."""

import pytest
import torch

from mlm_dist.config import TrainConfig
from mlm_dist.training.guards import DivergenceError, DivergenceGuard


def guard(on_divergence: str = "error") -> DivergenceGuard:
    return DivergenceGuard(TrainConfig(max_consecutive_skips=3, on_divergence=on_divergence),
                           torch.device("cpu"))


def feed(g: DivergenceGuard, verdicts: str) -> None:
    """'s' a skipped step, '.' an applied one; alternately as bools and as tensors."""
    for i, v in enumerate(verdicts):
        skipped = v == "s"
        g.record(skipped if i % 2 else torch.tensor(float(skipped)))


def test_a_run_that_ended_before_the_read_is_still_caught():
    g = guard()
    feed(g, ".ss.sss..")  # the run of 3 is over by the read
    with pytest.raises(DivergenceError, match="3 optimizer steps in a row"):
        g.should_roll_back(9, can_roll_back=lambda: False)


def test_runs_shorter_than_the_limit_pass_and_the_total_is_counted():
    g = guard()
    feed(g, ".ss.ss.")
    assert not g.should_roll_back(7, can_roll_back=lambda: True) and g.skipped == 4
    feed(g, "s.")
    assert not g.should_roll_back(9, can_roll_back=lambda: True) and g.skipped == 5


def test_a_run_across_two_reads_counts_whole():
    g = guard("rollback")
    feed(g, "..ss")
    assert not g.should_roll_back(4, can_roll_back=lambda: True)
    feed(g, "s")
    assert g.should_roll_back(5, can_roll_back=lambda: True)  # rollback: 2 + 1 in a row
    feed(g, "ss")  # counted afresh after the rollback
    assert not g.should_roll_back(7, can_roll_back=lambda: True)


def test_rollback_needs_a_checkpoint():
    g = guard("rollback")
    feed(g, "sss")
    with pytest.raises(DivergenceError, match="train.on_divergence=rollback"):
        g.should_roll_back(3, can_roll_back=lambda: False)
