"""The run config: YAML + overrides, typed coercion, and errors that name the key."""

from pathlib import Path

import pytest
import yaml

from mlm_dist.config import ConfigError, dump_yaml, load_config, validate_topology
from mlm_dist.masking import max_predictions

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, data) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_yaml_scientific_notation_and_overrides_are_coerced(tmp_path):
    # PyYAML reads 1e-4 as the *string* "1e-4"; the field type decides.
    cfg = load_config(write(tmp_path, {"optim": {"lr": "1e-4"}, "data": {"shards": "s"}}),
                      ["schedule.phases.0.until_step=7", "masking.whole_word=true",
                       "optim.warmup_steps=2"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.schedule.total_steps == 7 and cfg.masking.whole_word is True


def test_every_shipped_config_loads_with_shards_given():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path, ["data.shards=/somewhere"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.shards=x", "model.hidden_size=64", "model.num_heads=4"])
    again = load_config(write(tmp_path, yaml.safe_load(dump_yaml(cfg))))
    assert again == cfg


@pytest.mark.parametrize("overrides, key", [
    (["optim.lrr=1"], "optim.lrr: unknown key"),
    (["bogus=1"], "bogus: unknown key"),
    (["optim.lr=abc"], "optim.lr: expected a number"),
    (["schedule.phases.0.until_step=1.5"], "schedule.phases.0.until_step: expected an integer"),
    (["train.log_every=true"], "train.log_every: expected an integer"),
    (["schedule.phases.3.seq_len=8"], "3 is not an index of a list of 1"),
    (["schedule.phases=[{seq_len: 64, bogus: 1}]"], "schedule.phases.0.bogus: unknown key"),
    (["masking.whole_word=maybe"], "masking.whole_word: expected true/false"),
    (["train.precision=fp8"], "train.precision: expected one of"),
    (["train.zero_stage=4"], "train.zero_stage: ZeRO stage 4 does not exist"),
    (["schedule.phases.0.seq_len=1024"],
     "schedule.phases.0.seq_len: 1024 exceeds model.max_positions 512"),
    (["schedule.phases.0.global_batch=20", "schedule.phases.0.micro_batch=8"],
     "schedule.phases.0.global_batch: 20 is not divisible"),
    (["schedule.phases=[{until_step: 90}, {until_step: 50}]"],
     "schedule.phases.1.until_step: 50 must be greater than the previous phase's end (90)"),
    (["schedule.phases=[{until_step: 90}, {until_step: 90}]"],
     "schedule.phases.1.until_step: 90 must be greater"),
    (["schedule.phases=[]"], "schedule.phases: needs at least one phase"),
    (["schedule.phases=[{until_step: 9}, {until_step: 10, warmup_steps: 2}]"],
     "schedule.phases.1.warmup_steps"),
    (["model.num_heads=5"], "model.num_heads: hidden_size 768 is not divisible"),
    (["masking.prob=0"], "masking.prob"),
    (["masking.mask_frac=0.95"], "masking.random_frac: mask_frac + random_frac"),
    (["optim.warmup_steps=1000", "schedule.phases.0.until_step=10"], "optim.warmup_steps"),
    (["checkpoint.keep=-1"], "checkpoint.keep"),
    (["train.on_divergence=ignore"], "train.on_divergence: expected one of"),
    (["optim.name=lamb", "train.zero_stage=2"], "optim.name: lamb needs train.zero_stage=0"),
    (["data.shards="], "data.shards: is required"),
    (["optim=3"], "optim: expected a mapping"),
    (["train.log_every"], "expected key=value"),
])
def test_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.shards=x", *overrides])
    assert key in str(e.value)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_topology_divisibility_and_grad_accumulation():
    cfg = load_config(None, ["data.shards=x", "schedule.phases=[{micro_batch: 4, global_batch: 32,"
                             " until_step: 10}, {micro_batch: 2, global_batch: 64, until_step: 20}]"])
    assert validate_topology(cfg, 2) == [4, 16]
    assert validate_topology(cfg, 8) == [1, 4]
    with pytest.raises(ConfigError, match="micro_batch × ranks = 4 × 3 = 12"):
        validate_topology(cfg, 3)


def test_phase_lookup():
    cfg = load_config(None, ["data.shards=x", "schedule.phases=[{until_step: 90},"
                             " {seq_len: 512, micro_batch: 2, global_batch: 16, until_step: 100}]"])
    s = cfg.schedule
    assert [s.phase_at(i) for i in (0, 89, 90, 99)] == [0, 0, 1, 1]
    assert s.total_steps == 100 and s.start_of(1) == 90


def test_max_predictions_derived_or_configured():
    cfg = load_config(None, ["data.shards=x", "schedule.phases.0.seq_len=128"])
    assert max_predictions(cfg.schedule.phases[0], cfg.masking) == 20  # ceil(0.15 · 128)
    cfg = load_config(None, ["data.shards=x", "schedule.phases.0.seq_len=128",
                             "masking.whole_word=true"])
    assert max_predictions(cfg.schedule.phases[0], cfg.masking) > 20  # room for a last word
    cfg = load_config(None, ["data.shards=x", "schedule.phases.0.max_predictions=24"])
    assert max_predictions(cfg.schedule.phases[0], cfg.masking) == 24


def test_max_predictions_too_small_for_the_mask_rate_is_an_error():
    # 15 % of a full 128-token row is 18.75 tokens: 18 slots would cut rows short.
    with pytest.raises(ConfigError, match="schedule.phases.0.max_predictions.*at least 19"):
        load_config(None, ["data.shards=x", "schedule.phases.0.seq_len=128",
                           "schedule.phases.0.max_predictions=18"])
