"""The DeepSpeed JSON is derived from our config; the `deepspeed:` block only adds to it."""

import json
import subprocess
from pathlib import Path

import pytest

from launch import REPO, env
from mlm_dist.config import ConfigError, load_config, validate, validate_topology
from mlm_dist.launch.local import free_port, launcher_command, remove_shm_buffers
from mlm_dist.engine import REDUCE_BUCKET_ELEMENTS, deepspeed_config
from mlm_dist.optim import learning_rate_factor
from mlm_dist.precision import precision_for


def cfg(*overrides):
    return load_config(None, ["data.shards=x", "schedule.phases.0.micro_batch=4",
                              "schedule.phases.0.global_batch=32", *overrides])


def ds_config(c, world_size):
    """The DeepSpeed JSON on `world_size` ranks, from the accumulation and the precision the
    pre-flight derives."""
    return deepspeed_config(c, validate_topology(c, world_size), precision_for(c.train))


def test_batch_arithmetic_and_precision_are_derived():
    ds = ds_config(cfg("train.zero_stage=3", "train.precision=bf16"), world_size=2)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3 and ds["torch_autocast"]["dtype"] == "bfloat16"
    assert "fp16" not in ds and "bf16" not in ds
    fp16 = ds_config(cfg("train.precision=fp16"), world_size=1)["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # dynamic loss scaling


def test_extra_keys_merge_and_derived_keys_are_refused():
    c = cfg()
    c.deepspeed = {"zero_optimization": {"overlap_comm": True}, "communication_data_type": "fp32"}
    ds = ds_config(c, world_size=2)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True,
                                       "reduce_bucket_size": REDUCE_BUCKET_ELEMENTS}
    assert ds["communication_data_type"] == "fp32"
    for bad, key in [({"train_batch_size": 64}, "deepspeed.train_batch_size"),
                     ({"zero_optimization": {"stage": 1}}, "deepspeed.zero_optimization.stage"),
                     ({"bf16": {"enabled": False}}, "deepspeed.bf16")]:
        c.deepspeed = bad
        with pytest.raises(ConfigError, match=key):  # at load time, before any process starts
            validate(c)


def test_no_throughput_timer_and_gradient_reduction_overlaps_backward():
    for stage in (1, 2, 3):
        ds = ds_config(cfg(f"train.zero_stage={stage}"), world_size=2)
        assert ds["zero_optimization"] == {"stage": stage, "overlap_comm": True,
                                           "reduce_bucket_size": 25_000_000}
        # DeepSpeed's timer would synchronize the device at every forward and step()
        assert ds["timers"] == {"throughput": {"enabled": False}}
    assert ds_config(cfg("train.zero_stage=0"), world_size=2)["zero_optimization"] == {
        "stage": 0}  # no overlap there: DeepSpeed all-reduces after backward


def test_overlap_bucket_and_timer_can_be_overridden_and_bad_values_are_refused():
    ds = ds_config(cfg("deepspeed.zero_optimization.overlap_comm=false",
                       "deepspeed.zero_optimization.reduce_bucket_size=5.0e+8",
                       "deepspeed.timers={throughput: {enabled: true}}"), world_size=2)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False,
                                       "reduce_bucket_size": 5e8}
    assert ds["timers"] == {"throughput": {"enabled": True}}
    for bad, message in [("overlap_comm=maybe", "expected true/false, got 'maybe'"),
                         ("reduce_bucket_size=5e8", "YAML reads 5e8 as a string"),
                         ("reduce_bucket_size=0", "positive whole number"),
                         ("reduce_bucket_size=2.5", "positive whole number")]:
        with pytest.raises(ConfigError, match=f"deepspeed.zero_optimization.{bad.split('=')[0]}"
                                              f": .*{message}"):
            cfg(f"deepspeed.zero_optimization.{bad}")


def test_world_size_that_does_not_divide_the_batch():
    with pytest.raises(ConfigError, match="schedule.phases.0.global_batch"):
        ds_config(cfg(), world_size=3)


def test_learning_rate_is_one_schedule_across_phases_with_optional_rewarmup():
    c = load_config(None, ["data.shards=x", "optim.warmup_steps=10",
                           "schedule.phases=[{until_step: 90}, {until_step: 100}]"])
    f = [learning_rate_factor(c, s) for s in range(100)]
    assert f[0] == 0.1 and f[9] == 1.0 and f[99] > 0
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # continuous linear decay, no jump at 90
    c.schedule.phases[1].warmup_steps = 5
    g = [learning_rate_factor(c, s) for s in range(100)]
    assert g[:90] == f[:90] and abs(g[90] - f[90] / 5) < 1e-12 and g[95:] == f[95:]


def test_bf16_accumulates_and_reduces_gradients_in_fp32_by_default():
    ds = ds_config(cfg("train.precision=bf16"), world_size=2)
    assert "bf16" not in ds and ds["torch_autocast"]["enabled"]
    assert ds["torch_autocast"]["lower_precision_safe_modules"] == []  # nothing reduced in bf16
    opted_out = ds_config(cfg("train.precision=bf16", "train.grad_accum_dtype=bf16"), 2)
    assert opted_out["bf16"] == {"enabled": True} and "torch_autocast" not in opted_out
    with pytest.raises(ConfigError, match="train.grad_accum_dtype"):
        cfg("train.precision=fp32", "train.grad_accum_dtype=bf16")


def test_gradients_are_fp32_at_every_zero_stage_under_bf16(tmp_path):
    out = tmp_path / "dtypes.json"
    port = free_port()
    cmd = launcher_command(2, port, "grad_dtype_probe", str(out), "train.precision=bf16")
    try:
        proc = subprocess.run(cmd, env={**env(), "PYTHONPATH": str(Path(__file__).parent)},
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        remove_shm_buffers(port)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fp32 = {"grads": ["torch.float32"], "reduce": "torch.float32", "weights": ["torch.float32"]}
    assert json.loads(out.read_text()) == {str(stage): fp32 for stage in range(4)}


class _Accelerator:
    """Stands in for DeepSpeed's accelerator of a device without fp16 or bf16 kernels: which
    precisions a device has is the hardware's, and this machine's CPU may have both."""

    def __init__(self, fp16: bool, bf16: bool):
        self.fp16, self.bf16 = fp16, bf16

    def device_name(self, index=None):
        return "cpu"

    def is_fp16_supported(self):
        return self.fp16

    def is_bf16_supported(self):
        return self.bf16


def test_a_precision_the_device_lacks_is_refused_naming_the_key():
    from mlm_dist.engine import check_device_precision

    check_device_precision("fp16", _Accelerator(fp16=True, bf16=False))
    check_device_precision("fp32", _Accelerator(fp16=False, bf16=False))
    with pytest.raises(ConfigError, match="train.precision: fp16 is not supported on cpu; use"):
        check_device_precision("fp16", _Accelerator(fp16=False, bf16=True))
    with pytest.raises(ConfigError, match="train.precision: bf16 is not supported on cpu; use"):
        check_device_precision("bf16", _Accelerator(fp16=True, bf16=False))
