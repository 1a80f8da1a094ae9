"""Long runs on 2 real CPU ranks: sequence phases, bit-exact resume under ZeRO 1/2/3,
crash-safe checkpoints, preemption signals, skipped non-finite steps, evaluation."""

import json
import shutil
import signal
import subprocess
import time

import psutil
import pytest
import torch

from launch import REPO, cli, env, metrics, records, train, train_command
from mlm_dist.config import load_config
from mlm_dist.optim import learning_rate_factor
from mlm_dist.training.checkpoint import load_checkpoint

# Two phases: 4 steps at 32 tokens, then 4 at 64 (with a different batch shape), dropout on
# so that resuming must also restore the torch RNG.
PHASES = ("schedule.phases=[{seq_len: 32, micro_batch: 8, global_batch: 16, until_step: 4},"
          " {seq_len: 64, micro_batch: 4, global_batch: 16, until_step: 8}]")
EXACT = [PHASES, "train.log_every=1", "model.dropout=0.1", "model.attention_dropout=0.1",
         "checkpoint.every=2", "checkpoint.keep=0"]


def truncate_to(run, step):
    """A copy of the state `run` had right after saving `step`: as if it had stopped there."""
    for d in (run / "checkpoints").glob("step_*"):
        if int(d.name.split("_")[1]) > step:
            shutil.rmtree(d)
    (run / "checkpoints" / "latest").write_text(f"step_{step:08d}")
    (run / "metrics.jsonl").unlink()
    shutil.rmtree(run / "tensorboard")


# ZeRO 2 resumes inside a phase, across a change of accumulation, in the test after this one.
# Packed rows (several pairs a row) resume inside phase 2 too.
@pytest.mark.parametrize("stage, resume_at, pack", [(1, 4, False), (3, 6, False), (2, 6, True)])
def test_resume_is_bit_exact_at_the_phase_boundary_and_inside_a_phase(tiny_shards, tmp_path,
                                                                      stage, resume_at, pack):
    options = [f"train.zero_stage={stage}", *EXACT, f"data.pack={str(pack).lower()}"]
    full = tmp_path / "full"
    train(tiny_shards, full, *options)
    history = metrics(full)
    assert [r["train/seq_len"] for r in history] == [32] * 4 + [64] * 4
    part = tmp_path / "part"
    shutil.copytree(full, part)
    truncate_to(part, resume_at)  # the boundary (step 4) or inside phase 2 (step 6)
    proc = train(tiny_shards, part, *options, "checkpoint.resume=true")
    assert f"resumed from step {resume_at}" in proc.stdout
    resumed = metrics(part)
    assert [r["step"] for r in resumed] == list(range(resume_at + 1, 9))
    for a, b in zip(resumed, history[resume_at:]):
        assert a["train/loss"] == b["train/loss"], (a, b)  # exactly, not approximately
        assert a["train/lr"] == b["train/lr"]
    ours, theirs = load_checkpoint(part)[0].state_dict(), load_checkpoint(full)[0].state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


# Accumulation 2, then 4, after an odd number of steps: DeepSpeed's own run-global micro-step
# counter would put its boundaries between ours from phase 2 on.
ACCUMULATION_PHASES = ("schedule.phases=[{seq_len: 32, micro_batch: 4, global_batch: 16, until_step: 3},"
                       " {seq_len: 64, micro_batch: 2, global_batch: 16, until_step: 9}]")


def test_optimizer_steps_at_our_boundaries_across_accumulation_changes_and_resume(tiny_shards,
                                                                                  tmp_path):
    common = [ACCUMULATION_PHASES, "train.log_every=1", "model.dropout=0.1",
              "checkpoint.every=5", "checkpoint.keep=0", "train.zero_stage=2"]
    full = tmp_path / "full"
    train(tiny_shards, full, *common)
    history = metrics(full)
    assert [r["step"] for r in history] == list(range(1, 10))
    assert all(r["train/skipped_steps"] == 0 for r in history)
    # One optimizer (and LR scheduler) step per loop step: the LR logged after step s is the
    # schedule's value for s, which any extra or missing engine step would shift.
    cfg = load_config(full / "config.yaml")
    assert [r["train/lr"] for r in history] == pytest.approx(
        [cfg.optim.lr * learning_rate_factor(cfg, s) for s in range(1, 10)], rel=1e-6)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    truncate_to(part, 5)  # inside phase 2
    proc = train(tiny_shards, part, *common, "checkpoint.resume=true")
    assert "resumed from step 5" in proc.stdout
    resumed = metrics(part)
    assert [r["step"] for r in resumed] == [6, 7, 8, 9]
    for a, b in zip(resumed, history[5:]):
        assert a["train/loss"] == b["train/loss"] and a["train/lr"] == b["train/lr"], (a, b)
    ours, theirs = load_checkpoint(part)[0].state_dict(), load_checkpoint(full)[0].state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_sigkill_during_a_save_resumes_from_the_previous_complete_checkpoint(tiny_shards,
                                                                           tmp_path):
    run = tmp_path / "run"
    common = ["schedule.phases.0.until_step=6", "checkpoint.every=2", "checkpoint.keep=2"]
    crashed = train(tiny_shards, run, *common, faults="kill_during_save@4", check=False)
    assert crashed.returncode != 0
    checkpoints = run / "checkpoints"
    assert (checkpoints / "step_00000004").is_dir()  # DeepSpeed's files, written...
    assert not (checkpoints / "step_00000004" / "complete.json").exists()  # ...but not whole
    assert (checkpoints / "latest").read_text() == "step_00000002"
    proc = train(tiny_shards, run, *common, "checkpoint.resume=true")
    assert "resumed from step 2" in proc.stdout
    assert metrics(run)[-1]["step"] == 6
    # keep=2: the newest two complete checkpoints remain, the crashed save is gone
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000004",
                                                                 "step_00000006"]


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_saves_and_exits_zero(tiny_shards, tmp_path, signum):
    run = tmp_path / "run"
    cmd = train_command(tiny_shards, run, "schedule.phases.0.until_step=100000",
                        "train.log_every=1")
    launcher = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while not ((run / "metrics.jsonl").exists() and metrics(run)):
            assert launcher.poll() is None and time.time() < deadline, launcher.stdout.read()
            time.sleep(0.5)
        # As Slurm does, every process of the ranks gets the signal: the 2 ranks and their
        # dataloader workers (same command line).
        processes = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                     if any(a.startswith("--local_rank") for a in p.cmdline())]
        assert len([p for p in processes if p.name() != "pt_data_worker"]) == 2
        for p in processes:
            p.send_signal(signum)
        out, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, out
    assert "stopping at step" in out
    stopped = int(out.split("stopping at step ")[1].split()[0])
    assert (run / "checkpoints" / f"step_{stopped:08d}" / "complete.json").is_file()


