"""Make sure Redis and PostgreSQL answer before ``make run``; start private ones if need be.

Uses REDIS_URL / DATABASE_URL when set, the local defaults otherwise. If what they name does
not answer and the server binaries are installed, starts private instances under ``.run/``
(git-ignored) on free ports and writes their URLs to ``.run/env`` for honcho. Otherwise says
exactly what to start. ``.run/env`` also holds the passwords of Flower and of the events
explorer: random ones made on the first run and kept on later ones, unless the environment
sets FLOWER_PASSWORD or EXPLORER_PASSWORD. Standard library only: it runs before the
virtualenv exists.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = Path(os.environ.get("EVENTBUS_RUN_DIR", ROOT / ".run"))
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_DB = "postgresql+psycopg2://postgres@127.0.0.1:5432/eventbus"


def answers(url: str, default_port: int) -> bool:
    u = urllib.parse.urlparse(url)
    try:
        socket.create_connection((u.hostname or "127.0.0.1", u.port or default_port), timeout=1).close()
    except OSError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(url: str, port: int) -> bool:
    for _ in range(100):
        if answers(url, port):
            return True
        time.sleep(0.1)
    return False


def private_redis() -> str | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port, data = free_port(), RUN / "redis"
    data.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [binary, "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
         "--appendonly", "yes", "--maxmemory-policy", "noeviction", "--logfile", str(data / "redis.log"),
         "--pidfile", str(data / "redis.pid")],
        check=True,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    return url if wait(url, port) else None


def private_postgres() -> str | None:
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = shutil.which("initdb") or (bins[-1] if bins else None)
    if initdb is None:
        return None
    pg_ctl = str(Path(initdb).with_name("pg_ctl"))
    data, port = RUN / "postgres", free_port()
    run_as: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        run_as = ["runuser", "-u", "postgres", "--"]
        RUN.mkdir(exist_ok=True)
        shutil.chown(RUN, "postgres")
    if not (data / "PG_VERSION").exists():
        subprocess.run([*run_as, initdb, "-D", str(data), "-U", "postgres", "--auth=trust"], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    subprocess.run(
        [*run_as, pg_ctl, "-D", str(data), "-l", str(data / "server.log"), "-w", "start",
         "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/eventbus"


def ensure(variable: str, default: str, port: int, what: str, start: Callable[[], str | None]) -> str | None:
    """The URL to use for ``variable``: as given, the default, or a private server just started.

    None, with what to do printed, when nothing answers and nothing could be started.
    """
    url = os.environ.get(variable, default)
    if answers(url.replace("+psycopg2", ""), port):
        return url
    if variable not in os.environ and (started := start()) is not None:
        print(f"services: started a private {what} at {started} (data in {RUN})", file=sys.stderr)
        return started
    print(f"services: nothing answers at {variable}={url}. Start {what} there or set {variable}.", file=sys.stderr)
    return None


def read_env(path: Path) -> dict[str, str]:
    """The ``KEY=value`` lines of an env file written by :func:`write_env` ({} if there is none)."""
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def write_env(values: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> Path:
    """Write ``.run/env`` for honcho: ``values``, and the passwords of Flower and of the events
    explorer, each unless ``environ`` sets it.

    A password is made once (``secrets.token_urlsafe``) and kept on later runs, so a browser
    that saved it goes on working. honcho lets the file override the environment, so a
    password the environment sets is left out of the file, never overwritten.
    """
    path = RUN / "env"
    content = dict(values)
    for what, var, default_port in (("Flower", "FLOWER", "5555"), ("the explorer", "EXPLORER", "5556")):
        user, port = environ.get(f"{var}_USER", "admin"), environ.get(f"{var}_PORT", default_port)
        if environ.get(f"{var}_PASSWORD"):
            print(f"services: {what} (user {user}) uses {var}_PASSWORD from the environment", file=sys.stderr)
        else:
            content[f"{var}_PASSWORD"] = read_env(path).get(f"{var}_PASSWORD") or secrets.token_urlsafe(24)
            print(f"services: {what} on port {port}: user {user}, password in {path} ({var}_PASSWORD)", file=sys.stderr)
    # It holds a password: readable by its owner only, from the moment it exists.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("".join(f"{k}={v}\n" for k, v in content.items()))
    return path


def main() -> int:
    RUN.mkdir(exist_ok=True)
    redis_url = ensure("REDIS_URL", DEFAULT_REDIS, 6379, "Redis", private_redis)
    db_url = redis_url and ensure("DATABASE_URL", DEFAULT_DB, 5432, "PostgreSQL", private_postgres)
    if not redis_url or not db_url:
        return 1
    # Only what differs from what the environment already says.
    urls = (("REDIS_URL", redis_url), ("DATABASE_URL", db_url))
    write_env({k: v for k, v in urls if os.environ.get(k) != v and v not in (DEFAULT_REDIS, DEFAULT_DB)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
