"""The skip conditions of the tests that need a Debian package or root: each asks for the thing
it needs (the program, not a path near it) and names the package that provides it, so README's
test command passes, skipping them, on a machine that never ran .ci/run."""

import cluster


def test_cluster_tests_name_the_missing_programs_packages_then_root(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("sshd", "sbatch"):
        (bin_dir / program).write_text("#!/bin/sh\n")
        (bin_dir / program).chmod(0o755)
    (bin_dir / "pdsh").write_text("not a program")  # a path that exists is not enough
    monkeypatch.setattr(cluster, "SBIN", str(bin_dir))
    assert cluster.why_not(("sshd", "ssh", "ssh-keygen", "pdsh")) == (
        "needs ssh, ssh-keygen, pdsh: apt-get install openssh-client pdsh (.ci/run installs them)")
    assert cluster.why_not(("munged", "slurmctld", "sbatch", "srun")) == (
        "needs munged, slurmctld, srun: apt-get install munge slurmctld slurm-client (.ci/run "
        "installs them)")
    assert cluster.why_not(("sshd", "sbatch"), euid=1000) == (
        "needs root: it starts its own daemons as root (tests/cluster.py)")
    assert cluster.why_not(("sshd", "sbatch"), euid=0) is None
