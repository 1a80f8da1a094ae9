"""Fill masks with a trained model on one process, as `pipeline("fill-mask")` does."""

from __future__ import annotations

import torch

from mlm_dist.errors import UsageError
from mlm_dist.model import Encoder
from mlm_dist.tokenizer import Tokenizer


@torch.no_grad()
def fill_mask(model: Encoder, tokenizer: Tokenizer, text: str,
              top_k: int = 5) -> list[list[dict]]:
    """For each [MASK] in `text`, the top-k (token, probability) completions. `model`: the
    network of any objective (its MLM head, `token_logits`)."""
    ids = [tokenizer.cls_id] + tokenizer.encode(text, parse_mask=True) + [tokenizer.sep_id]
    if tokenizer.mask_id not in ids:
        raise UsageError(f"fill-mask: no [MASK] in {text!r}")
    input_ids = torch.tensor([ids])
    positions = (input_ids[0] == tokenizer.mask_id).nonzero().view(1, -1)
    token_logits = model.token_logits(input_ids, torch.zeros_like(input_ids),
                                      torch.ones_like(input_ids))
    probs = token_logits[0, positions[0]].float().softmax(-1)
    results = []
    for row in probs:
        p, idx = row.topk(top_k)
        results.append([{"token": tokenizer.id_to_piece(i), "prob": round(float(q), 4)}
                        for q, i in zip(p, idx)])
    return results
