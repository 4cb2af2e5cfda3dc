"""Real Redis, real PostgreSQL, real router and Celery worker processes, isolated per test.

Each test gets its own EVENTS_PREFIX (so its own stream, queues and keys) and its own
database, copied from a template migrated once per session with ``alembic upgrade head``.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kombu
import psycopg2
import pytest
import redis
import redis.cluster
import sqlalchemy as sa

from project.broker import AmqpSender
from project.bus import EventBus
from project.messages import TaskMessage
from project.settings import Settings
from tests.conftest import wait_for
from tests.rabbitmq import amqp_vhost, broker, pytest_generate_tests, queue_depth  # noqa: F401  # fixture, hook
from tests.redis_cluster import RedisCluster3, redis_cluster

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_DSN = os.environ.get("TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
HANDLERS = "tests.integration.app"
QUEUES = "alpha,beta,gamma"

pytestmark = pytest.mark.integration


def _pg_admin(sql: str) -> None:
    conn = psycopg2.connect(PG_DSN)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def _db_url(name: str) -> str:
    base = PG_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://", 1)
    return f"{base}/{name}"


@pytest.fixture(scope="session")
def template_db() -> Iterator[str]:
    name = f"eventbus_tmpl_{os.getpid()}"
    _pg_admin(f"DROP DATABASE IF EXISTS {name}")
    _pg_admin(f"CREATE DATABASE {name}")
    subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={_db_url(name)}", "upgrade", "head"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    yield name
    _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def prefix() -> Iterator[str]:
    value = f"t{uuid.uuid4().hex[:12]}"
    yield value
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{value}:*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture(scope="session")
def cluster_session() -> Iterator[RedisCluster3]:
    """A private 3-master Redis Cluster, started once for the tests that ask for one."""
    with redis_cluster() as cluster:
        yield cluster


@pytest.fixture
def database(template_db: str, prefix: str) -> Iterator[str]:
    name = f"eb_{prefix}"
    _pg_admin(f"CREATE DATABASE {name} TEMPLATE {template_db}")
    yield name
    _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@dataclass
class Stack:
    """The processes of one test's environment, and clients to inspect it."""

    prefix: str
    database: str
    workdir: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def settings(self) -> Settings:
        return Settings(**{k.lower(): v for k, v in self.env.items() if k.lower() in Settings.model_fields})

    def bus(self) -> EventBus:
        return EventBus(self.settings)

    @property
    def cluster(self) -> bool:
        """Whether this stack's events are on a Redis Cluster."""
        return self.env["REDIS_URL"] != REDIS_URL

    @property
    def redis(self) -> redis.Redis:
        """A client of the stack's event Redis (a ``RedisCluster`` on a cluster)."""
        if self.cluster:
            return redis.cluster.RedisCluster.from_url(self.env["REDIS_URL"])  # type: ignore[return-value]
        return redis.Redis.from_url(REDIS_URL)

    def scoped_keys(self) -> list[Any]:
        """The keys of each scope with events (one ``Keys`` in one Redis)."""
        from project.scopes import scope_keys

        return scope_keys(self.redis, self.bus().keys, "stream", "log")

    def engine(self) -> sa.Engine:
        return sa.create_engine(self.env["DATABASE_URL"], poolclass=sa.pool.NullPool)

    def query(self, sql: str, **params: Any) -> list[Any]:
        engine = self.engine()
        try:
            with engine.connect() as conn:
                return list(conn.execute(sa.text(sql), params))
        finally:
            engine.dispose()

    def wait_query(self, sql: str, until: Any, timeout_s: float = 30.0, **params: Any) -> list[Any]:
        """Run ``sql`` until ``until(rows)`` holds; return those rows."""
        result: list[Any] = []

        def check() -> bool:
            nonlocal result
            result = self.query(sql, **params)
            return bool(until(result))

        wait_for(check, timeout_s=timeout_s, what=f"{sql!r} to satisfy the condition (last: {result[:5]})")
        return result

    def wait_runs(self, count: int, timeout_s: float = 60.0) -> dict[str, int]:
        """Wait until ``count`` distinct (event_id, handler) pairs ran; return the run counts."""
        wait_for(lambda: len(self.runs()) >= count, timeout_s=timeout_s, what=f"{count} handler runs")
        return self.runs()

    def settle(self, timeout_s: float = 60.0) -> None:
        """Wait until the router group and the log writer have read and acknowledged everything."""

        def idle() -> bool:
            client = self.redis
            for keys in self.scoped_keys():
                for stream in (keys.stream, keys.log_buffer):
                    if not client.exists(stream):
                        continue
                    groups = client.xinfo_groups(stream)
                    if not groups or any(g["pending"] or g["lag"] for g in groups):
                        return False
            return True

        wait_for(idle, timeout_s=timeout_s, what="router and log writer to catch up")

    def queue_length(self, queue: str) -> int:
        """Messages waiting on ``queue`` that no worker has taken (on either broker)."""
        if self.settings.broker_is_amqp:
            return queue_depth(self.settings, queue)
        return int(self.redis.llen(self.bus().keys.celery_queue(queue)))

    def send_copy(self, task: TaskMessage) -> None:
        """Put ``task`` on its queue, as a broker's redelivery would."""
        if self.settings.broker_is_amqp:
            sender = AmqpSender(self.settings)
            try:
                sender.send([task])
            finally:
                sender.close()
        else:
            self.redis.lpush(self.bus().keys.celery_queue(task.queue), task.redis_form())

    def newest(self, queue: str) -> tuple[dict[str, Any], bytes]:
        """The headers and body of the task sent last to ``queue`` (left on it)."""
        if not self.settings.broker_is_amqp:
            message = json.loads(self.redis.lindex(self.bus().keys.celery_queue(queue), 0))
            return message["headers"], base64.b64decode(message["body"])
        with kombu.Connection(self.settings.broker_url) as conn:
            channel = conn.channel()
            last = None
            while (got := channel.basic_get(queue, no_ack=False)) is not None:
                last = got
            assert last is not None, f"{queue} is empty"
            # Closing the channel unacknowledged puts every message back.
            body = last.body
            return dict(last.headers), body if isinstance(body, bytes) else str(body).encode()

    def purge(self, queue: str) -> None:
        """Drop what waits on ``queue``: what a broker loses when a worker dies holding it."""
        if self.settings.broker_is_amqp:
            sender = AmqpSender(self.settings)
            try:
                sender.purge(queue)
            finally:
                sender.close()
        else:
            self.redis.delete(self.bus().keys.celery_queue(queue))

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def start(self, name: str, *argv: str, ready: str | None = None, **extra_env: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.env, **extra_env}
        with self.log_path(name).open("ab") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        if ready is not None:
            wait_for(
                lambda: proc.poll() is not None or ready in self.log_path(name).read_text(errors="replace"),
                timeout_s=60,
                what=f"{name} to be ready",
            )
            assert proc.poll() is None, f"{name} exited:\n{self.log_path(name).read_text()}"
        return proc

    def start_router(self, name: str = "router", *args: str, **extra_env: str) -> subprocess.Popen[bytes]:
        return self.start(
            name,
            sys.executable,
            "-m",
            "project.cli",
            "router",
            *args,
            ready="subscriptions, prefix",
            **extra_env,
        )

    def start_worker(
        self, name: str = "worker", queues: str = QUEUES, concurrency: int = 2, **extra_env: str
    ) -> subprocess.Popen[bytes]:
        return self.start(
            name,
            sys.executable,
            "-m",
            "celery",
            "-A",
            "project.celery_app",
            "worker",
            "-Q",
            queues,
            "-c",
            str(concurrency),
            "-P",
            "prefork",
            "-n",
            f"{name}-{self.prefix}@%h",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "INFO",
            ready=" ready.",
            **extra_env,
        )

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log(self, name: str) -> str:
        return self.log_path(name).read_text(errors="replace")

    def runs(self) -> dict[str, int]:
        """How often each (event_id, handler) ran, as recorded by the test handlers."""
        raw = self.redis.hgetall(f"{self.prefix}:test:runs")
        return {k.decode(): int(v) for k, v in raw.items()}


