"""`mlm-dist bench train`: step throughput and MFU of our stack, against Hugging Face's.

It times full training steps in one process, one device:

  ours  the batch on the device -> TokenMasker (max_predictions slots per sequence) -> our
        BertForPretraining (MLM head on the masked slots only) -> pretraining_loss -> backward
        -> gradient clipping -> the optimizer the run would use (optimizers.build_optimizer)
  HF    the same rows as the list of dicts a Trainer hands its collator ->
        DataCollatorForLanguageModeling -> transformers.BertForPreTraining (SDPA attention,
        prediction head on every position) -> backward -> clipping -> fused AdamW (the
        Trainer's default optimizer on torch >= 2.8)

Same dimensions, batch, sequence length, dropout and precision on both sides (bf16: torch.autocast
around the forward, fp32 weights, as the HF Trainer runs bf16). No DeepSpeed: on one rank
ZeRO-0 adds nothing to the model's forward and backward, its bf16 mode would make the two
sides differ in precision handling, and importing and initialising it costs more than the
comparison; the step here is what each rank of a run computes between its collectives.

The two sides alternate step by step (and swap order every round), and a large matmul in the
run's dtype is timed in every round too, so the machine's noise hits the three figures alike.
Figures are medians over the timed rounds. FLOPs per token are those of flops.py; ours counts
the head on K/S of the positions (it projects K slots), HF's on all of them. On a CPU the
process's malloc is tuned first (allocator.py; for both sides alike, `--default-malloc` leaves
glibc's defaults), as a CPU training run should be.

With --shards, each round takes the next of a list of real micro-batches, made from the
shards as the loader makes them (rows of [CLS] A [SEP] B [SEP], short documents give short
rows); HF gets the same pairs, each row as long as its pair, and its collator pads a batch to
its longest row. Besides tokens_per_s (micro_batch × seq_len positions per step), each side
then reports real_tokens_per_s (tokens that are not padding), its fill (real tokens / positions
it computed) and MFU counted on real tokens.

Nothing is downloaded: HF's collator gets a word-level tokenizer over the same vocabulary size,
with the specials at the tokenizer's ids.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

from mlm_dist.config import RunConfig, SequencePhase, load_config
from mlm_dist.config import max_predictions as derived_max_predictions

# torch, numpy, transformers and deepspeed are imported where they are used, so that
# registering these commands costs `mlm-dist --help` nothing.

DEFAULT_VOCAB = 30522  # BERT's WordPiece vocabulary, when the config leaves vocab_size to the tokenizer
PRECISIONS = ("bf16", "fp16", "fp32")


def _dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


# bench commands do not read data; load_config still wants the key set
_NO_SHARDS = "data.shards=unused-by-bench"


def bench_config(config: str | None, overrides: list[str] = (), vocab_size: int = 0) -> RunConfig:
    cfg = load_config(config, [_NO_SHARDS, *overrides])
    vocab = cfg.model.vocab_size or vocab_size or DEFAULT_VOCAB
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def phase_for(cfg: RunConfig, seq_len: int | None, micro_batch: int | None,
              max_predictions: int | None) -> SequencePhase:
    """The config's phase at seq_len (its micro batch and max_predictions), or a new one."""
    phases = cfg.schedule.phases
    match = [p for p in phases if seq_len in (None, p.seq_len)]
    phase = match[0] if match else SequencePhase(seq_len=seq_len, micro_batch=phases[0].micro_batch,
                                                 max_predictions=0)
    phase = dataclasses.replace(phase, micro_batch=micro_batch or phase.micro_batch)
    if max_predictions:
        phase = dataclasses.replace(phase, max_predictions=max_predictions)
    if phase.seq_len > cfg.model.max_positions:
        raise ValueError(f"--seq-len {phase.seq_len} exceeds model.max_positions "
                         f"{cfg.model.max_positions}")
    return dataclasses.replace(phase, max_predictions=derived_max_predictions(phase, cfg.masking))


