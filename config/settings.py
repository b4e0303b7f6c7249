"""Service settings: environment variables (and an optional TOML file), validated once at start-up.

The TOML file named by FILEFEED_CONFIG uses the environment variables' own names as keys
(`FILEFEED_STAGING_DIR = "/data"`, `PLUGIN_PORT = 8080`); a variable set in the environment wins over the file. A
missing file, a TOML syntax error or an unknown key is an error, reported with every other problem.
"""

from __future__ import annotations

import contextvars
import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from config.problems import ConfigFileError, did_you_mean, read_toml

CONFIG_ENV = "FILEFEED_CONFIG"
# Level names of the SDK (winston) and Python's "warning", to Python levels.
LOG_LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "warning": logging.WARNING, "info": logging.INFO,
              "http": logging.INFO, "verbose": logging.DEBUG, "debug": logging.DEBUG, "silly": logging.DEBUG}


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
    journal_room_bytes: int = Field(
        default=16 * 1024 * 1024, ge=0, description="at most this much of a writer's next journal is pre-written "
        "(zeros, fsynced) by its splitter, so commits overwrite instead of growing the file (0 = off)")
    dedup_window: int = Field(default=200_000, ge=0)
    dedup_seconds: float = Field(default=600.0, ge=0, description="rolls drop rows published this recently (0 = off)")
    dedup_max_rows: int = Field(default=1_000_000, ge=1, description="row hashes kept per partition for that")
    snapshot_tombstone_days: float = Field(
        default=30.0, ge=0, le=36_500, description="snapshot feeds forget removed identifiers this much older than "
        "the newest change of their segment (0 = never)")
    max_identifiers_per_update: int = Field(
        default=2_000, ge=1, description="user_segment_update with more user_identifiers is answered error")
    min_free_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    max_staged_bytes: int | None = Field(default=None, ge=1)
    max_open_files: int = Field(default=16, ge=3, le=4096, description="descriptors one worker's staging may hold: its "
                                "journal, sealed journals waiting for their split, the split's file")
    retry_delay_ms: int = Field(default=5_000, ge=0)
    commit_mode: Literal["inline", "thread"] = Field(
        default="inline", description="inline: group commit on the event loop (fast fsync); thread: committer thread")

    # rolling
    flush_check_seconds: float = Field(default=30.0, gt=0)
    batch_wait_seconds: float = Field(default=10.0, gt=0, description="how long batch_update waits for a lease")
    sftp_known_hosts: Path | None = None
    flush_concurrency: int = Field(default=8, ge=1, le=64, description="partitions `filefeed flush` rolls at once")

    # ledger and metrics
    ledger_retention_days: float = Field(default=14.0, gt=0, le=3650,
                                         description="ledger entries older than this are pruned")
    metrics_refresh_seconds: float = Field(default=5.0, gt=0, le=300,
                                           description="how often a background thread recomputes the disk gauges")

    # slow partners: every destination gets its own bounded lane, every sink call its own deadlines
    batch_deadline_seconds: float = Field(default=20.0, gt=0, le=600,
                                          description="batch_update answers RETRY after this; the roll goes on")
    destination_concurrency: int = Field(default=4, ge=1, le=64, description="rolls at once per destination")
    destination_queue: int = Field(default=32, ge=0, le=10_000, description="batches waiting per destination")
    sink_connect_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    sink_read_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    leftover_age_seconds: float = Field(default=3600.0, ge=1,
                                        description="filefeed's own temp uploads older than this are removed")

    # slow clients
    request_read_timeout_seconds: float = Field(default=10.0, gt=0, le=600,
                                                description="a request's headers and body must arrive within this")
    max_connections: int = Field(default=2048, ge=1, le=1_000_000, description="open connections per worker")
    # Longer than the idle timeout of the clients and load balancers in front (httpx and Node: 5 s, AWS ALB: 60 s), so
    # the client closes an idle connection first: a server closing first races the client's next request (a reset).
    keep_alive_seconds: float = Field(default=75.0, gt=0, le=3600,
                                      description="an idle keep-alive connection is closed after this")

    # several replicas: the state that decides exactly once, shared in PostgreSQL (pipeline/shared/)
    database_url: SecretStr | None = Field(default=None, description="postgresql://... shared by every replica; "
                                           "unset: one host, the embedded SQLite ledger")
    replica_id: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$",
                                   description="this replica's name in the shared database (default: host name)")
    database_pool_size: int = Field(default=4, ge=1, le=64, description="connections per worker process")
    database_timeout_seconds: float = Field(default=5.0, gt=0, le=120,
                                            description="connect, pool wait and statement deadline")
    database_lease_seconds: float = Field(default=60.0, ge=2, le=3600,
                                          description="a roll lease lapses this long after its last renewal")
    database_orphan_seconds: float = Field(default=600.0, ge=1, le=30 * 86400,
                                           description="a publishing roll silent this long may be resolved by another "
                                                       "replica (its files looked up at the destination)")

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        if v.strip().lower() not in LOG_LEVELS:
            raise ValueError(f"unknown level{did_you_mean(v.strip().lower(), LOG_LEVELS)}; use one of "
                             + ", ".join(n.upper() for n in LOG_LEVELS))
        return v.strip().upper()

    @model_validator(mode="after")
    def _mode(self) -> ServiceSettings:
        if self.feeds is None and not (self.plugin_worker_id and self.plugin_authentication_token):
            raise ValueError(
                "gateway mode needs PLUGIN_WORKER_ID and PLUGIN_AUTHENTICATION_TOKEN "
                "(or set FILEFEED_FEEDS=config/feeds.toml for embedded mode)"
            )
        if self.database_url is not None:
            url = self.database_url.get_secret_value()
            if not url.startswith(("postgresql://", "postgres://")):
                raise ValueError("FILEFEED_DATABASE_URL: must start with postgresql:// (user, host, port, database)")
            if self.database_orphan_seconds < 2 * self.database_lease_seconds:
                raise ValueError("FILEFEED_DATABASE_ORPHAN_SECONDS: must be at least twice "
                                 "FILEFEED_DATABASE_LEASE_SECONDS")
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
        values = _file_values.get()
        if values is None:  # built directly, not through load_settings: a broken file still fails loudly
            values, problems = read_config_file()
            if problems:
                raise SettingsError(problems)
        return init_settings, env_settings, _FileSource(settings_cls, values)


