"""BERT's networks for pretraining in plain torch: the encoder, and on it the heads of
`BertForPreTraining` (MLM + the pair classifier) or of `BertForMaskedLM` (MLM only). Which
one a run trains, and on what, is its objective's choice (mlm_dist/objectives).

The network is the original BERT, computed exactly as Hugging Face's `BertForPreTraining`
does it (post-LayerNorm residual blocks, exact-erf GELU, learned absolute positions, segment
embeddings, a tanh pooler on [CLS]), so a trained state dict exports 1:1 to that class
(see `interop/bert_names.py`). Three things differ, all for speed and none changes the numbers:

- attention goes through `F.scaled_dot_product_attention`, which picks a fused kernel (on a
  CPU it is written out; see mlm_dist/attention.py);
- the MLM head runs only on the masked positions it is asked about. The vocabulary projection
  is the largest matmul in the model at small hidden sizes (H x 30k per position); doing it for
  the ~20 predicted positions of a 128-token sequence instead of all 128 saves most of it;
- for the same reason the last encoder layer computes only the positions the heads read
  ([CLS] and the masked slots). Its keys and values still come from every position; the
  queries, the attention output, the residual, LayerNorm and the FFN are per position, so those
  outputs are exactly the ones the full layer would give. At seq 128 this saves most of a
  twelfth of the encoder.

Speed choices that leave the numbers (and the parameters) as they are:

- Under autocast the residual stream is kept in the autocast dtype from the embeddings on, on
  every device, as DeepSpeed's bf16 mode keeps it. Otherwise the fp32 embedding output makes
  every residual add and LayerNorm fp32, and every Linear casts its input again. LayerNorm
  normalises and scales in fp32 with its fp32 weights and rounds once to the autocast dtype
  (`LayerNorm`): CUDA autocast runs layer_norm in fp32 and returns fp32, so without the cast
  back the stream would turn fp32 after the first LayerNorm on a GPU (CPU autocast leaves
  layer_norm alone, and its kernel already returns the input's dtype).
- Attention gets a mask only when the batch needs one (FlashAttention on CUDA takes none), and
  on a CPU attention and dropout are written out, faster than PyTorch's CPU kernels. Those are
  the device-dependent choices, and they live in mlm_dist/attention.py.
- `checkpoint_activations` recomputes each encoder layer in the backward pass
  (torch.utils.checkpoint, the dropout masks replayed from the saved RNG state): activation
  memory falls from O(layers) to O(1) layers for about a third more compute.

This file knows nothing of ranks, DeepSpeed or data loading.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mlm_dist.attention import Dropout, attention, attention_bias, attention_plan
from mlm_dist.config import ConfigError, ModelConfig

IGNORE_INDEX = -100  # label value meaning "no prediction here" (F.cross_entropy's default)


@dataclass
class Packing:
    """Several [CLS] A [SEP] B [SEP] pairs in one row, none seeing another (Graphcore's packed
    BERT): positions restart at each pair, attention is block-diagonal by pair, and each pair's
    [CLS] gets its own NSP prediction. Static shapes: P slots per row whatever it holds."""

    position_ids: torch.Tensor  # [B, S] long, 0 at each pair's [CLS]
    sequence_ids: torch.Tensor  # [B, S] long, 1..P: the pair of each token, 0 = padding
    cls_positions: torch.Tensor  # [B, P] long, where each pair's [CLS] is (0 for empty slots)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose output has its input's dtype: under autocast the residual stream
    stays in the autocast dtype on every device (see the module docstring).

    CUDA autocast lists layer_norm among the ops it runs in fp32: it casts the input up and
    returns fp32. Cast back here, a GPU computes what the CPU kernel computes for a bf16 input
    and fp32 weights: normalised and scaled in fp32, rounded once to the input's dtype (as
    Megatron's MixedFusedLayerNorm does). On a CPU, and without autocast, the cast is a no-op.
    Under CUDA autocast the kernel keeps an fp32 copy of its input for backward (`bench
    memory` counts it). Parameters and state dict are nn.LayerNorm's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).to(x.dtype)


class Embeddings(nn.Module):
    """token + position + segment embeddings, then LayerNorm and dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.positions = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.token_types = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            # arange on the ids' device: no host->device copy, and it broadcasts over the batch.
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (self.tokens(input_ids) + self.token_types(token_type_ids)
             + self.positions(position_ids))
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.attention_dropout = cfg.attention_dropout
        # Separate q/k/v projections keep a 1:1 parameter mapping to Hugging Face's BERT; the
        # three small matmuls cost next to nothing compared with the rest of the layer.
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None,
                queries: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, S, H], every position (keys and values). queries: [B, Q, H] the positions to
        compute outputs for (None: all of x). attn_bias None: no mask. Returns [B, Q, H]."""
        queries = x if queries is None else queries
        batch, hidden = x.shape[0], x.shape[2]

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # [B, n, H] -> [B, heads, n, head_dim]
            return t.view(batch, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        q = split_heads(self.query(queries))
        k, v = split_heads(self.key(x)), split_heads(self.value(x))
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)  # no-op unless autocast made q lower precision
        y = attention(q, k, v, attn_bias, self.attention_dropout, self.training)
        y = y.transpose(1, 2).reshape(batch, queries.shape[1], hidden)
        return self.out(y)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exact (erf) GELU, as in the original BERT and HF's hidden_act="gelu"; the tanh
        # approximation would break parity with exported checkpoints.
        return self.down(F.gelu(self.up(x)))


class EncoderLayer(nn.Module):
    """One post-LN block: x = norm(x + attn(x)); x = norm(x + ffn(x)).

    Post-LN (normalising *after* the residual add) is what BERT does; it is less forgiving of
    large learning rates than pre-LN, which is why BERT recipes use warmup.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.ffn_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """positions: [B, Q] the positions whose outputs are wanted (None: all); attention
        still reads every position, everything else in the block is per position."""
        h = x if positions is None else gather_positions(x, positions)
        if positions is not None and attn_bias is not None and attn_bias.shape[2] > 1:
            # a bias row per query: theirs
            attn_bias = torch.gather(attn_bias, 2, positions[:, None, :, None].expand(
                -1, 1, -1, attn_bias.shape[3]))
        h = self.attn_norm(h + self.dropout(self.attn(x, attn_bias, h)))
        return self.ffn_norm(h + self.dropout(self.ffn(h)))


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x[b, positions[b, j]] for every b, j: [B, S, H] -> [B, Q, H]."""
    return torch.gather(x, 1, positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class MaskedLMHead(nn.Module):
    """transform (dense, GELU, LayerNorm), then a projection onto the vocabulary.

    The projection's weight *is* the token embedding matrix (tied by the network), with
    its own output bias (on the Linear: bias and matmul are one addmm). The weight is shared by
    assigning the same Parameter to a Linear module rather than calling F.linear on the
    embedding's weight from here: parameter-partitioning wrappers gather a module's parameters
    around that module's own forward, so the tied matrix must be a parameter of the module
    that uses it.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.transform = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.transform(h))))