def synthetic_batch(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> dict:
    """[CLS] A [SEP] B [SEP] rows of random ordinary ids; one row in ten shorter and padded (as
    BERT's short_seq_prob), every row's A/B split at a random point; NSP labels 0/1."""
    import numpy as np

    from mlm_dist.tokenizer import CLS_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS

    rng = np.random.default_rng(seed)
    first = len(SPECIAL_TOKENS)
    input_ids = np.full((batch, seq_len), PAD_ID, dtype=np.int64)
    token_type_ids = np.zeros((batch, seq_len), dtype=np.int64)
    attention_mask = np.zeros((batch, seq_len), dtype=np.int64)
    for row in range(batch):
        n = seq_len - 3 if rng.random() >= 0.1 else int(rng.integers(2, seq_len - 2))
        cut = int(rng.integers(1, n))
        body = rng.integers(first, vocab_size, size=n)
        input_ids[row, :n + 3] = np.concatenate([[CLS_ID], body[:cut], [SEP_ID], body[cut:], [SEP_ID]])
        token_type_ids[row, cut + 2:n + 3] = 1
        attention_mask[row, :n + 3] = 1
    nsp = rng.integers(0, 2, size=batch)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids,
            "attention_mask": attention_mask, "next_sentence_label": nsp}


def synthetic_vocabulary(vocab_size: int):
    """The Vocabulary of synthetic_batch's ids: our SentencePiece specials, every id a word."""
    import numpy as np

    from mlm_dist.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS, UNK_ID, Vocabulary

    special = np.zeros(vocab_size, dtype=bool)
    special[:len(SPECIAL_TOKENS)] = True
    return Vocabulary(vocab_size, PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID, special,
                      np.ones(vocab_size, dtype=bool))