# DeepSpeed's own check guards bf16 (and, by the gradient norm, ZeRO 1-3 in fp32);
# SkipsNonFiniteSteps guards ZeRO 0 in fp32, where DeepSpeed checks nothing.
@pytest.mark.parametrize("precision,stage", [("bf16", 2), ("fp32", 0), ("fp32", 3)])
def test_non_finite_step_is_skipped_on_every_rank(tiny_shards, tmp_path, precision, stage):
    run = tmp_path / "run"
    train(tiny_shards, run, "schedule.phases.0.until_step=8", "train.log_every=1",
          f"train.precision={precision}", f"train.zero_stage={stage}",
          faults="nan_loss@3:1")  # rank 1 only, step index 3 (the 4th step)
    history = metrics(run)
    assert [r["train/skipped_steps"] for r in history] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert all(r["train/loss"] == r["train/loss"] for r in history[4:])  # finite again


def test_divergence_stops_or_rolls_back(tiny_shards, tmp_path):
    common = ["schedule.phases.0.until_step=8", "train.max_consecutive_skips=2",
              "checkpoint.every=2"]
    faults = "nan_loss@4:1,nan_loss@5:1"
    stopped = train(tiny_shards, tmp_path / "a", *common, faults=faults, check=False)
    assert stopped.returncode != 0
    assert "2 optimizer steps in a row had non-finite gradients" in stopped.stdout + stopped.stderr
    proc = train(tiny_shards, tmp_path / "b", *common, "train.on_divergence=rollback",
                 faults=faults)
    assert "rolled back to step 4" in proc.stdout
    assert metrics(tmp_path / "b")[-1]["step"] == 8


def test_evaluation_in_training_and_from_the_command_line(tiny_shards, tmp_path):
    run = tmp_path / "run"
    train(tiny_shards, run, "schedule.phases.0.until_step=10", "eval.every=5")
    evals = [r for r in records(run) if "val/mlm_loss" in r]
    assert [r["step"] for r in evals] == [5, 10]
    assert evals[1]["val/perplexity"] > 1 and 0 <= evals[1]["val/nsp_acc"] <= 1
    args = ("eval", "--checkpoint", str(run), "--max-pairs", "40", "--micro-batch", "4")
    first, second = (json.loads(cli(*args).stdout.splitlines()[-1]) for _ in range(2))
    assert first == second  # fixed masks and data: the same weights give the same numbers
    assert first["val/predictions"] > 0 and first["val/perplexity"] > 1


def test_consolidate_writes_one_fp32_state_dict(tiny_shards, tmp_path):
    run = tmp_path / "run"
    train(tiny_shards, run, "schedule.phases.0.until_step=5", "train.zero_stage=3")
    out = tmp_path / "model.pt"
    cli("consolidate", "--checkpoint", str(run), "--out", str(out))
    state = torch.load(out)
    assert all(t.dtype == torch.float32 for t in state.values())
    assert torch.equal(state["layers.0.ffn.up.weight"],
                       load_checkpoint(run)[0].state_dict()["layers.0.ffn.up.weight"])


def test_resume_on_another_number_of_ranks(tiny_shards, tmp_path):
    run = tmp_path / "run"
    train(tiny_shards, run, "schedule.phases.0.until_step=8", "checkpoint.every=4",
          "train.log_every=1")
    before = metrics(run)
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    truncate_to(moved, 4)
    proc = train(tiny_shards, moved, "schedule.phases.0.until_step=8", "checkpoint.every=4",
                 "train.log_every=1", "checkpoint.resume=true", launcher="alone", ranks=1)
    assert "resuming a 2-rank checkpoint on 1 ranks" in proc.stdout
    after = metrics(moved)
    assert [r["step"] for r in after] == [5, 6, 7, 8]
    # weights and Adam moments came back: the loss goes on from where it was, not from scratch
    assert abs(after[0]["train/loss"] - before[4]["train/loss"]) < 0.5
    assert after[0]["train/lr"] == before[4]["train/lr"]
