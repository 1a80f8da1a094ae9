"""The shape of a run's configuration: one dataclass per section, each field with its type and
default, and the comment a user reads to set it. Reading it from YAML is loading.py's job,
rejecting inconsistent values checks.py's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

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

    def slots_needed(self, tokens: int) -> int:
        """The most positions masked among `tokens` eligible ones. A row masks prob·n of its n
        eligible tokens rounded at random (masking.py), never more than ceil(prob·n);
        whole-word masking may take one word more, so it gets spare slots (when they run out,
        the last word is left unmasked and the rate dips)."""
        k = math.ceil(self.prob * tokens)
        return k + 2 + k // 8 if self.whole_word else k


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
    # precision.py turns the two keys into the one Precision the run computes in.
    grad_accum_dtype: Literal["fp32", "bf16"] = "fp32"
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


# Here beside ModelConfig rather than in electra_model.py: checks.py refuses a generator_size
# whose heads do not divide its hidden size, and the checks run before torch is imported.
def generator_config(model: ModelConfig, size: float) -> ModelConfig:
    """ELECTRA's generator: `model` with hidden size, heads and FFN size scaled by `size`
    (objective.generator_size; at least one of each), the same layers, vocabulary and
    positions. Its token, position and segment embeddings are the model's, of the model's
    hidden size: the generator projects them down to its own (objectives/electra.py)."""
    return dataclasses.replace(
        model, hidden_size=max(1, round(model.hidden_size * size)),
        num_heads=max(1, round(model.num_heads * size)),
        intermediate_size=max(1, round(model.intermediate_size * size)))
