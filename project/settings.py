"""One typed settings object, read from the environment when first asked for."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """Everything the dispatcher, its workers and its tools can be configured with.

    Each field is read from the environment variable of the same name in upper case
    (``REDIS_URL``, ``EVENTS_PREFIX``, ...). ``celeryconfig.py`` reads this object too.
    """

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = "postgresql+psycopg2://postgres@127.0.0.1:5432/eventbus"
    # Isolates environments (and test runs) that share one Redis: every key, channel and
    # Celery queue is named under it.
    events_prefix: str = Field("events", pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    event_handler_modules: Annotated[list[str], NoDecode] = ["handlers"]

    events_max_data_bytes: int = Field(64 * 1024, gt=0)
    events_max_hops: int = Field(16, ge=0)
    # The stream is capped (approximately, which is O(1) per XADD); an event older than the
    # newest `maxlen` is trimmed even if no router has read it yet.
    events_stream_maxlen: int = Field(1_000_000, gt=0)

    router_batch_size: int = Field(200, gt=0, le=10_000)
    router_block_ms: int = Field(1000, ge=1)
    # A pending entry idle this long belongs to a router presumed dead and is taken over.
    router_claim_idle_ms: int = Field(30_000, ge=100)

    log_batch_size: int = Field(500, gt=0, le=10_000)
    log_block_ms: int = Field(1000, ge=1)
    # After a partial batch the writer waits this long for more: rows land at most this late.
    log_linger_ms: int = Field(200, ge=0)
    log_retry_max_s: float = Field(10.0, gt=0)
    # Records a log writer read but did not write for this long are taken over by another.
    log_claim_idle_ms: int = Field(60_000, ge=100)

    delivery_max_retries: int = Field(5, ge=0)
    delivery_backoff_s: float = Field(1.0, gt=0)
    delivery_backoff_max_s: float = Field(300.0, gt=0)
    # Celery's Redis transport redelivers an unacknowledged task after this long.
    broker_visibility_timeout_s: int = Field(3600, gt=0)
    # How long a succeeded (event_id, handler) is remembered, so a redelivered copy is
    # skipped. Copies arrive within the visibility timeout, so this must outlast it; each
    # marker costs ~100 bytes of Redis memory, so it should not be much longer.
    delivery_done_ttl_s: int = Field(2 * 3600, gt=0)

    flower_address: str = "127.0.0.1"
    flower_port: int = Field(5555, gt=0, lt=65536)
    flower_user: str = "admin"
    flower_password: SecretStr = SecretStr("change-me")

    # The application: cosmic checks run by celery beat, synthesis fan-out, working memory.
    noaa_kp_url: str = "https://services.swpc.noaa.gov/products/noaa-planetary-k-index.json"
    noaa_timeout_s: float = Field(10.0, gt=0)
    storm_check_interval_s: float = Field(900.0, gt=0)
    full_moon_check_interval_s: float = Field(3600.0, gt=0)
    # Only one beat process schedules; the others wait for its lock to lapse.
    beat_lock_ttl_s: float = Field(30.0, gt=0)
    synthesis_chunk_size: int = Field(500, gt=0)
    memory_ttl_s: int = Field(3600, gt=0)

    @model_validator(mode="after")
    def _done_outlasts_redelivery(self) -> Settings:
        if self.delivery_done_ttl_s <= self.broker_visibility_timeout_s:
            raise ValueError(
                f"DELIVERY_DONE_TTL_S ({self.delivery_done_ttl_s}) must be longer than "
                f"BROKER_VISIBILITY_TIMEOUT_S ({self.broker_visibility_timeout_s}), or a task "
                "redelivered after a lost worker could run twice"
            )
        return self

    @field_validator("event_handler_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, reading the environment on first use."""
    return Settings()
