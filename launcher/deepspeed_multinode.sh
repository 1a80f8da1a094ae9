#!/usr/bin/env bash
# Multi-node launch with the deepspeed launcher (pdsh over ssh) from a hostfile.
#
#   launcher/deepspeed_multinode.sh [--nodes N] [--gpus-per-node G] [--ssh-port P] \
#       [--env KEY=VALUE ...] [--dry-run] HOSTFILE CONFIG [key=value ...]
#
# Run it on the first host of HOSTFILE, with the Python environment that has mlm_dist installed
# (or PYTHON=/path/to/venv/bin/python). Every node must see the same paths and reach the others
# over passwordless ssh. It is `mlm-dist launch`: the checks, the hostfile and the environment
# file deepspeed exports on every node live in mlm_dist/launch/multinode.py; `--help` lists the
# options.
set -euo pipefail
python=${PYTHON:-$(command -v python || command -v python3)}
exec "$python" -m mlm_dist launch "$@"
