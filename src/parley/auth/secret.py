"""The JWT signing secret: from settings, or in development generated once and kept in the data directory."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from parley.settings import Settings

SECRET_FILE = "jwt_secret"


def resolve_jwt_secret(settings: Settings) -> str:
    if settings.jwt_secret is not None and settings.jwt_secret.get_secret_value():
        return settings.jwt_secret.get_secret_value()
    if settings.env == "production":
        raise RuntimeError("PARLEY_JWT_SECRET is required in production")  # Settings.check() says so first
    return _load_or_create(settings.data_dir / SECRET_FILE)


def _load_or_create(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        # O_EXCL: when several processes start at once, exactly one writes the secret and the others read it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        value = path.read_text().strip()
        if len(value) < 32:
            raise RuntimeError(f"{path} holds no usable secret; delete it to have a new one generated") from None
        return value
    value = secrets.token_urlsafe(48)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    return value
