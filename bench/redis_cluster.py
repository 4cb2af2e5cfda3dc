"""A private Redis Cluster on free loopback ports: for the benchmark of cluster mode and its tests.

Every node is a ``redis-server --cluster-enabled yes`` with nothing kept on disk. Three
masters or more are joined by ``redis-cli --cluster create``, as an operator would; fewer
(the benchmark compares one master with three), which ``redis-cli`` refuses, are joined here
with ``CLUSTER ADDSLOTSRANGE`` and ``CLUSTER MEET``. Torn down (processes killed, directories
removed) afterwards. Never the shared Redis. Importing this module fixes no environment (it
does not import :mod:`bench.harness`), so the tests import it too (``tests/redis_cluster.py``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import redis
import redis.cluster

__all__ = ["SLOTS", "PrivateRedisCluster", "redis_cluster"]

SLOTS = 16384


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


def _command(client: redis.Redis, *args: Any) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _cluster_ok(client: redis.Redis, masters: int) -> bool:
    info: Any = _command(client, "CLUSTER INFO")
    if isinstance(info, bytes):
        info = dict(line.split(":", 1) for line in info.decode().split() if ":" in line)
    return str(info.get("cluster_state")) == "ok" and int(info.get("cluster_known_nodes", 0)) == masters


class PrivateRedisCluster:
    """``masters`` masters (one or more), no replicas, slots split evenly in port order."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        if masters < 1:
            raise ValueError(f"a cluster needs at least one master, not {masters}")
        self.dir = workdir
        self.ports = _free_ports(masters)
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """A URL naming one node: a cluster client finds the others."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def slot_ranges(self) -> list[tuple[int, int]]:
        """The first and last slot each master serves, in the order of :attr:`ports`.

        Before the nodes are joined, the split :meth:`_join` gives; after, what the cluster
        says (``redis-cli`` splits a little differently).
        """
        n = len(self.ports)
        bounds = [SLOTS * i // n for i in range(n + 1)]
        planned = [(bounds[i], bounds[i + 1] - 1) for i in range(n)]
        if not self.procs:
            return planned
        node = redis.Redis(port=self.ports[0])
        try:
            served: dict[int, tuple[int, int]] = {}
            for first, last, master, *_ in _command(node, "CLUSTER SLOTS"):
                served[int(master[1])] = (int(first), int(last))
        except redis.RedisError:
            return planned
        finally:
            node.close()
        return [served.get(port, planned[i]) for i, port in enumerate(self.ports)]

    def start(self) -> None:
        """Start the nodes, give each its slots, join them; return once every node sees the cluster ok."""
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("a private Redis Cluster needs redis-server on PATH")
        for port in self.ports:
            node_dir = self.dir / str(port)
            node_dir.mkdir(parents=True, exist_ok=True)
            # fmt: off
            argv = [
                server, "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", "5000", "--save", "", "--appendonly", "no",
                "--dir", str(node_dir), "--logfile", str(node_dir / "redis.log"),
            ]
            # fmt: on
            self.procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        nodes = self.nodes()
        try:
            for node, port in zip(nodes, self.ports, strict=True):
                self._wait(node.ping, f"node {port} to answer")
            if len(self.ports) >= 3 and shutil.which("redis-cli"):
                hosts = [f"127.0.0.1:{port}" for port in self.ports]
                create = ["redis-cli", "--cluster", "create", *hosts, "--cluster-replicas", "0", "--cluster-yes"]
                subprocess.run(create, check=True, capture_output=True, timeout=60)
            else:
                self._join(nodes)
            for node, port in zip(nodes, self.ports, strict=True):
                self._wait(partial(_cluster_ok, node, len(nodes)), f"node {port} to see the cluster ok")
        finally:
            for node in nodes:
                node.close()

    def _join(self, nodes: list[redis.Redis]) -> None:
        """Give each master its slots and introduce them: what ``redis-cli --cluster create`` does."""
        for epoch, (node, (first, last)) in enumerate(zip(nodes, self.slot_ranges(), strict=True), start=1):
            # Distinct epochs up front, as redis-cli does: no collision for gossip to settle.
            _command(node, "CLUSTER SET-CONFIG-EPOCH", epoch)
            _command(node, "CLUSTER ADDSLOTSRANGE", first, last)
        for port in self.ports[1:]:
            _command(nodes[0], "CLUSTER MEET", "127.0.0.1", port)

    def client(self) -> redis.cluster.RedisCluster:
        """A cluster client (the caller closes it)."""
        return redis.cluster.RedisCluster.from_url(self.url)

    def nodes(self) -> list[redis.Redis]:
        """A plain client of each master, in the order of :attr:`ports` (the caller closes them)."""
        return [redis.Redis(port=port) for port in self.ports]

    def flush(self) -> None:
        """Empty every master."""
        for node in self.nodes():
            try:
                node.flushall()
            finally:
                node.close()

    def stop(self) -> None:
        """Kill every node."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.procs.clear()

    @staticmethod
    def _wait(check: Callable[[], object], what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        last: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except (redis.RedisError, OSError) as exc:
                last = exc
            time.sleep(0.05)
        raise TimeoutError(f"waited {timeout_s}s for {what} (last error: {last})")


@contextmanager
def redis_cluster(masters: int = 3) -> Iterator[PrivateRedisCluster]:
    """A private cluster of ``masters`` masters for the duration of the block."""
    workdir = Path(tempfile.mkdtemp(prefix="eventbus-cluster-"))
    cluster = PrivateRedisCluster(workdir, masters)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