def hf_collator_tokenizer(vocab, model_max_length: int):
    """A transformers fast tokenizer over `vocab`'s ids (a tokenizer.Vocabulary), word-level,
    its specials at their ids: all DataCollatorForLanguageModeling needs (mask id, special ids,
    vocabulary size, pad)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from mlm_dist.tokenizer import SPECIAL_TOKENS

    special_ids = (vocab.pad, vocab.unk, vocab.cls, vocab.sep, vocab.mask)
    words = {f"w{i}": i for i in range(vocab.size)}
    words.update({tok: i for tok, i in zip(SPECIAL_TOKENS, special_ids)})
    words = {w: i for w, i in words.items() if w.startswith("[") or i not in special_ids}
    backend = Tokenizer(models.WordLevel(words, unk_token=SPECIAL_TOKENS[1]))
    names = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"),
                     SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length,
                                  model_input_names=["input_ids", "token_type_ids", "attention_mask"],
                                  **names)
    assert tok.mask_token_id == vocab.mask and tok.pad_token_id == vocab.pad
    assert len(tok) == vocab.size
    return tok


def _autocast(device, precision: str):
    import torch

    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=_dtype(precision))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def as_batch(rows: dict, device=None):
    """synthetic_batch's rows as the loader's Batch, on `device` (each id its own word)."""
    import torch

    from mlm_dist.data.pipeline import Batch

    t = {k: torch.as_tensor(v, device=device) for k, v in rows.items()}
    return Batch(t["input_ids"], t["token_type_ids"], t["attention_mask"],
                 t["next_sentence_label"], torch.ones_like(t["input_ids"], dtype=torch.bool))


def shard_batches(shards_dir: str, phase: SequencePhase, vocab, *, count: int,
                  seed: int = 0, pack: bool = False) -> list:
    """`count` micro-batches of real pairs from the train shards, made as the loader makes them
    (one reader from the start; rows padded to seq_len): the fill of real data, not of
    synthetic near-full rows."""
    from mlm_dist.config import DataConfig
    from mlm_dist.config import pairs_per_row
    from mlm_dist.data.pipeline import (BatchWriter, PackedBatchWriter, ReaderStream,
                                        manifest_shards)

    stream = ReaderStream(manifest_shards(shards_dir), reader=0, readers=1,
                          seq_len=phase.seq_len, seed=seed, data=DataConfig(shards=shards_dir))
    writer = (PackedBatchWriter(phase.micro_batch, phase.seq_len, vocab,
                                pairs_per_row(phase.seq_len)) if pack
              else BatchWriter(phase.micro_batch, phase.seq_len, vocab))
    batches = []
    for pair, _ in stream.examples():
        if not writer.fits(pair.a, pair.b):  # a packed batch is done: the pair opens the next
            batches.append(writer.take())
        if len(batches) < count and writer.add(pair.a, pair.b, pair.label):
            batches.append(writer.take())
        if len(batches) == count:
            return batches


class TorchEngine:
    """The calls train_step makes of a DeepSpeed engine, on a plain model and optimizer.

    In one process DeepSpeed at ZeRO 0 adds nothing else to a step, and without it the
    comparison is fair: its bf16 mode would keep bf16 weights where HF's autocast keeps fp32."""

    def __init__(self, model, optimizer, *, device, precision: str, grad_clip: float,
                 compile: bool = False):
        import torch

        self.module, self.optimizer, self.device = model, optimizer, device
        self.precision, self.grad_clip = precision, grad_clip
        self.forward = torch.compile(model) if compile else model
        self.params = list(model.parameters())
        self.boundary = True

    def set_gradient_accumulation_boundary(self, boundary: bool) -> None:
        self.boundary = boundary

    def __call__(self, *inputs):
        with _autocast(self.device, self.precision):
            return self.forward(*inputs)

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        import torch

        if not self.boundary:
            return
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class OursStep:
    """One training step of our stack: training.step.train_step itself, on a plain engine;
    nothing in it waits for the host."""

    def __init__(self, cfg: RunConfig, phase: SequencePhase, batches: list, vocab, *, device,
                 precision: str, compile: bool = False, checkpoint_activations: bool = False):
        import itertools

        import torch

        from mlm_dist.masking import TokenMasker
        from mlm_dist.model import BertForPretraining, parameter_groups
        from mlm_dist.optim import build_optimizer

        torch.manual_seed(cfg.train.seed)
        model = BertForPretraining(cfg.model, checkpoint_activations=checkpoint_activations or None)
        model.to(device).train()
        o = cfg.optim
        optimizer = build_optimizer(parameter_groups(model, o.weight_decay), name=o.name,
                                    lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                    weight_decay=o.weight_decay, device=device)
        self.model = model
        self.engine = TorchEngine(model, optimizer, device=device, precision=precision,
                                  grad_clip=cfg.train.grad_clip, compile=compile)
        self.masker = TokenMasker(vocab, cfg.masking, max_predictions=phase.max_predictions,
                                  seed=cfg.train.seed, rank=0, device=device)
        self.batches = itertools.cycle([batch.to(device) for batch in batches])

    def __call__(self, step: int) -> None:
        from mlm_dist.training.step import train_step

        train_step(self.engine, self.batches, self.masker, step=step, accumulation=1)


class HFStep:
    """One step as a Hugging Face Trainer takes it (collator in the step: the Trainer's
    default dataloader_num_workers=0 runs it in the training process)."""

    def __init__(self, cfg: RunConfig, batches: list, vocab, *, device, precision: str,
                 attn_implementation: str = "sdpa"):
        import torch
        from transformers import BertForPreTraining, DataCollatorForLanguageModeling

        from mlm_dist.interop.huggingface import hf_bert_config

        self.device, self.precision = device, precision
        torch.manual_seed(cfg.train.seed)
        self.model = BertForPreTraining(hf_bert_config(cfg.model))
        self.model.set_attn_implementation(attn_implementation)
        self.model.to(device).train()
        no_decay = ("bias", "LayerNorm.weight")
        named = list(self.model.named_parameters())
        groups = [{"params": [p for n, p in named if not n.endswith(no_decay)],
                   "weight_decay": cfg.optim.weight_decay},
                  {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0}]
        o = cfg.optim
        fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                           **fused)
        self.params = [p for _, p in named]
        self.grad_clip = cfg.train.grad_clip
        tokenizer = hf_collator_tokenizer(vocab, cfg.model.max_positions)
        self.collator = DataCollatorForLanguageModeling(
            tokenizer=tokenizer, mlm_probability=cfg.masking.prob,
            mask_replace_prob=cfg.masking.mask_frac, random_replace_prob=cfg.masking.random_frac)
        # The rows as a Trainer hands them to its collator: each as long as its pair, so the
        # collator pads the batch to its longest row.
        self.examples = [hf_examples(batch) for batch in batches]
        self.collator_seconds: list[float] = []

    def __call__(self, step: int) -> None:
        import torch

        start = time.perf_counter()
        batch = self.collator(self.examples[step % len(self.examples)])
        self.collator_seconds.append(time.perf_counter() - start)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with _autocast(self.device, self.precision):
            out = self.model(**batch)
        out.loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def shards_vocabulary(shards: str, vocab_size: int):
    """The Vocabulary of the shards' tokenizer, checked against the model's size."""
    from mlm_dist.data.shards import Manifest
    from mlm_dist.tokenizer import Tokenizer

    vocab = Tokenizer.load(Manifest.load(shards).tokenizer.path).vocabulary
    if vocab.size != vocab_size:
        raise ValueError(f"--shards {shards}: its tokenizer has {vocab.size} ids, the model "
                         f"{vocab_size}; drop model.vocab_size / --vocab-size (they are taken "
                         "from the shards) or use shards of this model's tokenizer")
    return vocab


