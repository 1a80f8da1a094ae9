"""Carrying models to and from Hugging Face, one concern a module: bert_names.py (the parameter
table, state dicts both ways), hf_tokenizer.py (our SentencePiece model as a fast tokenizer),
export.py (a run as a folder), init_from.py (a folder as the start of a run), electra.py
(ELECTRA's two folders), fill_mask.py (as `pipeline("fill-mask")`). Their one error is here,
where each can import it."""

from mlm_dist.errors import UserError


class ModelFolderError(UserError, ValueError):
    """A model or tokenizer that cannot be carried to or from Hugging Face: a folder that is not
    a BERT this run can continue, weights that do not fit, a tokenizer export cannot write."""
