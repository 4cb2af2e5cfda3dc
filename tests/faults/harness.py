"""The fault suite's laboratory: private Redis servers, network namespaces, databases and the
processes of one environment (routers, log writers, workers), all torn down afterwards.

Plain Python, no pytest: ``conftest.py`` wraps it in fixtures and ``soak.py`` uses it directly.
Nothing here touches the shared Redis or PostgreSQL beyond its own keys and databases.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg2
import redis
import sqlalchemy as sa

from project.keys import Keys
from tests.faults import routes
from tests.rabbitmq import amqp_vhost, queue_depth

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
SHARED_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_DSN = os.environ.get("TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
_NETNS_PREFIX = "ebf"  # ebf<creator pid>n<k>: a namespace whose creator is gone is stale

T = TypeVar("T")

# Short timeouts so that every recovery path runs within a test's time.
BASE_ENV = {
    "EVENT_HANDLER_MODULES": routes.APP,
    "EVENT_CONTRACT_MODULES": "",  # the example application's contracts are not these apps'
    "EVENTS_MAX_HOPS": "3",
    "ROUTER_CLAIM_IDLE_MS": "1000",
    "ROUTER_BLOCK_MS": "200",
    "LOG_CLAIM_IDLE_MS": "1000",
    "LOG_BLOCK_MS": "200",
    "LOG_LINGER_MS": "50",
    "LOG_RETRY_MAX_S": "0.5",
    "DELIVERY_MAX_RETRIES": "3",
    "DELIVERY_BACKOFF_S": "0.05",
    "DELIVERY_BACKOFF_MAX_S": "0.2",
    "DELIVERY_LEASE_S": "2",
    "DELIVERY_TIME_LIMIT_S": "30",
    "BROKER_VISIBILITY_TIMEOUT_S": "6",
    "DELIVERY_DONE_TTL_S": "600",
    "RECONCILE_AFTER_S": "10",
    "RECONCILE_INTERVAL_S": "1",
    "PYTHONUNBUFFERED": "1",
}

EFFECTS_TABLE = """
CREATE TABLE IF NOT EXISTS fault_effects (
    id bigserial PRIMARY KEY,
    event_id uuid NOT NULL,
    handler text NOT NULL,
    pid integer,
    at timestamptz NOT NULL DEFAULT now()
)
"""  # no unique constraint on purpose: an effect applied twice must show as two rows


def wait_for(
    condition: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.05, what: str = "condition"
) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = condition()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")
        time.sleep(interval_s)
        last = condition()
    return last


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, return its result; raise with its output if it failed and ``check``."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def free_port() -> int:
    """A TCP port free on this machine right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    """The direct child processes of ``pid`` (from /proc)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
    return found


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- PostgreSQL -----------------------------------------------------------------------


def pg_admin(sql: str, dsn: str = PG_DSN) -> list[Any]:
    """Run one statement on the maintenance database, autocommit; return its rows if any."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall()) if cur.description else []
    finally:
        conn.close()


def db_url(name: str) -> str:
    """The SQLAlchemy URL of database ``name`` on the test server."""
    base = PG_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://", 1)
    return f"{base}/{name}"


