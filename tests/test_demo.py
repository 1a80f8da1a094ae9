"""`mlm-dist demo`, the README's main job, end to end at a few steps, as a user runs it: from an
installed copy of the package, in a directory of their own."""

import re
import shutil
import subprocess
import sys

from launch import REPO, env


def pip_install(target) -> None:
    """The package as pip installs it from the checkout. pip builds in the source tree, so it
    builds a copy: no build/ left in the checkout, whose stale files would end up in wheels."""
    src = target.parent / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".*", "build", "runs", "tests", "*.egg-info", "__pycache__"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
           "--no-build-isolation", "--target", str(target), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_demo_runs_every_stage_from_a_wheel_and_shows_what_was_learned(tmp_path):
    site, home = tmp_path / "site", tmp_path / "home"
    pip_install(site)
    home.mkdir()
    # The installed copy only: first on the path of the demo and of the ranks it launches.
    proc = subprocess.run([sys.executable, "-m", "mlm_dist", "demo", "--steps", "30"],
                          env={**env(), "PYTHONPATH": str(site)}, cwd=home,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{proc.stderr[-3000:]}"
    assert f"--config {site / 'mlm_dist' / 'demo' / 'tiny.yaml'} " in out  # package data
    for stage in ("[1/5] corpus", "[2/5] tokenizer", "[3/5] shards", "[4/5] pretraining",
                  "[5/5] exported"):
        assert stage in out, out
    before, after = map(float, re.search(
        r"validation perplexity ([\d.]+) \(initial weights\) -> ([\d.]+) \(trained\)", out).groups())
    assert after < 0.5 * before  # held-out text, not the training loss
    assert out.count("    -> ") == 3  # fill-mask answers for the three prompts
    assert (home / "runs" / "demo" / "hf").is_dir()  # the default --out, under the user's cwd
