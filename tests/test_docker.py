"""The Dockerfiles, checked without a Docker engine: they parse, what they pip-install matches
pyproject.toml (and the torch pin of README/.ci/run), what they copy exists, and the programs
they run exist (console scripts of the package, its subcommands, test extras)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest
from packaging.requirements import Requirement
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
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


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


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def pip_installs(instructions) -> list[list[str]]:
    """The argument lists of every `pip install` in the RUN steps."""
    found = []
    for word, args in instructions:
        if word != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", args):
            tokens = shlex.split(command)
            if tokens[:2] == ["pip", "install"] or tokens[1:4] == ["-m", "pip", "install"]:
                found.append(tokens[tokens.index("install") + 1:])
    return found


def requirements(args: list[str]) -> list[str]:
    skip_next = {"--index-url", "-i", "--extra-index-url", "-c", "-r"}
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in skip_next:
            skip = True
        elif not a.startswith("-"):
            out.append(a)
    return out


def pinned_torch() -> str:
    """The torch pin of README's install command and .ci/run (they must agree)."""
    readme = re.findall(r"torch==([\w.+]+)", (REPO / "README.md").read_text())
    ci = re.findall(r"torch==([\w.+]+)", (REPO / ".ci" / "run").read_text())
    assert readme and ci and set(readme) == set(ci), (readme, ci)
    return readme[0]


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_parses(kind):
    path = DOCKERFILES[kind]
    instructions = parse(path)
    words = [w for w, _ in instructions]
    assert words[0] in ("FROM", "ARG") and "FROM" in words
    image = dict(instructions)["FROM"].split()[0]
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
    instructions = parse(DOCKERFILES[kind])
    dependencies = {Requirement(d).name: Requirement(d) for d in PYPROJECT["dependencies"]}
    extras = PYPROJECT.get("optional-dependencies", {})
    installs = pip_installs(instructions)
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
            if r.name == "torch":
                assert pins[0] == pinned_torch()
    assert installed_project, "the image must `pip install` the project"


def test_gpu_base_image_torch_satisfies_pyproject_and_has_the_cluster_tools():
    instructions = parse(DOCKERFILES["gpu"])
    image = dict(instructions)["FROM"]
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-devel", image)
    assert m, f"expected a pinned pytorch/pytorch CUDA devel image, got {image}"
    torch_spec = next(Requirement(d) for d in PYPROJECT["dependencies"] if d.startswith("torch"))
    assert torch_spec.specifier.contains(Version(m.group(1)))
    runs = " ".join(args for word, args in instructions if word == "RUN")
    for package in ("pdsh", "openssh-client", "openssh-server"):
        assert re.search(rf"\b{package}\b", runs), package


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
