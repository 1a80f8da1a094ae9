"""Shards behind a URL: `https://host/path/`, `s3://bucket/prefix/`, `gs://bucket/prefix/`, and
WebDataset's `pipe:CMD`, read as streams without a shared filesystem.

A shard location (`data.shards`) is a directory or one of these; manifest.json is at the
location, and each shard at the location joined with the manifest's relative path. URLs are
opened through fsspec (HTTP with aiohttp, S3 with s3fs, GCS with gcsfs: `pip install
'mlm-dist[remote]'` brings the first two), which reads a file in blocks of BLOCK_BYTES by range
requests: a shard is read sequentially, never stored whole, and memory stays at one block
per reader. `pipe:CMD` runs CMD in a shell through WebDataset's Pipe with `{}` replaced
by the file's relative path (`pipe:aws s3 cp s3://bucket/prefix/{} -`), for any tool that can
write a file to its standard output.

Credentials stay the user's: nothing here takes or stores one. fsspec's libraries read their
standard sources (AWS_* variables and profiles, AWS_ENDPOINT_URL for an S3-compatible store,
~/.netrc for HTTP, Google's default credentials), so the run's config.yaml records the URL only,
and a URL that carries a password or a query string (a signed URL) is refused.

Every read has a timeout (data.stream_timeout): a server that stops answering ends the attempt
instead of hanging a worker; reader.py retries it from the last whole sample.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import select
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from mlm_dist.config import ConfigError, DataConfig
from mlm_dist.errors import UserError

log = logging.getLogger("mlm_dist.data")

PIPE = "pipe:"
BLOCK_BYTES = 4 << 20  # one range request, and what a reader holds of a shard at a time
# What each URL scheme needs beyond fsspec: the module fsspec imports for it, and the install.
LIBRARIES = {"http": ("aiohttp", "pip install 'mlm-dist[remote]'"),
             "https": ("aiohttp", "pip install 'mlm-dist[remote]'"),
             "s3": ("s3fs", "pip install 'mlm-dist[remote]'"),
             "gs": ("gcsfs", "pip install gcsfs"),
             "gcs": ("gcsfs", "pip install gcsfs")}
CREDENTIALS_HINT = {
    "s3": "the AWS credentials of this host (AWS_PROFILE or AWS_ACCESS_KEY_ID/"
          "AWS_SECRET_ACCESS_KEY; AWS_ENDPOINT_URL for an S3-compatible store)",
    "gs": "the Google credentials of this host (GOOGLE_APPLICATION_CREDENTIALS)",
    "gcs": "the Google credentials of this host (GOOGLE_APPLICATION_CREDENTIALS)",
    "http": "~/.netrc if the server asks for a login",
    "https": "~/.netrc if the server asks for a login"}


class RemoteShardsError(UserError, OSError):
    """A shard location that cannot be read: unreachable, unauthorised or not there."""


@dataclass(frozen=True)
class StreamSettings:
    """How a remote shard is read: the data.stream_* keys."""
    retries: int = DataConfig.stream_retries  # attempts in a row without a new sample
    backoff: float = DataConfig.stream_backoff  # seconds before the first retry, then doubled
    timeout: float = DataConfig.stream_timeout  # seconds for a connection, or for one read

    @classmethod
    def of(cls, data: DataConfig) -> "StreamSettings":
        return cls(data.stream_retries, data.stream_backoff, data.stream_timeout)


def is_remote(location: str) -> bool:
    """A URL or pipe: command rather than a local path (file:// counts as a local path)."""
    location = str(location)
    return location.startswith(PIPE) or (
        "://" in location and urlsplit(location).scheme not in ("", "file"))


def check_location(location: str) -> None:
    """Refuse, before anything is opened, a location this host cannot read or should not
    record: an unknown scheme, a missing library, credentials written into the URL."""
    if location.startswith(PIPE):
        if "{}" not in location:
            raise ConfigError(f"data.shards: {location!r} has no {{}}: write the command that "
                              "prints one file, with {} where its relative path goes, e.g. "
                              "'pipe:aws s3 cp s3://bucket/shards/{} -'")
        return
    parts = urlsplit(location)
    scheme = parts.scheme.lower()
    if scheme not in LIBRARIES:
        raise ConfigError(f"data.shards: {scheme}:// is not a shard location this reads; give a "
                          "directory, an http(s)://, s3:// or gs:// URL, or 'pipe:CMD {}'")
    if parts.password is not None or parts.username is not None or parts.query:
        raise ConfigError(f"data.shards: {scheme}://{parts.hostname}/… carries credentials "
                          "(user:password@ or a ?query); the URL is written to the run's "
                          f"config.yaml, so give them as {CREDENTIALS_HINT[scheme]}")
    module, install = LIBRARIES[scheme]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"data.shards: {scheme}:// URLs need the {module} package: {install}")


