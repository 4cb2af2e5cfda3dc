"""A private redis-server for one test, on a free port: for what the shared Redis must not
get (a password, ACL users), started and stopped by the test that needs it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from tests.conftest import wait_for

__all__ = ["redis_server"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_server(workdir: Path, password: str | None = None) -> Iterator[str]:
    """Run ``redis-server`` on loopback for the block; yield its URL (with the password, URL-quoted)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port, data = _free_port(), workdir / f"redis-{_free_port()}"
    data.mkdir(parents=True)
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data), "--save", "",
            "--appendonly", "no", "--maxmemory-policy", "noeviction"]  # fmt: skip
    if password is not None:
        argv += ["--requirepass", password]
    with (data / "redis.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    auth = f":{urllib.parse.quote(password, safe='')}@" if password is not None else ""
    url = f"redis://{auth}127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            assert proc.poll() is None, (data / "redis.log").read_text()
            return False

    try:
        wait_for(answers, timeout_s=20, what=f"redis-server on port {port}")
        yield url
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
