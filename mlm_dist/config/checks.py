"""Values that each parse but do not make a run: ranges, combinations, keys that belong to
another section, and the batch arithmetic of a world size (validate_topology). Each error names
the key to change."""

from __future__ import annotations

import math

from mlm_dist.config.schema import ConfigError, ObjectiveConfig, RunConfig, generator_config


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: RunConfig) -> None:
    """Every value in range and every combination consistent (the world size is checked later,
    by validate_topology, once it is known)."""
    m, t, mk, o = cfg.model, cfg.train, cfg.masking, cfg.optim
    _require(m.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 = from the tokenizer)")
    for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions"):
        _require(getattr(m, name) > 0, f"model.{name}", "must be positive")
    _require(m.hidden_size % m.num_heads == 0, "model.num_heads",
             f"hidden_size {m.hidden_size} is not divisible by num_heads {m.num_heads}")
    _validate_objective(cfg)
    for name in ("dropout", "attention_dropout"):
        _require(0.0 <= getattr(m, name) < 1.0, f"model.{name}", "must be in [0, 1)")

    _require(0.0 < mk.prob < 1.0, "masking.prob", "must be in (0, 1)")
    _require(0.0 <= mk.mask_frac <= 1.0, "masking.mask_frac", "must be in [0, 1]")
    _require(0.0 <= mk.random_frac <= 1.0, "masking.random_frac", "must be in [0, 1]")
    _require(mk.mask_frac + mk.random_frac <= 1.0, "masking.random_frac",
             "mask_frac + random_frac must not exceed 1")

    phases = cfg.schedule.phases
    _require(len(phases) > 0, "schedule.phases", "needs at least one phase")
    previous_end = 0
    for i, ph in enumerate(phases):
        key = f"schedule.phases.{i}"
        _require(ph.seq_len >= 8, f"{key}.seq_len", "must be at least 8")
        _require(ph.seq_len <= m.max_positions, f"{key}.seq_len",
                 f"{ph.seq_len} exceeds model.max_positions {m.max_positions}; "
                 "raise model.max_positions or shorten the phase")
        _require(ph.micro_batch > 0, f"{key}.micro_batch", "must be positive")
        _require(ph.global_batch > 0, f"{key}.global_batch", "must be positive")
        _require(ph.global_batch % ph.micro_batch == 0, f"{key}.global_batch",
                 f"{ph.global_batch} is not divisible by micro_batch {ph.micro_batch}")
        _require(ph.until_step > previous_end, f"{key}.until_step",
                 f"{ph.until_step} must be greater than the previous phase's end "
                 f"({previous_end}): phases run in order and may not overlap")
        _require(0 <= ph.max_predictions <= ph.seq_len, f"{key}.max_predictions",
                 f"must be in [0, seq_len={ph.seq_len}] (0 = derived)")
        # the fewest slots that hold the share of a full [CLS] A [SEP] B [SEP] row
        least = mk.slots_needed(ph.seq_len - 3)
        _require(ph.max_predictions == 0 or ph.max_predictions >= least, f"{key}.max_predictions",
                 f"{ph.max_predictions} slots would cut rows short and lower the mask rate below "
                 f"masking.prob={mk.prob}: need at least {least} at seq_len {ph.seq_len}; "
                 "set it to 0 to derive it")
        _require(0 <= ph.warmup_steps <= ph.until_step - previous_end, f"{key}.warmup_steps",
                 "must be >= 0 and not longer than the phase")
        previous_end = ph.until_step
    _require(t.zero_stage in (0, 1, 2, 3), "train.zero_stage",
             f"ZeRO stage {t.zero_stage} does not exist; use 0, 1, 2 or 3")
    _require(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    _require(t.grad_accum_dtype == "fp32" or t.precision == "bf16", "train.grad_accum_dtype",
             f"bf16 gradients need train.precision=bf16 (it is {t.precision})")
    _require(t.log_every > 0, "train.log_every", "must be positive")
    _require(0 < t.collective_timeout_minutes < math.inf, "train.collective_timeout_minutes",
             "must be a positive number of minutes (how long a collective waits for a stuck "
             "rank)")

    _require(o.lr > 0, "optim.lr", "must be positive")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1", "betas must be in [0, 1)")
    _require(o.name != "lamb" or t.zero_stage == 0, "optim.name",
             "lamb needs train.zero_stage=0: ZeRO stages 1-3 give the optimizer flat partitions "
             "of many tensors, so LAMB's per-tensor trust ratio would be taken per partition")
    _require(t.peak_flops >= 0, "train.peak_flops", "must be >= 0 (0 = table or measured)")
    total = cfg.schedule.total_steps
    _require(0 <= o.warmup_steps <= total, "optim.warmup_steps",
             f"must be in [0, total steps={total}] (the last phase's until_step)")

    c = cfg.checkpoint
    _require(c.every >= 0, "checkpoint.every", "must be >= 0")
    _require(c.every_minutes >= 0, "checkpoint.every_minutes", "must be >= 0")
    _require(c.keep >= 0, "checkpoint.keep", "must be >= 0 (0 = keep all)")
    _require(c.sync_every >= 0, "checkpoint.sync_every",
             "must be >= 0 (0 = at every log step, train.log_every)")
    _require(cfg.eval.every >= 0, "eval.every", "must be >= 0")
    _require(cfg.eval.max_pairs >= 0, "eval.max_pairs", "must be >= 0 (0 = the whole split)")
    _require(t.max_consecutive_skips >= 1, "train.max_consecutive_skips", "must be >= 1")
    _require(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    _require(cfg.data.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
    _require(cfg.data.open_documents >= 1, "data.open_documents", "must be >= 1")
    _require(cfg.data.max_skipped_samples >= 0, "data.max_skipped_samples", "must be >= 0")
    _require(0.0 <= cfg.data.short_seq_prob <= 1.0, "data.short_seq_prob", "must be in [0, 1]")
    _require(bool(cfg.data.shards), "data.shards",
             "is required: the directory written by `mlm-dist prepare`")
    _require(cfg.data.stream_retries >= 0, "data.stream_retries", "must be >= 0")
    _require(cfg.data.stream_backoff >= 0, "data.stream_backoff", "must be >= 0 seconds")
    _require(cfg.data.stream_timeout > 0, "data.stream_timeout", "must be > 0 seconds")
    _require(bool(cfg.out_dir), "out_dir", "is required")
    _validate_deepspeed_extras(cfg.deepspeed)


def _validate_objective(cfg: RunConfig) -> None:
    o = cfg.objective
    pairs = o.name in ("bert", "sop")  # [CLS] A [SEP] B [SEP]: segment types 0 and 1
    _require(not pairs or cfg.model.type_vocab_size >= 2, "model.type_vocab_size",
             f"objective.name={o.name} needs at least 2 segment types (sentence A and B)")
    _require(0.0 < o.swap_prob < 1.0, "objective.swap_prob", "must be in (0, 1)")
    _require(o.swap_prob == 0.5 or o.name == "sop", "objective.swap_prob",
             f"only objective.name=sop swaps segments (it is {o.name}); remove the key")
    _require(not (cfg.data.pack and o.name in ("mlm", "electra")), "data.pack",
             f"objective.name={o.name} fills every row with contiguous text already; packing is "
             "for pairs (bert, sop): set data.pack=false")
    defaults = ObjectiveConfig()
    for key in ("generator_size", "rtd_weight"):
        _require(getattr(o, key) == getattr(defaults, key) or o.name == "electra",
                 f"objective.{key}", f"only objective.name=electra has a generator (it is "
                 f"{o.name}); remove the key")
    _require(0.0 < o.generator_size <= 1.0, "objective.generator_size",
             "must be in (0, 1]: a fraction of the model's hidden size (the paper: 1/4 to 1/2)")
    _require(o.rtd_weight > 0 and math.isfinite(o.rtd_weight), "objective.rtd_weight",
             "must be a positive number (the paper's λ: 50)")
    if o.name == "electra":
        _require(not cfg.model.init_from, "model.init_from",
                 "objective.name=electra trains a generator beside the encoder and starts both "
                 "from random weights; continue a BERT folder with objective.name=mlm or bert")
        g = generator_config(cfg.model, o.generator_size)
        _require(g.hidden_size % g.num_heads == 0, "objective.generator_size",
                 f"{o.generator_size} gives the generator hidden size {g.hidden_size} and "
                 f"{g.num_heads} heads, which do not divide; choose a fraction that keeps "
                 f"model.hidden_size {cfg.model.hidden_size} and model.num_heads "
                 f"{cfg.model.num_heads} in step (e.g. 1/4 of 768 and 12: 192 and 3)")


# Keys of the DeepSpeed JSON we derive from our own config (engine.deepspeed_config); setting
# them under `deepspeed:` would configure them twice.
DERIVED_DEEPSPEED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu",
                          "gradient_accumulation_steps", "gradient_clipping", "bf16", "fp16",
                          "torch_autocast", "data_types", "optimizer", "scheduler")


def _validate_deepspeed_extras(extras: dict) -> None:
    for key, value in extras.items():
        _require(key not in DERIVED_DEEPSPEED_KEYS, f"deepspeed.{key}",
                 "derived from the run config, set it there instead (schedule.phases / train.* "
                 "/ optim.*)")
        if key == "zero_optimization":
            _require(isinstance(value, dict), "deepspeed.zero_optimization", "expected a mapping")
            _require("stage" not in value, "deepspeed.zero_optimization.stage",
                     "set train.zero_stage instead")
            _validate_zero_overrides(value)


def _validate_zero_overrides(zero: dict) -> None:
    """The ZeRO settings we choose (engine.zero_optimization) and a user may override: checked
    here, not by DeepSpeed on every rank after the process group is up."""
    key = "deepspeed.zero_optimization"
    if "overlap_comm" in zero:
        _require(isinstance(zero["overlap_comm"], bool), f"{key}.overlap_comm",
                 f"expected true/false, got {zero['overlap_comm']!r}")
    if "reduce_bucket_size" in zero:
        size = zero["reduce_bucket_size"]
        whole = (isinstance(size, int) and not isinstance(size, bool)) or (
            isinstance(size, float) and size.is_integer())
        hint = " (YAML reads 5e8 as a string: write 500_000_000 or 5.0e+8)" if isinstance(
            size, str) else ""
        _require(whole and size > 0, f"{key}.reduce_bucket_size",
                 f"expected a positive whole number of elements, got {size!r}{hint}")


def validate_topology(cfg: RunConfig, world_size: int) -> list[int]:
    """Check every phase's batch arithmetic for a data-parallel size; return the gradient
    accumulation steps of each phase (derived here, and only here)."""
    accumulation = []
    for i, ph in enumerate(cfg.schedule.phases):
        per_step = ph.micro_batch * world_size
        _require(ph.global_batch % per_step == 0, f"schedule.phases.{i}.global_batch",
                 f"{ph.global_batch} is not divisible by micro_batch × ranks = "
                 f"{ph.micro_batch} × {world_size} = {per_step}")
        accumulation.append(ph.global_batch // per_step)
    return accumulation
