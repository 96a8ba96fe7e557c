"""The dashboard's web app: GET / (the page) and GET /api/state (what the page shows), nothing else."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from exfilguard.dashboard.collect import Collector, DashboardConfig
from exfilguard.dashboard.page import render_page

log = logging.getLogger(__name__)


class _Poller:
    """Polls the collector on a thread of its own, so the ledger connection has one user."""

    def __init__(self, collector: Collector):
        self.collector = collector
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-poller", daemon=True)
        self._started = threading.Lock()

    def start(self) -> None:
        """Start polling (idempotent: a mounted app has no lifespan of its own, so requests start it too)."""
        with self._started:
            if not self._thread.is_alive() and not self._stop.is_set():
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.collector.poll()
            except Exception:  # a bug must not freeze the page silently: log it, keep polling
                log.exception("dashboard poll failed")
            self._stop.wait(self.collector.config.refresh_seconds)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.collector.close()


def create_dashboard_app(ledger_url: str, meter_metrics_url: str | None = None, *, tokens_metrics_url: str | None = None,
                         public_keys: Sequence[Path] = (), refresh_seconds: float = 3.0,
                         verify_every: float = 30.0) -> Any:
    """Return the read-only dashboard as a FastAPI app (for `exfilguard dashboard` and `exfilguard up`).

    Opens the ledger now (read-only), so a wrong URL raises ConfigError / LedgerUnavailable
    here rather than on the page. The app polls while it is running (its lifespan).
    """
    cfg = DashboardConfig(ledger_url=ledger_url, meter_metrics_url=meter_metrics_url,
                          tokens_metrics_url=tokens_metrics_url, public_keys=tuple(public_keys),
                          refresh_seconds=refresh_seconds, verify_every=verify_every)
    return app_from_config(cfg)


def app_from_config(cfg: DashboardConfig) -> Any:
    """The dashboard app for a full DashboardConfig."""

    collector = Collector(cfg)
    poller = _Poller(collector)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        poller.start()
        try:
            yield
        finally:
            poller.stop()

    app = FastAPI(title="exfilguard dashboard", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.collector = collector

    @app.get("/", response_class=HTMLResponse)
    async def index(request: Request) -> HTMLResponse:
        poller.start()
        # Under a mount (e.g. /dashboard in `up`) the API lives under the mount's root path.
        api = request.scope.get("root_path", "").rstrip("/") + "/api/state"
        return HTMLResponse(render_page(cfg.refresh_seconds, api), headers={"Cache-Control": "no-store"})

    @app.get("/api/state")
    async def state() -> JSONResponse:
        poller.start()
        return JSONResponse(collector.snapshot(), headers={"Cache-Control": "no-store"})

    return app


def serve_dashboard(cfg: DashboardConfig) -> None:
    """Serve the dashboard on cfg.listen until interrupted (ConfigError when the address is taken)."""
    import socket

    import uvicorn

    from exfilguard.errors import ConfigError
    from exfilguard.meter.config import parse_hostport

    cfg.validate()
    host, port = parse_hostport(cfg.listen, "--listen")
    app = app_from_config(cfg)  # opens the ledger: a wrong URL fails before we listen
    # Bind here, not in uvicorn, so a taken port is one clear line with our exit code.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        app.state.collector.close()
        raise ConfigError(f"dashboard cannot listen on {cfg.listen}: {exc.strerror or exc}") from None
    print(f"exfilguard dashboard on http://{host}:{sock.getsockname()[1]}/", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
