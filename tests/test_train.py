"""Real training runs: 2 CPU ranks under the deepspeed launcher (gloo), ZeRO 2 and 3, plus the
same command alone and under torchrun. These are the slowest tests (seconds each)."""

import shutil
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch import cli, metrics, train

REQUIRED_TAGS = {"train/loss", "train/mlm_loss", "train/nsp_loss", "train/mlm_acc",
                 "train/nsp_acc", "train/lr", "train/grad_norm", "train/seq_len",
                 "perf/tokens_per_s", "data/mask_rate"}


@pytest.fixture(scope="module")
def zero2_run(tiny_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero2") / "run"
    train(tiny_shards, out, "train.zero_stage=2", "train.steps=40", "optim.lr=2e-3")
    return out


def test_zero2_two_ranks_loss_falls(zero2_run):
    history = metrics(zero2_run)
    assert [r["step"] for r in history] == [5, 10, 15, 20, 25, 30, 35, 40]
    first, last = history[0], history[-1]
    assert last["train/mlm_loss"] < first["train/mlm_loss"] - 0.5, (first, last)
    assert 0.10 < last["data/mask_rate"] < 0.20


def test_zero2_checkpoint_has_one_shard_per_rank(zero2_run):
    tag = zero2_run / "checkpoints" / "step_00000040"
    assert (zero2_run / "checkpoints" / "latest").read_text().strip() == tag.name
    shards = sorted(p.name for p in tag.glob("*zero_pp_rank_*optim_states.pt"))
    assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1]
    assert (tag / "run_config.yaml").is_file() and (tag / "tokenizer.model").is_file()


def test_tensorboard_has_the_scalars_and_config(zero2_run):
    events = EventAccumulator(str(zero2_run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert REQUIRED_TAGS <= set(tags["scalars"]), REQUIRED_TAGS - set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert any("config" in t for t in tags["tensors"])  # add_text is stored as a tensor


def test_resume_continues_from_latest(zero2_run, tiny_shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(zero2_run, run)
    proc = train(tiny_shards, run, "train.steps=50", launcher="alone", check=False)
    assert proc.returncode == 2 and "checkpoint.resume=true" in proc.stderr  # never mixes runs
    proc = train(tiny_shards, run, "train.zero_stage=2", "train.steps=50", "optim.lr=2e-3",
                 "checkpoint.resume=true")
    assert "resumed from step 40" in proc.stdout
    assert [r["step"] for r in metrics(run)][-3:] == [40, 45, 50]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000050"


def test_zero3_two_ranks(tiny_shards, tmp_path):
    out = tmp_path / "run"
    train(tiny_shards, out, "train.zero_stage=3", "train.steps=10")
    assert metrics(out)[-1]["step"] == 10
    assert len(list((out / "checkpoints" / "step_00000010").glob("*zero_pp_rank_*"))) >= 2


@pytest.mark.parametrize("launcher, ranks", [("alone", 1), ("torchrun", 2)])
def test_same_command_alone_and_under_torchrun(tiny_shards, tmp_path, launcher, ranks):
    out = tmp_path / "run"
    train(tiny_shards, out, "train.steps=5", "train.zero_stage=1", launcher=launcher, ranks=ranks)
    assert metrics(out)[-1]["step"] == 5


def test_config_error_stops_before_any_work(tiny_shards, tmp_path):
    proc = train(tiny_shards, tmp_path / "run", "train.zero_stage=4", launcher="alone",
                 check=False)
    assert proc.returncode == 2
    assert "train.zero_stage: ZeRO stage 4 does not exist" in proc.stderr
    assert not (tmp_path / "run").exists()