def hf_examples(batch) -> list[dict]:
    """The pairs of a Batch, one example each (a packed row gives several)."""
    if batch.packing is None:
        spans = [(row, 0, int(n), int(batch.nsp_label[row]))
                 for row, n in enumerate(batch.attention_mask.sum(1).tolist())]
    else:
        p = batch.packing
        spans = [(row, int(p.cls_positions[row, slot]),
                  int((p.sequence_ids[row] == slot + 1).sum()), int(batch.nsp_label[row, slot]))
                 for row in range(len(batch.input_ids)) for slot in range(p.cls_positions.shape[1])
                 if batch.nsp_label[row, slot] != IGNORE]
    return [{"input_ids": batch.input_ids[row, start:start + n].tolist(),
             "token_type_ids": batch.token_type_ids[row, start:start + n].tolist(),
             "attention_mask": [1] * n, "next_sentence_label": label}
            for row, start, n, label in spans]


IGNORE = -100  # model.IGNORE_INDEX, without importing torch at parse time


def _timed(fn, device, *args) -> float:
    _sync(device)
    start = time.perf_counter()
    fn(*args)
    _sync(device)
    return time.perf_counter() - start


def bench_train(cfg: RunConfig, *, seq_len: int | None = None, micro_batch: int | None = None,
                steps: int = 10, warmup: int = 3, compare_hf: bool = False,
                precision: str | None = None, device: str | None = None,
                max_predictions: int | None = None, compile: bool = False,
                checkpoint_activations: bool = False, matmul_size: int = 4096,
                seed: int = 0, tune_allocator: bool = True, shards: str | None = None) -> dict:
    """Time `steps` rounds (after `warmup`) of our step, HF's step (with compare_hf) and a
    matmul; return the figures as a JSON-able dict.

    shards: real batches from these shards' train split, one per round, the same for both
    sides (default: one synthetic batch of nearly full rows).

    tune_allocator: on a CPU, allocator.tune_cpu_allocator() first (for the whole process, so
    both sides alike), as a CPU training run would."""
    import torch

    from mlm_dist.training.allocator import tune_cpu_allocator
    from mlm_dist.flops import (MatmulTimer, cuda_peak_from_table, model_flops_per_token,
                                sparse_flops_per_token)

    precision = precision or cfg.train.precision
    if precision not in PRECISIONS:
        raise ValueError(f"--precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32")
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {steps}, {warmup}")
    phase = phase_for(cfg, seq_len, micro_batch, max_predictions)
    tuned = device.type == "cpu" and tune_allocator and tune_cpu_allocator()
    m = cfg.model
    if shards:
        vocab = shards_vocabulary(shards, m.vocab_size)
        batches = shard_batches(shards, phase, vocab, count=warmup + steps, seed=seed,
                                pack=cfg.data.pack)
    else:
        vocab = synthetic_vocabulary(m.vocab_size)
        batches = [as_batch(synthetic_batch(m.vocab_size, phase.micro_batch, phase.seq_len,
                                            seed))]
    tokens = phase.micro_batch * phase.seq_len
    # Per round: the real (non-padding) tokens, and the positions HF computes (a pair a row,
    # padded to the batch's longest).
    real = [int(b.attention_mask.sum()) for b in batches]
    hf_positions = [len(rows) * max(len(e["input_ids"]) for e in rows)
                    for rows in map(hf_examples, batches)]

    step_options = dict(device=device, precision=precision,
                        checkpoint_activations=checkpoint_activations)
    sides = {"ours": OursStep(cfg, phase, batches, vocab, compile=compile, **step_options)}
    if compile:  # the same stack uncompiled, interleaved too: the speed-up in one run
        sides["ours_eager"] = OursStep(cfg, phase, batches, vocab, compile=False, **step_options)
    if compare_hf:
        sides["hf"] = HFStep(cfg, batches, vocab, device=device, precision=precision)
    dtype = _dtype(precision)
    matmul = MatmulTimer(device, dtype, matmul_size)

    times: dict[str, list[float]] = {name: [] for name in sides}
    peaks: list[float] = []
    for round_ in range(warmup + steps):
        order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
        for name in order:
            seconds = _timed(sides[name], device, round_)
            if round_ >= warmup:
                times[name].append(seconds)
        flops = matmul()
        if round_ >= warmup:
            peaks.append(flops)

    peak = statistics.median(peaks)
    result = {
        "model": {"num_layers": m.num_layers, "hidden_size": m.hidden_size,
                  "num_heads": m.num_heads, "intermediate_size": m.intermediate_size,
                  "vocab_size": m.vocab_size,
                  "parameters": sum(p.numel() for p in sides["ours"].model.parameters())},
        "seq_len": phase.seq_len, "micro_batch": phase.micro_batch, "tokens_per_step": tokens,
        "data": f"{len(batches)} micro-batches of {shards}" if shards else "synthetic",
        "precision": precision + (" autocast" if precision != "fp32" else ""),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(), "steps": steps, "warmup": warmup,
        "compile": compile,
        "checkpoint_activations": sides["ours"].model.checkpoint_activations,
        "cpu_allocator_tuned": tuned,
        "peak": {"dtype": str(dtype).replace("torch.", ""), "matmul": f"{matmul_size}^3",
                 "flops_per_s": peak, "flops_per_s_best": max(peaks),
                 "source": "measured, one matmul per round between the steps"},
    }
    if device.type == "cuda":
        result["peak"]["table_flops_per_s"] = cuda_peak_from_table(result["device"], dtype)
    timed = range(warmup, warmup + steps)  # the rounds whose times were kept
    real_tokens = sum(real[r % len(batches)] for r in timed)
    for name, seconds in times.items():
        step_s = statistics.median(seconds)
        ours_side = name.startswith("ours")
        # Positions computed: ours every row at seq_len, HF each pair at the batch's longest.
        computed = sum(phase.micro_batch * phase.seq_len if ours_side else
                       hf_positions[r % len(batches)] for r in timed)
        fraction = phase.max_predictions / phase.seq_len if ours_side else 1.0
        per_token = (sparse_flops_per_token(m, phase.seq_len, phase.max_predictions)
                     if ours_side else model_flops_per_token(m, phase.seq_len, 1.0))
        tokens_per_s = tokens / step_s
        entry = {
            "tokens_per_s": round(tokens_per_s, 1),
            "step_ms": round(step_s * 1e3, 2),
            "step_ms_min": round(min(seconds) * 1e3, 2),
            "sparse_head": ours_side,
            "sparse_last_layer": ours_side,  # computes only [CLS] and the masked slots
            "predicted_fraction": round(fraction, 4),
            "flops_per_token": per_token,
            "model_flops_per_s": tokens_per_s * per_token,
            "mfu": round(tokens_per_s * per_token / peak, 4),
            # What the step did for the data: non-padding tokens per second of all timed rounds,
            # the share of computed positions they are, and MFU counted on them alone.
            "real_tokens_per_s": round(real_tokens / sum(seconds), 1),
            "fill": round(real_tokens / computed, 4),
            "mfu_real": round(real_tokens / sum(seconds) * per_token / peak, 4),
        }
        if ours_side:
            entry["max_predictions"] = phase.max_predictions
        else:
            entry["collator_ms"] = round(
                statistics.median(sides[name].collator_seconds[warmup:]) * 1e3, 2)
        result[name] = entry
    if compare_hf:
        result["ratio"] = round(result["ours"]["tokens_per_s"] / result["hf"]["tokens_per_s"], 3)
        result["real_tokens_ratio"] = round(result["ours"]["real_tokens_per_s"]
                                            / result["hf"]["real_tokens_per_s"], 3)
        # The same ratio round by round (the two steps of a round ran back to back, under the
        # same load): its spread shows how much of the figure is the machine's noise.
        rounds = [hf / ours for ours, hf in zip(times["ours"], times["hf"])]
        result["ratio_per_round"] = {"median": round(statistics.median(rounds), 3),
                                     "min": round(min(rounds), 3), "max": round(max(rounds), 3)}
    if compile:
        result["compile_speedup"] = round(
            result["ours"]["tokens_per_s"] / result["ours_eager"]["tokens_per_s"], 3)
    return result


