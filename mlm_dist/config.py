"""One typed config tree for a run: YAML file + dotted overrides, validated before any work.

Every value is coerced to the type its dataclass field declares (PyYAML reads `1e-4` as a string),
and every error names the dotted key that caused it, so `optim.lr=abc` fails with
`optim.lr: expected float, got 'abc'` before a single process starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mlm_dist.errors import UserError


class ConfigError(UserError, ValueError):
    """A user-fixable problem with the run configuration; the message names the key."""


@dataclass
class ModelConfig:
    # vocab_size 0 means "take it from the tokenizer" (resolved once, at load time).
    vocab_size: int = 0
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02
    # A Hugging Face BERT folder to continue pretraining from (domain adaptation): its shape
    # and weights; the shards must be prepared with its tokenizer (`prepare --tokenizer DIR`).
    init_from: str = ""
    # Recompute each encoder layer in the backward pass instead of keeping its activations.
    checkpoint_activations: bool = False


@dataclass
class ObjectiveConfig:
    """What the model learns to predict: one module per objective in mlm_dist/objectives."""

    # bert: MLM + next-sentence prediction on sentence pairs (BERT; the default).
    # mlm: MLM only, on rows filled with contiguous text (RoBERTa's FULL-SENTENCES).
    # sop: MLM + sentence-order prediction on pairs of consecutive segments (ALBERT).
    # electra: a small MLM generator fills the masked slots with samples, the encoder learns
    # to tell replaced tokens from original ones on full rows (replaced-token detection).
    name: Literal["bert", "mlm", "sop", "electra"] = "bert"
    # sop: the chance that a pair's two segments are swapped (ALBERT: 1/2).
    swap_prob: float = 0.5
    # electra: the generator's hidden size, heads and FFN size as a fraction of the model's
    # (same number of layers); 1/4 as in the paper's small and large models.
    generator_size: float = 0.25
    # electra: λ in loss = generator MLM + λ · replaced-token detection (the paper's 50).
    rtd_weight: float = 50.0


@dataclass
class DataConfig:
    # Directory written by `mlm-dist prepare` (holds manifest.json and the tar shards), or
    # where such a directory is served: https://host/path/, s3://bucket/prefix/, gs://…, or
    # 'pipe:CMD {}' (CMD prints the file whose relative path replaces {}). See data/remote.py.
    shards: str = ""
    # Directory holding tokenizer.model; defaults to the one recorded next to the shards.
    tokenizer: str = ""
    num_workers: int = 1
    shuffle_buffer: int = 256  # documents a reader shuffles at a time
    # Documents whose examples (pairs, rows) are interleaved at a time, so that a micro-batch
    # mixes many documents even when each is a book (memory: these documents and their
    # examples, per reader).
    open_documents: int = 256
    # The chance that a pair gets a shorter target length, so the model also sees short inputs
    # (bert, sop; mlm's rows are always full, as RoBERTa's).
    short_seq_prob: float = 0.1
    # Documents that may be lost to bad data (missing/corrupt shards, undecodable samples),
    # summed over all ranks, before the run stops with an error.
    max_skipped_samples: int = 1000
    # Pack several pairs into a row (positions restart and attention stays within each pair):
    # short documents give short pairs, and a row of one pair is mostly padding.
    pack: bool = False
    # Shards behind a URL (data.shards): a stream that breaks or stalls is opened again at the
    # last whole sample, up to `stream_retries` times in a row without a new sample, waiting
    # `stream_backoff` seconds before the first retry and twice as long before each next;
    # then the rest of the shard counts as skipped (as for a corrupt tar). `stream_timeout`:
    # seconds a connection or one read may take before the attempt counts as broken.
    stream_retries: int = 5
    stream_backoff: float = 1.0
    stream_timeout: float = 60.0


@dataclass
class MaskingConfig:
    prob: float = 0.15
    mask_frac: float = 0.8
    random_frac: float = 0.1
    whole_word: bool = False


@dataclass
class SequencePhase:
    """One stretch of the run at one sequence length (BERT: 90 % of steps at 128, then 512)."""

    seq_len: int = 128
    micro_batch: int = 8
    global_batch: int = 16
    until_step: int = 100  # the phase ends when this many optimizer steps are done in total
    # Predicted positions per sequence, fixed so shapes are static (no host sync);
    # 0 = derived from seq_len and masking.prob with a margin that almost never truncates.
    max_predictions: int = 0
    # Optional re-warmup: the LR ramps up again over this many steps at the phase start.
    warmup_steps: int = 0


@dataclass
class ScheduleConfig:
    phases: list[SequencePhase] = field(default_factory=lambda: [SequencePhase()])

    @property
    def total_steps(self) -> int:
        return self.phases[-1].until_step

    def phase_at(self, step: int) -> int:
        """Index of the phase that optimizer step `step` (0-based) belongs to."""
        for i, phase in enumerate(self.phases):
            if step < phase.until_step:
                return i
        return len(self.phases) - 1

    def start_of(self, index: int) -> int:
        return self.phases[index - 1].until_step if index else 0


@dataclass
class TrainConfig:
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    # Under bf16: the dtype gradients are accumulated over micro-batches and reduced across
    # ranks in. fp32 (default) keeps fp32 weights and runs the forward under autocast; bf16 is
    # DeepSpeed's bf16 mode (bf16 weights and gradients, fp32 master copy in the optimizer).
    grad_accum_dtype: Literal["fp32", "bf16"] = "fp32"

    @property
    def fp32_weights(self) -> bool:
        """Weights and gradients held in fp32: under fp32, and under bf16 autocast."""
        return self.precision == "fp32" or (self.precision == "bf16"
                                            and self.grad_accum_dtype == "fp32")
    zero_stage: int = 2
    grad_clip: float = 1.0
    log_every: int = 10
    seed: int = 1234
    # A step whose gradients are not finite is skipped on every rank (DeepSpeed's overflow
    # check under bf16/fp16). After this many skips in a row the run stops or rolls back.
    max_consecutive_skips: int = 5
    on_divergence: Literal["error", "rollback"] = "error"
    compile: bool = False  # torch.compile the model (through DeepSpeed's engine.compile)
    # Peak FLOP/s of one device for perf/mfu; 0 = a table for known GPUs, else measured.
    peak_flops: float = 0.0
    # How long a collective waits for a rank that makes no progress (stuck, or its node gone)
    # before the run fails; a killed rank ends the run at once anyway. It must outlast the
    # longest legitimate wait: rank 0 converting a checkpoint to the universal form on resume
    # (the others wait at a barrier) or a save to a slow shared filesystem.
    collective_timeout_minutes: float = 30.0


@dataclass
class OptimConfig:
    name: Literal["adamw", "lamb"] = "adamw"  # LAMB for very large batches
    lr: float = 1e-4
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    warmup_steps: int = 10


@dataclass
class CheckpointConfig:
    every: int = 0  # optimizer steps between saves; 0 = only at the end
    every_minutes: float = 0.0  # also save when this much wall time passed since the last
    keep: int = 3  # newest complete checkpoints kept; 0 = keep all
    resume: bool = False
    # How often (in optimizer steps) the ranks agree on stop signals and timed saves: a tiny
    # all-reduce whose host read waits for the device. 0 = at each log step (train.log_every),
    # which waits for the device anyway to reduce the metrics: the steps between never wait.
    # SIGTERM/SIGUSR1 then save and exit 0 within one interval plus one save; Slurm warns
    # minutes ahead (`mlm-dist slurm --signal-seconds`), far more than a few steps take.
    sync_every: int = 0

    def agrees_every(self, log_every: int) -> int:
        """Optimizer steps between the ranks' agreements on signals and timed saves."""
        return self.sync_every or log_every


