"""When a run saves and stops: a pure decision from the step and what the ranks agreed on, and
the steps where the checkpointer agrees (and so waits for the device)."""

from types import SimpleNamespace

import torch

from mlm_dist.config import load_config
from mlm_dist.training.checkpointer import Agreed, Checkpointer, SaveDecision, save_decision


def cfg(*overrides):
    return load_config(None, ["data.shards=x", "schedule.phases.0.until_step=10",
                              "train.log_every=3", *overrides])


def test_saves_every_n_steps_and_at_the_last_one():
    c = cfg("checkpoint.every=4")
    saved = [s for s in range(1, 11) if save_decision(s, c, Agreed()).save]
    assert saved == [4, 8, 10]
    assert not any(save_decision(s, c, Agreed()).stop for s in range(1, 11))
    assert [s for s in range(1, 11) if save_decision(s, cfg(), Agreed()).save] == [10]


def test_the_clock_saves_and_a_signal_saves_then_stops():
    c = cfg("checkpoint.every=4")
    assert save_decision(3, c, Agreed(timed=True)) == SaveDecision(save=True, stop=False)
    assert save_decision(3, c, Agreed(stop=True)) == SaveDecision(save=True, stop=True)
    assert save_decision(4, c, Agreed(stop=True, timed=True)) == SaveDecision(True, True)


def checkpointer(tmp_path, *overrides) -> Checkpointer:
    topo = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    return Checkpointer(tmp_path / "run", cfg(*overrides), topo, [],
                        stop=SimpleNamespace(received=None))


def test_the_ranks_agree_at_log_steps_or_sync_every_and_at_the_last_step(tmp_path):
    default = checkpointer(tmp_path, "checkpoint.every=4")
    assert [s for s in range(1, 11) if default.agrees_at(s)] == [3, 6, 9, 10]
    assert [s for s in range(1, 11) if default.waits_at(s)] == [3, 4, 6, 8, 9, 10]
    assert default.agree(5) == Agreed()  # no collective between agreement steps
    assert not default.needs_universal_load and not default.has_checkpoint()
    synced = checkpointer(tmp_path, "checkpoint.sync_every=5")
    assert [s for s in range(1, 11) if synced.agrees_at(s)] == [5, 10]
