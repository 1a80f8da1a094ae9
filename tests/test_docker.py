"""The Dockerfiles and the tested versions, checked without a Docker engine. The Dockerfiles parse,
what they copy exists, and the programs they run exist (console scripts of the package, its
subcommands, test extras). One constraints file of tested versions (docker/constraints.txt) is
kept in step with pyproject.toml, and every install (.ci/run, README's install command, the CPU
and the GPU image) goes through it, torch first, at the constrained torch release."""

from __future__ import annotations

import importlib.metadata
import json
import posixpath
import re
import shlex
import subprocess

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from launch import REPO
from mlm_dist.cli import build_parser

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

DOCKERFILES = {"gpu": REPO / "docker" / "Dockerfile", "cpu": REPO / "docker" / "Dockerfile.cpu"}
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK",
                "SHELL", "MAINTAINER"}
PYPROJECT_TOML = tomllib.loads((REPO / "pyproject.toml").read_text())
PYPROJECT = PYPROJECT_TOML["project"]
CONSTRAINTS = "docker/constraints.txt"  # as every install names it, from the repository's root
CI_RUN = REPO / ".ci" / "run"


def parse(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, as Docker reads them: `#` lines are comments, a
    trailing backslash continues the instruction on the next line."""
    instructions, pending = [], ""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # comment lines inside a continued instruction are dropped
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = pending + line
        pending = ""
        word, _, args = text.strip().partition(" ")
        assert word.upper() in INSTRUCTIONS, f"{path.name}:{n}: unknown instruction {word!r}"
        assert word == word.upper(), f"{path.name}:{n}: write {word.upper()}"
        assert args.strip(), f"{path.name}:{n}: {word} without arguments"
        instructions.append((word, args.strip()))
    assert not pending, f"{path.name}: ends inside a continued line"
    return instructions


def build_args(instructions) -> dict[str, str]:
    """The ARG defaults of a Dockerfile (what a build without --build-arg uses)."""
    defaults = {}
    for word, args in instructions:
        if word == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name] = value
    return defaults


def expand(text: str, values: dict[str, str]) -> str:
    """${NAME} replaced by the build argument's default, as Docker and the shell would."""
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], text)


def base_image(instructions) -> str:
    return expand(dict(instructions)["FROM"].split()[0], build_args(instructions))


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def shell_commands(text: str) -> list[list[str]]:
    """The simple commands of shell text as token lists: comment lines dropped, continued lines
    joined, split at `&&`, `;` and `||`."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("#"):
            continue
        for command in re.split(r"&&|;|\|\|", line):
            tokens = shlex.split(command, comments=True)
            if tokens:
                commands.append(tokens)
    return commands


def run_commands(instructions) -> list[list[str]]:
    """The commands of every shell-form RUN step, build arguments at their defaults."""
    values = build_args(instructions)
    return [command for word, args in instructions if word == "RUN" and not args.startswith("[")
            for command in shell_commands(expand(args, values))]


def pip_installs(commands) -> list[list[str]]:
    """The argument lists of every `pip install` (pip, .venv/bin/pip, python -m pip)."""
    found = []
    for tokens in commands:
        for i, token in enumerate(tokens[:-1]):
            if (token == "pip" or token.endswith("/pip")) and tokens[i + 1] == "install":
                found.append(tokens[i + 2:])
                break
            if token == "-m" and tokens[i + 1:i + 3] == ["pip", "install"]:
                found.append(tokens[i + 3:])
                break
    return found


def apt_installs(commands) -> set[str]:
    """The Debian packages of every `apt-get install`."""
    packages = set()
    for tokens in commands:
        if "apt-get" in tokens and "install" in tokens[tokens.index("apt-get"):]:
            after = tokens[tokens.index("install", tokens.index("apt-get")) + 1:]
            packages |= {t for t in after if not t.startswith(("-", "$"))}
    return packages


def option_values(args: list[str], *names: str) -> list[str]:
    """The values given to a pip option, written `-c X`, `--constraint X` or `--constraint=X`."""
    values = []
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                values.append(args[i + 1])
            elif name.startswith("--") and arg.startswith(name + "="):
                values.append(arg.partition("=")[2])
    return values


def requirements(args: list[str]) -> list[str]:
    skip_next = {"--index-url", "-i", "--extra-index-url", "-c", "--constraint", "-r",
                 "--requirement", "-f", "--find-links"}
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in skip_next:
            skip = True
        elif not a.startswith("-"):
            out.append(a)
    return out


def constraints() -> dict[str, str]:
    """docker/constraints.txt as {canonical name: version}: one `name==version` a line."""
    pins = {}
    for n, line in enumerate((REPO / CONSTRAINTS).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        r = Requirement(line)
        specs = list(r.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and not r.marker and not r.extras, (
            f"{CONSTRAINTS}:{n}: {line!r}: write one exact version a line, name==X")
        name = canonicalize_name(r.name)
        assert name not in pins, f"{CONSTRAINTS}:{n}: {r.name} is pinned twice"
        pins[name] = specs[0].version
    return pins


def readme_install_command() -> str:
    """README's install command: the line that makes the venv and installs into it."""
    lines = [line for line in (REPO / "README.md").read_text().splitlines()
             if line.startswith("python3 -m venv .venv &&")]
    assert len(lines) == 1, lines
    return lines[0]


