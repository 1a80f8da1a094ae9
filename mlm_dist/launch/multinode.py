"""Multi-node launch with the `deepspeed` launcher (pdsh over ssh) from a hostfile.

    mlm-dist launch [options] HOSTFILE CONFIG [key=value ...]
    launcher/deepspeed_multinode.sh [options] HOSTFILE CONFIG [key=value ...]   (the same)

Run it on the first host of HOSTFILE. Before anything starts it checks the hostfile (one
`host slots=N` line per node), the node and GPU counts, the run config and its batch arithmetic
for the resulting number of ranks, and every value that will travel to the other nodes.

Why the care: deepspeed joins the per-node command into one shell string that pdsh runs over
ssh on every node. It wraps a value in double quotes only when it sees a space (and then
escapes nothing but `"`), pdsh replaces `%n`, `%h`, `%u`, `%%` anywhere in that string, and the
variables it forwards by itself are few (PYTHON*, NCCL* on GPUs). So this module
  * writes the hostfile deepspeed reads, normalized, from the validated hosts;
  * writes the environment file deepspeed exports on every node (DS_ENV_FILE): DS_ACCELERATOR,
    PYTHONPATH, HF_HOME, NCCL_*/GLOO_* and friends, and PATH with this Python's bin directory
    first, so `python` and `mlm-dist` resolve on the remote side as they do here;
  * quotes the training arguments so that the remote shell hands them over literally.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from mlm_dist.errors import UserError


class LaunchError(UserError, ValueError):
    """A user-fixable problem found before launching; the message names the thing to fix."""


@dataclass(frozen=True)
class Host:
    name: str
    slots: int
    line: int = 0


# Host names as pdsh and ssh take them: a DNS name or an IPv4 address, nothing a shell or pdsh's
# `-w a,b` list would interpret.
_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


def check_host_name(name: str, where: str) -> None:
    if not _HOST_NAME.fullmatch(name):
        raise LaunchError(f"{where}: {name!r} is not a host name (letters, digits, '.', '-' "
                          "and '_' only)")


def parse_hostfile(path: str | Path) -> list[Host]:
    """Hosts of an MPI-style hostfile: `host slots=N` per line; `#` starts a comment and blank
    lines are skipped. Anything else is an error naming the line."""
    p = Path(path)
    if not p.exists():
        raise LaunchError(f"hostfile {p} does not exist; write one `host slots=N` line per node "
                          "(see launcher/hostfile.example)")
    if not p.is_file():
        raise LaunchError(f"hostfile {p} is not a file")
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{p}, line {n}"
        tokens = line.split()
        if len(tokens) != 2 or not tokens[1].startswith("slots="):
            raise LaunchError(f"{where}: expected `host slots=N`, found {raw.strip()!r}")
        name, slots = tokens[0], tokens[1][len("slots="):]
        check_host_name(name, where)
        if not slots.isdigit():
            raise LaunchError(f"{where}: slots must be a whole number, found slots={slots!r}")
        if int(slots) < 1:
            raise LaunchError(f"{where}: host {name} has slots={slots}; every host needs at "
                              "least one slot (one rank per GPU)")
        if name in seen:
            raise LaunchError(f"{where}: host {name} is already listed on line {seen[name]}; "
                              "list each host once, with all its slots")
        seen[name] = n
        hosts.append(Host(name, int(slots), n))
    if not hosts:
        raise LaunchError(f"hostfile {p} lists no hosts; write one `host slots=N` line per node")
    return hosts


def check_topology(hosts: list[Host], hostfile: str | Path, nodes: int | None = None,
                   gpus_per_node: int | None = None) -> list[int]:
    """Ranks per host after the optional --nodes / --gpus-per-node checks."""
    if nodes is not None:
        if nodes < 1:
            raise LaunchError(f"--nodes must be at least 1, got {nodes}")
        if nodes != len(hosts):
            raise LaunchError(f"--nodes {nodes} does not match {hostfile}, which lists "
                              f"{len(hosts)} host{'s' * (len(hosts) != 1)} "
                              f"({', '.join(h.name for h in hosts)})")
    if gpus_per_node is None:
        return [h.slots for h in hosts]
    if gpus_per_node < 1:
        raise LaunchError(f"--gpus-per-node must be at least 1, got {gpus_per_node}")
    for h in hosts:
        if gpus_per_node > h.slots:
            raise LaunchError(f"--gpus-per-node {gpus_per_node} is more than host {h.name}'s "
                              f"slots={h.slots} in {hostfile}, line {h.line}")
    return [gpus_per_node] * len(hosts)


def render_hostfile(hosts: list[Host]) -> str:
    return "".join(f"{h.name} slots={h.slots}\n" for h in hosts)


# ---------------------------------------------------------------------------------------------
# The environment every rank needs

FORWARD_NAMES = ("DS_ACCELERATOR", "PYTHONPATH", "HF_HOME", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS")
FORWARD_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_", "MLM_DIST_")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Inside the double quotes deepspeed puts around a value these still mean something to the shell.
_ENV_UNSAFE = set('"$`\\\n\r\0')


def check_env_value(key: str, value: str, where: str = "") -> None:
    origin = f" ({where})" if where else ""
    if not _ENV_KEY.fullmatch(key):
        raise LaunchError(f"environment variable name {key!r}{origin} is not a valid name")
    bad = sorted(set(value) & _ENV_UNSAFE)
    if bad:
        raise LaunchError(
            f"environment variable {key}{origin} contains {', '.join(map(repr, bad))}; "
            "deepspeed passes it to the other nodes inside a shell command where that would "
            "not stay literal: set a value without \" $ ` \\ or newlines")
    if value != value.strip():
        raise LaunchError(f"environment variable {key}{origin} starts or ends with white space, "
                          "which deepspeed strips; remove it")


def env_assignments(items: list[str]) -> dict[str, str]:
    """{KEY: VALUE} from repeated `--env KEY=VALUE` (here and in `mlm-dist slurm`); the
    names and values are checked where they are used."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise LaunchError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def read_env_file(path: Path) -> dict[str, str]:
    """A `.deepspeed_env` as deepspeed reads it: KEY=VALUE per line."""
    env = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise LaunchError(f"{path}, line {n}: expected KEY=VALUE, found {line!r}")
        key, value = key.strip(), value.strip()
        check_env_value(key, value, f"{path}, line {n}")
        env[key] = value
    return env


