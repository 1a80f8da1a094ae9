"""Run by test_slurm in place of Python on the nodes (`mlm-dist slurm --python "python
slurm_device_probe.py OUT"`), so every task of a generated job ends here with the training
command as its arguments. Each task writes OUT/task<rank>.json: what Slurm showed it (its GPUs,
its CPUs per task) and the device a rank of `mlm-dist train` takes there, as CUDA would number
the GPUs that CUDA_VISIBLE_DEVICES shows (from 0, in that order)."""

import json
import os
import sys
from pathlib import Path


def main() -> None:
    from mlm_dist.engine import device_index, environment_ranks

    out = Path(sys.argv[1])
    rank, local_rank, world, local_world = environment_ranks()
    shown = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
    index = device_index(local_rank, local_world, len(shown), os.environ)
    (out / f"task{rank}.json").write_text(json.dumps({
        "rank": rank, "local_rank": local_rank, "world": world, "shown": shown,
        "device": index, "gpu": shown[index],
        "cpus_per_task": os.environ.get("SLURM_CPUS_PER_TASK"),
        "train": sys.argv[2:5]}))


if __name__ == "__main__":
    main()
