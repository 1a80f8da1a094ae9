"""The device a rank trains on, how it computes, and what happens when a rank stops: decided by
functions of the environment, device counts and versions (driven here on a CPU through the GPU
cases), and checked on real CPU runs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch import REPO, env, metrics, train_command
from mlm_dist.config import ConfigError, load_config
from mlm_dist.engine import (DeviceError, TORCH_AUTOCAST_SINCE, check_engine_precision,
                             choose_accelerator, cpu_threads, deepspeed_accelerator, device_index)
from mlm_dist.precision import Precision, precision_for
from mlm_dist.training import state as train_state


# ---- which accelerator: CPU only when asked for

def test_cuda_when_a_gpu_is_usable_cpu_only_when_asked_for():
    assert choose_accelerator({}, True, 8).name == "cuda"
    assert choose_accelerator({"DS_ACCELERATOR": "cuda"}, True, 1).name == "cuda"
    cpu = choose_accelerator({"DS_ACCELERATOR": "cpu"}, True, 8)  # asked for, GPUs or not
    assert cpu.name == "cpu" and cpu.reason == "CPU because DS_ACCELERATOR=cpu"


@pytest.mark.parametrize("environ, available, count, cuda_build, message", [
    ({}, False, 0, None, "this torch (2.7.1) is built without CUDA; install a CUDA build"),
    ({}, False, 0, "12.6", "torch 2.7.1 (CUDA 12.6) sees no GPU: give the job or container its "
                           "GPUs (docker run --gpus all"),
    ({"CUDA_VISIBLE_DEVICES": ""}, False, 0, "12.6", "CUDA_VISIBLE_DEVICES='' hides every GPU"),
    ({"DS_ACCELERATOR": "cuda"}, True, 0, "12.6", "sees no GPU"),
])
def test_no_usable_gpu_is_an_error_naming_the_way_to_cpu(environ, available, count, cuda_build,
                                                         message):
    with pytest.raises(DeviceError) as e:
        choose_accelerator(environ, available, count, torch_version="2.7.1",
                           cuda_build=cuda_build)
    assert message in str(e.value)
    assert str(e.value).endswith("To train on CPU ranks on purpose, set DS_ACCELERATOR=cpu")


def test_other_accelerators_are_refused():
    with pytest.raises(DeviceError, match="DS_ACCELERATOR=xpu: mlm-dist trains on CUDA GPUs"):
        choose_accelerator({"DS_ACCELERATOR": "xpu"}, False, 0)


def test_deepspeed_is_told_an_accelerator_without_an_error():
    assert deepspeed_accelerator({}, True, 2) == "cuda"
    assert deepspeed_accelerator({}, False, 0) == "cpu"  # export-hf, fill-mask on a laptop
    assert deepspeed_accelerator({"DS_ACCELERATOR": "cpu"}, True, 2) == "cpu"


def without_accelerator() -> dict:
    e = env()
    del e["DS_ACCELERATOR"]
    return e


def test_importing_the_engine_leaves_the_environment_as_it_was():
    """Nothing for the multi-node launcher to forward (it sends DS_ACCELERATOR to every node),
    and no guess of DeepSpeed's logged on stdout (fill-mask prints JSON there)."""
    code = ("import os, mlm_dist.engine\n"
            "from deepspeed.accelerator import get_accelerator\n"
            "from mlm_dist.launch.multinode import forwarded_env\n"
            "print(get_accelerator().device_name(), os.environ.get('DS_ACCELERATOR'),\n"
            "      'DS_ACCELERATOR' in forwarded_env(dict(os.environ)))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=without_accelerator(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "cpu None False\n"


def test_train_without_a_gpu_and_without_asking_for_the_cpu_stops_at_once(tiny_shards, tmp_path):
    cmd = train_command(tiny_shards, tmp_path / "run", launcher="alone", ranks=1)
    proc = subprocess.run(cmd, env=without_accelerator(), cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.startswith("mlm-dist train: error: no usable CUDA GPU: "), proc.stderr
    assert "set DS_ACCELERATOR=cpu" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # before the process group and the run directory


# ---- which GPU: all of the node's visible, or only the task's own

@pytest.mark.parametrize("visible", [8, 16])
def test_every_task_sees_the_node_gpus_and_takes_its_local_rank(visible):
    # deepspeed, torchrun, srun without binding (16: a job that asked for fewer than the node's)
    assert [device_index(r, 8, visible, {}) for r in range(8)] == list(range(8))


def test_every_task_sees_only_its_own_gpu():
    # srun --gpus-per-task=1 / --gpu-bind / a site default: CUDA_VISIBLE_DEVICES names one GPU,
    # which every task sees as its device 0
    assert [device_index(r, 8, 1, {"CUDA_VISIBLE_DEVICES": str(r)}) for r in range(8)] == [0] * 8
    assert device_index(0, 1, 1, {}) == 0


def test_a_binding_that_does_not_say_which_gpu_is_the_tasks_is_an_error():
    with pytest.raises(DeviceError) as e:
        device_index(5, 8, 2, {"CUDA_VISIBLE_DEVICES": "4,5"})
    assert "local rank 5 of 8 on this node sees 2 GPUs (CUDA_VISIBLE_DEVICES=4,5)" in str(e.value)
    assert "mlm-dist slurm --bind-gpus" in str(e.value)


def test_cpu_ranks_share_the_cores_unless_slurm_bound_them_their_own():
    assert cpu_threads(16, 4, {}) == 4
    assert cpu_threads(2, 4, {}) == 1
    # srun --cpus-per-task=6 with a binding task plugin: the task may use its 6 CPUs only
    assert cpu_threads(6, 4, {"SLURM_CPUS_PER_TASK": "6"}) == 6
    # no binding (task/none): the task sees the whole node, its share is the node's / ranks
    assert cpu_threads(24, 4, {"SLURM_CPUS_PER_TASK": "6"}) == 6


# ---- the precision the config asked for is the one the engine runs

def cfg(*overrides):
    return load_config(None, ["data.shards=x", *overrides])


def test_the_precision_asked_for_is_what_deepspeed_json_asks_for():
    assert precision_for(cfg("train.precision=bf16").train) == Precision(autocast=torch.bfloat16)
    assert precision_for(cfg("train.precision=bf16", "train.grad_accum_dtype=bf16").train) == \
        Precision(bf16=True)
    assert precision_for(cfg("train.precision=fp16").train) == Precision(fp16=True)
    assert precision_for(cfg("train.precision=fp32").train) == Precision()


def test_weights_stay_fp32_under_fp32_and_bf16_autocast_only():
    assert precision_for(cfg("train.precision=fp32").train).fp32_weights
    assert precision_for(cfg("train.precision=bf16").train).fp32_weights
    assert not precision_for(cfg("train.precision=bf16", "train.grad_accum_dtype=bf16").train) \
        .fp32_weights
    assert not precision_for(cfg("train.precision=fp16").train).fp32_weights


def test_a_deepspeed_that_ignored_torch_autocast_is_refused_naming_the_version():
    with pytest.raises(ConfigError) as e:
        c = cfg("train.precision=bf16")
        check_engine_precision(c, precision_for(c.train), Precision(), "0.16.9")
    assert str(e.value) == (
        "train.precision=bf16 asks for bfloat16 autocast with fp32 weights, but DeepSpeed 0.16.9 "
        f"runs fp32: upgrade DeepSpeed to >= {TORCH_AUTOCAST_SINCE}, the first with its "
        "torch_autocast section (or set train.grad_accum_dtype=bf16 for DeepSpeed's bf16 mode)")


@pytest.mark.parametrize("overrides, running", [
    (["train.precision=fp16"], Precision()),
    (["train.precision=fp32"], Precision(bf16=True)),
    (["train.precision=bf16", "train.grad_accum_dtype=bf16"], Precision(autocast=torch.bfloat16)),
])
def test_any_other_mismatch_is_refused(overrides, running):
    with pytest.raises(ConfigError, match=r"^train\.precision=\w+ asks for .* but DeepSpeed 9\.9 "):
        c = cfg(*overrides)
        check_engine_precision(c, precision_for(c.train), running, "9.9")


def test_real_cpu_engines_run_the_precision_asked_for(tmp_path):
    out = tmp_path / "found.json"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "precision_probe.py"), str(out)],
                          env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["bf16"] == "bfloat16 autocast with fp32 weights"
    assert found["bf16 mode"] == "DeepSpeed's bf16 mode" and found["fp32"] == "fp32"
    assert found["without torch_autocast"].startswith(
        "train.precision=bf16 asks for bfloat16 autocast with fp32 weights, but DeepSpeed ")
    assert f"upgrade DeepSpeed to >= {TORCH_AUTOCAST_SINCE}" in found["without torch_autocast"]