def join(location: str, relative: str) -> str:
    """Where the file `relative` (a manifest path: checked to stay inside) of a location is."""
    if location.startswith(PIPE):
        return location.replace("{}", shlex.quote(relative))
    return location.rstrip("/") + "/" + relative


def shard_location(location: str | os.PathLike, relative: str) -> str:
    """Where a shard listed in the manifest of `location` is: a URL, or an absolute path."""
    if is_remote(str(location)):
        return join(str(location), relative)
    return str(Path(location).resolve() / relative)


def read_file(location: str, relative: str, settings: StreamSettings = StreamSettings()) -> bytes:
    """The whole of a small file (the manifest), or one RemoteShardsError naming the URL."""
    url = join(location, relative)

    def attempt() -> bytes:
        if url.startswith(PIPE):
            with PipeStream(url, settings.timeout) as stream:
                data = stream.readall()
                stream.finish()
                return data
        fs, path = _filesystem(url, settings)
        return fs.cat_file(path)

    try:
        return _with_retries(attempt, url, settings)
    except Exception as e:
        raise RemoteShardsError(unreadable(url, e, location)) from None


def check_readable(location: str, relative: str, settings: StreamSettings) -> None:
    """Read a little of one shard from past its first block, as a reader resuming there
    would: the objects are readable with this host's credentials, not just the manifest, and
    an HTTP server answers range requests (without them no stream could resume)."""
    url = join(location, relative)

    def attempt() -> None:
        with open_stream(url, 512, settings) as stream:
            if not stream.read(1):
                raise ValueError("shorter than one tar block")

    try:
        _with_retries(attempt, url, settings)
    except Exception as e:
        raise RemoteShardsError(unreadable(url, e, location)) from None


def open_stream(url: str, offset: int, settings: StreamSettings,
                size: int | None = None) -> BinaryIO:
    """A read-only stream of a shard, `offset` bytes in: seeked by a range request for a URL,
    read and dropped for a pipe (whose command starts from the beginning again). `size`, the
    shard's bytes from the manifest, spares the request that would ask the server for it."""
    if url.startswith(PIPE):
        raw = PipeStream(url, settings.timeout)
    else:
        fs, path = _filesystem(url, settings)
        # No cache of fsspec's own: the buffer below asks for a whole block at a time, and
        # answers the tar reader's many small reads in C (fsspec's read costs ~10 µs a call).
        raw = FsspecStream(fs.open(path, "rb", block_size=BLOCK_BYTES, cache_type="none",
                                   size=size))
    try:
        seeked = offset > 0 and _seek(raw, offset)
        stream = io.BufferedReader(raw, buffer_size=BLOCK_BYTES)
        if offset and not seeked:
            # A pipe starts again from the beginning, as does a server that gives no size
            # (one streaming GET): read up to the offset and drop it.
            _drop(stream, offset)
        return stream
    except BaseException:
        raw.close()
        raise


def _with_retries(attempt, url: str, settings: StreamSettings):
    """attempt(), tried again after a failure of the connection (as the loader would), not
    after an answer: not found, access denied, no credentials."""
    failures = 0
    while True:
        try:
            return attempt()
        except Exception as e:
            if not _worth_retrying(e) or failures >= settings.retries:
                raise
            failures += 1
            wait = settings.backoff * 2 ** (failures - 1)
            log.warning("%s: %s; trying again in %.3g s (retry %d of %d)", redacted(url),
                        reason(e), wait, failures, settings.retries)
            time.sleep(wait)


def _worth_retrying(error: BaseException) -> bool:
    if not isinstance(error, transport_errors()) or isinstance(
            error, (FileNotFoundError, PermissionError)):
        return False
    if type(error).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return False
    status = getattr(error, "status", None)
    return not (isinstance(status, int) and 400 <= status < 500)


def transport_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a broken or stalled connection raises through the libraries in use:
    OSError (timeouts, resets, refused connections) and the libraries' own families."""
    errors: list[type[BaseException]] = [OSError, EOFError]
    for module, name in (("aiohttp", "ClientError"), ("botocore.exceptions", "BotoCoreError"),
                         ("botocore.exceptions", "ClientError")):
        if module in sys.modules:  # imported by fsspec if it is in use; never imported here
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def unreadable(url: str, error: BaseException, location: str) -> str:
    """One line for a location that cannot be read: the URL, why, and what to check."""
    scheme = "pipe" if location.startswith(PIPE) else urlsplit(location).scheme.lower()
    what = ("the command's exit status and output above" if scheme == "pipe" else
            f"the URL, that the server answers from this host, and {CREDENTIALS_HINT[scheme]}")
    return f"cannot read {redacted(url)} ({reason(error)}); check {what}"