# ---------------------------------------------------------------------------------------------
# command line


def _train_cmd(args) -> None:
    vocab_size = args.vocab_size
    if args.shards and not vocab_size:
        from mlm_dist.data.shards import Manifest

        vocab_size = Manifest.load(args.shards).tokenizer.vocab_size
    cfg = bench_config(args.config, args.overrides, vocab_size)
    result = bench_train(cfg, shards=args.shards, seq_len=args.seq_len, micro_batch=args.micro_batch,
                         steps=args.steps, warmup=args.warmup, compare_hf=args.compare_hf,
                         precision=args.precision, device=args.device,
                         max_predictions=args.max_predictions, compile=args.compile,
                         checkpoint_activations=args.checkpoint_activations,
                         matmul_size=args.matmul_size, seed=args.seed,
                         tune_allocator=not args.default_malloc)
    print(json.dumps(result, indent=2))


def add_parser(bench_subparsers) -> None:
    """Register `bench train` under `mlm-dist bench`."""
    t = bench_subparsers.add_parser(
        "train", help="training-step throughput and MFU of our stack (optionally against "
                      "transformers' BertForPreTraining), JSON",
        description=__doc__.split("\n\n")[1])
    t.add_argument("--config", required=True, help="YAML run config (model dims, masking, optim)")
    t.add_argument("--seq-len", type=int, help="default: the config's first phase")
    t.add_argument("--micro-batch", type=int, help="default: that phase's micro batch")
    t.add_argument("--max-predictions", type=int,
                   help="MLM slots per sequence (default: the phase's, or derived from seq_len)")
    t.add_argument("--steps", type=int, default=10, help="timed rounds (default 10)")
    t.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3; the "
                   "CPU heap settles over the first steps)")
    t.add_argument("--shards", help="time real batches of these shards (`mlm-dist prepare`), "
                   "one per round, the same for both sides; default: synthetic full rows")
    t.add_argument("--compare-hf", action="store_true",
                   help="also time transformers' BertForPreTraining + DataCollatorForLanguageModeling, "
                        "interleaved")
    t.add_argument("--precision", choices=PRECISIONS,
                   help="default: train.precision (bf16/fp16 = autocast)")
    t.add_argument("--device", help="default: cuda if available, else cpu")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile our model (and time it uncompiled too, interleaved: "
                        "compile_speedup)")
    t.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute each encoder layer in backward (saves memory, costs time)")
    t.add_argument("--vocab-size", type=int, default=0,
                   help=f"when the config leaves model.vocab_size to the tokenizer (default {DEFAULT_VOCAB})")
    t.add_argument("--matmul-size", type=int, default=4096, help="n of the n^3 peak matmul")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc as it is (default on a CPU: no mmap/trim for big "
                        "blocks, see allocator.py; applies to both sides)")
    t.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.num_layers=4")
    t.set_defaults(func=_train_cmd)