def dockerfile_installs(kind: str) -> list[list[str]]:
    return pip_installs(run_commands(parse(DOCKERFILES[kind])))


INSTALLS = {  # where the project gets installed -> the argument lists of its `pip install`s
    ".ci/run": lambda: pip_installs(shell_commands(CI_RUN.read_text())),
    "README": lambda: pip_installs(shell_commands(readme_install_command())),
    "cpu image": lambda: dockerfile_installs("cpu"),
    "gpu image": lambda: dockerfile_installs("gpu"),
}


def torch_pin(args: list[str]) -> str | None:
    """The exact torch version an install names (None if it installs no torch)."""
    for req in requirements(args):
        if not req.startswith(".") and canonicalize_name(Requirement(req).name) == "torch":
            pins = [s.version for s in Requirement(req).specifier if s.operator == "=="]
            assert pins, f"{req}: pin torch's version"
            return pins[0]
    return None


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_parses(kind):
    path = DOCKERFILES[kind]
    instructions = parse(path)
    words = [w for w, _ in instructions]
    assert words[0] in ("FROM", "ARG") and "FROM" in words
    image = base_image(instructions)
    name, _, tag = image.partition(":")
    assert tag and tag != "latest", f"{path.name}: pin the base image, not {image!r}"
    for word, args in instructions:
        if word in ("CMD", "ENTRYPOINT") or (word == "RUN" and args.startswith("[")):
            exec_form(args)
        elif word == "RUN":  # shell form: /bin/sh -c must accept it
            check = subprocess.run(["sh", "-n", "-c", args], capture_output=True, text=True)
            assert check.returncode == 0, f"{path.name}: RUN {args}\n{check.stderr}"
        elif word == "ENV":
            assert re.fullmatch(r"(\w+=\S+\s*)+", args), f"{path.name}: ENV {args}"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_copied_paths_exist_and_the_context_is_filtered(kind):
    path = DOCKERFILES[kind]
    for word, args in parse(path):
        if word in ("COPY", "ADD"):
            sources = shlex.split(args)[:-1]
            for source in sources:
                assert (REPO / source).exists(), f"{path.name}: COPY {source}: no such path"
            if "." in sources:  # the whole context: the venv, git and run outputs stay out
                ignore = (path.parent / (path.name + ".dockerignore")).read_text().split()
                assert {".git", ".venv", "runs"} <= set(ignore)


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_pip_installs_match_pyproject(kind):
    dependencies = {Requirement(d).name: Requirement(d) for d in PYPROJECT["dependencies"]}
    extras = PYPROJECT.get("optional-dependencies", {})
    installs = dockerfile_installs(kind)
    assert installs, "the image must install the package"
    installed_project = False
    for args in installs:
        for req in requirements(args):
            if req.startswith("."):  # the project itself, with extras that pyproject defines
                installed_project = True
                for extra in re.findall(r"\[(.*)\]", req)[0].split(",") if "[" in req else []:
                    assert extra in extras, f"{req}: pyproject has no extra {extra!r}"
                continue
            r = Requirement(req)
            assert r.name in dependencies, f"{req} is not a dependency in pyproject.toml"
            pins = [s.version for s in r.specifier if s.operator == "=="]
            assert pins, f"{req}: an extra install step must pin its version"
            assert dependencies[r.name].specifier.contains(pins[0], prereleases=True), (
                f"{req} is outside pyproject's {dependencies[r.name]}")
            if r.name == "torch":  # a build (+cpu, +cu126) of the tested release
                assert Version(pins[0]).public == constraints()["torch"], req
    assert installed_project, "the image must `pip install` the project"


