"""A training step that does not log, evaluate or save never waits for the device, at any ZeRO
stage, but for the one decision DeepSpeed's ZeRO 1-3 optimizers take on the host: whether the
step's gradients are finite, so that a non-finite step is skipped on every rank. At ZeRO 0 our
guard decides that on the device, and a steady step waits for nothing at all.
Counted by sync_probe.py in a real run on 2 CPU ranks. What it cannot see: the stream waits
DeepSpeed makes only on a CUDA device (README, "Device synchronizations"). The gradient
reduction that overlaps backward is checked by overlap_probe.py against DeepSpeed's own."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from launch import REPO, env
from mlm_dist.bench.syncs import NON_FINITE_CHECKS, reading_frame
from mlm_dist.config import load_config
from mlm_dist.engine import REDUCE_BUCKET_ELEMENTS
from mlm_dist.launch.local import free_port, launcher_command, remove_shm_buffers

STEPS, LOG_EVERY = 10, 5
# Tiny, and two micro-batches a step per rank, so that the counts of the engine's forward and
# step calls differ.
PROBE_OVERRIDES = [
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
    "model.intermediate_size=128", "model.max_positions=64", "data.shuffle_buffer=32",
    f"schedule.phases=[{{seq_len: 32, micro_batch: 4, global_batch: 16, until_step: {STEPS}}}]",
    f"train.log_every={LOG_EVERY}", "optim.warmup_steps=2",
]
def launch(module: str, *args: str) -> None:
    port = free_port()
    try:
        proc = subprocess.run(launcher_command(2, port, module, *args),
                              env={**env(), "PYTHONPATH": str(Path(__file__).parent)},
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        remove_shm_buffers(port)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module", params=[0, 1, 2, 3], ids=lambda stage: f"zero{stage}")
def probed(request, tiny_shards, tmp_path_factory) -> tuple[int, list[dict]]:
    """(ZeRO stage, each rank's sync_probe report) of one run at that stage."""
    tmp = tmp_path_factory.mktemp(f"syncs-zero{request.param}")
    launch("sync_probe", str(tmp / "counts"), f"data.shards={tiny_shards}",
           f"out_dir={tmp / 'run'}", *PROBE_OVERRIDES, f"train.zero_stage={request.param}")
    return request.param, [json.loads(Path(f"{tmp}/counts.rank{r}.json").read_text())
                           for r in range(2)]


def test_a_step_waits_for_the_device_only_where_deepspeed_skips_non_finite_gradients(probed):
    stage, reports = probed
    for rank, report in enumerate(reports):
        steps = {int(step): counts for step, counts in report["steps"].items()}
        assert sorted(steps) == list(range(STEPS))
        log_steps = {s for s in steps if (s + 1) % LOG_EVERY == 0}  # the last one also saves
        # Step 0 is DeepSpeed's warm-up: ZeRO 3 checks its parameter trace across the ranks.
        for step in sorted(set(steps) - log_steps - {0}):
            waits = {key: n for key, n in steps[step].items() if key.startswith("synchronize")
                     or reading_frame(key) not in NON_FINITE_CHECKS}
            assert not waits, f"ZeRO {stage}, rank {rank}, step {step} waits for: {waits}"
            if stage == 0:
                assert not steps[step], f"rank {rank}, step {step} waits for: {steps[step]}"
        for step in log_steps:
            # The counters count: a log step reduces the metrics (flush), and there the ranks
            # agree on stop signals and timed saves (Checkpointer.agree), and the divergence
            # guard reads its count of skipped steps (should_roll_back).
            functions = {reading_frame(key)[1] for key in steps[step]}
            assert {"flush", "agree", "should_roll_back"} <= functions, steps[step]


def test_gradient_reduction_overlaps_backward_at_zero_1_to_3(probed):
    stage, reports = probed
    for report in reports:  # what DeepSpeed made of the generated JSON, on CPU ranks and gloo
        if stage == 0:  # DeepSpeed all-reduces after backward; there is nothing to overlap
            assert report["zero"]["overlap_comm"] is False
        else:
            assert report["zero"] == {"overlap_comm": True,
                                      "reduce_bucket_size": REDUCE_BUCKET_ELEMENTS}


def test_overlapped_reduction_trains_exactly_as_deepspeeds_default(tmp_path):
    """Many small overlapped buckets against one big reduction after backward: the same
    losses and weights, bit for bit, at ZeRO 1, 2 and 3."""
    out = tmp_path / "runs.pt"
    launch("overlap_probe", str(out))
    runs = torch.load(out, weights_only=False)
    for stage in (1, 2, 3):
        ours, theirs = runs[(stage, "ours")], runs[(stage, "deepspeed")]
        assert (ours["overlap_comm"], ours["reduce_bucket_size"]) == (True, 2000)
        assert (theirs["overlap_comm"], theirs["reduce_bucket_size"]) == (False, 500_000_000)
        assert ours["losses"] == theirs["losses"], stage
        assert all(torch.equal(a, b) for a, b in zip(ours["weights"], theirs["weights"],
                                                     strict=True)), stage


def test_stop_signals_are_agreed_on_at_log_steps_unless_configured():
    cfg = load_config(None, ["data.shards=x", "train.log_every=7"])
    assert cfg.checkpoint.sync_every == 0 and cfg.checkpoint.agrees_every(7) == 7
    cfg = load_config(None, ["data.shards=x", "train.log_every=7", "checkpoint.sync_every=1"])
    assert cfg.checkpoint.agrees_every(7) == 1
