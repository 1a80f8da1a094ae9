"""Checkpoint saves that fail (a full disk) and the crashed saves they leave: first without
DeepSpeed (a fake engine writes or fails the way DeepSpeed's save_checkpoint does, on one
pretend rank), then two real ranks on a disk that really fills up."""

import errno
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from mlm_dist.config import RunConfig
from mlm_dist.training import checkpoint
from mlm_dist.training.checkpoint import CheckpointSaveError

MODEL_BYTES = 3_000_000  # random, so no filesystem compresses it: about 3.0 MB on disk
TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 45"


class FakeEngine:
    """DeepSpeed's save_checkpoint writes its files under the tag dir; `fail` is raised midway."""

    def __init__(self, fail: BaseException | None = None):
        self.fail, self.loaded = fail, None

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        tag_dir = Path(save_dir) / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        with open(tag_dir / "mp_rank_00_model_states.pt", "wb") as f:
            f.write(os.urandom(MODEL_BYTES // 2 if self.fail else MODEL_BYTES))
        if self.fail:
            raise self.fail

    def load_checkpoint(self, load_dir, tag):
        self.loaded = (Path(load_dir), tag, sorted(p.name for p in Path(load_dir).iterdir()))
        return str(Path(load_dir) / tag), {"step": int(tag.split("_")[1])}


@pytest.fixture
def fake_dist(monkeypatch):
    """One pretend rank; set .rank to be another."""
    fake = SimpleNamespace(rank=0, barrier=lambda: None, get_world_size=lambda: 1)
    fake.get_rank = lambda: fake.rank
    monkeypatch.setattr(checkpoint, "dist", fake)
    return fake


@pytest.fixture
def tokenizer_file(tmp_path) -> Path:
    f = tmp_path / "tokenizer.model"
    f.write_bytes(b"not really a sentencepiece model")
    return f


def save(engine, run_dir, step, tokenizer_file, keep=3):
    return checkpoint.save(engine, run_dir, step, cfg=RunConfig(), tokenizer_files=[tokenizer_file],
                           client_state={"step": step}, rank=0, keep=keep)


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


# torch.save inside DeepSpeed fails with a RuntimeError or an OSError; our own writes (rank 0's
# run_config.yaml, tokenizer files, complete.json) with an OSError.
@pytest.mark.parametrize("where, make_err", [("deepspeed", lambda: RuntimeError(TORCH_FULL_DISK)),
                                             ("deepspeed", enospc), ("ours", enospc)],
                         ids=["deepspeed-torch", "deepspeed-enospc", "ours-enospc"])
def test_a_failed_save_says_how_much_room_and_how_to_make_it(tmp_path, fake_dist, tokenizer_file,
                                                             monkeypatch, where, make_err):
    run, err = tmp_path / "run", make_err()
    done = save(FakeEngine(), run, 2, tokenizer_file)
    before = snapshot(done)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 7_500_000_000,
                                                              7_500_000_000))
    if where == "deepspeed":
        engine = FakeEngine(fail=err)
    else:  # DeepSpeed's files are written; rank 0's own files are not
        engine = FakeEngine()

        def copyfile(src, dst):
            raise err
        monkeypatch.setattr(checkpoint.shutil, "copyfile", copyfile)

    with pytest.raises(CheckpointSaveError) as raised:
        save(engine, run, 4, tokenizer_file)

    message = str(raised.value)
    assert raised.value.__cause__ is err  # the original traceback stays reachable
    assert "\n" not in message
    assert str(run / "checkpoints" / "step_00000004") in message
    assert "step_00000002, takes 3.0 MB" in message
    assert "7.5 GB is free" in message
    assert "checkpoint.keep" in message and "out_dir" in message
    assert snapshot(done) == before  # the complete checkpoint is untouched
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
    assert checkpoint.latest_complete(run / "checkpoints") == done


def test_a_failed_first_save_says_there_is_no_checkpoint_yet(tmp_path, fake_dist, tokenizer_file):
    with pytest.raises(CheckpointSaveError, match="no complete checkpoint yet") as raised:
        save(FakeEngine(fail=enospc()), tmp_path / "run", 2, tokenizer_file)
    assert "No space left on device" in str(raised.value) and "free" in str(raised.value)


def test_a_save_failing_for_another_reason_is_shown_whole(tmp_path, fake_dist, tokenizer_file):
    bug = RuntimeError("DeepSpeed could not gather the optimizer state")
    with pytest.raises(RuntimeError) as raised:
        save(FakeEngine(fail=bug), tmp_path / "run", 2, tokenizer_file)
    assert raised.value is bug  # no advice about disk space for what is not the disk


