"""Validation: the objective's figures (MLM loss, perplexity, MLM accuracy; NSP or SOP loss and
accuracy: objectives/) on the validation shards, and the mask rate.

One deterministic pass: the validation split is read once, from its start, by a single reader
with its own seed (`eval.seed`), and cut into global micro-batches 0, 1, 2, ... Batch g is
scored by rank g mod ranks and masked with a generator seeded by (eval seed, g), with the run's
masking settings (rate, 80/10/10, whole words). So every evaluation of the same weights sees the
same examples and the same masks, on 1 rank or on 8, and the per-batch sums are added up in
batch order on every rank: the numbers do not depend on the number of ranks. `eval.max_pairs`
caps the pass at the split's first examples (0 = the whole split).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from mlm_dist.config import ConfigError, RunConfig, SequencePhase, apply_overrides, load_config
from mlm_dist.data.batches import Batch, assemble, writer_for
from mlm_dist.data.pipeline import ReaderStream, manifest_shards
from mlm_dist.data.shards import Manifest, ShardFormatError
from mlm_dist.errors import UsageError
from mlm_dist.interop.init_from import load_pretrained
from mlm_dist.masking import TokenMasker, max_predictions
from mlm_dist.model import IGNORE_INDEX
from mlm_dist.objectives import objective_for
from mlm_dist.tokenizer import Tokenizer, Vocabulary
from mlm_dist.training.checkpoint import checkpoint_config, load_checkpoint, locate
from mlm_dist.training.preflight import resolve_data


def validation_batches(cfg: RunConfig, phase: SequencePhase, vocab: Vocabulary,
                       shards: str) -> Iterator[Batch]:
    """Each global micro-batch of the pass, one example a row whatever `data.pack` (so the
    figures do not depend on it); the last one is filled up with rows that count for nothing."""
    stream = ReaderStream(manifest_shards(shards, "valid"), reader=0, readers=1,
                          seq_len=phase.seq_len, seed=cfg.eval.seed, data=cfg.data,
                          examples_of=objective_for(cfg).example_builder, vocab=vocab)
    examples = itertools.islice(stream.examples(epochs=1), cfg.eval.max_pairs or None)
    writer = writer_for(phase.micro_batch, phase.seq_len, vocab, pack=False)
    for batch, _ in assemble(examples, writer, partial=True):
        yield batch


@torch.no_grad()
def evaluate(forward: Callable, cfg: RunConfig, phase: SequencePhase, vocab: Vocabulary, *,
             shards: str | None = None, rank: int = 0, world_size: int = 1,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """`forward`: the model of the run's objective (or anything called as it is: see the
    objective's `losses`); attention_mask None when the batch has no padding
    (Batch.padding_mask). `shards`: another shard directory than the run's `data.shards`
    (same tokenizer)."""
    device = torch.device(device)
    objective = objective_for(cfg)
    masker = TokenMasker(vocab, cfg.masking, max_predictions=max_predictions(phase, cfg.masking),
                         seed=cfg.eval.seed, rank=0, device=device)
    shapes: dict[str, torch.Size] = {}  # of the per-batch terms, in their order in a row

    def score(batch: Batch, g: int) -> torch.Tensor:
        batch = batch.to(device)
        masked = masker(batch.input_ids, step=g, word_starts=batch.word_starts)
        terms = {**objective.eval_terms(objective.losses(forward, batch, masked), batch),
                 "predicted": (masked.labels != IGNORE_INDEX).sum(),
                 "eligible": masked.eligible,
                 "examples": (batch.example_label != IGNORE_INDEX).sum()}
        shapes.clear()
        shapes.update((name, term.shape) for name, term in terms.items())
        return torch.cat([term.reshape(-1).double() for term in terms.values()])

    # Every rank builds the whole stream (cheap next to the forward passes) and scores batch g
    # when g % ranks == rank, holding one batch at a time.
    rows, first, total = [], None, 0
    for g, batch in enumerate(validation_batches(cfg, phase, vocab, shards or cfg.data.shards)):
        first, total = first or batch, g + 1
        if g % world_size == rank:
            rows.append(score(batch, g))
    if not total:
        raise ShardFormatError(f"the validation split of {shards or cfg.data.shards} gives no "
                               f"examples at seq_len {phase.seq_len}; re-run `mlm-dist prepare` with a "
                               "larger --valid-fraction")
    # Every rank runs the same number of forward passes (ZeRO-3 gathers parameters in each):
    # a rank short of one scores batch 0 again and throws the result away.
    per_rank = math.ceil(total / world_size)
    while len(rows) < per_rank:
        rows.append(torch.zeros_like(score(first, 0)))
    sums = torch.stack(rows)
    if world_size > 1:
        gathered = [torch.empty_like(sums) for _ in range(world_size)]
        dist.all_gather(gathered, sums)
        # [rank, i] holds batch i * world_size + rank: back into batch order before adding up.
        sums = torch.stack(gathered, dim=1).reshape(-1, sums.shape[1])
    totals = torch.cumsum(sums.cpu(), dim=0)[-1]
    totals = totals.split([shape.numel() for shape in shapes.values()])
    s = {name: total.item() if shape == () else total.tolist()
         for (name, shape), total in zip(shapes.items(), totals)}
    return {
        **objective.eval_record(s),
        "val/mask_rate": s["predicted"] / max(1.0, s["eligible"]),
        "val/sequences": s["examples"],
        "val/predictions": s["predicted"],
    }


# What decides how an evaluation reads and masks, besides the weights: `mlm-dist eval` takes
# these as dotted settings, and `--like RUN` copies them from a run. The rest of a config says
# how a model was built or trained (model.*, train.*, optim.*, the schedule): the checkpoint
# fixes it, or evaluation never uses it (it reads with one reader, one example a row).
EVAL_SECTIONS = ("masking", "eval")
EVAL_DATA_KEYS = ("shuffle_buffer", "open_documents", "short_seq_prob", "stream_retries",
                  "stream_backoff", "stream_timeout")


def check_eval_setting(override: str, *, folder: bool) -> None:
    """A ConfigError naming the key unless `override` (key=value) is an evaluation setting.
    `folder`: the model is a Hugging Face folder, whose objective (which network to build on
    its weights, which examples to score) is the evaluation's choice; a run's is its own."""
    key = override.split("=", 1)[0].strip()
    section, _, rest = key.partition(".")
    if section in EVAL_SECTIONS or (section == "data" and rest in EVAL_DATA_KEYS) or (
            section == "objective" and folder):
        return
    if key == "data.shards":
        raise ConfigError("data.shards: give the shard directory to evaluate on as --data")
    if section == "objective":
        raise ConfigError(f"{key}: a run is evaluated with its own objective, the network it "
                          "trained; objective.* is for a Hugging Face folder (export the run "
                          "with `mlm-dist export-hf` to score it as another objective)")
    allowed = ", ".join(["masking.*", "eval.*", *(f"data.{k}" for k in EVAL_DATA_KEYS),
                         *(["objective.*"] if folder else [])])
    raise ConfigError(f"{key}: not a setting of an evaluation; `mlm-dist eval` takes {allowed} "
                      "(the model comes from the checkpoint, and train.*, optim.* and the "
                      "schedule are how it was trained)")


def run_settings(run: str | Path) -> RunConfig:
    """The config of `run` (`--like`): a run directory, its checkpoints dir or a step dir."""
    if (Path(run) / "config.yaml").is_file():  # written when the run starts
        return load_config(Path(run) / "config.yaml")
    return checkpoint_config(*locate(run))


def settings_like(cfg: RunConfig, like: RunConfig, *, folder: bool) -> RunConfig:
    """`cfg` reading, masking and scoring as `like` does (a folder also takes its objective),
    so that the before and after of a domain adaptation score the same examples and masks."""
    if not folder and like.objective.name != cfg.objective.name:
        raise ConfigError(f"--like: that run's objective.name is {like.objective.name} and this "
                          f"one's {cfg.objective.name}; they do not score the same examples")
    return dataclasses.replace(
        cfg, masking=like.masking, eval=like.eval,
        objective=like.objective if folder else cfg.objective,
        data=dataclasses.replace(cfg.data, **{k: getattr(like.data, k) for k in EVAL_DATA_KEYS}))


def evaluate_saved_model(source: str | Path, *, data: str | None = None, seq_len: int = 0,
                         micro_batch: int = 16, max_pairs: int | None = None,
                         seed: int | None = None, overrides: list[str] = (),
                         like: str | Path | None = None) -> dict:
    """`mlm-dist eval`: the figures of a checkpoint (run dir, checkpoints dir or step dir), or
    of a Hugging Face BERT folder (the "before" of a domain adaptation), on `data`'s validation
    split (default: the run's shards), at `seq_len` (default: the last phase's, of `like` when
    given, else of the run).

    The evaluation's settings are the run's config or, for a folder, the defaults; then those
    of the run `like` (settings_like); then `overrides` (check_eval_setting); then `seed` and
    `max_pairs` (eval.seed and eval.max_pairs; None: as configured). All are checked before
    any weights are read."""
    source = Path(source)
    folder = (source / "config.json").is_file()
    for o in overrides:
        check_eval_setting(o, folder=folder)
    like_cfg = run_settings(like) if like else None
    if folder:
        if not data:
            raise ConfigError("--data is required to evaluate a Hugging Face folder")
        cfg = load_config(None, [f"data.shards={data}", f"model.init_from={source}"])
    else:
        cfg = checkpoint_config(*locate(source))
    if like_cfg is not None:
        cfg = settings_like(cfg, like_cfg, folder=folder)
    cfg = apply_overrides(cfg, [*overrides, *([] if seed is None else [f"eval.seed={seed}"]),
                                *([] if max_pairs is None else [f"eval.max_pairs={max_pairs}"])])
    if folder:
        cfg, _ = resolve_data(cfg)
        # Notes on the folder's heads go to stderr: stdout is the JSON result.
        model = load_pretrained(cfg.model, objective_for(cfg),
                                say=lambda note: print(note, file=sys.stderr))
        tokenizer_dir = source
    else:
        model, _, tokenizer_dir = load_checkpoint(source)
    phase = (SequencePhase(seq_len=seq_len) if seq_len
             else (like_cfg or cfg).schedule.phases[-1])
    phase = dataclasses.replace(phase, micro_batch=micro_batch)
    if phase.seq_len > cfg.model.max_positions:
        given = "--seq-len" if seq_len else f"the last phase's seq_len (of {like or source})"
        raise ConfigError(f"{given} {phase.seq_len} exceeds the model's max_positions "
                          f"{cfg.model.max_positions}")
    tokenizer = Tokenizer.load(tokenizer_dir)
    data = data or cfg.data.shards
    if Manifest.load(data).tokenizer.sha256 != tokenizer.sha256:
        raise UsageError(f"--data {data} was not prepared with this model's tokenizer "
                         f"({tokenizer.path}); the ids would not mean what the model learned")
    model.eval()
    return {"seq_len": phase.seq_len,
            **evaluate(model, cfg, phase, tokenizer.vocabulary, shards=data)}