def reason(error: BaseException) -> str:
    """What went wrong, in a few words, from the innermost exception that says it."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for e in chain:
        status = getattr(e, "status", None)
        if isinstance(status, int) and status >= 400:
            return f"HTTP {status} {getattr(e, 'message', '')}".strip()
    for e in reversed(chain):
        if isinstance(e, PermissionError):
            return f"access denied: {e}"
        if isinstance(e, TimeoutError):
            return "no answer in time (data.stream_timeout)"
        if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            return f"no credentials: {e}"
        if isinstance(e, ConnectionError) or type(e).__name__ in (
                "ClientConnectorError", "EndpointConnectionError"):
            return f"cannot connect: {e}"
    e = chain[0]
    if isinstance(e, FileNotFoundError):
        return "not found"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def redacted(url: str) -> str:
    """The URL as it may be printed: without a password or query (check_location refuses them,
    but a message must not leak one even where it was not checked)."""
    if url.startswith(PIPE):
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{':%d' % parts.port if parts.port else ''}{parts.path}"


def _filesystem(url: str, settings: StreamSettings):
    """fsspec's filesystem for a URL, with connect and read timeouts, and the path in it."""
    import fsspec

    scheme = urlsplit(url).scheme.lower()
    options: dict = {}
    if scheme in ("http", "https", "gs", "gcs"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.timeout,
                                        sock_read=settings.timeout)
        if scheme.startswith("http"):
            # trust_env: proxies from HTTP(S)_PROXY and logins from ~/.netrc, as curl reads them
            options["client_kwargs"] = {"timeout": timeout, "trust_env": True}
        else:
            options["requests_timeout"] = timeout
    elif scheme == "s3":
        options["config_kwargs"] = {"connect_timeout": settings.timeout,
                                    "read_timeout": settings.timeout}
    return fsspec.core.url_to_fs(url, **options)


def _seek(raw, offset: int) -> bool:
    """Whether `raw` now stands at `offset`. fsspec's streaming HTTP file (a server that gives
    no size) calls itself seekable and refuses to seek."""
    if not raw.seekable():
        return False
    try:
        raw.seek(offset)
    except (ValueError, io.UnsupportedOperation):
        return False
    return True


def _drop(stream, count: int) -> None:
    while count > 0:
        chunk = stream.read(min(count, BLOCK_BYTES))
        if not chunk:
            raise EOFError(f"the stream ended {count} bytes before the point to resume at")
        count -= len(chunk)


class FsspecStream(io.RawIOBase):
    """An fsspec file as a raw stream of io's own kind, for the BufferedReader above it.

    The BufferedReader asks its raw stream whether it is closed on every read, and the tar
    reader makes three reads a member: fsspec's `closed` is a Python property (~1 µs), which
    made a remote shard cost ~10 % more CPU to parse than a local one (cProfile of `bench
    data`). io.RawIOBase answers `closed` in C."""

    def __init__(self, file):
        super().__init__()
        self.file = file

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.file.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def readinto(self, buffer) -> int:
        return self.file.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            try:
                self.file.close()
            finally:
                super().close()


class PipeStream(io.RawIOBase):
    """The output of a `pipe:` command as a raw read-only stream with a timeout on every read.

    WebDataset's Pipe runs the command; it is made unbuffered so that select() sees every byte
    still to come, and in a session of its own so that closing early ends the whole command
    (a shell pipeline included), never waits on a stalled one."""

    def __init__(self, url: str, timeout: float):
        from webdataset.gopen import Pipe

        super().__init__()
        self.url, self.timeout = url, timeout
        self.pipe = Pipe(url[len(PIPE):], mode="rb", shell=True, bufsize=0,
                         start_new_session=True, ignore_status=[141])  # 141: SIGPIPE on close
        self.fd = self.pipe.stream.fileno()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        ready, _, _ = select.select([self.fd], [], [], self.timeout)
        if not ready:
            raise TimeoutError(f"{self.url}: no output for {self.timeout:g} s "
                               "(data.stream_timeout)")
        return os.readv(self.fd, [buffer])

    def finish(self) -> None:
        """After reading to the end: the command's exit status, an OSError if it failed."""
        status = self.pipe.proc.wait(self.timeout)
        if status not in (0, 141):
            raise OSError(f"exit status {status}")

    def close(self) -> None:
        if self.closed:
            return
        proc = self.pipe.proc
        self.pipe.stream.close()
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.pipe.status = proc.returncode  # Pipe's own close would wait again, and raise
        super().close()
