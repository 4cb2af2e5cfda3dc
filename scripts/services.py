"""Make sure Redis and PostgreSQL answer before ``make run``; start private ones if need be.

Uses REDIS_URL / DATABASE_URL when set, the local defaults otherwise. If what they name does
not answer and the server binaries are installed, starts private instances under ``.run/``
(git-ignored) on free ports and writes their URLs to ``.run/env`` for honcho. Otherwise says
exactly what to start. Standard library only: it runs before the virtualenv exists.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
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


def main() -> int:
    RUN.mkdir(exist_ok=True)
    env: dict[str, str] = {}
    redis_url = os.environ.get("REDIS_URL", DEFAULT_REDIS)
    if not answers(redis_url, 6379):
        if "REDIS_URL" in os.environ or (started := private_redis()) is None:
            print(f"services: nothing answers at REDIS_URL={redis_url}. Start Redis there "
                  "(redis-server --port 6379) or set REDIS_URL.", file=sys.stderr)  # fmt: skip
            return 1
        print(f"services: started a private Redis at {started} (data in .run/redis)", file=sys.stderr)
        env["REDIS_URL"] = started
    db_url = os.environ.get("DATABASE_URL", DEFAULT_DB)
    if not answers(db_url.replace("+psycopg2", ""), 5432):
        if "DATABASE_URL" in os.environ or (started := private_postgres()) is None:
            print(f"services: nothing answers at DATABASE_URL={db_url}. Start PostgreSQL there "
                  "or set DATABASE_URL.", file=sys.stderr)  # fmt: skip
            return 1
        print(f"services: started a private PostgreSQL at {started} (data in .run/postgres)", file=sys.stderr)
        env["DATABASE_URL"] = started
    (RUN / "env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
