"""A local S3 for tests: moto in server mode on 127.0.0.1, plus a fault-injecting proxy in front of it.

Server mode (a real HTTP endpoint) rather than `mock_aws`, because pyarrow's C++ S3 client and any
subprocess or Ray worker cannot see an in-process mock; every client is pointed at the endpoint
explicitly. Nothing here can reach a real AWS endpoint: credentials are fake, the profile and config
files of the person running the tests are hidden, and the instance-metadata lookup is disabled.

Use from a test module (or register once in tests/conftest.py: `pytest_plugins = ["tests.s3server"]`):

    def test_x(s3):                      # a clean S3 for this test
        s3.put("bkt", "calls/a.wav", b"...")
        fetch_bytes("s3://bkt/calls/a.wav", s3.options)

    with FaultProxy(s3.endpoint_url) as proxy:   # S3 that throttles on demand
        proxy.fail_next(2, status=503, code="SlowDown")
        fetch_bytes(uri, proxy.options)
"""
from __future__ import annotations

import http.client
import logging
import socket
import threading
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import urlsplit

import pytest

from pipeline.io.storage import StorageOptions

__all__ = ["s3_server", "s3", "S3Env", "FaultProxy", "free_port", "FAKE_AWS_ENV"]

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/phi4mm-tests/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/phi4mm-tests/aws-credentials",
}
# Settings of the person running the tests that would point clients elsewhere.
_HIDDEN_ENV = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
               "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Env:
    """One test's view of the local S3."""
    endpoint_url: str
    options: StorageOptions
    _client: Any = field(default=None, repr=False)

    @property
    def client(self):
        """A boto3 S3 client on the local endpoint (for seeding and checking)."""
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION)
        return self._client

    def create_bucket(self, bucket: str) -> None:
        try:
            self.client.create_bucket(Bucket=bucket)
        except self.client.exceptions.BucketAlreadyOwnedByYou:
            pass

    def put(self, bucket: str, key: str, data: bytes) -> str:
        """Store an object (creating the bucket when needed); returns its s3:// uri."""
        self.create_bucket(bucket)
        self.client.put_object(Bucket=bucket, Key=key, Body=data)
        return f"s3://{bucket}/{key}"

    def get(self, bucket: str, key: str) -> bytes:
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def reset(self) -> None:
        """Forget every bucket and object (moto's reset endpoint)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint url of a moto server running for the whole session, with fake credentials in env."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with pytest.MonkeyPatch.context() as env:
        for name in _HIDDEN_ENV:
            env.delenv(name, raising=False)
        for name, value in FAKE_AWS_ENV.items():
            env.setenv(name, value)
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3(s3_server: str) -> S3Env:
    """A clean local S3 for one test: every bucket from earlier tests is gone."""
    env = S3Env(endpoint_url=s3_server, options=StorageOptions(endpoint_url=s3_server, region=REGION))
    env.reset()
    return env


class FaultProxy:
    """An HTTP proxy in front of an S3 endpoint that answers chosen requests with S3 errors.

    `fail_next(n, ...)` makes the next n matching requests fail; `fail_always(...)` every one.
    `requests` records (method, path) of every request seen, to count attempts.
    """

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.requests: list[tuple[str, str]] = []
        self._rules: list[dict] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def options(self) -> StorageOptions:
        """Options pointing at the proxy, with the client's own retries off so attempts are countable."""
        return StorageOptions(endpoint_url=self.endpoint_url, region=REGION, retries=0)

    def fail_next(self, n: int, *, status: int = 503, code: str = "SlowDown",
                  message: str = "Please reduce your request rate.", method: str | None = "GET",
                  path_contains: str | None = None) -> None:
        """`path_contains`: only requests whose path (bucket/key, url-quoted) holds this string."""
        with self._lock:
            self._rules.append({"left": n, "status": status, "code": code, "message": message, "method": method,
                                "path": path_contains})

    def fail_always(self, **kwargs: Any) -> None:
        self.fail_next(10**9, **kwargs)

    def count(self, method: str) -> int:
        return sum(1 for m, _ in self.requests if m == method)

    def _failure_for(self, method: str, path: str = "") -> dict | None:
        with self._lock:
            for rule in self._rules:
                if rule["left"] > 0 and rule["method"] in (None, method) and \
                        (rule.get("path") is None or rule["path"] in path):
                    rule["left"] -= 1
                    return rule
        return None

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _make_handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _handle(self) -> None:
            chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
            body = self._read_chunked() if chunked else self.rfile.read(int(self.headers.get("Content-Length") or 0))
            proxy.requests.append((self.command, self.path))
            rule = proxy._failure_for(self.command, self.path)
            if rule is not None:
                payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{rule["code"]}</Code>'
                           f'<Message>{rule["message"]}</Message><RequestId>fault-proxy</RequestId></Error>'
                           ).encode()
                self.send_response(rule["status"])
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                return
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
            try:
                # a chunked upload (pyarrow's S3 client sends those) goes on with its length instead
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "transfer-encoding", "content-length")}
                if body or chunked or self.headers.get("Content-Length"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                # a HEAD response tells the object's size without a body: keep the upstream's value
                size = response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", size)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            finally:
                conn.close()

        def _read_chunked(self) -> bytes:
            """An HTTP/1.1 chunked request body, de-chunked."""
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler
