"""Fault injection for testing the failure paths on real runs (crash mid-save, NaN loss, a
stuck rank).

Set MLM_DIST_FAULTS to a comma-separated list of `kind@step[:rank]`, e.g.
    MLM_DIST_FAULTS=kill_during_save@10        every rank dies by SIGKILL inside the step-10 save
    MLM_DIST_FAULTS=nan_loss@5:1,nan_loss@6:1  rank 1's loss is NaN at steps 5 and 6
    MLM_DIST_FAULTS=hang@3:1                   rank 1 stops making progress at step 3, alive
Unset (always, outside tests) it costs one dictionary lookup per call.
"""

from __future__ import annotations

import os
import signal
import time


def _parse(text: str) -> set[tuple[str, int, int | None]]:
    faults = set()
    for item in filter(None, (s.strip() for s in text.split(","))):
        kind, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        faults.add((kind, int(step), int(rank) if rank else None))
    return faults


_FAULTS = _parse(os.environ.get("MLM_DIST_FAULTS", ""))


def _active(kind: str, step: int) -> bool:
    """True once per listed fault: a rolled-back run that reaches the step again goes on."""
    if not _FAULTS:
        return False
    rank = int(os.environ.get("RANK", "0"))
    for fault in ((kind, step, None), (kind, step, rank)):
        if fault in _FAULTS:
            _FAULTS.discard(fault)
            return True
    return False


def maybe_kill_during_save(step: int) -> None:
    if _active("kill_during_save", step):
        os.kill(os.getpid(), signal.SIGKILL)


def nan_loss(step: int) -> bool:
    return _active("nan_loss", step)


def maybe_hang(step: int) -> None:
    """A rank that is alive but makes no progress (a stuck filesystem, a hung device): the
    others wait for it in their next collective."""
    if _active("hang", step):
        while True:
            time.sleep(60)