# ---- the random streams of this rank's own device, whatever the process sees

class FakeCuda:
    """torch.cuda's generator calls on `count` visible GPUs, one current; an index that is not
    visible fails as CUDA does."""

    def __init__(self, count: int, current: int):
        self.count, self.current = count, current
        self.states = {i: torch.tensor([i], dtype=torch.uint8) for i in range(count)}

    def _check(self, index):
        if not 0 <= index < self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")

    def get_rng_state(self, device="cuda"):
        index = self.current if device == "cuda" else int(device)
        self._check(index)
        return self.states[index].clone()

    def set_rng_state(self, state, device="cuda"):
        index = self.current if device == "cuda" else int(device)
        self._check(index)
        self.states[index] = state.clone()

    def get_rng_state_all(self):
        return [self.get_rng_state(i) for i in range(self.count)]

    def set_rng_state_all(self, states):
        for i, state in enumerate(states):
            self.set_rng_state(state, i)

    def install(self, monkeypatch):
        for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)


def test_resume_where_each_process_sees_only_its_own_gpu(monkeypatch):
    """Saved by local rank 3 under deepspeed (8 GPUs visible, device 3), resumed under srun
    --gpus-per-task=1 (1 GPU visible, device 0): the state of GPU 3 goes to the new device 0."""
    saving = FakeCuda(count=8, current=3)
    saving.states[3] = torch.tensor([42], dtype=torch.uint8)  # what rank 3's dropout drew
    saving.install(monkeypatch)
    saved = train_state.rng_state()
    resuming = FakeCuda(count=1, current=0)
    resuming.install(monkeypatch)
    train_state.set_rng_state(saved)
    assert resuming.states[0].tolist() == [42]


