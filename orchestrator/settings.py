"""Configuration, resolved once: flag > environment > `.env` file > default.

The CLI passes flags as overrides; everything else reads `Settings` from the environment. Names
match docs/configuration.md and ARCHITECTURE.md's table.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.base import error_message
from schemas.errors import InvalidSpec


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CHARFORGE_", env_file=".env", env_file_encoding="utf-8", extra="ignore",
        allow_inf_nan=False,
    )

    home: Path = Path("~/.charforge")
    database_url: str = ""  # default: sqlite:///$CHARFORGE_HOME/charforge.db
    storage_url: str = ""  # default: file://$CHARFORGE_HOME/store
    s3_endpoint_url: str | None = None
    git_base_url: str = "https://github.com/"
    # RAY_ADDRESS, not CHARFORGE_RAY_ADDRESS: the variable Ray itself reads.
    ray_address: str | None = Field(
        default=None, validation_alias=AliasChoices("RAY_ADDRESS", "ray_address")
    )
    # Seconds without a heartbeat after which a running run counts as lost.
    heartbeat_timeout: float = Field(default=60.0, gt=0)
    # Attempts per stage when infrastructure fails (a dead worker or node, a network error);
    # the wait between them doubles from `retry_backoff` seconds (capped at 60).
    max_attempts: int = Field(default=3, ge=1)
    retry_backoff: float = Field(default=2.0, ge=0)
    # How often a lost run is recovered (queued again, resuming from its checkpoint) before it fails.
    max_recoveries: int = Field(default=3, ge=0)
    # Runs one dispatcher keeps in flight at once (Ray resources bound it further).
    max_concurrent: int = Field(default=4, ge=1)
    # The Ray resource training and sampling ask for when the cluster has it ("GPU", or a custom
    # resource naming accelerator nodes).
    accelerator: str = "GPU"
    # CPUs a training task asks for (and torch threads it uses); 0 = all of the local machine's
    # CPUs in the embedded default, 1 on a cluster.
    train_cpus: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        self.home = self.home.expanduser()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'charforge.db'}"
        if not self.storage_url:
            self.storage_url = (self.home / "store").as_uri()
        return self

    @property
    def embedded(self) -> bool:
        """No cluster configured: `jobs submit` runs the dispatcher itself on a local Ray."""
        return not self.ray_address

    def storage(self):  # -> workers.storage.Storage
        from workers.storage import open_storage

        return open_storage(self.storage_url, endpoint_url=self.s3_endpoint_url)


def load_settings(**overrides: Any) -> Settings:
    """Settings from env and `.env` (or the file CHARFORGE_ENV_FILE names), flags winning."""
    env_file = os.environ.get("CHARFORGE_ENV_FILE", ".env")
    try:
        # _env_file: BaseSettings takes it; the signature mypy derives from the fields does not list it
        return Settings(_env_file=env_file, **{k: v for k, v in overrides.items() if v is not None})  # type: ignore[call-arg]
    except ValidationError as err:
        raise InvalidSpec("; ".join(_setting_error(e) for e in err.errors())) from None


def _setting_error(error: Any) -> str:
    """One refused setting, by the name a user sets it with (the flag of the same name wins)."""
    field = str(error["loc"][0]) if error["loc"] else "?"
    name = "RAY_ADDRESS" if field == "ray_address" else f"CHARFORGE_{field.upper()}"
    return f"invalid setting {name}: {error_message(error)} (got {error.get('input')!r})"