class Encoder(nn.Module):
    """The BERT encoder (embeddings and post-LN layers) that every objective's network is
    built on; the networks below add their heads. `encode` computes the last layer only at the
    positions the heads read (see the module docstring).

    checkpoint_activations: recompute each encoder layer during backward instead of keeping
    its activations (None: the config's `checkpoint_activations`, default off)."""

    def __init__(self, cfg: ModelConfig, checkpoint_activations: bool | None = None):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved from the tokenizer before "
                             f"building the model (got {cfg.vocab_size})")
        if cfg.hidden_size % cfg.num_heads:
            raise ConfigError(f"model.hidden_size {cfg.hidden_size} is not divisible by "
                              f"model.num_heads {cfg.num_heads}")
        self.cfg = cfg
        if checkpoint_activations is None:
            checkpoint_activations = bool(getattr(cfg, "checkpoint_activations", False))
        self.checkpoint_activations = checkpoint_activations
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))

    def _init_weights(self, module: nn.Module) -> None:
        # BERT's init: every matrix N(0, init_std), biases 0, LayerNorm the identity.
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def encode(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
               attention_mask: torch.Tensor | None, packing: "Packing | None",
               read: torch.Tensor | None) -> torch.Tensor:
        """The last layer's output at `read` ([B, R] positions: [B, R, H]), or at every
        position when `read` is None ([B, S, H])."""
        x = self.embeddings(input_ids, token_type_ids,
                            None if packing is None else packing.position_ids)
        recompute = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        return run_layers(self.layers, x, attention_mask, packing, read, recompute)


