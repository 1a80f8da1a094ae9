"""Multi-node launch with deepspeed over a hostfile (`mlm-dist launch`: mlm_dist/launch/multinode.py,
launcher/).

The checks and the generated files are tested directly; one test starts a real sshd on
loopback and launches 2 ranks on 2 "hosts" (localhost, 127.0.0.2) through deepspeed and pdsh."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from types import SimpleNamespace
from pathlib import Path

import pytest

from cluster import SshServer, running
from launch import REPO, TINY, TINY_OVERRIDES, env as launch_env, free_port, metrics
from mlm_dist import cli
from mlm_dist.launch import multinode as hostfile

SCRIPT = REPO / "launcher" / "deepspeed_multinode.sh"


def launch(argv: list[str]) -> int:
    """The exit code of `mlm-dist launch ARGV` (0 when it returns)."""
    try:
        cli.main(["launch", *argv])
    except SystemExit as stop:
        return stop.code
    return 0


def run_main(tmp_path, text: str | None, *options: str, overrides=()):
    """The arguments of `mlm-dist launch --dry-run` with a hostfile of `text` (None: no file);
    (argv, out_dir)."""
    path = tmp_path / "hostfile"
    if text is not None:
        path.write_text(text)
    out_dir = tmp_path / "run"
    argv = [*options, "--dry-run", str(path), str(TINY), "data.shards=/nowhere",
            f"out_dir={out_dir}", *TINY_OVERRIDES, *overrides]
    return argv, out_dir


def test_hostfile_with_comments_and_blank_lines(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# cluster\n\nnode-1 slots=8   # first\n  10.0.0.7\tslots=4\n")
    assert hostfile.parse_hostfile(path) == [hostfile.Host("node-1", 8, 3),
                                             hostfile.Host("10.0.0.7", 4, 4)]


@pytest.mark.parametrize("text, options, message", [
    (None, [], "hostfile {path} does not exist"),
    ("node-1\n", [], "{path}, line 1: expected `host slots=N`, found 'node-1'"),
    ("node-1 slots=4 gpu\n", [], "line 1: expected `host slots=N`"),
    ("node-1 slots=\n", [], "line 1: slots must be a whole number, found slots=''"),
    ("node-1 slots=four\n", [], "slots must be a whole number, found slots='four'"),
    ("node-1 slots=2\nnode-2 slots=0\n", [], "line 2: host node-2 has slots=0"),
    ("a slots=1\nb slots=1\na slots=1\n", [], "line 3: host a is already listed on line 1"),
    ("\n  \n# nothing\n", [], "hostfile {path} lists no hosts"),
    ("node;rm slots=1\n", [], "'node;rm' is not a host name"),
    ("$(reboot) slots=1\n", [], "'$(reboot)' is not a host name"),
    ("a slots=2\nb slots=2\n", ["--nodes", "3"],
     "--nodes 3 does not match {path}, which lists 2 hosts (a, b)"),
    ("a slots=2\nb slots=2\n", ["--gpus-per-node", "0"], "--gpus-per-node must be at least 1"),
    ("a slots=2\nb slots=1\n", ["--gpus-per-node", "2"],
     "--gpus-per-node 2 is more than host b's slots=1 in {path}, line 2"),
    # the run config is checked for the number of ranks before any node is touched
    ("a slots=1\nb slots=1\nc slots=1\n", [], "is not divisible by micro_batch × ranks"),
    ("a slots=1\nb slots=1\n", ["--env", "NCCL_SOCKET_IFNAME=$(id)"],
     "environment variable NCCL_SOCKET_IFNAME contains '$'"),
    ("a slots=1\nb slots=1\n", ["--env", "BAD-NAME=1"], "'BAD-NAME' is not a valid name"),
    ("a slots=1\nb slots=1\n", ["--env", "NO_VALUE"], "--env 'NO_VALUE': expected KEY=VALUE"),
])
def test_every_mistake_is_one_clear_error_before_anything_starts(tmp_path, capsys, monkeypatch,
                                                                 text, options, message):
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("launched"))
    argv, out_dir = run_main(tmp_path, text, *options)
    assert launch(argv) == 2
    err = capsys.readouterr().err
    assert message.format(path=tmp_path / "hostfile") in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out_dir.exists()


def test_dry_run_shows_hostfile_environment_and_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")
    monkeypatch.setenv("HF_HOME", "/shared/hf home")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    argv, out_dir = run_main(tmp_path, "node-1 slots=8 # a\nnode-2 slots=8\n", "--nodes", "2",
                             "--gpus-per-node", "1", "--ssh-port", "2222", "--env", "MLM_X=100%")
    assert launch(argv) == 0
    out, err = capsys.readouterr()
    # the CPU image sets DS_ACCELERATOR=cpu: said aloud, since GPU nodes would train on CPU
    assert err == ("mlm-dist launch: every rank gets DS_ACCELERATOR=cpu from this "
                   "environment and trains on the CPU; unset it to train on GPUs\n")
    assert "node-1 slots=8\nnode-2 slots=8\n" in out
    env = dict(line.split("=", 1) for line in out.split(f"# {out_dir}/launch/deepspeed_env\n")[1]
               .split("# command")[0].splitlines())
    assert env["DS_ACCELERATOR"] == "cpu" and env["NCCL_SOCKET_IFNAME"] == "ib0"
    assert env["GLOO_SOCKET_IFNAME"] == "eth0" and env["HF_HOME"] == "/shared/hf home"
    assert env["MLM_X"] == "100%%"  # pdsh turns %% back into %
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert "UNRELATED_SECRET" not in env
    command = shlex.split(out.split("# command (2 ranks)\n")[1])
    assert command[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    assert ["--master_addr", "node-1"] == command[command.index("--master_addr"):][:2]
    assert ["--ssh_port", "2222"] == command[command.index("--ssh_port"):][:2]
    assert ["--num_gpus", "1"] == command[command.index("--num_gpus"):][:2]
    assert not out_dir.exists()  # a dry run writes nothing


def test_arguments_and_environment_reach_the_remote_ranks_literally(tmp_path, monkeypatch):
    """Build the per-node command with deepspeed's own pdsh runner, apply pdsh's %-substitution
    and run it through a shell as ssh would: every value arrives unchanged."""
    from deepspeed.launcher.multinode_runner import PDSHRunner
    from deepspeed.launcher.runner import parse_args

    nasty = ["out_dir=/tmp/a b $(touch pwned) `id` \"q\" 'q' \\ %n %% ;&|<>*?~ #c",
             "data.shards=x$HOME'%h'", "optim.lr=1e-3", "model.name=tab\there"]
    env_value = "lib dir/with 'quote' and 50% {braces} & semi;colon"
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("HF_HOME", env_value)
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser().parse_args(
        ["launch", "--env", "NCCL_DEBUG=INFO", str(tmp_path / "hostfile"), str(TINY), *nasty])
    (tmp_path / "hostfile").write_text("localhost slots=1\n127.0.0.2 slots=1\n")
    # The nasty values are no valid config: skip the pre-flight, keep the out_dir it returns.
    monkeypatch.setattr("mlm_dist.training.preflight.launch_preflight",
                        lambda *a: SimpleNamespace(out_dir=str(tmp_path / "run")))
    launch = hostfile.plan(args)

    # a stand-in for the Python that deepspeed starts on the node: it records what it got
    record = tmp_path / "record.json"
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, "
                    f"open({str(record)!r}, 'w'))\n")
    fake.chmod(0o755)
    ds_args = parse_args(launch.command[4:])
    runner = PDSHRunner(ds_args, "WORLD")
    for line in launch.env_text.splitlines():  # as deepspeed reads DS_ENV_FILE
        key, val = line.split("=", maxsplit=1)
        runner.add_export(key, val)
    monkeypatch.setattr(sys, "executable", str(fake))
    cmd, _, _ = runner.get_cmd(dict(os.environ), {"localhost": [0], "127.0.0.2": [0]})
    remote = cmd[cmd.index("-w") + 2:]
    substitute = {"n": "1", "h": "127.0.0.2", "u": "root", "%": "%"}  # what pdsh does
    shell_line = " ".join(re.sub(r"%(.)", lambda m: substitute[m.group(1)], a) for a in remote)
    subprocess.run(["sh", "-c", shell_line], check=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})

    got = json.loads(record.read_text())
    assert "--node_rank=1" in got["argv"]
    assert got["argv"][got["argv"].index("mlm_dist") + 1:] == [
        "train", "--config", str(TINY.absolute()), *nasty]
    assert got["env"]["HF_HOME"] == env_value and got["env"]["NCCL_DEBUG"] == "INFO"
    assert got["env"]["DS_ACCELERATOR"] == "cpu"
    assert got["env"]["PATH"].split(":")[0] == str(Path(args.python).parent)
    assert not (tmp_path / "pwned").exists()


def test_a_working_directory_deepspeed_cannot_quote_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "my runs").mkdir()
    monkeypatch.chdir(tmp_path / "my runs")
    argv, out_dir = run_main(tmp_path, "a slots=1\nb slots=1\n")
    assert launch(argv) == 2
    assert "the working directory" in capsys.readouterr().err


def test_env_values_the_remote_shell_would_expand_are_refused():
    for value in ["$HOME", "`id`", 'say "hi"', "back\\slash", "two\nlines"]:
        with pytest.raises(hostfile.LaunchError, match="HF_HOME"):
            hostfile.forwarded_env({"HF_HOME": value})


def test_arguments_with_a_newline_are_refused_for_remote_nodes():
    with pytest.raises(hostfile.LaunchError, match="contains a newline"):
        hostfile.remote_arg("out_dir=a\nb")


def test_single_host_launch_passes_arguments_unquoted(tmp_path):
    # one host: deepspeed starts the ranks locally, without a shell, so no quoting is added
    cmd = hostfile.deepspeed_command(Path("h"), "c.yaml", ["out_dir=a b$"], master_addr="x",
                                     master_port=1, ssh_port=None, gpus_per_node=None,
                                     multi_node=False)
    assert cmd[-1] == "out_dir=a b$"


def test_thin_script_runs_the_python_launcher(tmp_path):
    env = dict(launch_env(), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run([str(SCRIPT), str(tmp_path / "absent"), str(TINY)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"hostfile {tmp_path / 'absent'} does not exist" in proc.stderr
    proc = subprocess.run([str(SCRIPT), "--help"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "--gpus-per-node" in proc.stdout


# ---------------------------------------------------------------------------------------------
# The real thing: sshd on loopback, deepspeed -> pdsh -> ssh -> 2 "hosts"

@pytest.fixture(scope="module")
def ssh_server():
    with running(SshServer, "mlm-sshd-", ("sshd", "ssh", "ssh-keygen", "pdsh")) as server:
        yield server


def test_two_hosts_over_ssh_train_with_zero_and_save_a_shard_each(ssh_server, tiny_shards,
                                                                  tmp_path):
    hosts = tmp_path / "hostfile"
    hosts.write_text("".join(f"{h} slots=1\n" for h in ssh_server.hosts))
    # an out_dir a shell would mangle: it must reach the remote rank literally
    run = tmp_path / "run $(touch pwned) 'q' %n"
    env = ssh_server.env(launch_env())
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    cmd = [str(SCRIPT), "--nodes", "2", "--ssh-port", str(ssh_server.port),
           "--master-port", str(free_port()), "--env", "GLOO_SOCKET_IFNAME=lo",
           str(hosts), str(TINY), f"data.shards={tiny_shards}", f"out_dir={run}",
           *TINY_OVERRIDES, "schedule.phases.0.until_step=10", "train.zero_stage=2"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    # deepspeed went through pdsh, with our environment exported on every node
    pdsh = next(line for line in out.splitlines() if "cmd = pdsh" in line)
    assert "-w localhost,127.0.0.2" in pdsh
    assert "export DS_ACCELERATOR=cpu;" in pdsh and "export GLOO_SOCKET_IFNAME=lo;" in pdsh
    assert f"export PATH={Path(sys.executable).parent}:" in pdsh
    assert "localhost: " in out and "127.0.0.2: " in out  # pdsh's per-host prefixes
    assert re.search(r"127\.0\.0\.2: .*node_rank=1", out)
    assert not (REPO / "pwned").exists() and not (tmp_path / "pwned").exists()
    assert metrics(run)[-1]["step"] == 10
    tag = run / "checkpoints" / "step_00000010"
    shards = sorted(p.name for p in tag.glob("*zero_pp_rank_*optim_states.pt"))
    assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1], shards
    assert (run / "launch" / "hostfile").read_text() == hosts.read_text()
    assert "GLOO_SOCKET_IFNAME=lo" in (run / "launch" / "deepspeed_env").read_text()
