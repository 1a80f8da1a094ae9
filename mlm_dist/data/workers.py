"""Running one function over a stream on several processes, in order, with bounded memory.

`prepare` and `prepare --verify` use it. Results come back in input order, so the output is
the same whatever the number of processes.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from typing import Callable, Iterable, Iterator, TypeVar

from mlm_dist.errors import UsageError

T = TypeVar("T")
R = TypeVar("R")

_installed: Callable | None = None  # the function, inside a worker process


def default_workers() -> int:
    """The cores this process may use: under Slurm or taskset that is fewer than the machine has."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def check_workers(workers) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UsageError(f"--workers must be a positive integer, got {workers!r}")
    return workers


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int,
                in_flight_per_worker: int = 2) -> Iterator[R]:
    """fn(item) for each item, in order; on `workers` processes, or in this one when 1.

    Pool.imap would do, but it reads its whole input ahead into the task queue, so a corpus
    larger than memory would end up in memory. Here at most `in_flight_per_worker` items per
    worker are submitted and not yet consumed. `fn` must be picklable (a module-level function
    or an object); each worker unpickles it once, at start.

    Close the iterator (contextlib.closing) if you stop early: that stops the workers.
    """
    if workers == 1:
        yield from map(fn, items)
        return
    # spawn, not fork: the parent may hold threads (a progress bar's monitor, torch's pools),
    # and a forked copy of a process with threads can deadlock.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_install, initargs=(fn,)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(_call_installed, (item,)))
            if len(pending) >= workers * in_flight_per_worker:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _install(fn: Callable):
    global _installed
    _installed = fn


def _call_installed(item):
    return _installed(item)
