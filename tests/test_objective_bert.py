"""`objective.name=bert` (the default) computes what it computed before the objective seam,
bit for bit: the same loss at every step and the same evaluation figures on a fixed run."""

import pytest

from launch import records, train

# Two phases (32 then 64 tokens, another batch shape), dropout on, evaluation at steps 4 and 8.
FIXED_RUN = ["schedule.phases=[{seq_len: 32, micro_batch: 8, global_batch: 16, until_step: 4},"
             " {seq_len: 64, micro_batch: 4, global_batch: 16, until_step: 8}]",
             "train.log_every=1", "model.dropout=0.1", "model.attention_dropout=0.1",
             "eval.every=4", "eval.max_pairs=40"]
VARIANTS = {"pairs": ["train.zero_stage=2"], "packed": ["train.zero_stage=1", "data.pack=true"]}
VAL_KEYS = ("val/mlm_loss", "val/mlm_acc", "val/nsp_loss", "val/nsp_acc", "val/mask_rate",
            "val/sequences", "val/predictions")


def fixed_run(tiny_shards, out, variant: str) -> dict:
    """The loss of every step and the evaluation figures of the fixed run."""
    train(tiny_shards, out, *FIXED_RUN, *VARIANTS[variant])
    rows = records(out)
    return {"loss": [r["train/loss"] for r in rows if "train/loss" in r],
            "nsp_loss": [r["train/nsp_loss"] for r in rows if "train/loss" in r],
            "eval": [[r[k] for k in VAL_KEYS] for r in rows if "val/mlm_loss" in r]}


# Produced by the code before the seam (commit da840b3), 2 ranks, OMP_NUM_THREADS=1
# (tests/launch.py's env), by this test itself, which prints what it measures (run first with
# an empty REFERENCES):
#   git worktree add /tmp/old-K da840b3 && cp tests/test_objective_bert.py /tmp/old-K/tests/
#   cd /tmp/old-K && PYTHONPATH=/tmp/old-K .venv/bin/python -m pytest -q -s \
#       tests/test_objective_bert.py
# One set per kind of CPU: another CPU's vector kernels round differently (e.g. on one with
# AVX-512 BF16, oneDNN computes bf16 matmuls natively; the numbers then differ from the 6th
# digit). A run must equal one set exactly; on a new kind of CPU, record its set the same way.
REFERENCES = {
    "the first CI machine": {
        "pairs": {
            "loss": [
                7.073249816894531, 7.11311149597168, 7.060063362121582, 6.974796772003174,
                6.994233131408691, 6.96437406539917, 6.903026580810547, 6.849164962768555
            ],
            "nsp_loss": [
                0.6881053447723389, 0.6945229768753052, 0.6692138910293579, 0.6599099636077881,
                0.6697317361831665, 0.688377857208252, 0.6632110476493835, 0.6351801156997681
            ],
            "eval": [
                [6.304811750139509, 0.012422360248447204, 0.6647252263249578, 0.6486486486486487,
                 0.152317880794702, 37.0, 161.0],
                [6.219098218282064, 0.0375, 0.6134910769760609, 0.71875,
                 0.15065913370998116, 32.0, 240.0],
            ],
        },
        "packed": {
            "loss": [
                7.073249816894531, 7.11311149597168, 7.060063362121582, 6.974796772003174,
                6.992317199707031, 6.943399906158447, 6.887139320373535, 6.915295124053955
            ],
            "nsp_loss": [
                0.6881053447723389, 0.6945229768753052, 0.6692138910293579, 0.6599099636077881,
                0.6714378595352173, 0.6786137819290161, 0.6615616083145142, 0.661976158618927
            ],
            "eval": [
                [6.304811750139509, 0.012422360248447204, 0.6647252263249578, 0.6486486486486487,
                 0.152317880794702, 37.0, 161.0],
                [6.219839604695638, 0.0375, 0.6129002869129181, 0.71875,
                 0.15065913370998116, 32.0, 240.0],
            ],
        },
    },
    "AMD EPYC with AVX-512 BF16 (recorded 2026-12-07)": {
        "pairs": {
            "loss": [
                7.073246002197266, 7.113055229187012, 7.060079574584961, 6.974753379821777,
                6.994183540344238, 6.964224815368652, 6.903081893920898, 6.849147319793701
            ],
            "nsp_loss": [
                0.6881053447723389, 0.6945195198059082, 0.6692246198654175, 0.6598936319351196,
                0.6697317361831665, 0.6883878707885742, 0.6631870865821838, 0.6351895332336426
            ],
            "eval": [
                [6.304865487614033, 0.012422360248447204, 0.6647399825018805, 0.6486486486486487,
                 0.152317880794702, 37.0, 161.0],
                [6.219015566507975, 0.0375, 0.6134491488337517, 0.71875,
                 0.15065913370998116, 32.0, 240.0],
            ],
        },
        "packed": {
            "loss": [
                7.073246002197266, 7.113055229187012, 7.060079574584961, 6.974753379821777,
                6.992285251617432, 6.9433794021606445, 6.887063503265381, 6.915302276611328
            ],
            "nsp_loss": [
                0.6881053447723389, 0.6945195198059082, 0.6692246198654175, 0.6598936319351196,
                0.6714344024658203, 0.6785780191421509, 0.6615855693817139, 0.6619330644607544
            ],
            "eval": [
                [6.304865487614033, 0.012422360248447204, 0.6647399825018805, 0.6486486486486487,
                 0.152317880794702, 37.0, 161.0],
                [6.219793510437012, 0.0375, 0.6129012703895569, 0.71875,
                 0.15065913370998116, 32.0, 240.0],
            ],
        },
    },
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bert_repeats_the_numbers_from_before_the_seam(tiny_shards, tmp_path, variant):
    import json

    measured = fixed_run(tiny_shards, tmp_path / variant, variant)
    print(json.dumps({variant: measured}))
    # exactly: the same arithmetic in the same order, as on one of the CPUs recorded
    assert any(measured == numbers[variant] for numbers in REFERENCES.values()), (
        f"{variant}: none of {list(REFERENCES)} (or a CPU not recorded yet: see above)")
