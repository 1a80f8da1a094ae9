"""`mlm-dist slurm`: the generated sbatch script, checked as text, run under bash with stand-ins
for srun/scontrol, and submitted to a real one-node Slurm (munged, slurmctld, slurmd started by
the tests, with stand-in GPUs): a 2-task training job, then a job interrupted by the warning
signal, requeued and finished from its checkpoint; and the GPUs and CPUs each task gets."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cluster import SlurmCluster, running
from launch import REPO, TINY, TINY_OVERRIDES, env as launch_env, metrics
from mlm_dist.launch import slurm
from mlm_dist.cli import main

NASTY = "it's \"odd\" $(touch pwned) `touch pwned` ; #1 \\ %x end"


def generate(tmp_path, *options: str, overrides=()) -> str:
    out = tmp_path / "job.sbatch"
    main(["slurm", "--config", str(TINY), "--out-script", str(out), *options,
          "data.shards=/shared/shards", *TINY_OVERRIDES, *overrides])
    return out.read_text()


def sbatch_directives(script: str) -> list[str]:
    """The options sbatch reads from `#SBATCH` lines, tokenized as sbatch does (src/sbatch/
    opt.c, _get_argument): quotes group, a backslash escapes the next character, an unquoted
    `#` ends the line."""
    options = []
    for line in script.splitlines():
        if not line.startswith("#SBATCH"):
            continue
        rest, token, quote, escape, i = line[len("#SBATCH"):], "", None, False, 0
        tokens = []
        while i < len(rest):
            c = rest[i]
            i += 1
            if escape:
                token += c
                escape = False
            elif c == "\\":
                escape = True
            elif quote:
                if c == quote:
                    quote = None
                else:
                    token += c
            elif c in "\"'":
                quote = c
            elif c == "#":
                break
            elif c.isspace():
                if token:
                    tokens.append(token)
                token = ""
            else:
                token += c
        tokens += [token] if token else []
        options += tokens
    return options


def test_gpu_script_asks_for_gpus_signal_and_requeue(tmp_path):
    text = generate(tmp_path, "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu",
                    "--time", "2-00:00:00", "--account", "proj", "--signal-seconds", "600",
                    "--cpus-per-task", "6", "--sbatch-opt=--mem=0",
                    overrides=["train.zero_stage=3", "schedule.phases.0.micro_batch=1"])
    assert text.startswith("#!/bin/bash\n")
    options = sbatch_directives(text)
    for option in ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu",
                   "--time=2-00:00:00", "--account=proj", "--cpus-per-task=6",
                   "--signal=B:USR1@600", "--requeue", "--open-mode=append", "--mem=0",
                   f"--chdir={Path.cwd()}"]:
        assert option in options, (option, options)
    assert "DS_ACCELERATOR" not in text
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0


def test_every_task_sees_its_node_gpus_or_only_its_own(tmp_path):
    node = sbatch_directives(generate(tmp_path, "--nodes", "2", "--gpus-per-node", "8",
                                      overrides=["schedule.phases.0.micro_batch=1"]))
    assert "--gpus-per-node=8" in node and not [o for o in node if "gpus-per-task" in o]
    bound = sbatch_directives(generate(tmp_path, "--nodes", "2", "--gpus-per-node", "8",
                                       "--bind-gpus",
                                       overrides=["schedule.phases.0.micro_batch=1"]))
    for option in ["--ntasks-per-node=8", "--ntasks=16", "--gpus-per-task=1"]:
        assert option in bound, (option, bound)
    assert not [o for o in bound if o.startswith("--gpus-per-node")]


@pytest.mark.parametrize("options, cpus_on_node, expected", [
    ([], "48", "6"),  # the node's CPUs in the job, shared by its 8 ranks
    ([], "4", "1"),  # fewer CPUs than ranks: still one each
    (["--cpus-per-task", "3"], "48", "3"),  # the user's value
])
def test_each_rank_gets_its_share_of_the_node_cpus(tmp_path, options, cpus_on_node, expected):
    """srun gives a task one CPU unless told, and Slurm 22.05-23.02 srun takes the number only
    from SRUN_CPUS_PER_TASK."""
    generate(tmp_path, "--nodes", "1", "--gpus-per-node", "8", *options,
             overrides=["schedule.phases.0.micro_batch=1", "schedule.phases.0.global_batch=8"])
    proc = run_with_fakes(tmp_path, tmp_path / "job.sbatch", SLURM_CPUS_ON_NODE=cpus_on_node)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    env = dict(line.split("=", 1) for line in
               (tmp_path / "record" / "srun.env").read_text().splitlines() if "=" in line)
    assert env["SRUN_CPUS_PER_TASK"] == expected
    assert f", {expected} CPUs per rank" in out


def test_cpu_ranks_request_no_gpus(tmp_path):
    text = generate(tmp_path, "--nodes", "1", "--gpus-per-node", "2", "--cpu-ranks")
    options = sbatch_directives(text)
    assert "--ntasks-per-node=2" in options
    assert not [o for o in options if "gpu" in o]
    assert "export DS_ACCELERATOR=cpu" in text


FAKES = {
    # records its arguments (NUL-separated) and environment; on USR1 it stops like the ranks do
    "srun": """#!/bin/bash
