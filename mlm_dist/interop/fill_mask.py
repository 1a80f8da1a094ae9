"""Using a trained checkpoint on one process: consolidate its shards, fill masks."""

from __future__ import annotations

from pathlib import Path

import torch

from mlm_dist.training import checkpoint
from mlm_dist.config import RunConfig
from mlm_dist.model import BertForPretraining
from mlm_dist.tokenizer import Tokenizer


def load_checkpoint(path: str | Path) -> tuple[BertForPretraining, RunConfig, Path]:
    """(fp32 model in eval mode, the run's config, directory holding tokenizer.model)."""
    from mlm_dist.engine import consolidated_state_dict  # imports deepspeed: only when needed

    root, tag = checkpoint.locate(path)
    cfg = checkpoint.checkpoint_config(root, tag)
    model = BertForPretraining(cfg.model)
    state = consolidated_state_dict(str(root), tag, model)
    state.setdefault("mlm_head.decoder.weight", state["embeddings.tokens.weight"])  # tied
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {root / tag} does not match the model in its config: "
                         f"missing {missing}, unexpected {unexpected}")
    return model.eval(), cfg, root / tag


@torch.no_grad()
def fill_mask(model: BertForPretraining, tokenizer: Tokenizer, text: str,
              top_k: int = 5) -> list[list[dict]]:
    """For each [MASK] in `text`, the top-k (token, probability) completions."""
    ids = [tokenizer.cls_id] + tokenizer.encode(text, parse_mask=True) + [tokenizer.sep_id]
    if tokenizer.mask_id not in ids:
        raise ValueError(f"fill-mask: no [MASK] in {text!r}")
    input_ids = torch.tensor([ids])
    positions = (input_ids[0] == tokenizer.mask_id).nonzero().view(1, -1)
    mlm_logits, _ = model(input_ids, torch.zeros_like(input_ids), torch.ones_like(input_ids),
                          positions)
    probs = mlm_logits.float().softmax(-1)[0]
    results = []
    for row in probs:
        p, idx = row.topk(top_k)
        results.append([{"token": tokenizer.id_to_piece(i), "prob": round(float(q), 4)}
                        for q, i in zip(p, idx)])
    return results
