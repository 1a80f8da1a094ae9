# `python -m mlm_dist …` and `deepspeed --module mlm_dist …` land here.
from mlm_dist.cli import main

main()
