"""All of parley's configuration: one pydantic-settings class read from `PARLEY_*` variables and `.env`.

Every option is documented in the README's configuration reference; `parley doctor` prints the effective values.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def chdb_installed() -> bool:
    try:
        return importlib.util.find_spec("chdb") is not None
    except (ImportError, ValueError):
        return False


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "parley"


class UnsafeSettings(Exception):
    """Production was asked for with settings that are unsafe there; `problems` says which."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("refusing to start: " + "; ".join(problems))
        self.problems = problems


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PARLEY_", env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    # --- process -------------------------------------------------------------------------------------------
    env: Literal["development", "production", "test"] = "development"
    debug: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    data_dir: Path = Field(default_factory=_default_data_dir)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"
    forwarded_allow_ips: str = "127.0.0.1"
    # Seconds to keep answering (readiness says `draining`) after SIGTERM before closing the listener,
    # so a load balancer notices; then in-flight requests get `shutdown_deadline_s` to finish.
    drain_delay_s: float = Field(default=0.0, ge=0, le=300)
    shutdown_deadline_s: float = Field(default=30.0, gt=0, le=3600)

    # --- storage -------------------------------------------------------------------------------------------
    database_url: str | None = None
    # None: migrate automatically on start for SQLite, never for PostgreSQL (run `parley migrate`).
    auto_migrate: bool | None = None
    database_pool_size: int = Field(default=10, ge=1, le=500)
    database_max_overflow: int = Field(default=10, ge=0, le=500)
    database_pool_timeout_s: float = Field(default=5.0, gt=0, le=120)
    database_connect_timeout_s: float = Field(default=5.0, gt=0, le=120)
    database_statement_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    database_busy_timeout_s: float = Field(default=5.0, ge=0, le=120)  # SQLite only
    database_retry_after_s: int = Field(default=2, ge=1, le=300)

    # --- auth ----------------------------------------------------------------------------------------------
    jwt_secret: SecretStr | None = None
    jwt_issuer: str = "parley"
    jwt_audience: str = "parley-api"
    access_token_ttl_s: int = Field(default=900, ge=60, le=86400)
    refresh_token_ttl_s: int = Field(default=30 * 86400, ge=3600, le=365 * 86400)
    ws_ticket_ttl_s: int = Field(default=60, ge=5, le=60)
    # argon2id cost: RFC 9106's second recommended setting by default (64 MiB, 3 passes, 4 lanes).
    password_hash_memory_kib: int = Field(default=65_536, ge=1024, le=4_194_304)
    password_hash_time_cost: int = Field(default=3, ge=1, le=20)
    login_rate_limit: int = Field(default=10, ge=1, le=10_000)
    login_rate_window_s: float = Field(default=300.0, gt=0, le=86400)
    register_rate_limit: int = Field(default=20, ge=1, le=10_000)
    ticket_rate_limit: int = Field(default=60, ge=1, le=100_000)  # WebSocket/SSE tickets per user per minute
    rate_limit_max_keys: int = Field(default=100_000, ge=100, le=10_000_000)

    # --- HTTP ----------------------------------------------------------------------------------------------
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    hsts_max_age_s: int = Field(default=0, ge=0, le=2 * 365 * 86400)  # 0: no HSTS header
    max_request_body_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576)
    max_message_chars: int = Field(default=32_000, ge=1, le=1_000_000)
    max_metadata_bytes: int = Field(default=16_384, ge=2, le=1_048_576)

    # --- agents and runs ------------------------------------------------------------------------------------
    default_agent: str = "assistant"
    run_timeout_s: float = Field(default=300.0, gt=0, le=86400)
    max_concurrent_runs_per_user: int = Field(default=5, ge=1, le=1000)
    max_queued_runs_per_user: int = Field(default=50, ge=1, le=10_000)
    # A process renews the lease of its unfinished runs; a run whose lease lapses (its process died) is
    # marked `interrupted` by whichever process sweeps next.
    run_lease_s: float = Field(default=15.0, ge=1, le=3600)
    agent_max_steps: int = Field(default=6, ge=1, le=50)
    event_log_batch_max: int = Field(default=1000, ge=1, le=100_000)
    event_log_queue_max: int = Field(default=20_000, ge=100, le=1_000_000)

    # --- LLM -----------------------------------------------------------------------------------------------
    llm_provider: Literal["builtin", "openai"] = "builtin"
    builtin_token_delay_s: float = Field(default=0.02, ge=0, le=10)
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: SecretStr | None = None
    openai_model: str = "gpt-4o-mini"
    llm_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    llm_max_retries: int = Field(default=3, ge=0, le=20)
    llm_health_ttl_s: float = Field(default=30.0, ge=0, le=3600)

    # --- analytics -----------------------------------------------------------------------------------------
    # auto: `clickhouse` when PARLEY_CLICKHOUSE_URL is set, else `chdb` when installed (parley[chdb]), else off.
    analytics: Literal["auto", "clickhouse", "chdb", "off"] = "auto"
    clickhouse_url: SecretStr | None = None
    analytics_database: str = Field(default="parley", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    analytics_ttl_days: int = Field(default=90, ge=1, le=3650)
    analytics_queue_max: int = Field(default=100_000, ge=100, le=10_000_000)
    analytics_batch_max: int = Field(default=10_000, ge=1, le=1_000_000)
    analytics_flush_interval_s: float = Field(default=1.0, gt=0, le=300)
    analytics_retry_max_s: float = Field(default=30.0, gt=0, le=3600)
    analytics_shutdown_flush_s: float = Field(default=5.0, ge=0, le=300)
    model_prices: str | None = None
    model_prices_file: Path | None = None

    # --- observability -------------------------------------------------------------------------------------
    alert_webhook: SecretStr | None = None  # POSTed every SLO alert transition (firing, resolved)
    alert_eval_interval_s: float = Field(default=5.0, gt=0, le=300)
    recent_errors_max: int = Field(default=5000, ge=100, le=1_000_000)

    # --- WebSocket and SSE ---------------------------------------------------------------------------------
    ws_heartbeat_s: float = Field(default=20.0, ge=1, le=3600)
    ws_max_frame_bytes: int = Field(default=65_536, ge=1024, le=16 * 1_048_576)
    # permessage-deflate costs more CPU than it saves bandwidth on small JSON frames; opt in for slow links.
    ws_compression: bool = False
    ws_send_queue_max: int = Field(default=2048, ge=16, le=1_000_000)
    ws_max_connections_per_user: int = Field(default=20, ge=1, le=10_000)
    ws_messages_per_minute: int = Field(default=600, ge=1, le=1_000_000)
    sse_keepalive_s: float = Field(default=15.0, ge=1, le=15)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    # --- derived -------------------------------------------------------------------------------------------
    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'parley.db'}"

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")

    @property
    def should_auto_migrate(self) -> bool:
        return self.is_sqlite if self.auto_migrate is None else self.auto_migrate

    @property
    def analytics_backend(self) -> Literal["clickhouse", "chdb", "off"]:
        if self.analytics != "auto":
            return self.analytics
        if self.clickhouse_url is not None and self.clickhouse_url.get_secret_value():
            return "clickhouse"
        return "chdb" if chdb_installed() else "off"

    @property
    def json_logs(self) -> bool:
        if self.log_format == "auto":
            return self.env == "production"
        return self.log_format == "json"

    def production_problems(self) -> list[str]:
        """What makes these settings unsafe in production (empty when they are fine)."""
        problems: list[str] = []
        secret = self.jwt_secret.get_secret_value() if self.jwt_secret else ""
        if not secret:
            problems.append("PARLEY_JWT_SECRET is not set (generate one: python -c 'import secrets; "
                            "print(secrets.token_urlsafe(48))')")
        elif len(secret) < 32:
            problems.append("PARLEY_JWT_SECRET is shorter than 32 characters")
        if self.is_sqlite and self.workers > 1:
            problems.append(f"SQLite cannot serve {self.workers} workers; use PostgreSQL "
                            "(PARLEY_DATABASE_URL=postgresql+asyncpg://...) or PARLEY_WORKERS=1")
        if self.debug:
            problems.append("PARLEY_DEBUG is on")
        if "*" in self.cors_origins:
            problems.append("PARLEY_CORS_ORIGINS allows every origin ('*')")
        return problems

    def problems(self) -> list[str]:
        """What makes these settings unworkable in any environment."""
        problems: list[str] = []
        if self.workers > 1:
            problems.append(f"PARLEY_WORKERS={self.workers} needs an event bus shared by the processes, and "
                            "this version has only the in-process bus: use PARLEY_WORKERS=1")
        backend = self.analytics_backend
        if backend == "clickhouse" and not (self.clickhouse_url and self.clickhouse_url.get_secret_value()):
            problems.append("PARLEY_ANALYTICS=clickhouse needs PARLEY_CLICKHOUSE_URL (http://user:password@host:8123)")
        if backend == "chdb" and not chdb_installed():
            problems.append("PARLEY_ANALYTICS=chdb needs chDB: pip install 'parley[chdb]'")
        if backend == "chdb" and self.workers > 1:
            problems.append(f"chDB (embedded ClickHouse) allows one process per data directory, not "
                            f"{self.workers} workers: use a ClickHouse server (PARLEY_CLICKHOUSE_URL) or "
                            "PARLEY_ANALYTICS=off")
        try:
            from parley.analytics.pricing import PriceTable  # here, so settings load without the rest of parley

            PriceTable.load(self.model_prices, self.model_prices_file)
        except (ValueError, OSError) as exc:
            problems.append(f"model prices: {exc}")
        if self.llm_provider == "openai" and not self.openai_api_key and "api.openai.com" in self.openai_base_url:
            problems.append("PARLEY_LLM_PROVIDER=openai needs PARLEY_OPENAI_API_KEY for api.openai.com")
        return problems

    def check(self) -> None:
        """Raise `UnsafeSettings` for unworkable settings, and in production for unsafe ones."""
        problems = self.problems()
        if self.env == "production":
            problems += self.production_problems()
        if problems:
            raise UnsafeSettings(problems)