def run_layers(layers: nn.ModuleList, x: torch.Tensor, attention_mask: torch.Tensor | None,
               packing: "Packing | None", read: torch.Tensor | None,
               recompute: bool) -> torch.Tensor:
    """`layers` on embeddings `x` ([B, S, H]): the last layer's output at `read` ([B, R, H]),
    or at every position when `read` is None. `recompute`: checkpoint each layer. Encoder.encode
    and every other stack of these layers (ELECTRA's generator) run through here."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # The residual stream in the autocast dtype (see the module docstring).
        x = x.to(torch.get_autocast_dtype(device_type))

    # One additive mask shared by every layer, or none (see attention_plan). Whether the
    # batch has padding came from the host (attention_mask None: none), never from
    # looking at the mask on the device.
    plan = attention_plan(device_type, padded=attention_mask is not None,
                          packed=packing is not None)
    attn_bias = attention_bias(plan, attention_mask,
                               None if packing is None else packing.sequence_ids, x.dtype)

    for i, layer in enumerate(layers):
        positions = read if i == len(layers) - 1 else None
        if recompute:
            x = checkpoint(layer, x, attn_bias, positions, use_reentrant=False)
        else:
            x = layer(x, attn_bias, positions)
    return x


class BertForPretraining(Encoder):
    """BERT with both its pretraining heads, as Hugging Face's `BertForPreTraining`: the MLM
    head and a tanh pooler on [CLS] feeding a two-way classifier of the pair. The `bert`
    objective trains that classifier on next-sentence prediction, `sop` on sentence order
    (ALBERT); Hugging Face calls it `cls.seq_relationship`, for either."""

    # The parameters of these modules may be freshly initialised when a Hugging Face folder
    # lacks them (interop.init_from.load_pretrained); everything else must be loaded.
    HEADS = ("pooler", "nsp_head", "mlm_head")

    def __init__(self, cfg: ModelConfig, checkpoint_activations: bool | None = None):
        super().__init__(cfg, checkpoint_activations)
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)  # tanh(W h_[CLS] + b)
        self.nsp_head = nn.Linear(cfg.hidden_size, 2)  # logits for (is next, is random)
        self.mlm_head = MaskedLMHead(cfg)
        # Tied, as in BERT: the matrix that reads tokens in also scores them out.
        self.mlm_head.decoder.weight = self.embeddings.tokens.weight
        self.apply(self._init_weights)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S] long
        token_type_ids: torch.Tensor,  # [B, S] long, 0 = sentence A, 1 = sentence B
        attention_mask: torch.Tensor | None,  # [B, S], 1 = real token, 0 = padding; None: none
        masked_positions: torch.Tensor | None = None,  # [B, K] long, positions to predict
        packing: "Packing | None" = None,  # several pairs per row (see Packing)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mlm_logits [B, K, V] or [B, S, V] if masked_positions is None, nsp_logits
        [B, 2], or [B, P, 2] with packing: one per pair)."""
        cls = None if packing is None else packing.cls_positions
        # The heads read [CLS] and the masked slots only: the last layer computes just those
        # (see the module docstring), so the transform and the vocabulary projection run on
        # B*K rows instead of B*S too.
        read = None
        if masked_positions is not None:
            if cls is None:
                cls = torch.zeros_like(masked_positions[:, :1])  # [CLS] opens the row
            read = torch.cat([cls, masked_positions], 1)
        x = self.encode(input_ids, token_type_ids, attention_mask, packing, read)

        if read is None:  # every position was computed
            pairs = (x[:, :1] if packing is None
                     else gather_positions(x, packing.cls_positions))
            mlm_logits = self.mlm_head(x)
        else:  # the last layer computed the [CLS] positions first, then the masked slots
            pairs, mlm_logits = x[:, :cls.shape[1]], self.mlm_head(x[:, cls.shape[1]:])
        nsp_logits = self.nsp_head(torch.tanh(self.pooler(pairs)))
        return mlm_logits, (nsp_logits[:, 0] if packing is None else nsp_logits)

    def token_logits(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, S, V]: the MLM head at every position (fill-mask)."""
        return self(input_ids, token_type_ids, attention_mask)[0]


class BertForMaskedLM(Encoder):
    """BERT with the MLM head only, as Hugging Face's `BertForMaskedLM` (no pooler, no pair
    classifier): the network of the `mlm` objective (RoBERTa's recipe on BERT's architecture)."""

    HEADS = ("mlm_head",)

    def __init__(self, cfg: ModelConfig, checkpoint_activations: bool | None = None):
        super().__init__(cfg, checkpoint_activations)
        self.mlm_head = MaskedLMHead(cfg)
        self.mlm_head.decoder.weight = self.embeddings.tokens.weight  # tied, as in BERT
        self.apply(self._init_weights)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                attention_mask: torch.Tensor | None,
                masked_positions: torch.Tensor | None = None,
                packing: "Packing | None" = None) -> torch.Tensor:
        """mlm_logits [B, K, V] at `masked_positions`, or [B, S, V] when it is None. Only the
        masked slots are read, so the last layer computes just those."""
        x = self.encode(input_ids, token_type_ids, attention_mask, packing, masked_positions)
        return self.mlm_head(x)

    def token_logits(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, S, V]: the MLM head at every position (fill-mask)."""
        return self(input_ids, token_type_ids, attention_mask)


