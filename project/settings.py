"""One typed settings object, read from the environment when first asked for."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "get_settings"]

_AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
_REDIS_SCHEMES = ("redis", "rediss", "unix")


class Settings(BaseSettings):
    """Everything the dispatcher, its workers and its tools can be configured with.

    Each field is read from the environment variable of the same name in upper case
    (``REDIS_URL``, ``EVENTS_PREFIX``, ...). ``celeryconfig.py`` reads this object too.
    """

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    # Whether REDIS_URL names a Redis Cluster (any of its nodes). Unset, each process asks the
    # server once (project.redis_conn). On a cluster, each scope's events get their own stream
    # and CELERY_BROKER_URL must be an AMQP URL.
    redis_cluster: bool | None = None
    # Cluster only: how often a router and a log writer look for the streams of new scopes.
    scope_refresh_s: float = Field(2.0, gt=0)
    # Where Celery's queues live. Unset, in REDIS_URL's Redis beside the events. An AMQP URL
    # (amqp://user:password@host:5672/vhost) puts them on RabbitMQ: durable queues, and the
    # router waits for RabbitMQ's publisher confirms before it acknowledges an event. On
    # RabbitMQ, EVENTS_PREFIX does not name the queues: give each environment its own vhost.
    celery_broker_url: str | None = None
    # RabbitMQ only: declare the handlers' queues as quorum queues (replicated across the
    # cluster's nodes) instead of classic ones. Every worker and router must agree.
    broker_quorum_queues: bool = False
    # RabbitMQ only: how long a router waits for the confirms of one batch before it gives
    # up, reconnects and sends the batch again.
    broker_confirm_timeout_s: float = Field(30.0, gt=0)
    database_url: str = "postgresql+psycopg2://postgres@127.0.0.1:5432/eventbus"
    # Isolates environments (and test runs) that share one Redis: every key, channel and
    # Celery queue is named under it.
    events_prefix: str = Field("events", pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    event_handler_modules: Annotated[list[str], NoDecode] = ["handlers"]
    # Packages declaring event contracts (project.contracts), imported by a process on its
    # first publish, and by `eventbus contracts` and `eventbus catalog`. The default is
    # skipped if the application has no `contracts` package.
    event_contract_modules: Annotated[list[str], NoDecode] = ["contracts"]
    # The title of the AsyncAPI document `eventbus catalog` writes.
    catalog_title: str = Field("eventbus", min_length=1, max_length=200)
    # Modules with the application's own Celery tasks (periodic checks, helper tasks; not its
    # handlers, which EVENT_HANDLER_MODULES names): workers and beat import them. Unset,
    # celeryconfig picks them from EVENT_HANDLER_MODULES; empty, there are none.
    app_task_modules: Annotated[list[str] | None, NoDecode] = None

    events_max_data_bytes: int = Field(64 * 1024, gt=0)
    events_max_hops: int = Field(16, ge=0)
    # publish is idempotent per event_id for this long: a retried publish (same event_id)
    # returns the first one's outcome instead of making a second event. ~100 bytes per event.
    events_dedup_window_s: int = Field(3600, gt=0)

    router_batch_size: int = Field(200, gt=0, le=10_000)
    router_block_ms: int = Field(1000, ge=1)
    # A pending entry idle this long belongs to a router presumed dead and is taken over.
    router_claim_idle_ms: int = Field(30_000, ge=100)
    # A dispatch script call carries at most this many bytes of arguments (Redis refuses a
    # query over `client-query-buffer-limit`, 1 GB by default); a batch is split to fit.
    router_batch_max_bytes: int = Field(4 * 1024 * 1024, ge=64 * 1024)
    # Acknowledged entries are trimmed from the stream (XTRIM MINID) this often.
    router_trim_interval_s: float = Field(5.0, gt=0)
    # A delivery dispatched this long ago that no worker ever started (its task was lost
    # between Redis and a worker) is sent again with the same task id. 0 turns it off.
    reconcile_after_s: float = Field(900.0, ge=0)
    reconcile_interval_s: float = Field(60.0, gt=0)

    log_batch_size: int = Field(500, gt=0, le=10_000)
    log_block_ms: int = Field(1000, ge=1)
    # After a partial batch the writer waits this long for more: rows land at most this late.
    log_linger_ms: int = Field(200, ge=0)
    log_retry_max_s: float = Field(10.0, gt=0)
    # Records a log writer read but did not write for this long are taken over by another.
    log_claim_idle_ms: int = Field(60_000, ge=100)
    # The log buffer's bound, in records (a compact record is ~150-400 bytes). Past it,
    # LOG_BUFFER_FULL_POLICY says what happens: "shed" keeps dispatching and counts the
    # records it could not buffer in <prefix>:log-shed, with an error log; "keep" buffers on
    # until Redis' own maxmemory refuses writes (and then publish fails too).
    log_buffer_max_records: int = Field(2_000_000, gt=0)
    log_buffer_full_policy: Literal["shed", "keep"] = "shed"

    delivery_max_retries: int = Field(5, ge=0)
    delivery_backoff_s: float = Field(1.0, gt=0)
    delivery_backoff_max_s: float = Field(300.0, gt=0)
    # Celery's Redis transport redelivers an unacknowledged task after this long.
    broker_visibility_timeout_s: int = Field(3600, gt=0)
    # How often a worker looks for unacknowledged tasks older than the visibility timeout
    # (their worker died) to put back on their queues; kombu's default is every ~100 s.
    broker_restore_interval_s: int = Field(10, gt=0)
    # The running copy of a delivery holds a lease for this long and renews it every third
    # of it; a copy that finds the lease held is deferred, never run in parallel.
    delivery_lease_s: float = Field(30.0, ge=0.5)
    # Handlers' hard time limit (the soft one, which raises inside the handler, is 90% of it).
    delivery_time_limit_s: float = Field(600.0, gt=0)
    # How long a succeeded (event_id, handler) is remembered, so a redelivered copy is
    # skipped. Copies arrive within the visibility timeout, so this must outlast it; each
    # marker costs ~100 bytes of Redis memory, so it should not be much longer.
    delivery_done_ttl_s: int = Field(2 * 3600, gt=0)

    flower_address: str = "127.0.0.1"
    flower_port: int = Field(5555, gt=0, lt=65536)
    flower_user: str = "admin"
    flower_password: SecretStr = SecretStr("change-me")
    # RabbitMQ's management API, for Flower's broker page (http://user:password@host:15672/api/).
    flower_broker_api: str | None = None

    # The events explorer (`eventbus explorer`, project.explorer): basic auth, like Flower's.
    explorer_address: str = "127.0.0.1"
    explorer_port: int = Field(5556, gt=0, lt=65536)
    explorer_user: str = "admin"
    explorer_password: SecretStr = SecretStr("change-me")

    # Only one beat process schedules (project.beat); the others wait for its lock to lapse.
    beat_lock_ttl_s: float = Field(30.0, gt=0)

    # Prometheus /metrics on each router, log writer and worker (project.observability).
    # Off by default: every process of a host would otherwise need its own port.
    metrics_enabled: bool = False
    metrics_address: str = "127.0.0.1"
    metrics_router_port: int = Field(9101, gt=0, lt=65536)
    metrics_log_writer_port: int = Field(9102, gt=0, lt=65536)
    metrics_worker_port: int = Field(9103, gt=0, lt=65536)
    # Where a worker's processes keep their metric files (prometheus_client's own variable);
    # unset, a fresh temporary directory per worker.
    prometheus_multiproc_dir: str | None = None

    # Traces are exported only when these standard OpenTelemetry variables ask for it (and
    # the SDK is installed); the SDK reads the rest (endpoint details, service name, sampler).
    otel_sdk_disabled: bool = False
    otel_service_name: str | None = None
    otel_traces_exporter: str | None = None
    otel_exporter_otlp_endpoint: str | None = None
    otel_exporter_otlp_traces_endpoint: str | None = None

    @model_validator(mode="after")
    def _done_outlasts_redelivery(self) -> Settings:
        if self.delivery_done_ttl_s <= self.broker_visibility_timeout_s:
            raise ValueError(
                f"DELIVERY_DONE_TTL_S ({self.delivery_done_ttl_s}) must be longer than "
                f"BROKER_VISIBILITY_TIMEOUT_S ({self.broker_visibility_timeout_s}), or a task "
                "redelivered after a lost worker could run twice"
            )
        if not self.broker_is_amqp and self.broker_url != self.redis_url:
            raise ValueError(
                "CELERY_BROKER_URL names a Redis other than REDIS_URL's: on Redis, Celery's queues must live "
                "in the event Redis (the router sends a task in the same script that acknowledges its event); "
                "unset CELERY_BROKER_URL, or give an AMQP URL"
            )
        if self.delivery_lease_s * 1000 >= self.broker_visibility_timeout_s * 1000:
            raise ValueError("DELIVERY_LEASE_S must be shorter than BROKER_VISIBILITY_TIMEOUT_S")
        return self

    @field_validator("celery_broker_url")
    @classmethod
    def _known_broker(cls, value: str | None) -> str | None:
        if not value:
            return None
        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if scheme not in _AMQP_SCHEMES + _REDIS_SCHEMES:
            raise ValueError(
                f"CELERY_BROKER_URL must be an AMQP URL (amqp://, amqps://) or a Redis URL, not {scheme or value!r}"
            )
        return value

    @property
    def broker_url(self) -> str:
        """The URL Celery's queues live at: ``CELERY_BROKER_URL``, or else ``REDIS_URL``."""
        return self.celery_broker_url or self.redis_url

    @property
    def broker_is_amqp(self) -> bool:
        """Whether Celery's queues are on RabbitMQ rather than in the event Redis."""
        return self.broker_url.split("://", 1)[0].lower() in _AMQP_SCHEMES

    @field_validator("event_handler_modules", "event_contract_modules", "app_task_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, reading the environment on first use."""
    return Settings()
