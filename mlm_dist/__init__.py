"""mlm_dist: pretrain BERT-style encoders (MLM + NSP) with DeepSpeed ZeRO over WebDataset shards."""

__version__ = "0.1.0"
