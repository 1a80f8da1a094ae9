"""The training loop: read `Trainer.train` top to bottom.

    preflight (every check) -> process group -> model -> DeepSpeed engine -> (resume)
    -> for each sequence phase: loader and masker at its length, engine at its batch size
       -> for each optimizer step: train_step (mask on device, forward, backward, step),
          then each cadence: divergence guard, log, evaluation, checkpoint and stop signals.

The loop knows nothing of attention nor of what the objective predicts (mlm_dist/objectives);
the model knows nothing of ranks.
"""

from __future__ import annotations

import socket
from contextlib import closing
from pathlib import Path

import torch
import torch.distributed as dist

from mlm_dist.config import RunConfig, SequencePhase, dump_yaml
from mlm_dist.data.pipeline import ResumableLoader, split_shards
from mlm_dist.data.reader import BadDataError
from mlm_dist.engine import (build_engine, device_report, environment_ranks, init_distributed,
                             set_phase, step_skipped)
from mlm_dist.masking import TokenMasker, max_predictions
from mlm_dist.model import num_parameters
from mlm_dist.objectives import objective_for
from mlm_dist.training.preflight import preflight
from mlm_dist.training.checkpointer import Checkpointer
from mlm_dist.training.evaluate import evaluate
from mlm_dist.training.guards import DivergenceGuard, StopSignals
from mlm_dist.training.metrics import MetricLogger
from mlm_dist.training.state import TrainState, gather
from mlm_dist.training.step import train_step


def train(cfg: RunConfig) -> dict:
    summary = Trainer(cfg).train()
    # The process groups go down here, not in the interpreter's finalization, where gloo's
    # threads can be torn down while joinable (std::terminate, SIGABRT after a good run).
    dist.destroy_process_group()
    return summary


class Trainer:
    """One rank's run: `train` is the loop, the `maybe_*` methods are its cadences."""

    def __init__(self, cfg: RunConfig):
        # Every check a user can fail, before a process group exists.
        run = preflight(cfg, world_size=environment_ranks()[2])
        self.cfg, self.tokenizer, self.accumulation = run.cfg, run.data.tokenizer, run.accumulation
        cfg = self.cfg
        self.topo = topo = init_distributed(cfg.train.collective_timeout_minutes)
        if topo.device.type == "cpu":
            from mlm_dist.training.allocator import tune_cpu_allocator

            tune_cpu_allocator()  # big tensors reuse mapped heap instead of page-faulting each step
        self.rank0 = topo.rank == 0
        self.run_dir = Path(cfg.out_dir)
        if self.rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))

        self.objective = objective_for(cfg)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        if cfg.model.init_from:
            from mlm_dist.interop.init_from import load_pretrained

            model = load_pretrained(cfg.model, self.objective,
                                    say=print if self.rank0 else None)
        else:
            model = self.objective.build_model(cfg.model)
        n_params = num_parameters(model)  # before ZeRO-3 partitions the parameters away
        self.checkpointer = Checkpointer(self.run_dir, cfg, topo, self.tokenizer.files,
                                         StopSignals())
        self.engine = build_engine(model, cfg, topo, self.accumulation, run.precision,
                                   load_universal=self.checkpointer.needs_universal_load)
        self.shards = split_shards(run.data.manifest, run.data.location)  # read by the pre-flight
        self.vocab = self.tokenizer.vocabulary
        self.guard = DivergenceGuard(cfg.train, self.engine.device)
        self.logger = MetricLogger(self.run_dir / "tensorboard" if self.rank0 else None, cfg,
                                   topo, n_params, self.objective)
        self.announce(n_params)
        self.state = self.restore() if cfg.checkpoint.resume else TrainState()
        self.last_log_step, self.data_wait = self.state.step, 0.0

    def train(self) -> dict:
        cfg, engine, state, topo = self.cfg, self.engine, self.state, self.topo
        engine.train()
        while state.step < cfg.schedule.total_steps:
            # ---- a sequence phase: loader, masker and engine batch settings at its length
            index = cfg.schedule.phase_at(state.step)
            phase = cfg.schedule.phases[index]
            set_phase(engine, phase)
            masker = TokenMasker(self.vocab, cfg.masking,
                                 max_predictions=max_predictions(phase, cfg.masking),
                                 seed=cfg.train.seed, rank=topo.rank, device=engine.device)
            loader = state.loader(cfg, self.shards, index, rank=topo.rank,
                                  world_size=topo.world_size, vocab=self.vocab,
                                  device=engine.device)
            with closing(loader) as batches:  # its workers stop, whatever ends the phase
                while state.step < phase.until_step:
                    self.data_wait += train_step(engine, batches, masker, self.objective,
                                                 step=state.step,
                                                 accumulation=self.accumulation[index],
                                                 record=self.logger.accumulate)
                    state.step += 1
                    if self.maybe_roll_back():
                        break  # the phase starts again at the restored step
                    self.maybe_log(phase, batches)
                    self.maybe_evaluate(phase)
                    if self.maybe_checkpoint(index, batches):
                        return self.finish(stopped=True)
                # The next phase (or the rolled-back one) reads on from here: nothing replayed.
                state.remember(index, batches)
        return self.finish(stopped=False)

    # ---- the cadences, in the order the loop calls them

    def maybe_roll_back(self) -> bool:
        """The divergence guard: True when the weights went back to the last checkpoint. It
        counts every step on the device and judges only where the loop waits anyway."""
        self.guard.record(step_skipped(self.engine))
        if not self.waits_for_the_device(self.state.step):
            return False
        rolled_back = self.guard.should_roll_back(
            self.state.step, can_roll_back=self.checkpointer.has_checkpoint)
        self.logger.skipped_steps = self.guard.skipped
        if not rolled_back:
            return False
        # Weights and optimizer go back; the data stream moves on, so the batches that
        # diverged are not replayed.
        self.state.step = self.restore().step
        if self.rank0:
            print(f"rolled back to step {self.state.step} after {self.guard.limit} skipped "
                  "steps", flush=True)
        return True

    def waits_for_the_device(self, step: int) -> bool:
        """A step that logs, evaluates, saves or agrees on signals: it reads from the device
        anyway, so one more small read there costs nothing."""
        every = self.cfg.eval.every
        return (step % self.cfg.train.log_every == 0 or self.checkpointer.waits_at(step)
                or bool(every and step % every == 0))

    def maybe_log(self, phase: SequencePhase, batches: ResumableLoader) -> None:
        step, cfg = self.state.step, self.cfg
        if step % cfg.train.log_every and step != cfg.schedule.total_steps:
            return
        flops = self.objective.flops_per_token(cfg.model, phase.seq_len,
                                               max_predictions(phase, cfg.masking))
        record = self.logger.flush(step, lr=self.engine.get_lr()[0],
                                   grad_norm=self.engine.get_global_grad_norm(),
                                   seq_len=phase.seq_len, data_wait=self.data_wait,
                                   skipped=batches.skipped_documents,
                                   steps=step - self.last_log_step, flops_per_token=flops)
        self.data_wait, self.last_log_step = 0.0, step
        if record["data/skipped_samples"] > cfg.data.max_skipped_samples:
            # Every rank sees the same reduced count at the same step: all stop.
            raise BadDataError(
                f"{record['data/skipped_samples']:.0f} documents were skipped as bad data, more "
                f"than data.max_skipped_samples={cfg.data.max_skipped_samples}; the warnings "
                "above name the shards: check them with `mlm-dist prepare --verify`")

    def maybe_evaluate(self, phase: SequencePhase) -> None:
        if not self.cfg.eval.every or self.state.step % self.cfg.eval.every:
            return
        self.engine.eval()
        self.logger.log(self.state.step, evaluate(
            self.engine, self.cfg, phase, self.vocab, rank=self.topo.rank,
            world_size=self.topo.world_size, device=self.engine.device))
        self.engine.train()

    def maybe_checkpoint(self, phase_index: int, batches: ResumableLoader) -> bool:
        """Save when the checkpointer says so; True to stop (a stop signal: saved, now stop)."""
        step = self.state.step
        save, stop = self.checkpointer.should_save(step)
        if save:
            client = self.state.client_state(phase_index, batches, self.topo.world_size)
            self.checkpointer.save(self.engine, step, client)
        if stop and self.rank0:
            print(f"stopping at step {step} on a signal; resume with checkpoint.resume=true",
                  flush=True)
        return stop

    # ---- set-up and the end

    def restore(self) -> TrainState:
        """The newest complete checkpoint into the engine; its step and data position."""
        client = self.checkpointer.restore(self.engine)
        if client is None:
            return TrainState()
        return TrainState.from_client_state(client, self.shards, rank=self.topo.rank,
                                            world_size=self.topo.world_size,
                                            num_workers=self.cfg.data.num_workers)

    def announce(self, n_params: int) -> None:
        cfg, topo = self.cfg, self.topo
        places = gather(f"{socket.gethostname()} {topo.device}", topo.world_size)
        if not self.rank0:
            return
        hosts = {p.split()[0] for p in places}
        device = f"device: {device_report(topo)}"
        print(device, flush=True)
        print(f"model: {n_params / 1e6:.2f}M parameters, {topo.world_size} ranks, "
              f"ZeRO {cfg.train.zero_stage}, {cfg.train.precision}, phases "
              + ", ".join(f"{p.seq_len} until step {p.until_step}" for p in cfg.schedule.phases),
              flush=True)
        self.logger.text("config", f"```\n{dump_yaml(cfg)}\n```")
        self.logger.text("run", f"world size {topo.world_size} on {len(hosts)} host(s): "
                         + ", ".join(f"rank {r}: {p}" for r, p in enumerate(places))
                         + f"\n\nrank 0 {device}")

    def finish(self, *, stopped: bool) -> dict:
        summary = self.logger.close()
        if stopped:
            return {"step": self.state.step, "stopped": True}
        dist.barrier()
        return {"step": self.state.step, "stopped": False, **summary}
