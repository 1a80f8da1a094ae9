"""Shards read from real servers the tests start: HTTP (with Range), S3 (moto), and `pipe:`
commands. The same documents and batches as from the directory; a connection that drops
mid-shard is read on from the last whole sample, a dead one counted as skipped, never a hang;
bad URLs are one clear error before any work; credentials never reach the run's files."""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch

from launch import cli, metrics, train
from remote_servers import CuttingProxy, FileServer, environment, s3_bucket, silent_port
from mlm_dist.config import ConfigError, DataConfig, load_config
from mlm_dist.data import remote
from mlm_dist.data.pipeline import LoaderSettings, ResumableLoader, manifest_shards
from mlm_dist.data.reader import SkipCounter, read_documents
from mlm_dist.data.remote import RemoteShardsError, StreamSettings
from mlm_dist.data.shards import Manifest
from mlm_dist.tokenizer import Tokenizer


def needs(module: str, install: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed ({install})")


NEEDS_HTTP = needs("aiohttp", "pip install '.[remote]'")
NEEDS_S3 = [needs("s3fs", "pip install '.[remote]'"), needs("moto", "pip install '.[test]'")]
FAST = StreamSettings(retries=3, backoff=0.01, timeout=5)


def documents(path: str, expected: int, streams=FAST, skips=None):
    """Every document of a shard as comparable bytes."""
    skips = skips if skips is not None else SkipCounter()
    return [tuple(s.tobytes() for s in doc)
            for doc in read_documents(path, expected, 1, 0, skips, streams)]


def loader(location, workers=2, rank=0, state=None, **data):
    vocab = Tokenizer.load(Manifest.load(location).tokenizer.path).vocabulary
    settings = LoaderSettings(manifest_shards(location), seq_len=64, micro_batch=4, rank=rank,
                              world_size=2, seed=3, vocab=vocab,
                              data=DataConfig(num_workers=workers, shuffle_buffer=16, **data))
    return ResumableLoader(settings, state=state)


def batches(location, n=12, **kwargs):
    it = loader(location, **kwargs)
    try:
        return [b.input_ids for b in itertools.islice(it, n)]
    finally:
        it.close()


def same(xs, ys):
    return len(xs) == len(ys) and all(torch.equal(x, y) for x, y in zip(xs, ys))


@pytest.fixture(scope="module")
def served(tiny_shards):
    with FileServer(tiny_shards) as server:
        yield server


def resumes_mid_stream(location, full) -> None:
    """A loader stopped after 5 batches and resumed from its state gives the rest of `full`."""
    first = loader(location)
    list(itertools.islice(first, 5))
    state = first.state_dict()
    first.close()
    assert same(batches(location, n=7, state=state), full[5:])


@NEEDS_HTTP
def test_http_gives_the_directorys_documents_and_batches(tiny_shards, served):
    url = served.url + "/"
    local, remote_ = manifest_shards(tiny_shards), manifest_shards(url)
    assert [s.path for s in remote_] == [f"{served.url}/{Path(s.path).name}" for s in local]
    for a, b in zip(local, remote_):
        skips = SkipCounter()
        assert documents(b.path, b.documents, skips=skips) == documents(a.path, a.documents)
        assert skips.documents == 0
    # 2 workers per rank, each its own fsspec client in its own process; resumed mid-stream
    full = batches(url)
    assert same(full, batches(tiny_shards))
    resumes_mid_stream(url, full)


@NEEDS_HTTP
def test_bench_data_reads_a_url_as_it_reads_the_directory(tiny_shards, served):
    """`bench data --shards URL` is the comparison README reports: the same batches (fill,
    documents per micro-batch) from the server as from the directory, and a rate for each."""
    def figures(location):
        proc = cli("bench", "data", "--shards", str(location), "--seq-len", "64",
                   "--batches", "20", "--repeats", "1", "--mask-batch", "4", "--mask-seq-len", "32")
        return json.loads(proc.stdout)["loader"][0]

    local, served_ = figures(tiny_shards), figures(served.url + "/")
    for key in ("sequences", "fill", "documents_per_micro_batch", "skipped_documents"):
        assert served_[key] == local[key], key
    assert served_["sequences_per_s_per_worker"] > 0 and served_["first_batch_seconds"] > 0


def test_pipe_command_gives_the_directorys_batches(tiny_shards):
    location = f"pipe:cat {tiny_shards}/{{}}"
    assert same(batches(location), batches(tiny_shards))
    stopping = SkipCounter()
    reader = read_documents(remote.join(location, manifest_shards(tiny_shards)[0].path.rsplit(
        "/", 1)[1]), 40, 1, 0, stopping, FAST)
    next(reader)
    reader.close()  # stopping early ends the command at once, and counts nothing
    assert stopping.documents == 0


@pytest.mark.parametrize("resume", [False, True])
def test_s3_gives_the_directorys_batches_with_exact_resume(tiny_shards, resume):
    for mark in NEEDS_S3:
        if mark.args[0]:
            pytest.skip(mark.kwargs["reason"])
    with s3_bucket(tiny_shards) as (url, env), environment(env):
        full = batches(url, n=12)
        assert same(full, batches(tiny_shards, n=12))
        if resume:
            resumes_mid_stream(url, full)


@NEEDS_HTTP
def test_a_dropped_connection_reads_on_from_the_last_whole_sample(tiny_shards, served,
                                                                 monkeypatch, caplog):
    monkeypatch.setattr(remote, "BLOCK_BYTES", 4096)  # several range requests per shard
    shard = manifest_shards(tiny_shards)[0]
    name = shard.path.rsplit("/", 1)[1]
    with CuttingProxy(served.url, after=20_000, cuts=3) as proxy:
        skips = SkipCounter()
        with caplog.at_level(logging.WARNING, "mlm_dist.data"):
            got = documents(f"{proxy.url}/{name}", shard.documents, skips=skips)
        assert proxy.cut == 3
    assert got == documents(shard.path, shard.documents) and skips.documents == 0
    # A cut inside the response headers aiohttp retries by itself; a cut in the body breaks
    # the stream, which is read on from the last whole sample, not from the start.
    resumed_at = [int(m.split("broke at byte ")[1].split(" ")[0]) for m in caplog.messages
                  if "broke at byte" in m]
    assert resumed_at and all(offset > 0 for offset in resumed_at), caplog.messages


def test_a_pipe_that_dies_mid_shard_is_run_again_and_skips_what_it_gave(tiny_shards, tmp_path):
    shard = manifest_shards(tiny_shards)[0]
    name = shard.path.rsplit("/", 1)[1]
    failed = tmp_path / "failed-once"
    # The first run prints part of the shard and fails; the second prints all of it.
    location = (f"pipe:if [ -e {failed} ]; then cat {tiny_shards}/{{}}; else touch {failed}; "
                f"head -c 30000 {tiny_shards}/{{}}; exit 1; fi")
    skips = SkipCounter()
    got = documents(remote.join(location, name), shard.documents, skips=skips)
    assert failed.exists() and skips.documents == 0
    assert got == documents(shard.path, shard.documents)


@NEEDS_HTTP
def test_a_connection_that_always_drops_counts_the_shard_as_skipped(tiny_shards, served,
                                                                    caplog):
    shard = manifest_shards(tiny_shards)[0]
    name = shard.path.rsplit("/", 1)[1]
    with CuttingProxy(served.url, after=5_000, cuts=None) as proxy:
        skips = SkipCounter()
        with caplog.at_level(logging.WARNING, "mlm_dist.data"):
            got = documents(f"{proxy.url}/{name}", shard.documents, skips=skips,
                            streams=StreamSettings(retries=2, backoff=0.01, timeout=5))
    assert got == [] and skips.documents == shard.documents  # counted, not silently lost
    assert sum("broke at byte" in m for m in caplog.messages) == 2
    assert any("gave up after 3 attempt(s)" in m for m in caplog.messages)


@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_a_server_that_never_answers_times_out_instead_of_hanging(kind):
    if kind == "http" and importlib.util.find_spec("aiohttp") is None:
        pytest.skip("aiohttp is not installed (pip install '.[remote]')")
    settings = StreamSettings(retries=1, backoff=0.01, timeout=0.5)
    with silent_port() as url:
        location = f"{url}/train-000000.tar" if kind == "http" else "pipe:sleep 60"
        skips = SkipCounter()
        start = time.monotonic()
        assert documents(location, 7, streams=settings, skips=skips) == []
        assert time.monotonic() - start < 15
    assert skips.documents == 7


@NEEDS_HTTP
def test_unreachable_missing_or_forbidden_urls_are_one_clear_error(tiny_shards, tmp_path):
    with silent_port() as url:
        dead = url  # nothing will ever answer, and after the block nothing listens either
    root = tmp_path / "site"
    shutil.copytree(tiny_shards, root / "forbidden")
    with FileServer(root) as server:
        for location, why in [(dead + "/shards/", "cannot connect"),
                              (server.url + "/nothing/", "not found"),
                              (server.url + "/forbidden/", "HTTP 403")]:
            with pytest.raises(RemoteShardsError) as error:
                Manifest.load(location, StreamSettings(backoff=0.01, timeout=5))
            assert f"cannot read {location}manifest.json ({why}" in str(error.value)


def test_bad_locations_are_refused_before_anything_is_opened():
    with pytest.raises(ConfigError, match="carries credentials") as error:
        remote.check_location("https://user:hunter2@example.org/shards/")
    assert "hunter2" not in str(error.value)
    with pytest.raises(ConfigError, match=r"\?query"):
        remote.check_location("https://example.org/shards/?X-Amz-Signature=abc")
    with pytest.raises(ConfigError, match="has no {}"):
        remote.check_location("pipe:cat /data/manifest.json")
    with pytest.raises(ConfigError, match="ftp:// is not a shard location"):
        remote.check_location("ftp://example.org/shards/")
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(ConfigError, match="gs:// URLs need the gcsfs package: pip install"):
            remote.check_location("gs://bucket/shards/")
    for key, value in [("stream_retries", "-1"), ("stream_timeout", "0")]:
        with pytest.raises(ConfigError, match=f"data.{key}"):
            load_config(None, [f"data.{key}={value}", "data.shards=x"])


@NEEDS_HTTP
def test_a_server_without_range_requests_fails_the_preflight(tiny_shards, tmp_path):
    from mlm_dist.training.preflight import resolve_data

    with FileServer(tiny_shards, ranges=False) as server:
        cfg = load_config(None, [f"data.shards={server.url}/", f"out_dir={tmp_path / 'run'}"])
        with pytest.raises(RemoteShardsError, match="range requests"):
            resolve_data(cfg)


@NEEDS_HTTP
def test_prepare_verify_checks_a_url(tiny_shards, served, tmp_path):
    proc = cli("prepare", "--verify", served.url + "/", "--quiet")
    assert "match its manifest" in proc.stdout
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_shards, damaged)
    first = sorted(damaged.glob("train-*.tar"))[0]
    first.write_bytes(first.read_bytes()[:-20000])
    with FileServer(damaged) as server:
        proc = cli("prepare", "--verify", server.url + "/", "--quiet", check=False)
    assert proc.returncode == 2 and f"{server.url}/{first.name}" in proc.stdout
    proc = cli("prepare", "--verify", served.url + "/nothing/", check=False)
    assert proc.returncode == 2 and "cannot read" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@NEEDS_HTTP
