"""Counting, optimizer step by optimizer step, what makes a training step wait for the device.

A rank entry point (`python -m mlm_dist.bench.syncs OUT --config C overrides…`, started by the
deepspeed launcher: `mlm-dist bench gpu` on one rank, tests/test_step_syncs.py on two) trains
through the real Trainer and counts, from the first step on:

  synchronize   calls of DeepSpeed's accelerator `synchronize` (a device-wide wait)
  Tensor.<m>    Python-level host reads of a tensor's value (.item(), .tolist(), bool(t), …):
                on a GPU each waits for the device to reach that tensor
  cuda_sync     on CUDA, every operation torch itself reports as synchronizing
                (torch.cuda.set_sync_debug_mode("warn"): one warning each), such as a copy
                from pageable host memory; torch documents that not all are reported

Each rank writes OUT.rank<r>.json: {"steps": {step: {"<what> <where>": calls}}, "zero":
DeepSpeed's overlap_comm and reduce_bucket_size, "cuda_syncs_counted": bool}. <where> is the
first caller outside torch and this module, and its caller, so a count says who synced.

The counters are patched onto this process only, after set-up: the accelerator object DeepSpeed
hands out, torch.Tensor's host-read methods and the warnings machinery. `summary` judges a
report: a step that neither logs, evaluates nor saves may wait only where DeepSpeed decides
whether its gradients are finite (NON_FINITE_CHECKS).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

import mlm_dist
from mlm_dist.config import load_config
from mlm_dist.engine import accelerator
from mlm_dist.training import loop

REPO = f"{Path(mlm_dist.__file__).resolve().parents[1]}/"
# Python-level reads of a tensor's value on the host: on a GPU each waits for the device.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
TORCH_DIR = str(Path(torch.__file__).parent)
# What torch warns (then " (Triggered internally at …)") under set_sync_debug_mode("warn").
CUDA_SYNC_WARNING = "called a synchronizing CUDA operation"
# Frames of the warnings machinery between a warning and the code that caused it.
_WARNINGS_FILES = {Path(warnings.__file__).name, "_py_warnings.py"}

# The host reads a step may make, all DeepSpeed's, to decide whether its gradients are finite
# so that a non-finite step is skipped on every rank: its ZeRO 1-3 optimizers in step() (ZeRO
# 1/2 read the norm again to clip it, once per parameter group). Ours decides on the device
# (optim.SkipsNonFiniteSteps at ZeRO 0) and reads nothing. As ("file", "function") of the
# reading frame.
NON_FINITE_CHECKS = {("deepspeed/runtime/utils.py", "is_invalid_grad_norm")}


class SyncCounter:
    def __init__(self):
        self.step: int | None = None  # the optimizer step being run; None outside steps
        self.counts: dict[int, collections.Counter] = collections.defaultdict(
            collections.Counter)

    def start(self, step: int) -> None:
        self.step = step  # from here until the next step starts: optimizer step `step`
        self.counts[step].clear()  # present, even when nothing is counted

    def record(self, what: str) -> None:
        if self.step is None:
            return
        self.counts[self.step][f"{what} {caller()}"] += 1

    def wrap(self, owner, name: str, what: str) -> None:
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            self.record(what)
            return real(*args, **kwargs)

        setattr(owner, name, counted)

    @contextlib.contextmanager
    def counting_warnings(self, prefix: str = CUDA_SYNC_WARNING,
                          what: str = "cuda_sync") -> Iterator[None]:
        """While open, each warning whose message starts with `prefix` is counted as `what`
        where it was raised, every time (Python would show a repeated one once), and not
        shown; other warnings are shown as before."""
        with warnings.catch_warnings():  # restores the filters and showwarning on exit
            warnings.filterwarnings("always", message=prefix)
            show = warnings.showwarning

            def counted(message, category, filename, lineno, file=None, line=None):
                if str(message).startswith(prefix):
                    self.record(what)
                else:
                    show(message, category, filename, lineno, file, line)

            warnings.showwarning = counted
            yield


@contextlib.contextmanager
def cuda_sync_debug() -> Iterator[None]:
    """torch warns at every CUDA operation that synchronizes while this is open."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def caller() -> str:
    """Where a count comes from: the first frame outside torch, this module and the warnings
    machinery, and the one that called it ("file:line function < file:line function"), plus
    the thread if not the main one."""
    frame = sys._getframe(1)
    while frame and (frame.f_code.co_filename.startswith(TORCH_DIR)
                     or frame.f_code.co_filename == __file__
                     or Path(frame.f_code.co_filename).name in _WARNINGS_FILES):
        frame = frame.f_back
    where = " < ".join(f"{short(f.f_code.co_filename)}:{f.f_lineno} {f.f_code.co_name}"
                       for f in (frame, frame and frame.f_back) if f is not None)
    thread = threading.current_thread()
    return where if thread is threading.main_thread() else f"{where} [{thread.name}]"