printf '%s\\0' "$@" > "$RECORD/srun.args"
env > "$RECORD/srun.env"
if [ -n "${FAKE_SRUN_WAIT:-}" ]; then
  sleep 30 > /dev/null 2>&1 & nap=$!
  trap 'echo usr1 >> "$RECORD/srun.signals"; kill $nap; exit 0' USR1
  touch "$RECORD/srun.started"
  wait
fi
exit 0
""",
    "scontrol": """#!/bin/bash
echo "$*" >> "$RECORD/scontrol.calls"
if [ "$1 $2" = "show hostnames" ]; then printf 'node-a\\nnode-b\\n'; fi
""",
}


def run_with_fakes(tmp_path, script: Path, **env) -> subprocess.Popen:
    fakes = tmp_path / "fakes"
    fakes.mkdir(exist_ok=True)
    for name, text in FAKES.items():
        (fakes / name).write_text(text)
        (fakes / name).chmod(0o755)
    record = tmp_path / "record"
    record.mkdir(exist_ok=True)
    full_env = {"PATH": f"{fakes}:/usr/bin:/bin", "RECORD": str(record), "SLURM_JOB_ID": "123",
                "SLURM_JOB_NODELIST": "node-[a-b]", "RANK": "7", "WORLD_SIZE": "9", **env}
    return subprocess.Popen(["bash", str(script)], env=full_env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_nasty_values_stay_literal(tmp_path):
    nasty_dir = tmp_path / "out dir $(touch pwned)"
    overrides = [f"out_dir={nasty_dir} 'q' \"q\" `touch pwned` \\ %j", "optim.lr=1e-3",
                 "run.note=two\nlines $(touch pwned)"]
    # the run config itself is checked elsewhere; here only the quoting matters
    job = slurm.SlurmJob(config=str(TINY), nodes=2, gpus_per_node=1, cpu_ranks=True,
                         overrides=overrides, job_name=NASTY, partition="part $(x) 'y'",
                         account='acc "z"', output=f"{nasty_dir}/log %j.out",
                         chdir=str(nasty_dir), python=f"{sys.executable} -X utf8",
                         env={"NCCL_SOCKET_IFNAME": "$(touch pwned) 'a b'"})
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.sbatch_script(job))
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    options = sbatch_directives(script.read_text())
    for value in (f"--job-name={NASTY}", "--partition=part $(x) 'y'", '--account=acc "z"',
                  f"--output={nasty_dir}/log %j.out", f"--chdir={nasty_dir}"):
        assert value in options, (value, options)

    proc = run_with_fakes(tmp_path, script)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    args = (tmp_path / "record" / "srun.args").read_text().split("\0")[:-1]
    assert args == ["--kill-on-bad-exit=1", sys.executable, "-X", "utf8", "-m", "mlm_dist",
                    "train", "--config", str(TINY.absolute()), *overrides,
                    "checkpoint.resume=true"]
    env = dict(line.split("=", 1) for line in
               (tmp_path / "record" / "srun.env").read_text().splitlines() if "=" in line)
    assert env["NCCL_SOCKET_IFNAME"] == "$(touch pwned) 'a b'"
    assert env["MASTER_ADDR"] == "node-a" and env["MASTER_PORT"] == str(20000 + 123)
    assert env["DS_ACCELERATOR"] == "cpu"
    assert "RANK" not in env and "WORLD_SIZE" not in env  # ranks come from Slurm's variables
    assert not list(tmp_path.rglob("pwned"))
    assert "requeue" not in (tmp_path / "record" / "scontrol.calls").read_text()


def test_warning_signal_is_forwarded_then_the_job_requeued(tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.sbatch_script(slurm.SlurmJob(config=str(TINY), nodes=1,
                                                         gpus_per_node=2, cpu_ranks=True)))
    proc = run_with_fakes(tmp_path, script, FAKE_SRUN_WAIT="1")
    started = tmp_path / "record" / "srun.started"
    deadline = time.monotonic() + 30
    while not started.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what Slurm does with --signal=B:USR1@...
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert (tmp_path / "record" / "srun.signals").read_text() == "usr1\n"
    assert "requeue 123" in (tmp_path / "record" / "scontrol.calls").read_text()
    assert "USR1 received" in out and "requeueing job 123" in out


@pytest.mark.parametrize("options, overrides, message", [
    (["--nodes", "0", "--gpus-per-node", "8"], [], "--nodes must be at least 1, got 0"),
    (["--nodes", "2", "--gpus-per-node", "0"], [], "--gpus-per-node must be at least 1"),
    (["--job-name", "a\n#SBATCH --account=x"], [], "--job-name 'a\\n#SBATCH --account=x' "
                                                   "contains a line break"),
    (["--partition", "gpu\r"], [], "--partition 'gpu\\r' contains a line break"),
    (["--output", "/logs/\n%j"], [], "--output '/logs/\\n%j' contains a line break"),
    (["--time", "two days"], [], "--time 'two days' is not a Slurm time limit"),
    (["--time", "5", "--signal-seconds", "300"], [], "--signal-seconds 300 is not shorter than "
                                                     "--time 5 (300 s)"),
    (["--env", "A B=1"], [], "--env 'A B': not a valid environment variable name"),
    (["--env", "NO_VALUE"], [], "--env 'NO_VALUE': expected KEY=VALUE"),
    (["--bind-gpus"], [], "--bind-gpus gives each task one GPU, --cpu-ranks requests no GPUs"),
    (["--cpus-per-task", "0"], [], "--cpus-per-task must be at least 1, got 0"),
    ([], ["checkpoint.resume=false"], "always passes checkpoint.resume=true"),
    (["--nodes", "3"], [], "is not divisible by micro_batch × ranks"),
    (["--config", "/no/such.yaml"], [], "--config /no/such.yaml does not exist"),
])
def test_mistakes_are_one_clear_error_and_nothing_is_written(tmp_path, capsys, options,
                                                             overrides, message):
    # argparse keeps the last occurrence of an option: `options` override these defaults
    argv = ["slurm", "--config", str(TINY), "--nodes", "1", "--gpus-per-node", "2",
            "--cpu-ranks", "--out-script", str(tmp_path / "job.sbatch"), *options,
            "data.shards=/x", *TINY_OVERRIDES, *overrides]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.startswith("mlm-dist slurm: error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "job.sbatch").exists()


def test_a_run_with_checkpoints_can_be_submitted_again(tmp_path):
    """The ranks always resume, so the submit-time pre-flight accepts a run directory that
    already holds checkpoints (a resubmitted job continues its run)."""
    out_dir = tmp_path / "run"
    (out_dir / "checkpoints" / "step_00000005").mkdir(parents=True)
    (out_dir / "checkpoints" / "step_00000005" / "complete.json").write_text("{}")
    script = generate(tmp_path, "--nodes", "1", "--gpus-per-node", "2",
                      overrides=[f"out_dir={out_dir}"])
    assert "checkpoint.resume=true" in script


def test_out_script_never_overwrites_a_file_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "job.sbatch"
    mine.write_text("#!/bin/bash\necho precious\n")
    with pytest.raises(SystemExit):
        generate(tmp_path, "--nodes", "1", "--gpus-per-node", "2")
    assert mine.read_text() == "#!/bin/bash\necho precious\n"
    assert "was not written by `mlm-dist slurm`" in capsys.readouterr().err
    mine.unlink()
    generate(tmp_path, "--nodes", "1", "--gpus-per-node", "2")
    generate(tmp_path, "--nodes", "1", "--gpus-per-node", "4",  # its own script: regenerated
             overrides=["schedule.phases.0.micro_batch=4"])
    assert "--ntasks-per-node=4" in mine.read_text()


def test_time_limits():
    assert slurm.time_limit_seconds("90") == 90 * 60
    assert slurm.time_limit_seconds("10:30") == 630
    assert slurm.time_limit_seconds("1:00:00") == 3600
    assert slurm.time_limit_seconds("2-12") == (2 * 24 + 12) * 3600
    assert slurm.time_limit_seconds("1-00:30") == 86400 + 1800
    assert slurm.time_limit_seconds("1-00:00:05") == 86405
    assert slurm.time_limit_seconds("UNLIMITED") is None


# ---------------------------------------------------------------------------------------------
# A real Slurm on this machine

STEPS = 120


@pytest.fixture(scope="module")
def cluster():
    with running(partial(SlurmCluster, gpus=2), "mlm-slurm-",
                 ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel",
                  "sinfo", "squeue")) as c:
        yield c


def submit(cluster: SlurmCluster, workdir: Path, shards: Path, out_dir: Path, *options: str,
           job_name: str = "mlm-dist") -> tuple[str, Path]:
    logs = workdir / "logs $(touch pwned)"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlm_dist", "slurm", "--config", str(TINY), "--nodes", "1",
           "--gpus-per-node", "2", "--cpu-ranks", "--job-name", job_name, "--time", "10",
           "--signal-seconds", "60", "--output", f"{logs}/job %j.out",
           "--out-script", str(workdir / "job.sbatch"), "--submit", *options,
           f"data.shards={shards}", f"out_dir={out_dir}", *TINY_OVERRIDES,
           f"schedule.phases.0.until_step={STEPS}", "train.log_every=5",
           "data.num_workers=1"]  # Slurm signals the workers too: they must not die of it
    proc = cluster.run(*cmd, env=launch_env(), cwd=workdir)
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    return job_id, logs / f"job {job_id}.out"


def job_log(cluster, log: Path) -> str:
    return (log.read_text() if log.exists() else "(no job log)") + "\n" + cluster.logs()


@pytest.fixture(scope="module")
def uninterrupted(cluster, tiny_shards, tmp_path_factory):
    work = tmp_path_factory.mktemp("slurm-job")
    out_dir = work / "run"
    job_id, log = submit(cluster, work, tiny_shards, out_dir, job_name=NASTY)
    try:
        cluster.wait(job_id, lambda j: j["JobState"] == "COMPLETED", timeout=240)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{job_log(cluster, log)}") from None
    return job_id, out_dir, log, work


def test_two_tasks_train_checkpoint_and_write_tensorboard(cluster, uninterrupted):
    job_id, out_dir, log, work = uninterrupted
    info = cluster.job(job_id)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", info
    text = log.read_text()  # the literal --output path, with %j filled in by Slurm
    assert "mlm-dist: job" in text and ", 2 ranks," in text, text
    assert metrics(out_dir)[-1]["step"] == STEPS
    tag = out_dir / "checkpoints" / f"step_{STEPS:08d}"
    shards = sorted(p.name for p in tag.glob("*zero_pp_rank_*optim_states.pt"))
    assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1], shards
    events = EventAccumulator(str(out_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(5, STEPS + 1, 5))
    # the job name went through sbatch's own parser unchanged, and no shell ran any of it
    name = cluster.run("squeue", "-t", "all", "-h", "-j", job_id, "-o", "%j").stdout
    assert name.rstrip("\n") == NASTY
    assert not list(work.rglob("pwned")) and not list(REPO.glob("pwned"))


def test_warning_signal_checkpoints_requeues_and_resumes(cluster, uninterrupted, tiny_shards,
                                                         tmp_path):
    _, reference, _, _ = uninterrupted
    out_dir = tmp_path / "run"
    job_id, log = submit(cluster, tmp_path, tiny_shards, out_dir)
    try:
        # once the ranks have logged a step they handle the signal; then warn as Slurm would
        cluster.wait(job_id, lambda j: (out_dir / "metrics.jsonl").exists()
                     and bool(metrics(out_dir)), timeout=180, poll=0.2)
        cluster.run("scancel", "--signal=USR1", "--batch", job_id)
        cluster.wait(job_id, lambda j: j["JobState"] == "COMPLETED" and j["Restarts"] == "1",
                     timeout=240)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{job_log(cluster, log)}") from None
    text = log.read_text()
    stopped = re.search(r"stopping at step (\d+) on a signal", text)
    assert stopped and "requeueing job" in text, text
    step = int(stopped.group(1))
    assert 0 < step < STEPS, text
    assert f"resumed from step {step}" in text, text
    assert text.count("mlm-dist: job") == 2  # two allocations of the same job
    # the same final step as the uninterrupted run, and both checkpoints are there
    final, uninterrupted_final = metrics(out_dir)[-1], metrics(reference)[-1]
    assert final["step"] == uninterrupted_final["step"] == STEPS
    # on the same topology a resumed run repeats the uninterrupted one exactly (DESIGN.md);
    # the logged loss is the mean since the previous log line (every 5 steps)
    if step <= STEPS - 5:
        assert final["train/loss"] == pytest.approx(uninterrupted_final["train/loss"], abs=1e-6)
    checkpoints = out_dir / "checkpoints"
    assert (checkpoints / f"step_{step:08d}" / "complete.json").is_file()
    assert (checkpoints / f"step_{STEPS:08d}" / "complete.json").is_file()


@pytest.mark.parametrize("options, shown, cpus_per_task", [
    (["--gpus-per-node", "2"], [["0", "1"], ["0", "1"]], "1"),  # every task sees the node's GPUs
    (["--gpus-per-node", "2", "--bind-gpus"], [["0"], ["1"]], "1"),  # only its own
    (["--gpus-per-node", "1", "--sbatch-opt=--exclusive"], [["0"]], "2"),  # the node's 2 CPUs
])
def test_each_task_takes_its_own_gpu_and_its_share_of_cpus(cluster, tmp_path, options, shown,
                                                           cpus_per_task):
    """A job as `mlm-dist slurm` writes it, on stand-in GPUs: every task computes the device a
    rank would take (tests/slurm_device_probe.py). Each ends on another GPU of the node, and
    srun gave it the CPUs the script meant."""
    probe = f"{sys.executable} {REPO / 'tests' / 'slurm_device_probe.py'} {tmp_path}"
    cmd = [sys.executable, "-m", "mlm_dist", "slurm", "--config", str(TINY), "--nodes", "1",
           *options, "--python", probe, "--output", f"{tmp_path}/job-%j.out", "--time", "10",
           "--signal-seconds", "60", "--out-script", str(tmp_path / "job.sbatch"), "--submit",
           "data.shards=/shared/shards", *TINY_OVERRIDES]
    job_id = re.search(r"submitted job (\d+)", cluster.run(*cmd, cwd=tmp_path).stdout).group(1)
    log = tmp_path / f"job-{job_id}.out"
    try:
        cluster.wait(job_id, lambda j: j["JobState"] == "COMPLETED", timeout=120)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{job_log(cluster, log)}") from None
    tasks = [json.loads((tmp_path / f"task{r}.json").read_text()) for r in range(len(shown))]
    assert [t["shown"] for t in tasks] == shown
    assert [t["local_rank"] for t in tasks] == list(range(len(shown)))
    assert sorted(t["gpu"] for t in tasks) == [str(g) for g in range(len(shown))]  # one each
    assert {t["cpus_per_task"] for t in tasks} == {cpus_per_task}
    assert tasks[0]["train"] == ["-m", "mlm_dist", "train"]