def test_train_stops_on_an_unreachable_url_before_any_process_group(tiny_shards, tmp_path):
    with silent_port() as url:
        pass
    proc = train(url + "/shards/", tmp_path / "run", "data.stream_backoff=0.01",
                 launcher="alone", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"cannot read {url}/shards/manifest.json (cannot connect" in proc.stderr
    assert "process group" not in proc.stderr and "deepspeed" not in proc.stderr.lower()


# ----------------------------------------------------------------------------- 2 ranks, real runs

RUN = ["schedule.phases=[{seq_len: 64, micro_batch: 4, global_batch: 16, until_step: 8}]",
       "train.log_every=1", "data.num_workers=2", "checkpoint.every=4", "checkpoint.keep=0",
       "data.stream_backoff=0.05"]


@pytest.fixture(scope="module")
def directory_run(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("from-directory") / "run"
    train(tiny_shards, out, *RUN)
    return out


def losses(run):
    return [(r["step"], r["train/loss"]) for r in metrics(run)]


@NEEDS_HTTP
def test_two_ranks_train_over_dropping_http_as_from_the_directory(directory_run, served,
                                                                  tmp_path):
    # 4 connections are cut mid-shard, every 30 kB sent (whichever rank, worker or pre-flight
    # check they serve: fewer than data.stream_retries in a row for any of them); the run reads
    # on and loses nothing.
    with CuttingProxy(served.url, after=30_000, cuts=4) as proxy:
        out = tmp_path / "run"
        train(proxy.url + "/", out, *RUN)
        assert proxy.cut == 4
    assert losses(out) == losses(directory_run)  # exactly: same data, same order
    assert metrics(out)[-1]["data/skipped_samples"] == 0
    assert load_config(out / "config.yaml").data.shards == proxy.url + "/"


def test_two_ranks_resume_from_s3_exactly_and_store_no_secret(directory_run, tiny_shards,
                                                                 tmp_path):
    for mark in NEEDS_S3:
        if mark.args[0]:
            pytest.skip(mark.kwargs["reason"])
    part = tmp_path / "part"
    shutil.copytree(directory_run, part)
    for d in (part / "checkpoints").glob("step_*"):
        if int(d.name.split("_")[1]) > 4:
            shutil.rmtree(d)
    (part / "checkpoints" / "latest").write_text("step_00000004")
    (part / "metrics.jsonl").unlink()
    with s3_bucket(tiny_shards) as (url, env), environment(env):
        proc = train(url, part, *RUN, "checkpoint.resume=true")
    assert "resumed from step 4" in proc.stdout
    assert losses(part) == losses(directory_run)[4:]
    assert load_config(part / "config.yaml").data.shards == url
    secret = env["AWS_SECRET_ACCESS_KEY"]
    assert secret not in proc.stdout + proc.stderr
    for path in part.rglob("*"):
        if path.is_file() and path.stat().st_size < 10_000_000:
            assert secret.encode() not in path.read_bytes(), path
