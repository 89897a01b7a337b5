"""The benchmark's baseline: a bare FastAPI app whose one route returns a constant list of 20 small dicts.

It runs under the same uvicorn options as `parley serve` (`parley.server.uvicorn_config`: httptools, uvloop, no
access log, one process), so the gap between it and parley's `GET /api/threads` is parley's own work: its
middleware, authentication, the database session and query, and the response model.

    .venv/bin/python bench/baseline_server.py PORT
"""

from __future__ import annotations

import sys
from typing import Any

import uvicorn
from fastapi import FastAPI

from parley.server import uvicorn_config
from parley.settings import Settings

PATH = "/items"
ITEMS: list[dict[str, Any]] = [
    {"id": f"01bench{index:019d}", "title": f"Thread {index}", "message_count": 0} for index in range(20)
]


def build_app() -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get(PATH)
    async def items() -> list[dict[str, Any]]:
        return ITEMS

    return app


def main(port: int) -> None:
    settings = Settings(_env_file=None, env="test", host="127.0.0.1", port=port)
    uvicorn.Server(uvicorn_config(settings, build_app())).run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
