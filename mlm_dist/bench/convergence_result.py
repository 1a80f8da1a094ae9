"""`bench convergence`'s result: each side's runs (their final validation figures, their
training figures and validation curves), the mean and sample spread over seeds, the
differences of the means with their standard errors, and the targets on them.

The targets compare what the objective names (Objective.headline, Objective.task_metrics):
its validation loss, at most the reference's + MLM_LOSS_MARGIN (the MLM loss; the generator's
for electra), its task figures, at least the reference's - TASK_MARGIN (NSP or SOP accuracy;
electra's RTD accuracy and AUC), and a lower wall time.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from mlm_dist.bench.reference_trainer import REFERENCE_RECIPES
from mlm_dist.config import ModelConfig
from mlm_dist.data.shards import Manifest
from mlm_dist.objectives import objective_for
from mlm_dist.objectives.base import Objective

if TYPE_CHECKING:
    from mlm_dist.bench.convergence import Setup

# The targets, on the means over seeds: ours must match the reference's quality for the same
# tokens, in less time.
MLM_LOSS_MARGIN = 0.02
TASK_MARGIN = 0.01  # the task's figures (NSP, SOP accuracy; RTD accuracy and AUC)
# evaluate.py's figures that describe the sample, not the model
SAMPLE_FIGURES = ("val/mask_rate", "val/sequences", "val/predictions")


def result_key(metric: str) -> str:
    """The result's name of one of evaluate.py's metrics: "val/mlm_loss" -> "val_mlm_loss"."""
    return metric.replace("/", "_")


def model_shape(m: ModelConfig) -> str:
    return (f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads, vocab "
            f"{m.vocab_size}")


def named_metrics(point: dict) -> dict:
    """The objective's validation metrics of one evaluation, under result_key's names, without
    the figures of the sample."""
    return {result_key(k): v for k, v in point.items()
            if k.startswith("val/") and k not in SAMPLE_FIGURES}


def side_summary(run: dict, curve: list[dict]) -> dict:
    """One run's figures in the result: its final validation metrics, its training run's
    figures and its validation curve."""
    final = curve[-1]
    return {
        **named_metrics(final),
        # the sample behind them: the same examples and predicted positions for both sides
        "val_examples": final["val/sequences"], "val_predictions": final["val/predictions"],
        "train_seconds": run["train_seconds"], "loop_seconds": run["loop_seconds"],
        "steps": run["steps"], "sequences": run["sequences"], "tokens": run["tokens"],
        # tokens that are not padding: what the examples put into those sequences
        "real_tokens": run["real_tokens"],
        "curve": [{"step": p["step"], **named_metrics(p)} for p in curve],
    }


def mean_and_spread(runs: list[dict], keys: list[str]) -> dict:
    """The mean and the sample standard deviation (n - 1; None for one run) of each of `keys`
    over `runs`."""
    values = {k: [r[k] for r in runs] for k in keys}
    return {"mean": {k: statistics.fmean(v) for k, v in values.items()},
            "std": {k: statistics.stdev(v) if len(v) > 1 else None for k, v in values.items()}}


def standard_error_of_difference(ours: dict, reference: dict, n_ours: int,
                                 n_reference: int) -> dict:
    """The standard error of each difference of the means (ours - reference), from each side's
    sample spread (`ours`, `reference`: mean_and_spread's "std"): sqrt(s_o²/n_o + s_r²/n_r), as
    Welch's test takes it; None unless both sides ran 2 seeds or more. The seeds' noise alone
    moves a difference by about this much; it shrinks as 1/sqrt(seeds), so it says whether a
    missed target is a gap or needs more seeds."""
    return {k: (ours[k] ** 2 / n_ours + reference[k] ** 2 / n_reference) ** 0.5
            if ours[k] is not None and reference[k] is not None else None for k in ours}


def compared_keys(run: dict) -> list[str]:
    """What is averaged over seeds and compared: the validation metrics and the times."""
    return [k for k in run if k.startswith("val_") and k not in ("val_examples",
                                                                 "val_predictions")
            ] + ["train_seconds", "loop_seconds", "real_tokens"]


def targets_of(ours: dict, reference: dict, objective: Objective) -> dict[str, bool]:
    """Our targets on the means over seeds (`ours`, `reference`: mean_and_spread's "mean") of
    the figures `objective` names."""
    loss = result_key(objective.headline)
    targets = {f"{loss} mean <= reference mean + {MLM_LOSS_MARGIN}":
               ours[loss] <= reference[loss] + MLM_LOSS_MARGIN}
    for figure in map(result_key, objective.task_metrics):
        targets[f"{figure} mean >= reference mean - {TASK_MARGIN}"] = (
            ours[figure] >= reference[figure] - TASK_MARGIN)
    targets["train_seconds mean < reference mean"] = (ours["train_seconds"]
                                                      < reference["train_seconds"])
    return targets


def assemble_result(setups: list[Setup], runs: list[tuple[dict, dict, dict]],
                    plot: Path) -> dict:
    """The JSON result: the set-up, both sides (every run, the mean and spread over seeds),
    the differences of the means and the targets."""
    sides: dict[str, list[dict]] = {"ours": [], "reference": []}
    for setup, (ours, reference, curves) in zip(setups, runs):
        o = {"seed": setup.seed, **side_summary(ours, curves["ours"])}
        r = {"seed": setup.seed, **side_summary(reference, curves["reference"]),
             **{k: v for k, v in reference.items()
                if k in ("data_seconds", "passes", "instances", "blocks", "threads")
                or k.endswith("_fraction")}}
        sides["ours"].append(o)
        sides["reference"].append(r)
    keys = compared_keys(sides["ours"][0])
    summary = {side: {**mean_and_spread(done, keys), "runs": done}
               for side, done in sides.items()}
    o, r = summary["ours"]["mean"], summary["reference"]["mean"]
    setup, cfg = setups[0], setups[0].cfg
    targets = targets_of(o, r, objective_for(cfg))
    phase = setup.phase
    return {
        "corpus": setup.corpus, "objective": cfg.objective.name,
        "seeds": [s.seed for s in setups],
        "setup": {"model": model_shape(cfg.model), "seq_len": phase.seq_len,
                  "micro_batch": phase.micro_batch, "global_batch": phase.global_batch,
                  "steps": setup.steps, "every": setup.every, "lr": cfg.optim.lr,
                  "warmup_steps": cfg.optim.warmup_steps, "precision": cfg.train.precision,
                  "ranks": setup.ranks, "reference_threads": setup.threads,
                  "reference": REFERENCE_RECIPES[cfg.objective.name],
                  # what produced these figures (convergence.run_signature)
                  "code": setup.signature["code"],
                  "libraries": setup.signature["libraries"],
                  "train_shards": split_totals(setup.shards, "train"),
                  "valid_shards": split_totals(setup.shards, "valid")},
        **summary,
        "delta": {k: o[k] - r[k] for k in keys},  # of the means: ours - reference
        "delta_standard_error": standard_error_of_difference(
            summary["ours"]["std"], summary["reference"]["std"], len(sides["ours"]),
            len(sides["reference"])),
        "targets": targets, "targets_hold": all(targets.values()),
        "plot": str(plot),
    }


def split_totals(shards: Path, split: str) -> dict:
    return Manifest.load(shards).totals(split)
