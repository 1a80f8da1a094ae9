"""Real cluster programs for the tests, started on this machine and stopped afterwards.

SshServer    an sshd on 127.0.0.1 and 127.0.0.2 (its own port, host key and authorized root
             key, all in a temporary directory), plus an `ssh` wrapper first on PATH that
             points ssh at a private client config. Nothing in /etc/ssh or ~/.ssh is touched.
SlurmCluster a one-node Slurm: munged, slurmctld and slurmd with a generated munge key,
             slurm.conf and cgroup.conf in a temporary directory, found through SLURM_CONF.

Both are stopped by `stop()` (the fixtures call it as their finalizer, also after a failure),
which ends the daemons it started and every process started through them, by pid. Both run
as root (sshd for root logins, with its privilege separation directory; SlurmUser=root): a
test that needs them is skipped, naming what is missing, if a program or root is.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from mlm_dist.launch.local import free_port

SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


# The Debian package of each program the tests start (.ci/run installs them all).
DEBIAN_PACKAGE = {"sshd": "openssh-server", "ssh": "openssh-client",
                  "ssh-keygen": "openssh-client", "pdsh": "pdsh", "munged": "munge",
                  "slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client",
                  "srun": "slurm-client", "scontrol": "slurm-client", "scancel": "slurm-client",
                  "sinfo": "slurm-client", "squeue": "slurm-client"}


def which(program: str) -> str | None:
    return shutil.which(program, path=SBIN)


def missing(*programs: str) -> list[str]:
    return [p for p in programs if which(p) is None]


def why_not(programs: tuple[str, ...], euid: int | None = None) -> str | None:
    """Why the service cannot start here (the programs missing and the packages holding them,
    or not being root), None if it can."""
    absent = missing(*programs)
    if absent:
        packages = " ".join(dict.fromkeys(DEBIAN_PACKAGE[p] for p in absent))
        return (f"needs {', '.join(absent)}: apt-get install {packages} (.ci/run installs "
                "them)")
    if (os.geteuid() if euid is None else euid) != 0:
        return "needs root: it starts its own daemons as root (tests/cluster.py)"
    return None


def _wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{proc.args[0]} is not listening on {host}:{port}:\n"
                                   + (log.read_text() if log.exists() else "(no log)"))
            time.sleep(0.1)


def _stop(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def _processes_with_env(marker: str) -> list[int]:
    """Pids of processes whose environment holds `marker` (e.g. SLURM_CONF=<our file>)."""
    needle = marker.encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class SshServer:
    """sshd for root on 127.0.0.1 and 127.0.0.2, key login only."""

    hosts = ("localhost", "127.0.0.2")

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.bin_dir = root / "bin"
        self.proc: subprocess.Popen | None = None
        self._made_run_dir = False

    def start(self) -> "SshServer":
        r = self.root
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mlm-dist-test",
                            "-f", str(r / name)], check=True)
        shutil.copyfile(r / "client_key.pub", r / "authorized_keys")
        (r / "authorized_keys").chmod(0o600)
        (r / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\n"
            f"HostKey {r / 'host_key'}\nPidFile {r / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {r / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            # the key files live in a world-readable temporary directory
            "StrictModes no\nPrintMotd no\nX11Forwarding no\n")
        (r / "ssh_config").write_text(
            f"Host *\n  Port {self.port}\n  IdentityFile {r / 'client_key'}\n"
            "  IdentitiesOnly yes\n  BatchMode yes\n  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
        # What a user's ~/.ssh/config would do, without touching it: every `ssh` that deepspeed
        # and pdsh run finds this wrapper first on PATH.
        self.bin_dir.mkdir()
        wrapper = self.bin_dir / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {which("ssh")} -F {r / "ssh_config"} "$@"\n')
        wrapper.chmod(0o755)
        if not Path("/run/sshd").exists():  # sshd's privilege separation directory
            Path("/run/sshd").mkdir(mode=0o755, parents=True)
            self._made_run_dir = True
        sshd = which("sshd")
        subprocess.run([sshd, "-t", "-f", str(r / "sshd_config")], check=True)
        log = r / "sshd.log"
        self.proc = subprocess.Popen([sshd, "-D", "-f", str(r / "sshd_config"), "-E", str(log)])
        for address in ("127.0.0.1", "127.0.0.2"):
            _wait_for_port(address, self.port, 20, self.proc, log)
        for host in self.hosts:
            proc = subprocess.run(["ssh", host, "true"], env=self.env(), capture_output=True,
                                  text=True, timeout=30)
            if proc.returncode != 0:
                raise RuntimeError(f"key login to root@{host}:{self.port} failed: "
                                   f"{proc.stderr}\nsshd log:\n{log.read_text()}")
        return self

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', os.defpath)}"
        return env

    def stop(self) -> None:
        _stop(self.proc)
        if self._made_run_dir:
            shutil.rmtree("/run/sshd", ignore_errors=True)


# Character devices that stand in for GPUs in gres.conf: slurmd only checks that each File is
# one (nothing constrains devices here), and Slurm then sets CUDA_VISIBLE_DEVICES for each task
# as on a GPU node.
FAKE_GPU_FILES = ("/dev/zero", "/dev/full", "/dev/null", "/dev/urandom")


class SlurmCluster:
    """One node (this host, 2 CPUs; `gpus` stand-in GPUs), one partition, no accounting, no
    cgroups."""

    def __init__(self, root: Path, cpus: int = 2, gpus: int = 0):
        self.root = root
        self.cpus = cpus
        self.gpus = gpus
        self.node = socket.gethostname().split(".")[0]  # `hostname -s`
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.procs: list[subprocess.Popen] = []

    def _daemon(self, args: list[str], log: str) -> subprocess.Popen:
        with open(self.root / "log" / log, "ab") as out:
            proc = subprocess.Popen(args, env=self.env(), stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def start(self) -> "SlurmCluster":
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir()
        (r / "munge").chmod(0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # --force: root, and a key directory under /tmp, are fine for a test
        self._daemon([which("munged"), "--foreground", "--force",
                      f"--socket={self.munge_socket}", f"--key-file={key}",
                      f"--pid-file={r / 'munge' / 'munged.pid'}",
                      f"--seed-file={r / 'munge' / 'munged.seed'}",
                      f"--log-file={r / 'log' / 'munged.log'}"], "munged.out")
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            if time.monotonic() > deadline or self.procs[-1].poll() is not None:
                raise RuntimeError("munged did not start:\n" + self.logs())
            time.sleep(0.1)
        ctld_port, slurmd_port = free_port(), free_port()
        srun_base = 40000 + (os.getpid() * 7) % 20000
        (r / "plugstack.conf").write_text("")
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        # proctrack/linuxproc + task/none: no cgroups needed. cred_expire also sets how long a
        # requeued job waits before it may start again (default 120 s); sched/builtin with
        # sched_interval=1 starts it as soon as it may.
        self.conf.write_text(f"""\
