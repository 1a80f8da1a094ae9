"""The steps `bench train` times, one process, one device: ours (training.step.train_step
itself, on a plain model and optimizer: TorchEngine) and Hugging Face's (BertForPreTraining with
DataCollatorForLanguageModeling in the step, as a Trainer runs it)."""

from __future__ import annotations

import itertools
import time

import torch
from transformers import BertForPreTraining, DataCollatorForLanguageModeling

from mlm_dist.bench.workload import hf_collator_tokenizer, hf_examples
from mlm_dist.config import RunConfig, SequencePhase
from mlm_dist.interop.export import hf_bert_config
from mlm_dist.masking import TokenMasker
from mlm_dist.model import parameter_groups
from mlm_dist.objectives import objective_for
from mlm_dist.optim import build_optimizer
from mlm_dist.training.step import train_step


def torch_dtype(precision: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def _autocast(device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch_dtype(precision))


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TorchEngine:
    """The calls train_step makes of a DeepSpeed engine, on a plain model and optimizer.

    In one process DeepSpeed at ZeRO 0 adds nothing else to a step, and without it the
    comparison is fair: its bf16 mode would keep bf16 weights where HF's autocast keeps fp32."""

    def __init__(self, model, optimizer, *, device, precision: str, grad_clip: float,
                 compile: bool = False):
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
        torch.manual_seed(cfg.train.seed)
        self.objective = objective_for(cfg)
        model = self.objective.build_model(cfg.model,
                                           checkpoint_activations=checkpoint_activations or None)
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
        train_step(self.engine, self.batches, self.masker, self.objective, step=step,
                   accumulation=1)


class HFStep:
    """One step as a Hugging Face Trainer takes it (collator in the step: the Trainer's
    default dataloader_num_workers=0 runs it in the training process)."""

    def __init__(self, cfg: RunConfig, batches: list, vocab, *, device, precision: str,
                 attn_implementation: str = "sdpa"):
        self.device, self.precision = device, precision
        torch.manual_seed(cfg.train.seed)
        self.model = BertForPreTraining(hf_bert_config(cfg.model))
        self.model.set_attn_implementation(attn_implementation)
        self.model.to(device).train()
        self.optimizer = hf_adamw(self.model, cfg.optim)
        self.params = list(self.model.parameters())
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


def hf_adamw(model, o):
    """torch's fused AdamW (the HF Trainer's default, adamw_torch_fused) in BERT's two groups:
    no weight decay on biases and LayerNorm weights."""
    named = list(model.named_parameters())
    no_decay = ("bias", "LayerNorm.weight")
    groups = [{"params": [p for n, p in named if not n.endswith(no_decay)],
               "weight_decay": o.weight_decay},
              {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0}]
    fused = {"fused": True} if next(model.parameters()).device.type in ("cuda", "cpu") else {}
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **fused)


def timed_call(fn, device, *args) -> float:
    _sync(device)
    start = time.perf_counter()
    fn(*args)
    _sync(device)
    return time.perf_counter() - start
