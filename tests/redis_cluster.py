"""A private 3-master Redis Cluster on free loopback ports, for the tests of cluster mode.

Started with ``redis-server --cluster-enabled yes`` and joined with ``redis-cli --cluster
create``; torn down (processes killed, directories removed) afterwards. Never the shared Redis.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
import redis.cluster

__all__ = ["RedisCluster3", "redis_cluster"]


def _free_ports(n: int) -> list[int]:
    """``n`` ports free now whose cluster-bus ports (+10000) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 >= 65536 or port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


def _cluster_ok(port: int) -> bool:
    info = redis.Redis(port=port).execute_command("CLUSTER INFO")
    state = info.get("cluster_state") if isinstance(info, dict) else None
    return str(state) == "ok" or b"cluster_state:ok" in (info if isinstance(info, bytes) else b"")


class RedisCluster3:
    """Three masters, no replicas, nothing kept on disk."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.dir = workdir
        self.ports = _free_ports(masters)
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """A URL naming one node: a cluster client finds the others."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> None:
        for port in self.ports:
            node = self.dir / str(port)
            node.mkdir(parents=True, exist_ok=True)
            # fmt: off
            argv = [
                "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-config-file", str(node / "nodes.conf"),
                "--cluster-node-timeout", "5000", "--save", "", "--appendonly", "no",
                "--dir", str(node), "--logfile", str(node / "redis.log"),
            ]
            # fmt: on
            self.procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        for port in self.ports:
            self._wait(lambda p=port: redis.Redis(port=p).ping(), f"node {port} to answer")
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for port in self.ports:
            self._wait(lambda p=port: _cluster_ok(p), f"node {port} to see the cluster ok")

    def client(self) -> redis.cluster.RedisCluster:
        return redis.cluster.RedisCluster.from_url(self.url)

    def flush(self) -> None:
        """Empty every master."""
        for port in self.ports:
            redis.Redis(port=port).flushall()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.procs.clear()

    @staticmethod
    def _wait(check: object, what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        last: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                if check():  # type: ignore[operator]
                    return
            except (redis.RedisError, OSError) as exc:
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"waited {timeout_s}s for {what} (last error: {last})")


@contextmanager
def redis_cluster(masters: int = 3) -> Iterator[RedisCluster3]:
    """A private cluster for the duration of the block."""
    workdir = Path(tempfile.mkdtemp(prefix="eventbus-cluster-"))
    cluster = RedisCluster3(workdir, masters)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
