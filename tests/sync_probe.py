"""Run by test_step_syncs under the deepspeed launcher (2 ranks): mlm_dist.bench.syncs, the
counter `mlm-dist bench gpu` runs, on the tiny config with the overrides in argv. Each rank
writes OUT.rank<r>.json (see mlm_dist/bench/syncs.py)."""

import sys
from pathlib import Path

from mlm_dist.bench.syncs import main

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"

if __name__ == "__main__":
    out, *overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main([out, "--config", str(TINY), *overrides])