def create_template(name: str) -> None:
    """Create database ``name``, migrated to head, with the fault suite's effects table."""
    pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    pg_admin(f"CREATE DATABASE {name}")
    subprocess.run(
        [PY, "-m", "alembic", "-x", f"url={db_url(name)}", "upgrade", "head"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    pg_admin(EFFECTS_TABLE, dsn=PG_DSN.rsplit("/", 1)[0] + f"/{name}")


def drop_database(name: str) -> None:
    """Drop ``name``, ending its sessions; re-allow connections first in case a scenario forbade them."""
    with contextlib.suppress(psycopg2.Error):
        pg_admin(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true")
    pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# -- a private Redis ------------------------------------------------------------------


class PrivateRabbitMQ:
    """A RabbitMQ node of one scenario's own, on free ports, with its own data directory.

    Scenarios that kill or restart the broker use one of these, never the machine's node.
    Killed and started again, it keeps its durable queues and persistent messages.
    """

    def __init__(self, workdir: Path, conf: str = "") -> None:
        """``conf``: more lines of ``rabbitmq.conf`` (``consumer_timeout = 5000``)."""
        self.port, self.dist_port = free_port(), free_port()
        self.node = f"eventbus{self.port}@localhost"
        self.dir = workdir / f"rabbitmq-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n{conf}"
        )
        self.env = {
            **os.environ,
            "HOME": str(self.dir),  # its own Erlang cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> PrivateRabbitMQ:
        """Start the node (again, on the same ports and data) and wait until it takes connections."""
        # The server script itself, not the wrapper that re-runs it as the rabbitmq user.
        with (self.dir / "server.log").open("ab") as out:
            self.proc = subprocess.Popen(
                ["/usr/lib/rabbitmq/bin/rabbitmq-server"], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

        def serving() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"rabbitmq-server exited: {self.log()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
            except OSError:
                return False
            return "Starting broker... completed" in self.log()

        wait_for(serving, timeout_s=90, interval_s=0.2, what=f"RabbitMQ node {self.node}")
        return self

    def kill(self) -> None:
        """SIGKILL the whole node (the Erlang VM and its helpers) and wait for it to exit."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        # The next start must not find the old node's log line.
        log = self.dir / "server.log"
        if log.exists():
            log.rename(self.dir / f"server.{time.time():.0f}.log")

    def stop(self) -> None:
        self.kill()

    def log(self) -> str:
        path = self.dir / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


class PrivateRedis:
    """A ``redis-server`` of one scenario's own, on a free port, with its own directory.

    Scenarios that kill, restart or reconfigure Redis use one of these, never the shared one.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        binds: tuple[str, ...] = ("127.0.0.1",),
        appendonly: bool = False,
        appendfsync: str = "everysec",
        directory: Path | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self.dir = directory or workdir / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.binds = binds
        self.argv = [
            "redis-server",
            "--port", str(self.port),
            "--bind", *binds,
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes" if appendonly else "no",
            "--appendfsync", appendfsync,
            "--maxmemory-policy", "noeviction",
            "--protected-mode", "no",
            "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
            *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL host-side processes use."""
        return self.url_on(self.binds[0])

    def url_on(self, host: str) -> str:
        """The URL of this server at address ``host`` (one of its binds)."""
        return f"redis://{host}:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new client of this server."""
        return redis.Redis.from_url(self.url, **kwargs)

    def start(self) -> PrivateRedis:
        """Start the server (again, on the same port and directory) and wait until it serves."""
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = self.client(socket_timeout=1, socket_connect_timeout=1)

        def serving() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"redis-server exited: {self.log()[-2000:]}"
            try:
                return bool(probe.ping())
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                return False

        try:
            wait_for(serving, timeout_s=30, what=f"redis-server on port {self.port}")
        finally:
            probe.close()
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the server and wait for it to exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        """The server's log file."""
        path = self.dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


# -- a disk that can lose power -------------------------------------------------------


class CrashableDisk:
    """An ext4 filesystem on a loop device whose power can be cut.

    A process crash loses nothing a program wrote: the kernel holds it. A power cut loses
    what the kernel had not written to the device yet. :meth:`power_cut` copies the device's
    backing file (what reached the "disk") while the writer is frozen, then mounts that copy
    at the same place: the filesystem as it would come back after the cut.
    """

    _count = 0

    def __init__(self, size_mb: int = 64) -> None:
        # Outside pytest's tmp_path, named after this process: a run killed before its
        # cleanup leaves a mount that sweep_stale_disks() finds and removes, and pytest's own
        # rotation of old tmp_path directories never meets a mounted filesystem.
        CrashableDisk._count += 1
        self.dir = DISK_ROOT / f"{os.getpid()}-{CrashableDisk._count}"
        self.image = self.dir / "disk.img"
        self.mountpoint = self.dir / "disk"
        self.size_mb = size_mb
        self.loop: str | None = None

    def create(self) -> CrashableDisk:
        """Make, attach and mount the filesystem."""
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        sh("truncate", "-s", f"{self.size_mb}M", str(self.image))
        sh("mkfs.ext4", "-q", "-F", str(self.image))
        self._mount(self.image)
        return self

    def _mount(self, image: Path) -> None:
        self.loop = sh("losetup", "-f", "--show", str(image)).stdout.strip()
        sh("mount", self.loop, str(self.mountpoint))

    def _unmount(self) -> None:
        if self.loop is not None:
            if sh("umount", str(self.mountpoint), check=False).returncode != 0:
                sh("umount", "-l", str(self.mountpoint), check=False)
            sh("losetup", "-d", self.loop, check=False)
            self.loop = None

    def power_cut(self) -> None:
        """Keep only what reached the device, as a power cut would (freeze the writers first)."""
        crashed = self.image.with_name("disk-after-cut.img")
        with self.image.open("rb") as src, crashed.open("wb") as dst:  # the device, as it is now
            while chunk := src.read(1 << 20):
                if chunk.count(0) == len(chunk):
                    dst.seek(len(chunk), os.SEEK_CUR)  # keep it sparse
                else:
                    dst.write(chunk)
            dst.truncate()
        self._unmount()
        self._mount(crashed)  # ext4 replays its journal, like a reboot

    def destroy(self) -> None:
        """Unmount, detach and delete the images (idempotent)."""
        self._unmount()
        shutil.rmtree(self.dir, ignore_errors=True)


DISK_ROOT = Path(tempfile.gettempdir()) / "eventbus-fault-disks"


def sweep_stale_disks() -> None:
    """Remove the crashable disks of runs that died before cleaning up: stop the servers still
    working in them, unmount, detach their loop devices, delete the images."""
    if not DISK_ROOT.is_dir():
        return
    mounted = {line.split()[1] for line in Path("/proc/mounts").read_text().splitlines() if len(line.split()) > 1}
    for run in DISK_ROOT.iterdir():
        creator = run.name.split("-", 1)[0]
        if not creator.isdigit() or pid_alive(int(creator)):
            continue
        mountpoint = run / "disk"
        for proc in Path("/proc").iterdir():  # a private redis-server chdir'ed into the disk
            with contextlib.suppress(OSError, ValueError):
                if proc.name.isdigit() and Path(os.readlink(proc / "cwd")).is_relative_to(mountpoint):
                    os.kill(int(proc.name), signal.SIGKILL)
        if str(mountpoint) in mounted:
            sh("umount", "-l", str(mountpoint), check=False)
        for image in run.glob("*.img"):
            for line in sh("losetup", "-j", str(image), check=False).stdout.splitlines():
                sh("losetup", "-d", line.split(":", 1)[0], check=False)
        shutil.rmtree(run, ignore_errors=True)


# -- a worker host cut off by a network namespace -------------------------------------


class NetnsHost:
    """A network namespace joined to this machine by a veth pair, in a private /30.

    Processes started in it reach the host only at :attr:`host_address` (bind a private
    Redis there). :meth:`cut` sets the host end of the link down, so packets are dropped
    silently, like a pulled cable; :meth:`restore` sets it up again.
    """

    _count = 0

    def __init__(self) -> None:
        NetnsHost._count += 1
        tag = f"{os.getpid()}n{NetnsHost._count}"
        self.name = f"{_NETNS_PREFIX}{tag}"
        self.host_if = f"ebh{tag}"[:15]
        self.ns_if = f"ebn{tag}"[:15]
        used = sh("ip", "-o", "-4", "addr", "show").stdout
        while True:
            block = random.randrange(0, 16384) * 4  # a /30 inside 10.213.0.0/16
            self.host_address = f"10.213.{block // 256}.{block % 256 + 1}"
            self.ns_address = f"10.213.{block // 256}.{block % 256 + 2}"
            if self.host_address + "/" not in used and self.ns_address + "/" not in used:
                break
        self.created = False

    def create(self) -> NetnsHost:
        """Make the namespace and the link, both ends up."""
        self.created = True
        sh("ip", "netns", "add", self.name)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        sh("ip", "link", "set", self.ns_if, "netns", self.name)
        sh("ip", "addr", "add", f"{self.host_address}/30", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        self.exec("ip", "addr", "add", f"{self.ns_address}/30", "dev", self.ns_if)
        self.exec("ip", "link", "set", self.ns_if, "up")
        self.exec("ip", "link", "set", "lo", "up")
        return self

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and wait for it."""
        return sh("ip", "netns", "exec", self.name, *argv)

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` as run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def cut(self) -> None:
        """Cut the link: from now on every packet between the namespace and the host is lost."""
        sh("ip", "link", "set", self.host_if, "down")

    def restore(self) -> None:
        """Reconnect the link."""
        sh("ip", "link", "set", self.host_if, "up")

    def reachable(self, port: int) -> bool:
        """Whether a TCP connection from inside the namespace to the host's ``port`` succeeds."""
        code = f"import socket; socket.create_connection(({self.host_address!r}, {port}), 1).close()"
        return sh("ip", "netns", "exec", self.name, PY, "-c", code, check=False).returncode == 0

    def destroy(self) -> None:
        """Kill whatever still runs inside, remove the link and the namespace (idempotent)."""
        if not self.created:
            return
        _destroy_netns(self.name, self.host_if)
        self.created = False


def _destroy_netns(name: str, host_if: str | None) -> None:
    pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    if host_if:
        sh("ip", "link", "del", host_if, check=False)
    sh("ip", "netns", "del", name, check=False)


def sweep_stale_netns() -> None:
    """Remove namespaces this suite made in a run that died before cleaning up."""
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(_NETNS_PREFIX):
            continue
        creator = name[len(_NETNS_PREFIX) :].split("n", 1)[0]
        if creator.isdigit() and not pid_alive(int(creator)):
            _destroy_netns(name, None)
            tag = name[len(_NETNS_PREFIX) :]
            sh("ip", "link", "del", f"ebh{tag}"[:15], check=False)


# -- the processes of one environment -------------------------------------------------


@dataclass
class Proc:
    """One process of the environment."""

    name: str
    role: str  # router | log-writer | worker | tool
    popen: subprocess.Popen[bytes]
    log: Path
    must_live: bool = True

    @property
    def pid(self) -> int:
        return int(self.popen.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None


class PublishFailed(AssertionError):
    """Raised when a publish could not be completed before its deadline."""


@dataclass
class Stack:
    """One isolated environment: its prefix, database, Redis and processes.

    ``published`` maps every event_id whose publish returned to its event_type: the
    checker's notion of what must be on record.
    """

    prefix: str
    database: str
    workdir: Path
    redis_url: str
    env: dict[str, str]
    procs: dict[str, Proc] = field(default_factory=dict)
    published: dict[str, str] = field(default_factory=dict)
    publish_retries: int = 0
    raw_publish_errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _client: redis.Redis | None = None
    _bus: Any = None

    # -- clients -----------------------------------------------------------------

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    @property
    def redis(self) -> redis.Redis:
        """A client of this environment's Redis, for inspection."""
        if self._client is None:
            self._client = redis.Redis.from_url(self.redis_url, socket_timeout=10, socket_connect_timeout=5)
        return self._client

    def settings(self, **overrides: str) -> Any:
        from project.settings import Settings

        env = {**self.env, **overrides}
        return Settings(**{k.lower(): v for k, v in env.items() if k.lower() in Settings.model_fields})

    def bus(self) -> Any:
        """An EventBus of this environment (one per stack, thread-safe for publish_sync)."""
        if self._bus is None:
            from project.bus import EventBus

            self._bus = EventBus(self.settings())
        return self._bus

    def test_key(self, name: str) -> str:
        return f"{self.prefix}:test:{name}"

    def runs(self) -> dict[str, int]:
        """How often each ``event_id:handler`` ran, as the handlers counted it."""
        return {k.decode(): int(v) for k, v in self.redis.hgetall(self.test_key("runs")).items()}

    def busy(self) -> dict[str, str]:
        """``node:pid`` -> ``event_id:handler`` of every handler running right now."""
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(self.test_key("busy")).items()}

    def query(self, sql: str, **params: Any) -> list[Any]:
        engine = sa.create_engine(self.env["DATABASE_URL"], poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                return list(conn.execute(sa.text(sql), params))
        finally:
            engine.dispose()

    def queue_length(self, queue: str) -> int:
        """Messages waiting on ``queue`` that no worker has taken (on either broker)."""
        settings = self.settings()
        if settings.broker_is_amqp:
            return queue_depth(settings, queue)
        return int(self.redis.llen(self.keys.celery_queue(queue)))

    def busy_child(self, worker: Proc, node: str = "host") -> int | None:
        """A pool child of ``worker`` that is inside a handler right now, if any."""
        kids = set(children(worker.pid))
        for where in self.busy():
            where_node, _, pid = where.partition(":")
            if where_node == node and int(pid) in kids:
                return int(pid)
        return None

    def busy_on(self, node: str) -> int:
        """How many handlers run on ``node`` (FAULT_NODE of their worker) right now."""
        return sum(1 for where in self.busy() if where.partition(":")[0] == node)

    def unacked(self) -> int:
        """How many messages kombu handed out that were not acknowledged yet."""
        return int(self.redis.zcard(f"{self.keys.celery_keyprefix}unacked_index"))

    def unacked_older_than(self, age_s: float) -> bool:
        """Whether kombu holds an unacknowledged message handed out more than ``age_s`` ago."""
        index = f"{self.keys.celery_keyprefix}unacked_index"
        oldest = self.redis.zrange(index, 0, 0, withscores=True)
        return bool(oldest) and time.time() - oldest[0][1] > age_s

    # -- publishing --------------------------------------------------------------

    def publish(
        self,
        event_type: str,
        data: Mapping[str, Any] | None = None,
        *,
        deadline_s: float = 60.0,
        **kwargs: Any,
    ) -> str:
        """Publish until Redis has the event, retrying an unknown outcome with the same event_id.

        Records the event as published once a call returned. Any error other than
        ``PublishOutcomeUnknown`` / ``PublishRefused`` (and a raw Redis connection error,
        noted in :attr:`raw_publish_errors` because the API promises typed errors) is raised.
        """
        from project.errors import PublishOutcomeUnknown, PublishRefused

        bus = self.bus()
        deadline = time.monotonic() + deadline_s
        backoff_s = 0.01
        while True:
            try:
                event_id = str(bus.publish_sync(event_type, data, **kwargs))
                break
            except PublishOutcomeUnknown as exc:
                kwargs["event_id"] = exc.event_id
            except PublishRefused:
                pass
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Not a typed error: the outcome is unknown and there is no event_id to retry with
                # unless the caller gave one.
                self.raw_publish_errors.append(repr(exc))
                if "event_id" not in kwargs:
                    raise
            with self._lock:
                self.publish_retries += 1
            if time.monotonic() > deadline:
                raise PublishFailed(f"publish of {event_type} did not succeed within {deadline_s}s")
            time.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 0.5)
        with self._lock:
            self.published[event_id] = event_type
        return event_id

    def publish_in_background(
        self, event_type: str, count: int, *, rate_per_s: float = 200.0, data: Mapping[str, Any] | None = None
    ) -> Publisher:
        """Publish ``count`` events at about ``rate_per_s`` from a thread; see :class:`Publisher`."""
        publisher = Publisher(self, event_type, count, rate_per_s, dict(data or {}))
        publisher.start()
        return publisher

    # -- processes ---------------------------------------------------------------

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def log(self, name: str) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def start(
        self,
        name: str,
        role: str,
        argv: list[str],
        *,
        ready: Callable[[Proc], bool] | None = None,
        netns: NetnsHost | None = None,
        timeout_s: float = 60.0,
        **extra_env: str,
    ) -> Proc:
        """Start a process of the environment, logging to ``<workdir>/<name>.log``."""
        env = {**os.environ, **self.env, **extra_env}
        with self.log_path(name).open("ab") as out:
            popen = subprocess.Popen(
                _die_with_parent(netns.wrap(argv) if netns else argv),
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: teardown kills pool children too
            )
        _remember_group(popen.pid)
        proc = self.procs[name] = Proc(name, role, popen, self.log_path(name))
        if ready is not None:
            wait_for(
                lambda: not proc.alive() or ready(proc),
                timeout_s=timeout_s,
                interval_s=0.1,
                what=f"{name} to be ready",
            )
            assert proc.alive(), f"{name} exited ({proc.popen.returncode}):\n{self.log(name)[-4000:]}"
        return proc

    def start_router(self, name: str = "router", *args: str, **extra_env: str) -> Proc:
        """Start ``eventbus router --consumer <name>``; ready once it reads the stream."""
        return self.start(
            name,
            "router",
            [PY, "-m", "project.cli", "router", "--consumer", name, *args],
            ready=lambda p: self._consumer_seen(name) or "subscriptions, prefix" in self.log(name),
            **extra_env,
        )

    def _consumer_seen(self, name: str) -> bool:
        try:
            consumers = self.redis.xinfo_consumers(self.keys.stream, "router")
        except redis.ResponseError:
            return False
        return any(c["name"] in (name, name.encode()) for c in consumers)

    def start_log_writer(self, name: str = "log-writer", **extra_env: str) -> Proc:
        """Start ``eventbus log-writer`` (its records wait in Redis until it reads them)."""
        return self.start(name, "log-writer", [PY, "-m", "project.cli", "log-writer"], **extra_env)

    def start_worker(
        self,
        name: str = "worker",
        queues: str = routes.QUEUES,
        concurrency: int = 2,
        *,
        netns: NetnsHost | None = None,
        extra_args: tuple[str, ...] = (),
        **extra_env: str,
    ) -> Proc:
        """Start a Celery worker (prefork) on ``queues``; ready once Celery says so."""
        argv = [
            PY, "-m", "celery", "-A", "project.celery_app", "worker",
            "-Q", ",".join(f"{q}" for q in queues.split(",")),
            "-c", str(concurrency), "-P", "prefork",
            "-n", f"{name}-{self.prefix}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", "INFO",
            *extra_args,
        ]  # fmt: skip
        return self.start(name, "worker", argv, ready=lambda p: " ready." in self.log(name), netns=netns, **extra_env)

    def run_tool(self, *args: str, timeout_s: float = 60.0, **extra_env: str) -> subprocess.CompletedProcess[str]:
        """Run ``python -m project.cli <args>`` to completion."""
        return subprocess.run(
            [PY, "-m", "project.cli", *args],
            cwd=ROOT,
            env={**os.environ, **self.env, **extra_env},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def send_signal(self, name: str, sig: int) -> None:
        """Send ``sig`` to process ``name`` (its main process only)."""
        os.kill(self.procs[name].pid, sig)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> Proc:
        """Kill process ``name`` on purpose (it is no longer expected to live) and reap it."""
        proc = self.procs[name]
        proc.must_live = False
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        proc.popen.wait(timeout=30)
        return proc

    def stop(self, name: str, timeout_s: float = 20.0) -> None:
        """Stop process ``name`` gracefully (SIGTERM), forcefully after ``timeout_s``."""
        proc = self.procs[name]
        proc.must_live = False
        if proc.alive():
            proc.popen.terminate()
            try:
                proc.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _killpg(proc)
                proc.popen.wait()

    def dump_worker_stacks(self) -> None:
        """Have every live worker's main process log the stack of each of its threads (Celery's
        SIGUSR1 handler), so a wedged worker shows where it is stuck in the failure output."""
        sizes = {}
        for proc in self.procs.values():
            if proc.role == "worker" and proc.alive():
                sizes[proc.name] = len(self.log(proc.name))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGUSR1)
        with contextlib.suppress(AssertionError):
            wait_for(
                lambda: all(len(self.log(name)) > size for name, size in sizes.items()),
                timeout_s=3,
                what="the workers' stack dumps",
            )

    def dead_processes(self) -> list[str]:
        """Processes that should be running but exited, with the tail of their log."""
        return [
            f"{p.name} ({p.role}) exited with {p.popen.returncode}:\n{self.log(p.name)[-3000:]}"
            for p in self.procs.values()
            if p.must_live and not p.alive()
        ]

    def teardown(self) -> None:
        """Kill every process of the environment, whole process groups (pool children too)."""
        for proc in self.procs.values():
            if proc.alive() and proc.role != "worker":
                proc.popen.terminate()
        for proc in self.procs.values():
            _killpg(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=10)
        if self._client is not None:
            self._client.close()
        if self._bus is not None:
            with contextlib.suppress(Exception):
                self._bus.close()


RUNS_ROOT = Path(tempfile.gettempdir()) / "eventbus-fault-runs"


def _die_with_parent(argv: list[str]) -> list[str]:
    """``argv`` run so that it is SIGKILLed when the test process dies, however it dies
    (util-linux ``setpriv --pdeathsig``; it survives the exec). Pool children are covered by
    :func:`sweep_stale_processes` at the next run."""
    if shutil.which("setpriv") is None:
        return argv
    return ["setpriv", "--pdeathsig", "KILL", "--", *argv]


def _remember_group(pgid: int) -> None:
    """Note a process group this run started, for sweep_stale_processes() should the run die."""
    RUNS_ROOT.mkdir(parents=True, exist_ok=True)
    with (RUNS_ROOT / str(os.getpid())).open("a") as f:
        f.write(f"{pgid}\n")


def sweep_stale_processes() -> None:
    """Kill the process groups (pool children included) of runs that died before their teardown."""
    if not RUNS_ROOT.is_dir():
        return
    for record in RUNS_ROOT.iterdir():
        if not record.name.isdigit() or pid_alive(int(record.name)):
            continue
        for line in record.read_text().split():
            with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                os.killpg(int(line), signal.SIGKILL)
        record.unlink(missing_ok=True)


def forget_run() -> None:
    """This run ended cleanly: its record of process groups is not needed any more."""
    (RUNS_ROOT / str(os.getpid())).unlink(missing_ok=True)


def _killpg(proc: Proc) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is the pid


@dataclass
class Publisher:
    """A thread publishing ``count`` events at about ``rate_per_s``, each with ``data.i``."""

    stack: Stack
    event_type: str
    count: int
    rate_per_s: float
    data: dict[str, Any]
    ids: list[str] = field(default_factory=list)
    acked_at: dict[str, float] = field(default_factory=dict)  # event_id -> when its publish returned
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            for i in range(self.count):
                due = started + i / self.rate_per_s
                if due > time.monotonic():
                    time.sleep(due - time.monotonic())  # pacing, not synchronisation
                event_id = self.stack.publish(self.event_type, {**self.data, "i": i})
                self.acked_at[event_id] = time.time()
                self.ids.append(event_id)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout_s: float = 120.0) -> list[str]:
        """Wait for the thread; re-raise its error; return the event_ids published."""
        assert self.thread is not None
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"publisher still running after {timeout_s}s ({len(self.ids)} published)"
        if self.error is not None:
            raise self.error
        return self.ids


# -- the laboratory -------------------------------------------------------------------


class Lab:
    """Makes stacks, private Redis servers and namespaces, and removes them all on :meth:`close`."""

    def __init__(self, workdir: Path, template: str) -> None:
        self.workdir = workdir
        self.template = template
        self.stacks: list[Stack] = []
        self._cleanups: list[Callable[[], None]] = []

    def rabbitmq_node(self, conf: str = "") -> PrivateRabbitMQ:
        """Start a private RabbitMQ node (see :class:`PrivateRabbitMQ`), ``conf`` added to its config."""
        node = PrivateRabbitMQ(self.workdir, conf)
        self._cleanups.append(node.stop)
        return node.start()

    def redis_server(self, **kwargs: Any) -> PrivateRedis:
        """Start a private Redis (see :class:`PrivateRedis` for the options)."""
        server = PrivateRedis(self.workdir, **kwargs)
        self._cleanups.append(server.stop)
        return server.start()

    def crashable_disk(self) -> CrashableDisk:
        """An ext4 filesystem on a loop device that :meth:`CrashableDisk.power_cut` can crash."""
        disk = CrashableDisk()
        self._cleanups.append(disk.destroy)
        return disk.create()

    def netns(self) -> NetnsHost:
        """Create a network namespace joined to the host by a veth pair."""
        host = NetnsHost()
        self._cleanups.append(host.destroy)
        return host.create()

    def stack(self, *, redis_url: str = SHARED_REDIS_URL, broker: str = "redis", **env: str) -> Stack:
        """A new environment with its own prefix and database, on ``redis_url``.

        ``broker`` ``rabbitmq``: Celery's queues in a vhost of its own on the machine's RabbitMQ.
        """
        prefix = f"f{uuid.uuid4().hex[:11]}"
        if broker == "rabbitmq":
            vhost = amqp_vhost(f"eventbus-{prefix}")
            env = {"CELERY_BROKER_URL": vhost.__enter__(), **env}
            self._cleanups.append(lambda: vhost.__exit__(None, None, None))
        database = f"eb_{prefix}"
        pg_admin(f"CREATE DATABASE {database} TEMPLATE {self.template}")
        self._cleanups.append(lambda: drop_database(database))
        workdir = self.workdir / prefix
        workdir.mkdir(parents=True, exist_ok=True)
        stack = Stack(
            prefix=prefix,
            database=database,
            workdir=workdir,
            redis_url=redis_url,
            env={
                **BASE_ENV,
                "REDIS_URL": redis_url,
                "DATABASE_URL": db_url(database),
                "EVENTS_PREFIX": prefix,
                **env,
            },
        )
        self._cleanups.append(lambda: _forget_keys(redis_url, prefix))
        self._cleanups.append(stack.teardown)
        self.stacks.append(stack)
        return stack

    def close(self) -> None:
        """Undo everything, last made first; keep going past errors and raise the first."""
        first: BaseException | None = None
        while self._cleanups:
            try:
                self._cleanups.pop()()
            except BaseException as exc:
                first = first or exc
        if first is not None:
            raise first


def _forget_keys(redis_url: str, prefix: str) -> None:
    with contextlib.suppress(redis.RedisError):
        client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2)
        try:
            for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                client.delete(key)
        finally:
            client.close()


@contextlib.contextmanager
def laboratory(workdir: Path) -> Iterator[Lab]:
    """A :class:`Lab` with its own template database, for use outside pytest (the soak)."""
    template = f"eventbus_ftmpl_{os.getpid()}"
    sweep_stale_processes()
    sweep_stale_netns()
    sweep_stale_disks()
    create_template(template)
    lab = Lab(workdir, template)
    try:
        yield lab
    finally:
        try:
            lab.close()
        finally:
            drop_database(template)
            forget_run()
