"""Running it: Flower behind basic auth, docker-compose.yml, private servers for make run."""

from __future__ import annotations

import base64
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
import yaml

from project.bus import EventBus
from project.settings import Settings
from tests.conftest import wait_for
from tests.integration.conftest import ROOT, Stack
from tests.rabbitmq import WITH_CLUSTER

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(url: str, auth: tuple[str, str] | None) -> urllib.request.Request:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(_request(url, auth), timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def _body(url: str, auth: tuple[str, str]) -> str:
    with urllib.request.urlopen(_request(url, auth), timeout=10) as response:
        return str(response.read().decode())


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed")
@pytest.mark.brokers(*WITH_CLUSTER)
def test_flower_requires_auth_and_shows_workers_and_handler_tasks(stack: Stack, tmp_path: Path) -> None:
    port = _free_port()
    stack.env.update({"FLOWER_PORT": str(port), "FLOWER_USER": "ops", "FLOWER_PASSWORD": "s3cret-pass"})
    stack.start_worker(queues="alpha,beta")
    stack.start_router()
    stack.start("flower", sys.executable, "-m", "celery", "-A", "project.celery_app", "flower")
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _status(base + "/") == 401, timeout_s=30, what="flower to answer 401")
    # Flower learns of tasks from the events workers send (over pub/sub) once it is subscribed.
    bus = stack.bus()

    def flower_saw_tasks() -> bool:
        bus.publish_sync("user.birth_data.updated", user_id="u1")
        bus.publish_sync("cosmic.solar_storm.detected", {"kp_index": 7})
        return _body(base + "/api/tasks", ("ops", "s3cret-pass")).count('"state": "SUCCESS"') >= 4

    wait_for(flower_saw_tasks, timeout_s=60, interval_s=1, what="flower to receive task events")
    assert _status(base + "/", auth=("ops", "wrong")) == 401
    assert _status(base + "/", auth=("ops", "s3cret-pass")) == 200
    # Bound to loopback only.
    listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=False)
    if listening.returncode == 0:
        local = [line.split()[3] for line in listening.stdout.splitlines()]
        assert local == [f"127.0.0.1:{port}"], listening.stdout

    def page(path: str) -> str:
        out = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=8000", "--dump-dom",
             f"http://ops:s3cret-pass@127.0.0.1:{port}{path}"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        return out.stdout

    worker_name = f"worker-{stack.prefix}@"
    wait_for(lambda: worker_name in page("/workers"), timeout_s=60, interval_s=1, what="the worker on the page")
    tasks_page = ""

    def tasks_listed() -> bool:
        nonlocal tasks_page
        tasks_page = page("/tasks")
        return "tests.integration.app.StormWatchModule.on_storm" in tasks_page

    wait_for(tasks_listed, timeout_s=60, interval_s=1, what="handler tasks on the page")
    for name in ("tests.integration.app.on_birth_data", "tests.integration.app.on_any_detection",
                 "tests.integration.app.on_anything_cosmic"):  # fmt: skip
        assert name in tasks_page


def _compose_services() -> dict[str, Any]:
    if shutil.which("docker-compose") is None:
        pytest.skip("Debian's docker-compose package is not installed")
    out = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
        cwd=ROOT, env={**os.environ, "FLOWER_PASSWORD": "test", "EXPLORER_PASSWORD": "test"}, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return dict(yaml.safe_load(out.stdout)["services"])


def test_docker_compose_is_valid_and_every_queue_has_a_worker_service() -> None:
    services = _compose_services()
    for name in ("redis", "postgres", "migrate", "router", "log-writer", "beat", "flower"):
        assert name in services, name
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--maxmemory-policy noeviction" in redis_cmd
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    for name, svc in services.items():
        if name in ("redis", "postgres", "migrate", "rabbitmq"):
            continue
        assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
    for name in ("redis", "postgres"):
        assert "healthcheck" in services[name]

    bus = EventBus(Settings(event_handler_modules=["handlers"]))
    bus.load_modules()
    queues = {sub.queue for sub in bus.registry} | {"cosmic"}  # cosmic: the beat tasks
    served: set[str] = set()
    for svc in services.values():
        cmd = svc.get("command") or []
        if "worker" in cmd and "-Q" in cmd:
            served |= set(cmd[cmd.index("-Q") + 1].split(","))
    assert queues <= served, f"queues without a worker service: {queues - served}"
    procfile = (ROOT / "Procfile").read_text()
    for queue in queues:
        assert f"-Q {queue} " in procfile, queue


def _services_module(run_dir: Path) -> ModuleType:
    os.environ["EVENTBUS_RUN_DIR"] = str(run_dir)
    try:
        spec = importlib.util.spec_from_file_location("services", ROOT / "scripts" / "services.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        del os.environ["EVENTBUS_RUN_DIR"]
    return module


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_make_run_starts_a_private_redis_with_persistence_when_none_answers() -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="eventbus-run-"))
    services = _services_module(run_dir)
    url = services.private_redis()
    assert url is not None
    client = redis.Redis.from_url(url)
    try:
        assert client.ping()
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert client.config_get("dir")["dir"] == str(run_dir / "redis")
    finally:
        client.shutdown(nosave=True)
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.skipif(not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")), reason="no PostgreSQL binaries")
def test_make_run_starts_a_private_postgresql_when_none_answers() -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="eventbus-run-"))
    run_dir.chmod(0o755)
    services = _services_module(run_dir)
    url = services.private_postgres()
    assert url is not None
    import sqlalchemy as sa

    engine = sa.create_engine(url.rsplit("/", 1)[0] + "/postgres", poolclass=sa.pool.NullPool)
    pg_ctl = str(next(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")))
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT current_setting('data_directory')")).scalar() == str(
                run_dir / "postgres"
            )
    finally:
        engine.dispose()
        run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*run_as, pg_ctl, "-D", str(run_dir / "postgres"), "-m", "immediate", "stop"], check=False)
        shutil.rmtree(run_dir, ignore_errors=True)


def test_make_run_makes_a_random_flower_password_once_and_never_overrides_the_environment(tmp_path: Path) -> None:
    services = _services_module(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    env["EVENTBUS_RUN_DIR"] = str(tmp_path)

    def run_services(**extra: str) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "services.py")],
            cwd=ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out

    first = run_services()
    path = tmp_path / "env"
    password = services.read_env(path)["FLOWER_PASSWORD"]
    assert len(password) >= 24 and password != "change-me"
    assert f"password in {path}" in first.stderr
    assert path.stat().st_mode & 0o077 == 0  # it holds a password: the owner's only

    # What Flower reads through honcho (the file overrides honcho's environment).
    shown = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "honcho"), "-e", str(path), "run", sys.executable, "-c",
         "from project.settings import get_settings; print(get_settings().flower_password.get_secret_value())"],
        cwd=ROOT, env={**env, "FLOWER_PASSWORD": "stale"}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert shown.stdout.strip() == password, shown.stderr

    run_services()
    assert services.read_env(path)["FLOWER_PASSWORD"] == password  # kept on later runs
    own = run_services(FLOWER_PASSWORD="set-by-the-operator")
    assert "FLOWER_PASSWORD" not in services.read_env(path)  # the file would override it
    assert "from the environment" in own.stderr


def test_flower_refuses_to_start_behind_the_default_password(stack: Stack) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_PASSWORD"}
    env.update({**stack.env, "FLOWER_PORT": str(_free_port())})
    for password in (None, "change-me"):
        if password is not None:
            env["FLOWER_PASSWORD"] = password
        out = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "project.celery_app", "flower"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode != 0
        assert "set FLOWER_PASSWORD" in out.stdout + out.stderr