ClusterName=mlmdisttest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SrunPortRange={srun_base}-{srun_base + 199}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
PlugStackConfig={r / 'plugstack.conf'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=10
InactiveLimit=0
MailProg=/bin/true
GresTypes=gpu
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus}{gres} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        (r / "cgroup.conf").write_text("CgroupAutomount=no\n")
        if self.gpus:
            (r / "gres.conf").write_text("".join(f"Name=gpu File={f}\n"
                                                 for f in FAKE_GPU_FILES[:self.gpus]))
        self._daemon([which("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        _wait_for_port("127.0.0.1", ctld_port, 30, self.procs[-1], r / "log" / "slurmctld.log")
        self._daemon([which("slurmd"), "-D", "-f", str(self.conf)], "slurmd.out")
        deadline = time.monotonic() + 60
        while True:
            state = self.run("sinfo", "-h", "-n", self.node, "-o", "%t", check=False).stdout
            if state.strip() == "idle":
                return self
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"node {self.node} is not idle ({state.strip()!r}):\n"
                                   + self.logs())
            time.sleep(0.5)

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([env.get("PATH", os.defpath), "/usr/sbin", "/sbin"])
        return env

    def run(self, *args: str, check: bool = True, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env=self.env(env), capture_output=True, text=True,
                              timeout=60, cwd=cwd)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n"
                                 f"{proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        tail = out[out.index(" UserId="):]  # after JobName, which may hold anything
        return {key: m.group(1) for key in ("JobState", "Restarts", "ExitCode", "Reason")
                if (m := re.search(rf" {key}=(\S+)", tail))}

    def wait(self, job_id: str, until, timeout: float, poll: float = 1.0) -> dict:
        """Poll `scontrol show job` until `until(info)`; fail on a final state not wanted."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if until(info):
                return info
            if info["JobState"] in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                                    "BOOT_FAIL", "DEADLINE", "PREEMPTED", "COMPLETED"):
                raise AssertionError(f"job {job_id} ended as {info}")
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {info} after {timeout:.0f} s")
            time.sleep(poll)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((self.root / "log").glob("*")))

    def stop(self) -> None:
        if self.conf.exists() and self.procs and self.procs[0].poll() is None:
            self.run("scancel", "--full", "--user", "root", check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                queue = self.run("squeue", "-h", "-o", "%i", check=False)
                if queue.returncode != 0 or not queue.stdout.strip():
                    break
                time.sleep(0.5)
        for proc in reversed(self.procs):  # slurmd, slurmctld, munged
            _stop(proc)
        # anything still running in a job (slurmstepd, the batch script, srun, the ranks)
        _kill_all(_processes_with_env(f"SLURM_CONF={self.conf}"))


def tmp_root(prefix: str) -> Path:
    """A short private directory (unix socket paths are limited to ~100 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@contextlib.contextmanager
def running(service, prefix: str, programs: tuple[str, ...]):
    """`service(root)` started in a fresh private directory, stopped and removed afterwards
    (also after a failure); the test is skipped, naming the packages, if it cannot start here."""
    reason = why_not(programs)
    if reason is not None:
        pytest.skip(reason)
    root = tmp_root(prefix)
    started = service(root)
    try:
        yield started.start()
    finally:
        started.stop()
        subprocess.run(["rm", "-rf", str(root)])