def test_checkpoints_with_every_visible_gpus_state_still_resume(monkeypatch):
    """The earlier format (one state per visible GPU): the current device's on the same GPU
    view; none on another (which was this rank's is unknown)."""
    old = {"torch": torch.get_rng_state(), "numpy": __import__("numpy").random.get_state(),
           "python": __import__("random").getstate(),
           "cuda": [torch.tensor([10 + i], dtype=torch.uint8) for i in range(4)]}
    same = FakeCuda(count=4, current=2)
    same.install(monkeypatch)
    train_state.set_rng_state(old)
    assert same.states[2].tolist() == [12] and same.states[1].tolist() == [1]
    bound = FakeCuda(count=1, current=0)
    bound.install(monkeypatch)
    train_state.set_rng_state(old)
    assert bound.states[0].tolist() == [0]


def test_a_cpu_rank_saves_no_device_state():
    assert set(train_state.rng_state()) == {"torch", "numpy", "python"}


# ---- a stuck rank ends the run after train.collective_timeout_minutes

@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_collective_timeout_must_be_positive_minutes(value):
    with pytest.raises(ConfigError, match="train.collective_timeout_minutes: must be a positive"):
        cfg(f"train.collective_timeout_minutes={value}")


TIMEOUT_MINUTES = 0.5


def logged_steps(run: Path) -> set[int]:
    """Steps in metrics.jsonl so far (a line being written is not one yet)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return {json.loads(x)["step"] for x in lines if x.endswith("\n")}


@pytest.fixture(scope="module")
def stuck_run(tiny_shards, tmp_path_factory):
    """2 ranks under deepspeed; rank 1 stops making progress at step index 3 (alive, silent).
    (output, seconds from the last logged step to the launcher's exit, exit code, run dir)"""
    run = tmp_path_factory.mktemp("stuck") / "run"
    log = run.parent / "launcher.log"  # a file, not a pipe nobody reads while the run goes on
    cmd = train_command(tiny_shards, run, "train.log_every=1",
                        f"train.collective_timeout_minutes={TIMEOUT_MINUTES}")
    with open(log, "w") as out:
        launcher = subprocess.Popen(cmd, env=env("hang@3:1"), cwd=REPO, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while 3 not in logged_steps(run):
            if launcher.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the run did not reach step 3:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        stuck_at = time.monotonic()
        launcher.wait(timeout=60 * TIMEOUT_MINUTES + 120)
        return log.read_text(), time.monotonic() - stuck_at, launcher.returncode, run
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of it: ranks, workers
            os.killpg(launcher.pid, signal.SIGKILL)


def test_a_stuck_rank_ends_the_run_after_the_collective_timeout(stuck_run):
    out, seconds, returncode, run = stuck_run
    assert returncode != 0, out[-4000:]
    assert re.search(r"timed out|timeout", out, re.IGNORECASE), out[-4000:]
    # the timeout ended it: not sooner (nothing else failed), not much later (no hang; the
    # deepspeed launcher gives the stuck rank 30 s to exit before it kills it)
    timeout = 60 * TIMEOUT_MINUTES
    assert 0.9 * timeout <= seconds <= timeout + 60, (seconds, out[-3000:])
    assert max(r["step"] for r in metrics(run)) == 3


def test_rank0_reports_its_device_and_versions_on_stdout_and_tensorboard(stuck_run):
    out, _, _, run = stuck_run
    line = next((x for x in out.splitlines() if "device: " in x), None)
    assert line is not None, out[-3000:]
    assert re.search(r"device: cpu \(.+; CPU because DS_ACCELERATOR=cpu\), torch "
                     + re.escape(torch.__version__) + r", DeepSpeed \d+\.\d+\.\d+, gloo, "
                     r"\d+ threads? per rank$", line), line
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors("run/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "rank 0: " in text and "rank 1: " in text and " cpu" in text
    assert line.split("device: ", 1)[1] in text


def test_a_killed_rank_still_ends_the_run_in_seconds(tiny_shards, tmp_path):
    """The timeout is for ranks that are alive and stuck: a dead one ends the run at once."""
    start = time.monotonic()
    proc = subprocess.run(train_command(tiny_shards, tmp_path / "run", "checkpoint.every=2"),
                          env=env("kill_during_save@2:1"), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert time.monotonic() - start < 120, proc.stdout[-2000:]
