"""The cosmic application's settings, read from the environment when first asked for.

The dispatcher's settings are ``project.settings``; these are the application's own, read
from the same environment (``NOAA_KP_URL``, ``SYNTHESIS_CHUNK_SIZE``, ...) into their own
typed object, so the dispatcher knows nothing of them.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["AppSettings", "get_app_settings"]


class AppSettings(BaseSettings):
    """What the cosmic checks, the synthesis fan-out and the working memory can be configured with.

    Each field is read from the environment variable of the same name in upper case.
    ``celeryconfig.py`` reads the check intervals for the beat schedule.
    """

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    noaa_kp_url: str = "https://services.swpc.noaa.gov/products/noaa-planetary-k-index.json"
    noaa_timeout_s: float = Field(10.0, gt=0)
    storm_check_interval_s: float = Field(900.0, gt=0)
    full_moon_check_interval_s: float = Field(3600.0, gt=0)
    # Users per synthesis task when a global event fans out to every active user.
    synthesis_chunk_size: int = Field(500, gt=0)
    memory_ttl_s: int = Field(3600, gt=0)


@lru_cache(maxsize=1)
def get_app_settings() -> AppSettings:
    """Return the process-wide application settings, reading the environment on first use."""
    return AppSettings()
