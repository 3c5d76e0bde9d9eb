"""Settings for every popcontrol process.

Which source wins, highest first: keyword arguments passed to ``Settings(...)`` (tests),
environment variables prefixed ``POPCONTROL_``, a ``.env`` file in the working directory,
then the defaults below.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="POPCONTROL_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    data_dir: Path = Field(
        default=Path("./var"), description="Holds the embedded SQLite database and blob store."
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; default sqlite:///DATA_DIR/popcontrol.db. "
        "Production: postgresql+psycopg://user:pass@host/db",
    )
    blob_dir: Path | None = Field(default=None, description="Default DATA_DIR/blobs.")
    host: str = "127.0.0.1"
    port: int = 8000
    ingest_enabled: bool = True
    ingest_bind: str = "tcp://*:5601"
    curve_public_key: str | None = Field(
        default=None, description="Server CURVE public key (Z85); see `popcontrol rig-keygen`."
    )
    curve_secret_key: str | None = Field(default=None, description="Server CURVE secret key (Z85).")
    ingest_insecure: bool = Field(
        default=False,
        description="Run the rig ingest without CurveZMQ (loopback development only).",
    )
    session_secret: str | None = Field(
        default=None, description="Signs dashboard cookies; random per process when unset."
    )
    max_upload_bytes: int = 20 * 1024 * 1024
    max_image_px: int = 4096
    worker_device: str = "auto"
    worker_lease_s: float = 60.0
    log_level: str = "INFO"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'popcontrol.db').resolve()}"

    @property
    def resolved_blob_dir(self) -> Path:
        return self.blob_dir if self.blob_dir is not None else self.data_dir / "blobs"


@lru_cache
def get_settings() -> Settings:
    return Settings()
