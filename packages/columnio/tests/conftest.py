"""Fixtures for ColumnIO tests: a real S3-compatible server on loopback (moto server mode).

Nothing reaches the internet: the server listens on 127.0.0.1, credentials are fixed
dummies, and the AWS SDK is told not to look for instance metadata or profile files.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import pyarrow.fs as pafs
import pytest

# Shared test data helpers (columnio_testdata.py) import by name from this directory.
sys.path.insert(0, os.path.dirname(__file__))

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"

# What the AWS SDK (inside pyarrow) and moto read. Profile files point nowhere so a
# developer's real ~/.aws config cannot leak into the tests.
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_AWS_ENV_UNSET = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@dataclass(frozen=True)
class S3Server:
    """A running moto S3 server: where it listens and how to reach it from pyarrow."""

    endpoint: str  # "127.0.0.1:PORT"

    def filesystem(self) -> pafs.S3FileSystem:
        """A fresh pyarrow S3 filesystem talking to this server."""
        return pafs.S3FileSystem(
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            region=REGION,
            endpoint_override=self.endpoint,
            scheme="http",
            allow_bucket_creation=True,
        )

    def uri(self, bucket_key: str) -> str:
        """``s3://`` URI for ``bucket/key`` that ``FileSystem.from_uri`` resolves to this server.

        pyarrow takes credentials only as the URI's user info (``access_key``/``secret_key``
        are not accepted query parameters); endpoint, scheme and region go in the query.
        """
        query = urlencode(
            {"endpoint_override": self.endpoint, "scheme": "http", "region": REGION},
            safe=":",
        )
        return f"s3://{ACCESS_KEY}:{SECRET_KEY}@{bucket_key.lstrip('/')}?{query}"

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no error if it exists); returns the name."""
        self.filesystem().create_dir(name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 server (moto) on 127.0.0.1 for the whole test session."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:  # moto[server] is a dev dependency; plain installs skip
        pytest.skip(f"S3 tests need moto[server] (uv sync --group dev): {e}")

    patch = pytest.MonkeyPatch()
    for name, value in _AWS_ENV.items():
        patch.setenv(name, value)
    for name in _AWS_ENV_UNSET:
        patch.delenv(name, raising=False)

    # One log line per HTTP request otherwise; failures still show moto's errors.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server: Any = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server(endpoint=f"{host}:{port}")
    finally:
        server.stop()
        patch.undo()
        # No pyarrow.fs.finalize_s3() here: pyarrow registers ensure_s3_finalized with
        # atexit itself, and finalizing early would break any later S3 use in this process.