def forwarded_env(environ: dict[str, str], extra: dict[str, str] | None = None,
                  python: str = sys.executable, env_files: tuple[Path, ...] = ()) -> dict[str, str]:
    """What every rank gets: the variables our ranks need from this environment, then the
    user's own .deepspeed_env files, then `extra` (--env), PATH with this Python's bin first."""
    env = {k: v for k, v in environ.items()
           if k in FORWARD_NAMES or k.startswith(FORWARD_PREFIXES)}
    bin_dir = str(Path(python).parent)
    path = [bin_dir] + environ.get("PATH", os.defpath).split(os.pathsep)
    env["PATH"] = os.pathsep.join(dict.fromkeys(d for d in path if d))
    for f in env_files:
        env.update(read_env_file(f))
    env.update(extra or {})
    for key, value in env.items():
        check_env_value(key, value)
    return env


def render_env_file(env: dict[str, str]) -> str:
    """The DS_ENV_FILE text. pdsh turns `%%` into `%` in the command it runs, so `%` is
    doubled here (the file is read by deepspeed's pdsh launcher only)."""
    lines = []
    for key, value in env.items():
        check_env_value(key, value)
        lines.append(f"{key}={value.replace('%', '%%')}\n")
    return "".join(lines)


# ---------------------------------------------------------------------------------------------
# The command


def remote_arg(arg: str) -> str:
    """`arg` prepared for deepspeed's pdsh command line, so the remote shell receives it
    literally. deepspeed wraps an argument holding a space in double quotes, escaping only `"`;
    any other argument goes into the shell string as it is."""
    if set(arg) & set("\n\r\0"):
        raise LaunchError(f"argument {arg!r} contains a newline, which cannot be passed to the "
                          "other nodes")
    arg = arg.replace("%", "%%")  # pdsh substitutes %n, %h, %u and %%
    if " " in arg:
        return re.sub(r'([\\$`])', r"\\\1", arg)
    return shlex.quote(arg)


# deepspeed runs `cd <working directory>; <python> -u -m deepspeed.launcher.launch …` on every
# node without quoting either, and pdsh would substitute a `%` in them.
_SAFE_PATH = re.compile(r"[\w@+=:,./-]+")


def deepspeed_command(hostfile: Path, config: str, overrides: list[str], *, master_addr: str,
                      master_port: int, ssh_port: int | None, gpus_per_node: int | None,
                      multi_node: bool, python: str = sys.executable) -> list[str]:
    args = ["train", "--config", config, *overrides]
    if multi_node:
        args = [remote_arg(a) for a in args]
    cmd = [python, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
           "--master_addr", master_addr, "--master_port", str(master_port)]
    if ssh_port is not None:
        cmd += ["--ssh_port", str(ssh_port)]
    if gpus_per_node is not None:
        cmd += ["--num_gpus", str(gpus_per_node)]
    return cmd + ["--module", "mlm_dist", *args]


@dataclass
class Launch:
    command: list[str]
    hostfile_text: str
    env_text: str
    hostfile_path: Path
    env_path: Path
    ranks: int
    forwarded_accelerator: str | None = None  # DS_ACCELERATOR as every rank will get it


