"""What an objective is: everything a run does that depends on what the model predicts.

The loop, the step, the engine, checkpoints, masking, packing and the launchers call these
methods and know nothing else of the objective:

- `build_model`: the network (an nn.Module; the engine wraps it as it is);
- `example_builder`: how a reader turns documents into rows (data/examples.py);
- `losses`: one forward pass (or several: an objective may run a generator before its
  discriminator inside its module's forward) and the loss to back-propagate, under "loss";
- `train_terms` / `train_record`: the named quantities it sums over micro-steps and ranks, and
  the training metrics made from those sums at each log step;
- `eval_terms` / `eval_record`: the same for one evaluation pass;
- `export`: the Hugging Face folder its network becomes;
- `flops_per_token`: the training FLOPs per token of its step (MFU, equal-compute comparisons);
- `headline` / `task_metrics`: the validation figures `bench convergence` holds against a
  reference trainer of the objective.

Terms are 0-dim tensors, never read on the host by the objective: the metric logger stacks
them (by name) and pays for one reduction at its own cadence. An evaluation term may also be
a 1-dim tensor of counts (a histogram), summed element by element and handed to `eval_record`
as a list of floats. Besides the objective's terms every sum also holds the generic ones,
available to the records by these names:

    loss       the loss of each micro-batch (train only)
    predicted  masked positions predicted (the masker's labels)
    eligible   tokens the masker could have chosen
    examples   examples in the rows (pairs or full rows; not filler rows, not empty slots)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from mlm_dist.config import DataConfig, ModelConfig, ObjectiveConfig
from mlm_dist.tokenizer import Vocabulary


class Objective:
    name: str = ""
    # The Hugging Face class `export` writes by default, and the ones it can write.
    hf_class: str = ""
    hf_classes: tuple[str, ...] = ()
    # What `bench convergence` compares with the reference trainer: the validation loss both
    # sides minimise alike (lower is better), and the objective's own task figures (higher is
    # better; an objective without a task of its own has none).
    headline = "val/mlm_loss"
    task_metrics: tuple[str, ...] = ()

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg

    def build_model(self, model: ModelConfig,
                    checkpoint_activations: bool | None = None) -> nn.Module:
        raise NotImplementedError

    def example_builder(self, seq_len: int, rng: np.random.Generator, data: DataConfig,
                        vocab: Vocabulary):
        """data.examples.ExampleBuilder: documents -> this objective's examples at seq_len."""
        raise NotImplementedError

    def losses(self, model, batch, masked) -> dict[str, torch.Tensor]:
        """`model` (the engine, or the bare network) on a Batch and its MaskedBatch."""
        raise NotImplementedError

    def train_terms(self, losses: dict, batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def train_record(self, sums: dict[str, float], micro_steps: int) -> dict[str, float]:
        """`micro_steps`: over all ranks (a mean per micro-batch divides by it)."""
        raise NotImplementedError

    def eval_terms(self, losses: dict, batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def eval_record(self, sums: dict[str, float | list[float]]) -> dict[str, float]:
        raise NotImplementedError

    def flops_per_token(self, model: ModelConfig, seq_len: int, max_predictions: int) -> float:
        """Training FLOPs per token (flops.py) of this objective's network at seq_len with
        max_predictions masked slots a row: by default one BERT whose heads read [CLS] and
        the slots."""
        from mlm_dist.flops import sparse_flops_per_token

        return sparse_flops_per_token(model, seq_len, max_predictions)

    def export(self, state_dict: dict, model: ModelConfig, tokenizer_dir: str | Path,
               out: str | Path, hf_class: str = "") -> Path:
        """Write a Hugging Face folder of `hf_class` (default: the objective's own)."""
        from mlm_dist.config import ConfigError
        from mlm_dist.interop.export import export_hf

        hf_class = hf_class or self.hf_class
        if hf_class not in self.hf_classes:
            raise ConfigError(f"--hf-class {hf_class}: objective {self.name} exports as "
                              + " or ".join(self.hf_classes))
        return export_hf(state_dict, model, tokenizer_dir, out, hf_class=hf_class)


# ---- masked-token prediction: what every objective so far has, by the same names


def mlm_train_terms(losses: dict) -> dict[str, torch.Tensor]:
    return {"mlm_loss": losses["mlm_loss"].detach().float(),
            "mlm_correct": (losses["mlm_acc"] * losses["mlm_count"]).float()}


def mlm_train_record(sums: dict[str, float], micro_steps: int) -> dict[str, float]:
    return {"train/mlm_loss": sums["mlm_loss"] / micro_steps,
            "train/mlm_acc": sums["mlm_correct"] / max(1.0, sums["predicted"])}


def mlm_eval_terms(losses: dict) -> dict[str, torch.Tensor]:
    return {"mlm_loss_sum": losses["mlm_loss"] * losses["mlm_count"],
            "mlm_correct": losses["mlm_acc"] * losses["mlm_count"]}


def mlm_eval_record(sums: dict[str, float]) -> dict[str, float]:
    mlm_loss = sums["mlm_loss_sum"] / max(1.0, sums["predicted"])
    return {"val/mlm_loss": mlm_loss,
            "val/perplexity": math.exp(min(mlm_loss, 50.0)),
            "val/mlm_acc": sums["mlm_correct"] / max(1.0, sums["predicted"])}
