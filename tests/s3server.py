"""A real S3 endpoint for tests: moto's server mode on 127.0.0.1, with credentials confined to the block."""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest


@contextlib.contextmanager
def moto_s3(access_key: str, secret_key: str, region: str = "us-east-1") -> Iterator[str]:
    """Start moto's S3 server on a free loopback port and yield its endpoint URL (``http://127.0.0.1:PORT``).

    Inside the block the AWS environment holds only these dummy credentials: no instance metadata service, no
    user config or credential files, no profile or session token, and no proxy for loopback traffic.
    """
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", access_key)
        mp.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
        mp.setenv("AWS_DEFAULT_REGION", region)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        mp.setenv("no_proxy", "127.0.0.1,localhost")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()
