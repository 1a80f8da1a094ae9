"""Pretraining objectives, one module each (base.py says what one is). `objective.name` in the
run config picks one; adding one is a module here, an entry below and its name in
config.ObjectiveConfig."""

from __future__ import annotations

from mlm_dist.config import ObjectiveConfig, RunConfig
from mlm_dist.objectives.base import Objective
from mlm_dist.objectives.bert import Bert
from mlm_dist.objectives.electra import Electra
from mlm_dist.objectives.mlm import MaskedLM
from mlm_dist.objectives.sop import SentenceOrder

OBJECTIVES: dict[str, type[Objective]] = {o.name: o for o in (Bert, MaskedLM, SentenceOrder,
                                                                     Electra)}


def objective_for(cfg: RunConfig | ObjectiveConfig) -> Objective:
    """The objective a run config (or its `objective` section) chose."""
    section = cfg.objective if isinstance(cfg, RunConfig) else cfg
    return OBJECTIVES[section.name](section)