def test_gpu_image_is_the_cuda_build_of_the_tested_torch_with_the_cluster_tools():
    instructions = parse(DOCKERFILES["gpu"])
    image = base_image(instructions)
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?devel-ubuntu[\d.]+", image)
    assert m, f"expected NVIDIA's CUDA devel image (nvcc for DeepSpeed's ops), got {image}"
    cuda = f"cu{m.group(1)}{m.group(2)}"  # PyTorch's name for the toolkit's CUDA: 12.6 -> cu126
    assert build_args(instructions)["TORCH_CUDA"] == cuda, "torch's CUDA is not the toolkit's"
    (install,) = [args for args in dockerfile_installs("gpu") if torch_pin(args)]
    assert torch_pin(install) == f"{constraints()['torch']}+{cuda}"
    assert option_values(install, "--index-url", "-i", "--extra-index-url") == [
        f"https://download.pytorch.org/whl/{cuda}"]
    packages = apt_installs(run_commands(instructions))
    for package in ("pdsh", "openssh-client", "openssh-server",  # the multi-node launcher
                    "rdma-core", "libibverbs1", "ibverbs-providers", "librdmacm1"):  # NCCL over IB
        assert package in packages, package


def test_gpu_build_stops_when_torch_cuda_is_not_the_toolkit_cuda():
    """DeepSpeed compiles its ops only with an nvcc of torch's CUDA: a --build-arg pair that
    disagrees stops the build at once, naming the argument to fix."""
    instructions = parse(DOCKERFILES["gpu"])
    checks = [args for word, args in instructions
              if word == "RUN" and "TORCH_CUDA" in args and "pip" not in args]
    assert len(checks) == 1, "docker/Dockerfile: no RUN that checks TORCH_CUDA against CUDA_VERSION"
    check = checks[0]

    def build(cuda_version: str, torch_cuda: str) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/bin:/bin", "CUDA_VERSION": cuda_version, "TORCH_CUDA": torch_cuda}
        return subprocess.run(["sh", "-c", check], env=env, capture_output=True, text=True)

    defaults = build_args(instructions)
    assert build(defaults["CUDA_VERSION"], defaults["TORCH_CUDA"]).returncode == 0
    assert build("13.0.2", "cu130").returncode == 0
    wrong = build("13.0.2", "cu126")
    assert wrong.returncode != 0
    assert "TORCH_CUDA=cu126" in wrong.stderr and "--build-arg TORCH_CUDA" in wrong.stderr


def test_the_constraints_pin_every_declared_package_within_pyproject_ranges():
    pins = constraints()
    assert canonicalize_name(PYPROJECT["name"]) not in pins, (
        f"{CONSTRAINTS} pins {PYPROJECT['name']} itself: the checkout is what gets installed")
    declared = (PYPROJECT["dependencies"] + PYPROJECT_TOML["build-system"]["requires"]
                + [d for extra in PYPROJECT["optional-dependencies"].values() for d in extra])
    for dependency in declared:
        r = Requirement(dependency)
        name = canonicalize_name(r.name)
        assert name in pins, (
            f"{r.name} ({dependency}) is not in {CONSTRAINTS}: add its tested version")
        assert r.specifier.contains(pins[name], prereleases=True), (
            f"{CONSTRAINTS} has {r.name}=={pins[name]}, outside pyproject's {dependency}")
    # no build label: the CPU build (CI) and the CUDA build (GPU image) must both satisfy it
    assert Version(pins["torch"]).local is None, pins["torch"]


@pytest.mark.parametrize("package", ["torch", "deepspeed"])
def test_torch_and_deepspeed_floors_are_the_tested_versions(package):
    pins = constraints()
    (dependency,) = [Requirement(d) for d in PYPROJECT["dependencies"]
                     if canonicalize_name(Requirement(d).name) == package]
    assert [(s.operator, s.version) for s in dependency.specifier] == [(">=", pins[package])], (
        f"pyproject.toml: {dependency}: write {package}>={pins[package]}, the version CI tests "
        f"({CONSTRAINTS})")


def test_the_constraints_name_every_package_installed_with_the_project():
    """The dependencies of mlm-dist[test] as installed here, recursively: each is in the
    constraints file, or an install with it would float that package."""
    environment = {"extra": ""}
    seen, todo = set(), [(PYPROJECT["name"], {"test"})]
    while todo:
        name, extras = todo.pop()
        if (canonicalize_name(name), frozenset(extras)) in seen:
            continue
        seen.add((canonicalize_name(name), frozenset(extras)))
        for line in importlib.metadata.distribution(name).requires or []:
            r = Requirement(line)
            if r.marker is None or any(r.marker.evaluate({**environment, "extra": e})
                                       for e in ("", *extras)):
                todo.append((r.name, set(r.extras)))
    installed = {name for name, _ in seen} - {canonicalize_name(PYPROJECT["name"])}
    missing = sorted(installed - set(constraints()))
    assert not missing, (f"{missing} come with {PYPROJECT['name']}[test] but are not in "
                         f"{CONSTRAINTS}: add their tested versions (see the file's header)")