def masked_lm_loss(mlm_logits: torch.Tensor, mlm_labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean MLM cross entropy over the labelled positions, its accuracy and count (0-dim
    tensors), in float32 (log-softmax over a 30k vocabulary in bf16 loses most of its
    precision). A micro-batch with no labelled position gives loss 0, never NaN."""
    mlm_logits = mlm_logits.float().flatten(0, -2)
    mlm_labels = mlm_labels.flatten()
    mlm_valid = mlm_labels != IGNORE_INDEX
    mlm_count = mlm_valid.sum()
    mlm_denominator = mlm_count.clamp(min=1)
    mlm_loss = F.cross_entropy(mlm_logits, mlm_labels, ignore_index=IGNORE_INDEX,
                               reduction="sum") / mlm_denominator
    mlm_correct = ((mlm_logits.argmax(-1) == mlm_labels) & mlm_valid).sum()
    return {"mlm_loss": mlm_loss, "mlm_acc": mlm_correct / mlm_denominator,
            "mlm_count": mlm_count}


def pretraining_loss(
    mlm_logits: torch.Tensor,  # [B, K, V] (or [B, S, V])
    mlm_labels: torch.Tensor,  # [B, K] (or [B, S]), IGNORE_INDEX where nothing is predicted
    nsp_logits: torch.Tensor,  # [B, 2] ([B, P, 2]: a packed row's pairs)
    nsp_labels: torch.Tensor,  # [B] ([B, P]), 0 = B follows A, 1 = random (IGNORE_INDEX allowed)
) -> dict[str, torch.Tensor]:
    """Loss = mean MLM cross entropy + mean cross entropy of the pair classifier (NSP, or
    sentence order: the labels say which), plus metrics, all 0-dim tensors.

    Nothing here calls .item(): the training loop decides when to pay for a host sync.
    Sums are divided by clamped counts so that a micro-batch with no labelled position gives
    loss 0 (and zero gradient), never NaN.
    """
    mlm = masked_lm_loss(mlm_logits, mlm_labels)
    nsp_logits = nsp_logits.float().flatten(0, -2)  # [B, 2], or [B, P, 2] packed
    nsp_labels = nsp_labels.flatten()
    nsp_valid = nsp_labels != IGNORE_INDEX
    nsp_denominator = nsp_valid.sum().clamp(min=1)
    nsp_loss = F.cross_entropy(nsp_logits, nsp_labels, ignore_index=IGNORE_INDEX,
                               reduction="sum") / nsp_denominator
    nsp_correct = ((nsp_logits.argmax(-1) == nsp_labels) & nsp_valid).sum()

    return {
        "loss": mlm["mlm_loss"] + nsp_loss,
        "mlm_loss": mlm["mlm_loss"],
        "nsp_loss": nsp_loss,
        "mlm_acc": mlm["mlm_acc"],
        "nsp_acc": nsp_correct / nsp_denominator,
        "mlm_count": mlm["mlm_count"],
    }


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: weight decay on matrices, none on biases and LayerNorm parameters.

    As in BERT: decaying a LayerNorm gain pulls it toward 0 (not toward its identity value 1),
    and decaying biases only fights the data. Embedding matrices are decayed like any matrix.
    The tied embedding/decoder matrix appears once (named_parameters skips duplicates).
    """
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in no_decay_ids or name.endswith("bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def num_parameters(model: nn.Module) -> int:
    """Distinct parameters (the tied embedding/decoder matrix counts once, as in HF)."""
    return sum(p.numel() for p in model.parameters())