@dataclass
class EvalConfig:
    every: int = 0  # optimizer steps between evaluations; 0 = never during training
    # One deterministic pass over the validation split, cut after this many examples (the
    # objective's pairs or rows; 0 = the whole split). A big corpus's 1-2 % valid split can take longer than the steps
    # between evaluations; the first 10,000 pairs give the loss to about ±0.01.
    max_pairs: int = 10_000
    seed: int = 0  # the validation pairs and masks: the same at every evaluation


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Extra DeepSpeed keys merged into the generated JSON; keys we derive may not be set here.
    deepspeed: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Building the tree from plain data


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported union type for {key}")  # not used in the tree
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}.{i}") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], key)
        elif dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], {}, key)
    return cls(**kwargs)


def _apply_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. optim.lr=1e-4")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    # Values are parsed as YAML so `[1, 2]` and `{a: 1}` work; types are coerced afterwards.
    value = yaml.safe_load(raw) if raw.strip() else ""
    node = data
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):  # e.g. schedule.phases.1.seq_len=512
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"{dotted}: {p} is not an index of a list of {len(node)}")
            p = int(p)
        elif not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {parts[i - 1]} is not a section")
        if last:
            node[p] = value
        else:
            if isinstance(node, dict) and p not in node:
                node[p] = _default_data(dotted, parts[:i + 1])
            node = node[p]