@pytest.fixture
def stack(
    prefix: str,
    database: str,
    broker: str,  # noqa: F811  # the fixture imported above
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Stack]:
    with ExitStack() as cleanup:
        env = _stack_env(prefix, database)
        if broker in ("rabbitmq", "cluster"):
            env["CELERY_BROKER_URL"] = cleanup.enter_context(amqp_vhost(f"eventbus-{prefix}"))
        if broker == "cluster":
            env["REDIS_URL"] = request.getfixturevalue("cluster_session").url
            env["SCOPE_REFRESH_S"] = "0.5"
        s = Stack(prefix=prefix, database=database, workdir=tmp_path, env=env)
        yield s
        for name in list(s.procs):
            s.stop(name)
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            for log in sorted(tmp_path.glob("*.log")):
                sys.stderr.write(f"\n----- {log.name} -----\n{log.read_text(errors='replace')[-6000:]}\n")


def _stack_env(prefix: str, database: str) -> dict[str, str]:
    return {
        "REDIS_URL": REDIS_URL,
        "DATABASE_URL": _db_url(database),
        "EVENTS_PREFIX": prefix,
        "EVENT_HANDLER_MODULES": HANDLERS,
        "EVENT_CONTRACT_MODULES": "",  # the example application's contracts are not these apps'
        "EVENTS_MAX_HOPS": "3",
        "ROUTER_CLAIM_IDLE_MS": "1000",
        "LOG_CLAIM_IDLE_MS": "1000",
        "ROUTER_BLOCK_MS": "200",
        "LOG_BLOCK_MS": "200",
        "LOG_RETRY_MAX_S": "0.5",
        "DELIVERY_BACKOFF_S": "0.05",
        "DELIVERY_BACKOFF_MAX_S": "0.2",
        "DELIVERY_LEASE_S": "1",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
