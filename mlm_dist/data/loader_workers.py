"""How a rank's dataloader workers start and end: spawned, deaf to the stop signals, quick to exit.

Started as fresh interpreters (spawn), not forked from the rank (Linux's default). A rank has
threads (TensorBoard's writer, gloo's and DeepSpeed's, the previous loader's pin-memory thread
and queue feeders), and forking while another thread holds CPython's runtime lock (a thread
starting or ending) leaves the child waiting on that lock forever (CPython gh-112275, fixed in
3.12; we support 3.11): the rank waits on its worker and every other rank in its next
collective, a hang at a phase's start with no error. Not from the forkserver either: its
workers are the server's children, so torch's watchdog (which ends a worker whose parent died)
does not see the rank die, and they inherit the environment of the server's first use, not the
rank's now. A spawned worker costs one import of torch (~1.3 s of CPU) per loader, that is per phase
and per resume.
"""

from __future__ import annotations

import atexit
import os
import signal
from typing import Iterator

import torch

# DataLoader(multiprocessing_context=...): see above.
START_METHOD = "spawn"

# Slurm signals every process of a job step, workers included. The rank turns these into a
# checkpoint and an orderly exit (which ends its workers); a worker dying on them first would
# fail the rank instead, so workers ignore them.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def start_workers(loader: torch.utils.data.DataLoader) -> Iterator:
    """iter(loader), with the stop signals blocked while its workers start.

    A worker can ignore them only once it runs our code (prepare_worker), a second or more
    after it starts; until then they stay pending (a child inherits the signal mask of the
    thread that starts it), so a preemption that lands then is dropped by the worker, not fatal
    to it. The rank still receives it: its other threads take process signals meanwhile.
    """
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def prepare_worker(worker_id: int) -> None:
    """In each worker, before it reads (the DataLoader's worker_init_fn).

    Stop signals: ignored, then let through (start_workers blocked them while it started).

    Exit: at once, when the worker loop is over and multiprocessing has done its own exit
    work, as a forked worker exits (os._exit), not through the interpreter's shutdown. A
    spawned worker would otherwise finalize the interpreter while its queue's feeder thread, a
    daemon, may still be inside torch's C++ moving a batch into shared memory (a batch the rank
    no longer wants); before Python 3.14 such a thread is unwound with pthread_exit when it
    retakes the GIL, which through C++ frames aborts the process (CPython gh-87135), and the
    rank reports "DataLoader worker killed by signal: Aborted" as its phase ends. The exit
    handler registered last runs first, before the interpreter starts finalizing. The status
    is 0 whatever happened: torch sends a worker's errors to the rank through the queue.
    """
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    atexit.register(os._exit, 0)
