"""`bench convergence`'s one evaluation for both sides: the shared initial weights and every
saved model of ours and of the reference, loaded into the objective's network and scored by its
evaluation (training/evaluate.py: the objective's named metrics) on the same validation examples
and masks; and the plot of both sides' validation curves, every seed."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from mlm_dist.bench.reference_trainer import initial_state_dict, say
from mlm_dist.objectives import objective_for
from mlm_dist.training.checkpoint import CHECKPOINTS, load_checkpoint, tag_for
from mlm_dist.training.evaluate import evaluate

EVAL_MICRO_BATCH = 32



def score(model, cfg, shards, tokenizer) -> dict:
    """Validation figures of `model` (the objective's network) on the valid split of `shards`:
    evaluate.py's one deterministic pass (the first eval.max_pairs examples), the same examples
    and masks whatever the model, so both sides' numbers compare."""
    phase = dataclasses.replace(cfg.schedule.phases[-1], micro_batch=EVAL_MICRO_BATCH)
    model.eval()
    return evaluate(model, cfg, phase, tokenizer.vocabulary, shards=str(shards), rank=0,
                    world_size=1, device="cpu")


def saved_steps(every: int, total: int) -> list[int]:
    return sorted(set(range(every, total + 1, every)) | {total})


def evaluate_runs(cfg, tokenizer, ours_dir: Path, reference_dir: Path, every: int) -> dict:
    """Score the shared initial weights (step 0) and every saved model of both sides, all in
    the objective's network (the reference's saved weights carry our names: strict load)."""
    shards = cfg.data.shards
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = objective_for(cfg).build_model(cfg.model)
    model.load_state_dict(initial_state_dict(cfg), strict=True)
    initial = {"step": 0, **score(model, cfg, shards, tokenizer)}
    curves = {"ours": [initial], "reference": [initial]}
    headline = objective_for(cfg).headline
    for step in saved_steps(every, cfg.schedule.total_steps):
        ours, _, _ = load_checkpoint(ours_dir / CHECKPOINTS / tag_for(step))
        curves["ours"].append({"step": step, **score(ours, cfg, shards, tokenizer)})
        model.load_state_dict(torch.load(reference_dir / f"{tag_for(step)}.pt",
                                          map_location="cpu", weights_only=True), strict=True)
        curves["reference"].append({"step": step, **score(model, cfg, shards, tokenizer)})
        say(f"evaluated step {step}: {headline} ours {curves['ours'][-1][headline]:.4f}, "
            f"reference {curves['reference'][-1][headline]:.4f}")
    return curves


def plot_curves(runs: list[dict], path: Path, title: str, metric: str) -> None:
    """Both sides' validation curves of `metric` (the objective's headline loss), one line per
    seed (`runs`: evaluate_runs's curves of each seed)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for side, style, color in (("ours", "-o", "C0"), ("reference", "--s", "C1")):
        for k, curves in enumerate(runs):
            points = curves[side]
            ax.plot([p["step"] for p in points], [p[metric] for p in points], style,
                    color=color, label=side if k == 0 else None, markersize=3,
                    alpha=1.0 if len(runs) == 1 else 0.6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
