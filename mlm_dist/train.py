"""The training loop: read it top to bottom.

    config -> process group -> tokenizer, shards -> model -> DeepSpeed engine -> (resume)
    -> for each optimizer step: for each micro-batch: mask on device, forward, backward, step
    -> log at a cadence, checkpoint at a cadence and at the end.

The loop knows nothing of attention; the model knows nothing of ranks.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mlm_dist import checkpoint
from mlm_dist.config import RunConfig, dump_yaml, max_predictions, validate_topology
from mlm_dist.data.pipeline import ResumableLoader, manifest_shards
from mlm_dist.data.reader import BadDataError
from mlm_dist.data.shards import Manifest
from mlm_dist.engine import build_engine, check_precision, init_distributed
from mlm_dist.masking import TokenMasker
from mlm_dist.metrics import MetricLogger
from mlm_dist.model import BertForPretraining, num_parameters, pretraining_loss
from mlm_dist.tokenizer import MASK_ID, Tokenizer


def resolve_data(cfg: RunConfig) -> tuple[RunConfig, Tokenizer, Manifest]:
    """Find the tokenizer, check it matches the shards, and fill in model.vocab_size."""
    manifest = Manifest.load(cfg.data.shards)
    tokenizer_dir = cfg.data.tokenizer or manifest.tokenizer.path
    tokenizer = Tokenizer.load(tokenizer_dir)
    if tokenizer.sha256 != manifest.tokenizer.sha256:
        raise ValueError(f"data.tokenizer: {tokenizer.path} is not the tokenizer the shards in "
                         f"{cfg.data.shards} were made with; point data.tokenizer at that one "
                         "or re-run `mlm-dist prepare`")
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    if vocab != tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size: {vocab} does not match the tokenizer's "
                         f"{tokenizer.vocab_size}; leave it 0 to take it from the tokenizer")
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab),
        data=dataclasses.replace(cfg.data, tokenizer=str(Path(tokenizer.path).parent.resolve()),
                                 shards=str(Path(cfg.data.shards).resolve())))
    return cfg, tokenizer, manifest


def prepare_run_dir(cfg: RunConfig, is_rank0: bool) -> Path:
    run_dir = Path(cfg.out_dir)
    has_checkpoint = checkpoint.latest_tag(run_dir / checkpoint.CHECKPOINTS) is not None
    if has_checkpoint and not cfg.checkpoint.resume:
        # Never train over an existing run: its checkpoints would be mixed with ours.
        raise FileExistsError(f"out_dir: {run_dir} already holds checkpoints; pass "
                              "checkpoint.resume=true to continue it, or choose another out_dir")
    if is_rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    return run_dir


def train(cfg: RunConfig) -> dict:
    cfg, tokenizer, manifest = resolve_data(cfg)
    topo = init_distributed()
    check_precision(cfg)
    grad_accum = validate_topology(cfg, topo.world_size)
    is_rank0 = topo.rank == 0
    run_dir = prepare_run_dir(cfg, is_rank0)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

    model = BertForPretraining(cfg.model)
    n_params = num_parameters(model)  # before ZeRO-3 partitions the parameters away
    engine = build_engine(model, cfg, topo.world_size)
    device = engine.device

    start_step, data_state = 0, None
    if cfg.checkpoint.resume:
        state = checkpoint.resume(engine, run_dir)
        if state is not None:
            start_step = state["step"]
            if len(state["data"]) != topo.world_size:
                raise ValueError(f"checkpoint.resume: the checkpoint was written by "
                                 f"{len(state['data'])} ranks and this run has "
                                 f"{topo.world_size}; resume on the same number of ranks")
            data_state = state["data"][topo.rank]
            if is_rank0:
                print(f"resumed from step {start_step}", flush=True)

    t = cfg.train
    masker = TokenMasker(tokenizer.special_table(), MASK_ID, max_predictions(cfg), t.seed,
                         topo.rank, device, cfg.masking.prob, cfg.masking.mask_frac,
                         cfg.masking.random_frac)
    batches = ResumableLoader(manifest_shards(cfg.data.shards), t.seq_len, t.micro_batch,
                              topo.rank, topo.world_size, cfg.data.num_workers, seed=t.seed,
                              shuffle_buffer=cfg.data.shuffle_buffer,
                              short_seq_prob=cfg.data.short_seq_prob,
                              pin_memory=device.type == "cuda", state=data_state)
    logger = MetricLogger(run_dir / "tensorboard" if is_rank0 else None, cfg, topo)
    if is_rank0:
        print(f"model: {n_params / 1e6:.2f}M parameters, {topo.world_size} ranks, "
              f"ZeRO {t.zero_stage}, {t.precision}, grad accumulation {grad_accum}", flush=True)
        logger.text("config", f"```\n{dump_yaml(cfg)}\n```")

    engine.train()
    step = start_step
    data_wait = 0.0
    while step < t.steps:
        for micro in range(grad_accum):
            waited = time.perf_counter()
            batch = next(batches).to(device)
            data_wait += time.perf_counter() - waited
            masked = masker(batch.input_ids, step, micro)
            mlm_logits, nsp_logits = engine(masked.input_ids, batch.token_type_ids,
                                            batch.attention_mask, masked.positions)
            losses = pretraining_loss(mlm_logits, masked.labels, nsp_logits, batch.nsp_label)
            engine.backward(losses["loss"])
            engine.step()
            logger.accumulate(losses, batch.attention_mask, masked.labels)
        step += 1
        if step % t.log_every == 0 or step == t.steps:
            record = logger.flush(step, lr=engine.get_lr()[0],
                                  grad_norm=engine.get_global_grad_norm(),
                                  data_wait=data_wait, skipped=batches.skipped_documents)
            data_wait = 0.0
            if record["data/skipped_samples"] > cfg.data.max_skipped_samples:
                # Every rank sees the same reduced count at the same step, so all stop together.
                raise BadDataError(
                    f"{record['data/skipped_samples']:.0f} documents were skipped as bad data, "
                    f"more than data.max_skipped_samples={cfg.data.max_skipped_samples}; the "
                    "warnings above name the shards: check them with `mlm-dist prepare --verify`")
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == t.steps:
            data_states = [None] * topo.world_size
            dist.all_gather_object(data_states, batches.state_dict())
            path = checkpoint.save(engine, run_dir, step, cfg, tokenizer.path,
                                   {"step": step, "data": data_states}, is_rank0)
            if is_rank0:
                print(f"saved checkpoint {path}", flush=True)

    summary = logger.close()
    dist.barrier()
    return summary