def crashed_run(tmp_path, tokenizer_file) -> Path:
    """A complete step 2, a save of step 4 that failed, and things that are not checkpoints."""
    run = tmp_path / "run"
    save(FakeEngine(), run, 2, tokenizer_file)
    with pytest.raises(CheckpointSaveError):
        save(FakeEngine(fail=RuntimeError(TORCH_FULL_DISK)), run, 4, tokenizer_file)
    root = run / "checkpoints"
    crashed = root / "step_00000004"
    assert crashed.is_dir() and not (crashed / checkpoint.COMPLETE).exists()
    (root / "notes").mkdir()
    (root / "notes" / "keep.txt").write_text("mine")
    (root / "step_00000010").write_text("a file, not a checkpoint")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.bin").write_bytes(b"x")
    (root / "step_00000009").symlink_to(elsewhere)  # a step_* that is not a directory of ours
    return run


def test_resume_removes_the_crashed_save_before_loading(tmp_path, fake_dist, tokenizer_file,
                                                        capsys):
    run = crashed_run(tmp_path, tokenizer_file)
    root = run / "checkpoints"
    complete = snapshot(root / "step_00000002")
    engine = FakeEngine()

    assert checkpoint.resume(engine, run) == {"step": 2}

    load_dir, tag, seen_when_loading = engine.loaded
    assert (load_dir, tag) == (root, "step_00000002")
    assert "step_00000004" not in seen_when_loading
    assert sorted(p.name for p in root.iterdir()) == [
        "latest", "notes", "step_00000002", "step_00000009", "step_00000010"]
    assert snapshot(root / "step_00000002") == complete
    assert (root / "notes" / "keep.txt").read_text() == "mine"
    assert (tmp_path / "elsewhere" / "data.bin").read_bytes() == b"x"
    logged = [line for line in capsys.readouterr().out.splitlines() if "removed" in line]
    assert len(logged) == 1 and "step_00000004" in logged[0]


def test_only_rank_0_removes_crashed_saves(tmp_path, fake_dist, tokenizer_file):
    run = crashed_run(tmp_path, tokenizer_file)
    fake_dist.rank = 1
    assert checkpoint.resume(FakeEngine(), run) == {"step": 2}
    assert (run / "checkpoints" / "step_00000004").is_dir()


# ---- the real thing: two DeepSpeed ranks writing to a disk that fills up


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: room for the run's logs and one checkpoint of the tiny model, not two."""
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("needs mount and umount: apt-get install mount")
    if os.geteuid() != 0:
        pytest.skip("needs root: it mounts a 3 MB tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_ends_the_run_with_one_clear_message_and_resume_cleans_up(
        tiny_shards, small_disk):
    from launch import train

    run = small_disk / "run"
    full = train(tiny_shards, run, "checkpoint.every=5", check=False)
    assert full.returncode != 0
    # Each rank's error is one line: the full disk, or (a rank whose peer left first) the
    # lost peer; the lines of two ranks may interleave.
    errors = full.stderr.replace("mlm-dist train: error:", "\nmlm-dist train: error:")
    errors = [line for line in errors.splitlines() if line.startswith("mlm-dist train: error:")]
    full_disk = [line for line in errors if "free on that filesystem" in line]
    assert full_disk, full.stderr[-3000:]
    message = full_disk[0]
    assert "could not save checkpoint" in message and str(run / "checkpoints") in message
    assert "checkpoint.keep" in message and "free on that filesystem" in message
    assert "Traceback" not in full.stderr  # one clear line, not torch's internals
    steps = checkpoint.tags(run / "checkpoints")
    complete = [d for _, d, ok in steps if ok]
    crashed = [d for _, d, ok in steps if not ok]
    assert complete and crashed, steps  # the first save fits, a later one does not
    assert f"the last complete checkpoint, {complete[-1].name}, takes" in message

    # More room, and resume: the crashed save goes, the complete one is loaded untouched.
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = train(tiny_shards, run, "checkpoint.every=5", "checkpoint.keep=1",
                    "checkpoint.resume=true")
    assert f"resumed from step {int(complete[-1].name.split('_')[1])}" in resumed.stdout
    assert all(not d.exists() or (d / checkpoint.COMPLETE).is_file() for d in crashed)
    assert checkpoint.latest_complete(run / "checkpoints").name == "step_00000040"