def env_name(name: str, field: FieldInfo) -> str:
    """The environment variable a setting is read from (the first one, when it has several)."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"FILEFEED_{name.upper()}"


def env_names() -> dict[str, str]:
    """{environment variable name: setting}, every name each setting answers to, from the model's fields."""
    out: dict[str, str] = {}
    for name, field in ServiceSettings.model_fields.items():
        out[f"FILEFEED_{name.upper()}"] = name
        if isinstance(field.validation_alias, AliasChoices):
            out.update({str(c): name for c in field.validation_alias.choices})
    return out


class _FileSource(PydanticBaseSettingsSource):
    """The FILEFEED_CONFIG file's values, below the environment."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]):
        super().__init__(settings_cls)
        self.values = values

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


_file_values: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("filefeed_config_file",
                                                                                      default=None)


def read_config_file(path: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """({setting: value}, problems) of the FILEFEED_CONFIG file; keys are environment variable names."""
    path = path if path is not None else os.environ.get(CONFIG_ENV)
    if not path:
        return {}, []
    try:
        doc = read_toml(path, CONFIG_ENV)
    except ConfigFileError as e:
        return {}, [str(e)]
    names = env_names()
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in doc.items():
        if key in names:
            values[names[key]] = value
        else:
            problems.append(f"{path}: unknown setting {key}{did_you_mean(key, names)}; keys are the environment "
                            "variables' names, e.g. FILEFEED_STAGING_DIR")
    return values, problems


_active: ServiceSettings | None = None


def active_settings() -> ServiceSettings | None:
    """The settings this process validated last (the server's and every command's): for code that has no settings
    handed to it, such as a sink opened from feed properties alone."""
    return _active


def load_settings(**overrides: Any) -> ServiceSettings:
    """Validate the settings once; raise SettingsError naming every problem (setting and variable), never a value."""
    global _active
    values, problems = read_config_file()
    token = _file_values.set(values)
    try:
        settings = ServiceSettings(**overrides)
    except ValidationError as e:
        fields = ServiceSettings.model_fields
        for err in e.errors(include_input=False, include_url=False):
            loc = ".".join(str(p) for p in err.get("loc", ())) or "settings"
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            if loc in fields:
                loc = env_name(loc, fields[loc])
            problems.append(f"{loc}: {msg}" if loc != "settings" else msg)
    finally:
        _file_values.reset(token)
    if problems:
        raise SettingsError(problems)
    _active = settings
    return settings
