"""mlm_dist: pretrain BERT-style encoders (BERT's MLM + NSP, RoBERTa's full-row MLM, ALBERT's
SOP) with DeepSpeed ZeRO over WebDataset shards."""

__version__ = "0.1.0"
