#!/usr/bin/env bash
# Slurm: write (and with --submit, submit) the sbatch script of a training run.
#
#   launcher/slurm.sh --config CONFIG --nodes N --gpus-per-node G [--partition P --time T \
#       --account A --job-name J --out-script FILE --cpu-ranks] [--submit] [key=value ...]
#
# The same as `mlm-dist slurm` (mlm_dist/launch/slurm.py; `--help` lists the options): srun starts one
# task per GPU, MASTER_ADDR is the job's first host, Slurm warns the job with USR1 before its
# time limit, the ranks checkpoint and the job requeues itself and resumes.
set -euo pipefail
python=${PYTHON:-$(command -v python || command -v python3)}
exec "$python" -m mlm_dist slurm "$@"
