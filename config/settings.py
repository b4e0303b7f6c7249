"""Service settings: environment variables (and an optional TOML file), validated once at start-up."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource


class SettingsError(ValueError):
    """Every problem in the service settings, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid settings: " + "; ".join(problems))


class ServiceSettings(BaseSettings):
    """Read from FILEFEED_* variables, the platform's PLUGIN_*/GATEWAY_* variables, and `FILEFEED_CONFIG` (TOML)."""

    model_config = SettingsConfigDict(env_prefix="FILEFEED_", extra="ignore", hide_input_in_errors=True,
                                      populate_by_name=True)

    staging_dir: Path = Path("./var")
    feeds: Path | None = Field(default=None, description="embedded mode: TOML file declaring feeds; no gateway")
    host: str = "0.0.0.0"
    port: int = Field(default=8080, validation_alias=AliasChoices("PLUGIN_PORT", "FILEFEED_PORT"))
    workers: int = Field(default=1, ge=1, le=64)
    log_level: str = "INFO"

    # platform
    plugin_worker_id: str | None = Field(default=None, validation_alias=AliasChoices("PLUGIN_WORKER_ID"))
    plugin_authentication_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("PLUGIN_AUTHENTICATION_TOKEN")
    )
    gateway_host: str = Field(default="plugin-gateway.platform", validation_alias=AliasChoices("GATEWAY_HOST"))
    gateway_port: int = Field(default=8080, validation_alias=AliasChoices("GATEWAY_PORT"))
    gateway_timeout_seconds: float = 10.0
    context_ttl_seconds: float = 600.0

    # staging
    seal_after_seconds: float = Field(default=1.0, gt=0, le=300)
    max_segment_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    dedup_window: int = Field(default=200_000, ge=0)
    min_free_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    max_staged_bytes: int | None = Field(default=None, ge=1)
    retry_delay_ms: int = Field(default=5_000, ge=0)
    commit_mode: Literal["inline", "thread"] = Field(
        default="inline", description="inline: group commit on the event loop (fast fsync); thread: committer thread")

    # rolling
    flush_check_seconds: float = Field(default=30.0, gt=0)
    batch_wait_seconds: float = Field(default=10.0, gt=0, description="how long batch_update waits for a lease")
    sftp_known_hosts: Path | None = None

    @model_validator(mode="after")
    def _mode(self) -> ServiceSettings:
        if self.feeds is None and not (self.plugin_worker_id and self.plugin_authentication_token):
            raise ValueError(
                "gateway mode needs PLUGIN_WORKER_ID and PLUGIN_AUTHENTICATION_TOKEN "
                "(or set FILEFEED_FEEDS=config/feeds.toml for embedded mode)"
            )
        return self

    @property
    def embedded(self) -> bool:
        return self.feeds is not None

    @property
    def gateway_url(self) -> str:
        return f"http://{self.gateway_host}:{self.gateway_port}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get("FILEFEED_CONFIG")
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)


def load_settings(**overrides: Any) -> ServiceSettings:
    """Validate the settings once; raise SettingsError naming every problem, never a value."""
    try:
        return ServiceSettings(**overrides)
    except ValidationError as e:
        problems = []
        for err in e.errors(include_input=False, include_url=False):
            loc = ".".join(str(p) for p in err.get("loc", ())) or "settings"
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            problems.append(f"{loc}: {msg}" if loc != "settings" else msg)
        raise SettingsError(problems) from None