@pytest.mark.parametrize("where", INSTALLS)
def test_every_install_uses_the_constraints_torch_first_at_the_tested_release(where):
    installs = INSTALLS[where]()
    assert installs, f"{where}: no pip install"
    for args in installs:
        assert option_values(args, "-c", "--constraint") == [CONSTRAINTS], (
            f"{where}: pip install {shlex.join(args)}: install with -c {CONSTRAINTS}")
    first = torch_pin(installs[0])
    assert first and len(requirements(installs[0])) == 1, (
        f"{where}: install torch first, alone: pip install {shlex.join(installs[0])}")
    assert Version(first).public == constraints()["torch"], (
        f"{where}: torch=={first} is not the tested torch {constraints()['torch']}")
    assert any(r.startswith(".") for args in installs[1:] for r in requirements(args)), (
        f"{where}: the project is installed after torch")


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_the_images_copy_the_constraints_before_installing_with_them(kind):
    copied = set()
    for word, args in parse(DOCKERFILES[kind]):
        if word in ("COPY", "ADD"):
            *sources, destination = shlex.split(args)
            for source in sources:
                copied.add("." if source == "." else posixpath.normpath(
                    posixpath.join(destination, posixpath.basename(source))
                    if destination.endswith("/") or len(sources) > 1 else destination))
        elif word == "RUN" and pip_installs(shell_commands(args)):
            assert CONSTRAINTS in copied or "." in copied, (
                f"{DOCKERFILES[kind].name}: RUN {args}: copy {CONSTRAINTS} in first")


def test_the_images_run_the_python_ci_tests():
    floor = [s.version for s in SpecifierSet(PYPROJECT["requires-python"]) if s.operator == ">="]
    assert floor, PYPROJECT["requires-python"]
    python = floor[0]
    cpu = base_image(parse(DOCKERFILES["cpu"]))
    assert cpu.startswith(f"python:{python}-"), f"{cpu}: not requires-python's floor, {python}"
    gpu = run_commands(parse(DOCKERFILES["gpu"]))
    assert {f"python{python}", f"python{python}-dev", f"python{python}-venv"} <= apt_installs(gpu)
    assert [f"python{python}", "-m", "venv"] in [c[:3] for c in gpu]


def test_the_cpu_image_has_the_debian_packages_ci_installs():
    ci = CI_RUN.read_text()
    groups = re.findall(r'^\w+_packages="([^"]*)"', ci, re.M)  # cluster_packages=, text_packages=
    wanted = {package for group in groups for package in group.split()}
    assert wanted, ".ci/run: no *_packages lists"
    instructions = parse(DOCKERFILES["cpu"])
    assert wanted <= apt_installs(run_commands(instructions)), wanted - apt_installs(
        run_commands(instructions))
    if "slim" in base_image(instructions):  # Debian's slim images drop every manual page
        runs = " ".join(args for word, args in instructions if word == "RUN")
        for language in ("ja", "zh_CN"):  # what manpages-ja / manpages-zh install
            assert f"path-include=/usr/share/man/{language}/*" in runs, language


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_commands_the_images_run_exist(kind):
    instructions = dict(parse(DOCKERFILES[kind]))
    command = exec_form(instructions.get("ENTRYPOINT", "[]")) + exec_form(
        instructions.get("CMD", "[]"))
    assert command
    scripts = PYPROJECT["scripts"]
    program, args = command[0], command[1:]
    if program == "python":
        assert args[:2] == ["-m", "pytest"] and any(
            e.startswith("pytest") for e in PYPROJECT["optional-dependencies"]["test"])
        return
    assert program in scripts, f"{program} is not a console script of the package"
    module, _, function = scripts[program].partition(":")
    assert callable(getattr(__import__(module, fromlist=[function]), function))
    parser = build_parser()
    if args == ["--help"]:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(args)
        assert exit_.value.code == 0
    else:  # a subcommand with everything it needs
        assert parser.parse_args(args).command == args[0]


def test_readme_commands_use_the_images():
    readme = (REPO / "README.md").read_text()
    assert "docker build -f docker/Dockerfile -t mlm-dist:gpu ." in readme
    assert "docker build -f docker/Dockerfile.cpu -t mlm-dist:cpu ." in readme
    assert "--container-image" in readme  # how to use the image under Slurm (pyxis/enroot)
