"""The command line is glue: it parses without importing the heavy stack, a user's mistake
ends in one line, and a bug shows its traceback."""

import subprocess
import sys

import numpy as np
import pytest

from launch import REPO, env
from mlm_dist import cli, flops
from mlm_dist.commands import checkpoint
from mlm_dist.errors import UsageError, UserError


def test_building_the_parser_imports_nothing_heavy():
    probe = ("import sys; from mlm_dist.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('torch', 'deepspeed', 'sentencepiece', 'transformers', "
             "'webdataset', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], env=env(), cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("command", [["train"], ["bench", "train"], ["bench", "gpu"], ["launch"],
                                     ["slurm"], ["consolidate"], ["demo"]])
def test_a_commands_help_imports_no_torch(command):
    """Only the command asked for brings its options, and they need neither torch nor DeepSpeed."""
    probe = ("import contextlib, io, sys; from mlm_dist.cli import build_parser\n"
             "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
             f"    build_parser().parse_args({command + ['--help']!r})\n"
             "print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], env=env(), cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_a_users_mistake_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--config", str(tmp_path / "missing.yaml")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.yaml" in err and "Traceback" not in err


def test_a_bug_shows_its_traceback(monkeypatch):
    def broken(args):
        np.zeros(2).reshape(3)  # a ValueError raised inside numpy, not by one of our checks

    monkeypatch.setattr(checkpoint, "consolidate", broken)
    with pytest.raises(ValueError, match="reshape"):
        cli.main(["consolidate", "--checkpoint", "x", "--out", "y"])


def test_a_user_error_raised_anywhere_is_one_line(monkeypatch, capsys):
    # The rule is the exception's type, not where it was raised: here a library (sorted) calls
    # the code that raises, and the raising line is a generator's throw, not a `raise`.
    def check(value):
        (_ for _ in ()).throw(UsageError(f"--out {value} already exists; choose another path"))

    monkeypatch.setattr(checkpoint, "consolidate", lambda args: sorted([args.out, "z"], key=check))
    with pytest.raises(SystemExit) as stop:
        cli.main(["consolidate", "--checkpoint", "x", "--out", "y"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("mlm-dist consolidate: error: --out y already exists; "
                                       "choose another path\n")


def test_a_plain_value_error_of_ours_shows_its_traceback(monkeypatch):
    # An internal check (a bug if it fires) raises the builtin: not one line, but the traceback.
    monkeypatch.setattr(checkpoint, "consolidate", lambda args: flops._check_share("share", 2.0))
    with pytest.raises(ValueError, match=r"share must be in \[0, 1\]") as raised:
        cli.main(["consolidate", "--checkpoint", "x", "--out", "y"])
    assert not isinstance(raised.value, UserError)