def _default_data(dotted: str, parts: list) -> dict | list:
    """The plain-data default of a section an override descends into (lists need their items)."""
    node: Any = to_dict(RunConfig())
    for p in parts:
        if isinstance(node, list) and str(p).isdigit() and int(p) < len(node):
            node = node[int(p)]
        elif isinstance(node, dict) and p in node:
            node = node[p]
        else:
            return {}  # unknown: _build names the key
    return node if isinstance(node, (dict, list)) else {}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML (optional), apply `a.b=c` overrides, coerce types, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
    for o in overrides:
        _apply_override(data, o)
    cfg = _build(RunConfig, data)
    validate(cfg)
    return cfg


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """`cfg` with `a.b=c` overrides applied, coerced and validated as load_config does them
    (`mlm-dist eval` sets its masking and reading settings on a run's saved config this way)."""
    data = to_dict(cfg)
    for o in overrides:
        _apply_override(data, o)
    cfg = _build(RunConfig, data)
    validate(cfg)
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Validation of values and combinations (world size checks happen in validate_topology)


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: RunConfig) -> None:
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
        least = min_max_predictions(ph, mk)
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


def generator_config(model: ModelConfig, size: float) -> ModelConfig:
    """ELECTRA's generator: `model` with hidden size, heads and FFN size scaled by `size`
    (objective.generator_size; at least one of each), the same layers, vocabulary and
    positions. Its token, position and segment embeddings are the model's, of the model's
    hidden size: the generator projects them down to its own (objectives/electra.py)."""
    return dataclasses.replace(
        model, hidden_size=max(1, round(model.hidden_size * size)),
        num_heads=max(1, round(model.num_heads * size)),
        intermediate_size=max(1, round(model.intermediate_size * size)))


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


# A packed row holds at most this many pairs: static shapes for the NSP head. A pair is
# [CLS] A [SEP] B [SEP] with A and B of a sentence or more, rarely under 32 tokens.
MIN_PACKED_PAIR = 32


def pairs_per_row(seq_len: int) -> int:
    """NSP slots of a packed row of `seq_len` tokens."""
    return max(1, seq_len // MIN_PACKED_PAIR)


def max_predictions(phase: SequencePhase, masking: MaskingConfig) -> int:
    """Predicted positions per sequence: configured, or derived so that no row is cut short."""
    return phase.max_predictions or min(phase.seq_len, _slots(phase.seq_len, masking))


def min_max_predictions(phase: SequencePhase, masking: MaskingConfig) -> int:
    """The fewest slots that hold the share of a full [CLS] A [SEP] B [SEP] row."""
    return _slots(phase.seq_len - 3, masking)


def _slots(tokens: int, masking: MaskingConfig) -> int:
    # A row masks prob·n of its n eligible tokens rounded at random (masking.py), never more
    # than ceil(prob·n); whole-word masking may take one word more, so it gets spare slots
    # (when they run out, the last word is left unmasked and the rate dips).
    k = math.ceil(masking.prob * tokens)
    return k + 2 + k // 8 if masking.whole_word else k
