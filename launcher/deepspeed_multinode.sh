#!/usr/bin/env bash
# Multi-node launch with the deepspeed launcher (pdsh over ssh) from a hostfile.
#
#   launcher/deepspeed_multinode.sh HOSTFILE CONFIG [key=value ...]
#
# Run it on the first host of HOSTFILE. Every node must see the same paths (shared filesystem)
# and have this package installed in the same Python environment.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 HOSTFILE CONFIG [key=value ...]" >&2
  exit 2
fi
hostfile=$1; config=$2; shift 2
[ -f "$hostfile" ] || { echo "hostfile $hostfile does not exist" >&2; exit 2; }
[ -f "$config" ] || { echo "config $config does not exist" >&2; exit 2; }

# The deepspeed launcher forwards only some variables to the other nodes; the ones listed in
# .deepspeed_env (in the working directory) are exported on every rank.
{
  for var in DS_ACCELERATOR NCCL_SOCKET_IFNAME NCCL_IB_DISABLE GLOO_SOCKET_IFNAME PYTHONPATH HF_HOME; do
    if [ -n "${!var:-}" ]; then printf '%s=%s\n' "$var" "${!var}"; fi
  done
} > .deepspeed_env

first_host=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")
exec deepspeed --hostfile "$hostfile" --master_addr "$first_host" --master_port "${MASTER_PORT:-29500}" \
  --module mlm_dist train --config "$config" "$@"