def plan(args: argparse.Namespace, environ: dict[str, str] | None = None,
         cwd: Path | None = None) -> Launch:
    """Everything checked and decided; nothing written or started."""
    environ = dict(os.environ if environ is None else environ)
    cwd = Path.cwd() if cwd is None else cwd
    hosts = parse_hostfile(args.hostfile)
    per_host = check_topology(hosts, args.hostfile, args.nodes, args.gpus_per_node)
    ranks = sum(per_host)
    multi_node = len(hosts) > 1
    if multi_node and not _SAFE_PATH.fullmatch(str(cwd)):
        raise LaunchError(f"the working directory {str(cwd)!r} holds characters that deepspeed "
                          "does not quote when it changes into it on every node; launch from a "
                          "directory whose path has only letters, digits and _@+=:,./-")
    if not 1 <= args.master_port <= 65535:
        raise LaunchError(f"--master-port must be a port number, got {args.master_port}")
    if args.ssh_port is not None and not 1 <= args.ssh_port <= 65535:
        raise LaunchError(f"--ssh-port must be a port number, got {args.ssh_port}")
    python = shutil.which(args.python)
    if python is None:
        raise LaunchError(f"--python {args.python}: no such program")
    args.python = str(Path(python).absolute())
    if multi_node and not _SAFE_PATH.fullmatch(args.python):
        raise LaunchError(f"--python {args.python!r}: deepspeed runs it on every node without "
                          "quoting it; use a Python whose path has only letters, digits and "
                          "_@+=:,./-")
    master_addr = args.master_addr or hosts[0].name
    check_host_name(master_addr, "--master-addr")

    config = Path(args.config)
    # Here, not at the top: the pre-flight imports torch, which `mlm-dist launch --help` and
    # the hostfile's checks above should not wait for.
    from mlm_dist.training.preflight import launch_preflight

    # The ranks' own checks, here and once, rather than on every node after the launch.
    out_dir = Path(launch_preflight(config, args.overrides, ranks).out_dir)

    extra = env_assignments(args.env)
    user_files = tuple(f for f in (Path.home() / ".deepspeed_env", cwd / ".deepspeed_env")
                       if f.is_file())
    env = forwarded_env(environ, extra, args.python, user_files)

    launch_dir = out_dir / "launch"
    env_path = Path(args.env_file) if args.env_file else launch_dir / "deepspeed_env"
    hostfile_path = launch_dir / "hostfile"
    command = deepspeed_command(hostfile_path.absolute(), str(config.absolute()), args.overrides,
                                master_addr=master_addr, master_port=args.master_port,
                                ssh_port=args.ssh_port, gpus_per_node=args.gpus_per_node,
                                multi_node=multi_node, python=args.python)
    return Launch(command, render_hostfile(hosts), render_env_file(env), hostfile_path,
                  env_path, ranks, env.get("DS_ACCELERATOR"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`mlm-dist launch`'s options."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = ("Start `mlm-dist train` on every host of HOSTFILE with the deepspeed "
                     "launcher (pdsh over passwordless ssh). Run it on the first host.")
    p.epilog = ("The hostfile deepspeed reads and the environment file (DS_ENV_FILE) exported "
                "on every node are written to <out_dir>/launch/. Variables forwarded from this "
                "environment: " + ", ".join(FORWARD_NAMES) + ", "
                + ", ".join(prefix + "*" for prefix in FORWARD_PREFIXES) + ", PATH (this "
                "Python's bin first), plus ~/.deepspeed_env and ./.deepspeed_env if present, "
                "plus --env.")
    p.add_argument("hostfile", help="one `host slots=N` line per node")
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.shards=/shared/x")
    p.add_argument("--nodes", type=int, help="expected number of hosts (checked)")
    p.add_argument("--gpus-per-node", type=int,
                   help="ranks per host (default: each host's slots)")
    p.add_argument("--master-addr", help="rendezvous host (default: the first host)")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--ssh-port", type=int, help="sshd port on the hosts (default: ssh's own)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="one more variable for every rank (repeatable)")
    p.add_argument("--env-file", help="where to write the environment file")
    p.add_argument("--python", default=sys.executable,
                   help="the Python the ranks run (default: this one; same path on every node)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the hostfile, environment and command; start nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    launch = plan(args)
    if launch.forwarded_accelerator is not None:
        # The CPU image sets it; on GPU nodes it would make every rank train on the CPU.
        print(f"mlm-dist launch: every rank gets DS_ACCELERATOR={launch.forwarded_accelerator} "
              "from this environment" + (" and trains on the CPU; unset it to train on GPUs"
                                         if launch.forwarded_accelerator == "cpu" else ""),
              file=sys.stderr)
    if args.dry_run:
        print(f"# {launch.hostfile_path}\n{launch.hostfile_text}"
              f"# {launch.env_path}\n{launch.env_text}"
              f"# command ({launch.ranks} ranks)\n{shlex.join(launch.command)}")
        return
    for path, text in ((launch.hostfile_path, launch.hostfile_text),
                       (launch.env_path, launch.env_text)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    env = dict(os.environ, DS_ENV_FILE=str(launch.env_path.absolute()))
    print(f"launching {launch.ranks} ranks: {shlex.join(launch.command)}", flush=True)
    os.execve(launch.command[0], launch.command, env)  # signals reach deepspeed directly
