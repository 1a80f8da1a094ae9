"""Starting DeepSpeed ranks on this machine: a free rendezvous port, the launcher command for N
local ranks, and the shared-memory segments DeepSpeed's CPU all-reduce leaves behind.

Used by `mlm-dist demo` and `mlm-dist bench memory` (and by the tests); multi-node launches go
through hostfile.py and slurm.py instead.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from mlm_dist.errors import UserError


class RanksFailedError(UserError, RuntimeError):
    """Ranks started with `launcher_command` exited with an error. Their own output (above,
    or quoted in the message) says why; a user's mistake there was already one line."""


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it), for MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(ranks: int, port: int, module: str, *args: str) -> list[str]:
    """`deepspeed --num_gpus N --master_port P --module M ARGS…` run by this Python."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
            "--master_port", str(port), "--module", module, *args]


def remove_shm_buffers(port: int) -> int:
    """Delete the /dev/shm segments DeepSpeed's CPU all-reduce (csrc/cpu/comm/shm.cpp) created
    for a finished launch on `port`: it never unlinks them, ~66 MiB per rank and launch, and a
    tmpfs full of them ends in the OOM killer. Returns how many were removed."""
    removed = 0
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed
