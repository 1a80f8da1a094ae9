"""The training loop: read it top to bottom.

    config -> process group -> tokenizer, shards -> model -> DeepSpeed engine -> (resume)
    -> for each sequence phase: loader and masker at its length, engine at its batch size
       -> for each optimizer step: for each micro-batch: mask on device, forward, backward, step
       -> skipped-step guard, logging, evaluation, checkpoints and signals at their cadences.

The loop knows nothing of attention; the model knows nothing of ranks.
"""

from __future__ import annotations

import dataclasses
import math
import random
import signal
import socket
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mlm_dist.training import checkpoint, faults
from mlm_dist.config import RunConfig, dump_yaml, max_predictions, validate_topology
from mlm_dist.data.pipeline import (ResumableLoader, carry_to_next_unit, manifest_shards,
                                    regroup)
from mlm_dist.data.reader import BadDataError
from mlm_dist.data.shards import Manifest
from mlm_dist.engine import (build_engine, check_precision, init_distributed, set_phase,
                             to_universal)
from mlm_dist.training.evaluate import evaluate
from mlm_dist.flops import sparse_flops_per_token
from mlm_dist.masking import TokenMasker
from mlm_dist.training.metrics import MetricLogger
from mlm_dist.model import BertForPretraining, num_parameters, pretraining_loss
from mlm_dist.tokenizer import Tokenizer


class DivergenceError(RuntimeError):
    pass


def resolve_data(cfg: RunConfig) -> tuple[RunConfig, Tokenizer, Manifest]:
    """Find the tokenizer, check it matches the shards, and fill in model.vocab_size."""
    manifest = Manifest.load(cfg.data.shards)
    tokenizer_dir = cfg.data.tokenizer or manifest.tokenizer.path
    tokenizer = Tokenizer.load(tokenizer_dir)
    if tokenizer.sha256 != manifest.tokenizer.sha256:
        raise ValueError(f"data.tokenizer: {tokenizer.path} is not the tokenizer the shards in "
                         f"{cfg.data.shards} were made with; point data.tokenizer at that one "
                         "or re-run `mlm-dist prepare`")
    model_cfg = cfg.model
    if model_cfg.init_from:
        from mlm_dist.interop.huggingface import pretrained_model_config

        model_cfg = pretrained_model_config(model_cfg.init_from, model_cfg)
        theirs = Tokenizer.load(model_cfg.init_from)
        if theirs.sha256 != tokenizer.sha256:
            raise ValueError(
                f"model.init_from: the shards in {cfg.data.shards} were not made with "
                f"{model_cfg.init_from}'s tokenizer; re-run `mlm-dist prepare --tokenizer "
                f"{model_cfg.init_from} …` so token ids mean what the model learned")
    vocab = model_cfg.vocab_size or tokenizer.vocab_size
    if vocab != tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size: {vocab} does not match the tokenizer's "
                         f"{tokenizer.vocab_size}; leave it 0 to take it from the tokenizer")
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(model_cfg, vocab_size=vocab),
        data=dataclasses.replace(cfg.data, tokenizer=str(Path(tokenizer.path).parent.resolve()),
                                 shards=str(Path(cfg.data.shards).resolve())))
    return cfg, tokenizer, manifest


def prepare_run_dir(cfg: RunConfig, is_rank0: bool) -> Path:
    run_dir = Path(cfg.out_dir)
    has_checkpoint = checkpoint.latest_complete(run_dir / checkpoint.CHECKPOINTS) is not None
    if has_checkpoint and not cfg.checkpoint.resume:
        # Never train over an existing run: its checkpoints would be mixed with ours.
        raise FileExistsError(f"out_dir: {run_dir} already holds checkpoints; pass "
                              "checkpoint.resume=true to continue it, or choose another out_dir")
    if is_rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    return run_dir


class StopSignals:
    """SIGTERM and SIGUSR1 (what Slurm sends before a time limit or preemption) only raise a
    flag here; the loop turns it into an agreed step, a checkpoint and a clean exit."""

    def __init__(self):
        self.received: int | None = None
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.received = signum


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather(obj, world_size: int) -> list:
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def train(cfg: RunConfig) -> dict:
    cfg, tokenizer, manifest = resolve_data(cfg)
    topo = init_distributed()
    if topo.device.type == "cpu":
        from mlm_dist.training.allocator import tune_cpu_allocator

        tune_cpu_allocator()  # big tensors reuse mapped heap instead of page-faulting each step
    check_precision(cfg)
    accumulation = validate_topology(cfg, topo.world_size)
    rank0 = topo.rank == 0
    run_dir = prepare_run_dir(cfg, rank0)
    schedule, t = cfg.schedule, cfg.train
    torch.manual_seed(t.seed)  # identical initial weights on every rank

    model = BertForPretraining(cfg.model)
    if cfg.model.init_from:
        from mlm_dist.interop.huggingface import pretrained_state_dict

        # strict: a missing head or a shape mismatch is an error, never a random weight
        model.load_state_dict(pretrained_state_dict(cfg.model.init_from), strict=True)
    n_params = num_parameters(model)  # before ZeRO-3 partitions the parameters away
    # A checkpoint written by another number of ranks is loaded in DeepSpeed's universal form.
    newest = checkpoint.latest_complete(run_dir / checkpoint.CHECKPOINTS)
    universal = bool(cfg.checkpoint.resume and newest is not None
                     and checkpoint.saved_world_size(newest) != topo.world_size)
    engine = build_engine(model, cfg, topo, load_universal=universal)
    device = engine.device
    stop = StopSignals()
    logger = MetricLogger(run_dir / "tensorboard" if rank0 else None, cfg, topo, n_params)
    if rank0:
        print(f"model: {n_params / 1e6:.2f}M parameters, {topo.world_size} ranks, "
              f"ZeRO {t.zero_stage}, {t.precision}, phases "
              + ", ".join(f"{p.seq_len} until step {p.until_step}" for p in schedule.phases),
              flush=True)
        logger.text("config", f"```\n{dump_yaml(cfg)}\n```")
    hosts = gather(socket.gethostname(), topo.world_size)
    if rank0:
        logger.text("run", f"world size {topo.world_size} on {len(set(hosts))} host(s): "
                    + ", ".join(f"rank {r}: {h}" for r, h in enumerate(hosts)))

    def restore_latest() -> tuple[int, dict | None]:
        """Load the newest complete checkpoint: (step, this rank's data state)."""
        state = checkpoint.resume(engine, run_dir, to_universal if universal else None)
        if state is None:
            return 0, None
        if len(state["data"]) == topo.world_size:
            set_rng_state(state["rng"][topo.rank])
            return state["step"], {"phase": state["phase"], **state["data"][topo.rank]}
        # Another number of ranks: the data position carries over shard by shard (and the
        # resumed run is no longer bit-identical to any uninterrupted one).
        if rank0:
            print(f"resuming a {len(state['data'])}-rank checkpoint on {topo.world_size} ranks",
                  flush=True)
        data = regroup(state["data"], manifest_shards(cfg.data.shards), topo.world_size,
                       cfg.data.num_workers)
        return state["step"], {"phase": state["phase"], **data}

    def save(step: int, phase_index: int, batches: ResumableLoader) -> Path:
        client = {"step": step, "phase": phase_index,
                  "data": gather(batches.state_dict(), topo.world_size),
                  "rng": gather(rng_state(), topo.world_size)}
        path = checkpoint.save(engine, run_dir, step, cfg, tokenizer.files, client, topo.rank,
                               cfg.checkpoint.keep)
        if rank0:
            print(f"saved checkpoint {path}", flush=True)
        return path

    step, data_state = 0, None
    if cfg.checkpoint.resume:
        step, data_state = restore_latest()
        if rank0 and step:
            print(f"resumed from step {step}", flush=True)

    vocab = tokenizer.vocabulary
    engine.train()
    consecutive_skips, last_save_time, data_wait = 0, time.monotonic(), 0.0
    last_log_step = step
    batches = None
    try:
        while step < schedule.total_steps:
            # ---- a sequence phase: loader, masker and engine batch settings at its length
            index = schedule.phase_at(step)
            phase, grad_accum = schedule.phases[index], accumulation[index]
            set_phase(engine, phase)
            state = None
            if data_state is not None:
                # Same phase: the exact position. Earlier phase (resumed right at a boundary):
                # its readers move on to their next work unit at the new length.
                same = data_state.pop("phase") == index
                state = data_state if same else carry_to_next_unit(data_state)
            if batches is not None:
                batches.close()
            batches = ResumableLoader(manifest_shards(cfg.data.shards), seq_len=phase.seq_len,
                                      micro_batch=phase.micro_batch, rank=topo.rank,
                                      world_size=topo.world_size, seed=t.seed, data=cfg.data,
                                      vocab=vocab, pin_memory=device.type == "cuda", state=state)
            k = max_predictions(phase, cfg.masking)
            masker = TokenMasker(vocab, cfg.masking, max_predictions=k, seed=t.seed,
                                 rank=topo.rank, device=device)
            rolled_back = False

            while step < phase.until_step and not rolled_back:
                # ---- one optimizer step
                for micro in range(grad_accum):
                    # Our step decides where DeepSpeed's accumulation ends, not its run-global
                    # micro-step counter, which phases with other accumulation and resumes
                    # would shift off our boundaries.
                    engine.set_gradient_accumulation_boundary(micro == grad_accum - 1)
                    waited = time.perf_counter()
                    batch = next(batches).to(device)
                    data_wait += time.perf_counter() - waited
                    masked = masker(batch.input_ids, step, micro, batch.word_starts)
                    mlm_logits, nsp_logits = engine(masked.input_ids, batch.token_type_ids,
                                                    batch.attention_mask, masked.positions)
                    losses = pretraining_loss(mlm_logits, masked.labels, nsp_logits, batch.nsp_label)
                    if faults.nan_loss(step):
                        losses["loss"] = losses["loss"] * math.nan
                    engine.backward(losses["loss"])
                    engine.step()
                    logger.accumulate(losses, batch.attention_mask, masked.eligible)
                step += 1

                # ---- divergence guard: the update was skipped on every rank (non-finite
                # gradients: DeepSpeed's check, or SkipsNonFiniteSteps at ZeRO 0 in fp32); we
                # count, and stop or roll back after too many.
                if engine.was_step_applied():
                    consecutive_skips = 0
                else:
                    consecutive_skips += 1
                    logger.skipped_step()
                    if consecutive_skips >= t.max_consecutive_skips:
                        if t.on_divergence == "error" or checkpoint.latest_complete(
                                run_dir / checkpoint.CHECKPOINTS) is None:
                            raise DivergenceError(
                                f"{consecutive_skips} optimizer steps in a row had non-finite "
                                f"gradients (last at step {step}); lower optim.lr, or set "
                                "train.on_divergence=rollback to restart from the last checkpoint")
                        # Roll back the weights and optimizer; the data stream moves on, so the
                        # batches that diverged are not replayed.
                        step, _ = restore_latest()
                        consecutive_skips, rolled_back = 0, True
                        if rank0:
                            print(f"rolled back to step {step} after {t.max_consecutive_skips} "
                                  "skipped steps", flush=True)
                        continue

                if step % t.log_every == 0 or step == schedule.total_steps:
                    record = logger.flush(step, lr=engine.get_lr()[0],
                                          grad_norm=engine.get_global_grad_norm(),
                                          seq_len=phase.seq_len, data_wait=data_wait,
                                          skipped=batches.skipped_documents,
                                          steps=step - last_log_step,
                                          flops_per_token=sparse_flops_per_token(
                                              cfg.model, phase.seq_len, k))
                    data_wait, last_log_step = 0.0, step
                    if record["data/skipped_samples"] > cfg.data.max_skipped_samples:
                        # Every rank sees the same reduced count at the same step: all stop.
                        raise BadDataError(
                            f"{record['data/skipped_samples']:.0f} documents were skipped as bad "
                            f"data, more than data.max_skipped_samples="
                            f"{cfg.data.max_skipped_samples}; the warnings above name the shards: "
                            "check them with `mlm-dist prepare --verify`")

                if cfg.eval.every and step % cfg.eval.every == 0:
                    engine.eval()
                    logger.log(step, evaluate(engine, cfg, phase, vocab, rank=topo.rank,
                                              world_size=topo.world_size, device=device))
                    engine.train()

                # ---- checkpoints: every N steps, every M minutes, at the end, or on a signal.
                # Signals and clocks differ between ranks; one all-reduce makes them agree.
                stopping = timed = False
                if step % cfg.checkpoint.sync_every == 0 or step == schedule.total_steps:
                    due = (cfg.checkpoint.every_minutes > 0 and rank0 and
                           time.monotonic() - last_save_time >= 60 * cfg.checkpoint.every_minutes)
                    flags = torch.tensor([stop.received is not None, due], dtype=torch.int32,
                                         device=device)
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                    stopping, timed = (bool(f) for f in flags.tolist())
                if (stopping or timed or step == schedule.total_steps
                        or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)):
                    save(step, index, batches)
                    last_save_time = time.monotonic()
                if stopping:
                    if rank0:
                        print(f"stopping at step {step} on a signal; resume with "
                              "checkpoint.resume=true", flush=True)
                    logger.close()
                    return {"step": step, "stopped": True}
                # the next phase builds its own loader; the position carries over
                if step == phase.until_step and step < schedule.total_steps:
                    data_state = {"phase": index, **batches.state_dict()}
            if rolled_back:
                data_state = {"phase": index, **batches.state_dict()}

    finally:
        if batches is not None:
            batches.close()  # workers stop in order, whatever ended the loop

    summary = logger.close()
    dist.barrier()
    return {"step": step, "stopped": False, **summary}