def short(filename: str) -> str:
    """A path from the package on: mlm_dist/..., tests/..., deepspeed/..., torch/..."""
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1]
    return filename.removeprefix(REPO)


# ---------------------------------------------------------------------------------------------
# judging a report


def reading_frame(count_key: str) -> tuple[str, str]:
    """("file", "function") that synced, from a key such as
    "Tensor.item deepspeed/runtime/utils.py:233 is_invalid_grad_norm < ...: caller"."""
    file_line, function = count_key.split(" < ")[0].split(" ")[1:3]
    return file_line.rsplit(":", 1)[0], function


def kind(count_key: str) -> str:
    """"synchronize", "host_reads" (Tensor.<method>) or "cuda_syncs" (torch's own report)."""
    what = count_key.split(" ", 1)[0]
    return {"synchronize": "synchronize", "cuda_sync": "cuda_syncs"}.get(what, "host_reads")


def steady_steps(steps: Iterable[int], log_every: int) -> list[int]:
    """The steps a long run is made of: neither a log step (where the metrics are reduced and
    the ranks agree on stop signals; the last step, which saves, is one) nor step 0, DeepSpeed's
    warm-up (ZeRO 3 checks its parameter trace across the ranks)."""
    return [s for s in sorted(steps) if s != 0 and (s + 1) % log_every != 0]


def waits_not_allowed(counts: dict[str, int]) -> dict[str, int]:
    """The counts of a steady step that are not the finite-gradient decision."""
    return {key: n for key, n in counts.items()
            if kind(key) == "synchronize" or reading_frame(key) not in NON_FINITE_CHECKS}


def summary(report: dict, log_every: int) -> dict:
    """A rank's report judged: the waits per steady step by kind (the most of any steady
    step), where they come from (calls per steady step), those not allowed, and "ok"."""
    steps = {int(step): counts for step, counts in report["steps"].items()}
    steady = steady_steps(steps, log_every)
    per_step = {"synchronize": 0, "host_reads": 0, "cuda_syncs": 0}
    where: collections.Counter = collections.Counter()
    for step in steady:
        kinds: collections.Counter = collections.Counter()
        for key, n in steps[step].items():
            kinds[kind(key)] += n
        per_step = {k: max(v, kinds[k]) for k, v in per_step.items()}
        where.update(steps[step])
    if not report.get("cuda_syncs_counted"):
        per_step["cuda_syncs"] = {"skipped": "torch reports synchronizing operations on CUDA "
                                             "devices only"}
    not_allowed = {step: waits for step in steady if (waits := waits_not_allowed(steps[step]))}
    result = {"steps": len(steps), "steady_steps": steady, "per_steady_step": per_step,
              "where": {key: round(n / len(steady), 2) for key, n in sorted(where.items())}
              if steady else {},
              "allowed": sorted(f"{file} {function}" for file, function in NON_FINITE_CHECKS),
              "not_allowed": not_allowed, "ok": bool(steady) and not not_allowed}
    if not steady:
        result["error"] = (f"no steady step among {sorted(steps)} with log_every {log_every}: "
                           "train more steps than log_every")
    return result


# ---------------------------------------------------------------------------------------------
# the rank entry point


def main(argv: list[str] | None = None) -> None:
    argv = [a for a in (sys.argv[1:] if argv is None else argv)
            if not a.startswith("--local_rank")]
    p = argparse.ArgumentParser(prog="python -m mlm_dist.bench.syncs")
    p.add_argument("out", help="each rank writes OUT.rank<r>.json")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = p.parse_intermixed_args(argv)  # OUT, --config and the overrides in any order

    trainer = loop.Trainer(load_config(args.config, args.overrides))
    counter = SyncCounter()
    # Installed after set-up: what is counted is what the steps do.
    counter.wrap(accelerator(), "synchronize", "synchronize")
    for name in HOST_READS:
        counter.wrap(torch.Tensor, name, f"Tensor.{name}")
    real_train_step = loop.train_step

    def train_step(*args, step: int, **kwargs):
        counter.start(step)
        return real_train_step(*args, step=step, **kwargs)

    loop.train_step = train_step
    cuda = trainer.topo.device.type == "cuda"
    with contextlib.ExitStack() as counting:
        if cuda:
            counting.enter_context(counter.counting_warnings())
            counting.enter_context(cuda_sync_debug())
        trainer.train()
        counter.step = None
    engine = trainer.engine
    report = {"steps": {step: dict(c) for step, c in counter.counts.items()},
              "cuda_syncs_counted": cuda,
              # what DeepSpeed made of the ZeRO settings (stage 0 ignores them)
              "zero": {"overlap_comm": engine.zero_overlap_comm(),
                       "reduce_bucket_size": engine.zero_reduce_bucket_size()}}
    with open(f"{args.out}.rank{trainer.topo.rank}.json", "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
