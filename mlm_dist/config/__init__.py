"""One typed config tree for a run: YAML file + dotted overrides, validated before any work.

schema.py is the tree (what a user can set), loading.py reads it (generic coercion: YAML +
`a.b=c` overrides -> typed dataclasses, errors naming the dotted key), checks.py refuses the
values that parse but make no run. Importers take the names from here.
"""

from mlm_dist.config.checks import validate, validate_topology
from mlm_dist.config.loading import apply_overrides, dump_yaml, load_config
from mlm_dist.config.schema import (CheckpointConfig, ConfigError, DataConfig, EvalConfig,
                                    MaskingConfig, ModelConfig, ObjectiveConfig, OptimConfig,
                                    RunConfig, ScheduleConfig, SequencePhase, TrainConfig,
                                    generator_config)

__all__ = ["CheckpointConfig", "ConfigError", "DataConfig", "EvalConfig", "MaskingConfig",
           "ModelConfig", "ObjectiveConfig", "OptimConfig", "RunConfig", "ScheduleConfig",
           "SequencePhase", "TrainConfig", "apply_overrides", "dump_yaml", "generator_config",
           "load_config", "validate", "validate_topology"]
