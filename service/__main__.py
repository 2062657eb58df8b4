"""``python -m service``: run the API with uvicorn; SIGTERM drains before exiting."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys

import uvicorn

from service.api import create_app
from service.settings import Settings
from service.supervisor import STARTUP_FAILURE, supervise


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, turn /ready to 503 first; uvicorn then finishes in-flight requests."""

    def __init__(self, config: uvicorn.Config, engine: object) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame: object) -> None:  # type: ignore[override]
        self.engine.begin_drain()  # type: ignore[attr-defined]
        super().handle_exit(sig, frame)  # type: ignore[arg-type]
        # uvicorn re-raises captured signals once it has shut down, which would end a cleanly
        # drained SIGTERM with status -15; supervisors should see a clean exit (0).
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and captured is not None:
            captured[:] = [s for s in captured if s != signal.SIGTERM]


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = argparse.ArgumentParser(description="cprec recommendation API")
    parser.add_argument("--host", default=None, help="overrides CPREC_HOST")
    parser.add_argument("--port", type=int, default=None, help="overrides CPREC_PORT")
    args = parser.parse_args()
    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    settings = Settings(**overrides)  # type: ignore[arg-type]
    configure_logging(settings)
    workers = settings.worker_count()
    if workers == 1:
        serve_one(settings)
    else:
        sys.exit(supervise(settings, overrides, workers))


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def serve_one(settings: Settings, sockets: list[socket.socket] | None = None) -> None:
    """One service process (on ``sockets`` when a supervisor bound them); exits with
    ``STARTUP_FAILURE`` when it never started serving."""
    configure_logging(settings)
    app = create_app(settings)
    server = DrainingServer(uvicorn_config(app, settings), app.state.engine)
    server.run(sockets=sockets)
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def uvicorn_config(app: object, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=settings.access_log,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
