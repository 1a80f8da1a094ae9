"""Real servers for the remote-shard tests, started on 127.0.0.1 by the tests and stopped after.

HTTP: Werkzeug's server (Werkzeug is already pinned, as TensorBoard's and Flask's dependency)
serving a directory through `send_from_directory(conditional=True)`, which answers Range
requests with 206 as nginx or a CDN do; it starts in this process in milliseconds, with no
system package to install or skip for. S3: moto's ThreadedMotoServer, a real S3 API over HTTP.
Faults: a TCP proxy that cuts connections after some bytes, and a port that never answers.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from contextlib import contextmanager
from pathlib import Path


class FileServer:
    """A directory over HTTP with Range support; paths under `forbidden/` answer 403."""

    def __init__(self, root: Path, ranges: bool = True):
        from werkzeug.exceptions import Forbidden, HTTPException
        from werkzeug.serving import make_server
        from werkzeug.utils import send_from_directory
        from werkzeug.wrappers import Request

        def app(environ, start_response):
            path = Request(environ).path.lstrip("/")
            try:
                if path.startswith("forbidden/"):
                    raise Forbidden()
                response = send_from_directory(root, path, environ, conditional=ranges)
                if not ranges:
                    response.headers.pop("Accept-Ranges", None)
            except HTTPException as e:
                response = e.get_response(environ)
            return response(environ, start_response)

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


class CuttingProxy:
    """A TCP proxy in front of a server that drops connections mid-response, as a failing
    network does: every `after` bytes the server sends (counted over all connections), the
    connection carrying the next byte is closed instead, `cuts` times (None: for ever)."""

    def __init__(self, upstream: str, after: int, cuts: int | None):
        host, port = upstream.rsplit("//", 1)[-1].rsplit(":", 1)
        self.upstream = (host, int(port))
        self.after, self.cuts = after, cuts
        self.sent = self.cut = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> "CuttingProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping = True
        self.thread.join()
        self.listener.close()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)  # closing a socket does not wake a blocked accept()
        while not self.stopping:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream)
        except OSError:
            _close(client)
            return
        threading.Thread(target=_pump, args=(client, server), daemon=True).start()
        _pump(server, client, self._allowance)

    def _allowance(self, size: int) -> int | None:
        """How many of `size` bytes from the server pass; None: all, and the connection stays."""
        with self.lock:
            if self.cuts is not None and self.cut >= self.cuts:
                return None
            room = self.after * (self.cut + 1) - self.sent
            if size < room:
                self.sent += size
                return None
            self.sent += room
            self.cut += 1
            return room


def _pump(source: socket.socket, sink: socket.socket, allowance=None) -> None:
    """Copy until either side closes, or until `allowance(len(data))` says where to cut."""
    try:
        while True:
            data = source.recv(65536)
            if not data:
                return
            cut_at = allowance(len(data)) if allowance else None
            sink.sendall(data if cut_at is None else data[:cut_at])
            if cut_at is not None:
                return
    except OSError:
        return
    finally:
        for s in (source, sink):
            _close(s)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


@contextmanager
def silent_port():
    """An address that accepts connections and never answers: only a timeout ends a read."""
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


S3_ENV = {"AWS_ACCESS_KEY_ID": "mlm-dist-test-key",
          "AWS_SECRET_ACCESS_KEY": "mlm-dist-test-SECRET-do-not-store",
          "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def s3_bucket(directory: Path, bucket: str = "shards", prefix: str = "tiny"):
    """moto's S3 server on a free port, `directory` uploaded under s3://bucket/prefix/; yields
    (URL of the prefix, the environment a client needs: the test credentials and
    AWS_ENDPOINT_URL, as a user of an S3-compatible store sets them)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    environment = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    try:
        client = boto3.client("s3", endpoint_url=environment["AWS_ENDPOINT_URL"],
                              aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                              region_name=S3_ENV["AWS_DEFAULT_REGION"])
        client.create_bucket(Bucket=bucket)
        for path in sorted(directory.iterdir()):
            client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
        yield f"s3://{bucket}/{prefix}/", environment
    finally:
        server.stop()


@contextmanager
def environment(values: dict):
    """os.environ with `values` set, restored after; fsspec's cached S3 clients dropped, since
    they keep the endpoint and credentials they were made with."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    _forget_filesystems()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _forget_filesystems()


def _forget_filesystems() -> None:
    import fsspec

    for protocol in ("s3", "http"):
        try:
            fsspec.get_filesystem_class(protocol).clear_instance_cache()
        except ImportError:
            pass
