"""The outside's entry point: `exfilguard outside` loads the weak model and serves the OpenAI API,
reaching the inside through the meter.

Tests and benchmarks start the same API in-process with `start_outside`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from exfilguard.endpoint import parse_hostport, wait_for_signal
from exfilguard.outside.app import OutsideConfig, create_app
from exfilguard.outside.client import InsideConnection, StatusProbe, no_probe
from exfilguard.protocol.streams import CodecFactory


class UvicornThreadless:
    """A uvicorn server run as a task in the current event loop."""

    def __init__(self, app: Any, host: str, port: int):
        import uvicorn

        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(self.config)
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Serve; return the bound port once uvicorn is listening."""
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError("uvicorn stopped during startup")
            await asyncio.sleep(0.02)
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 10)


async def start_outside(codecs: CodecFactory, tokenizer: Any, weak_fingerprint: str, api_keys: list[str],
                        inside_host: str, inside_port: int, probe: StatusProbe = no_probe,
                        host: str = "127.0.0.1", port: int = 0, config: OutsideConfig | None = None) -> tuple[UvicornThreadless, int]:
    """Start the API; return (server, bound port)."""
    conn = InsideConnection(inside_host, inside_port, codecs, probe)
    app = create_app(conn, tokenizer, weak_fingerprint, api_keys, config)
    srv = UvicornThreadless(app, host, port)
    return srv, await srv.start()


def serve_outside(inside: str, weak_spec: str, listen: str, api_keys_file: str | None, meter_status: str | None,
                  config: OutsideConfig) -> None:
    """`exfilguard outside`: load the weak model, serve the API until SIGINT/SIGTERM."""
    from exfilguard.models.loading import load_models, tokenizer_of
    from exfilguard.outside.app import read_api_keys
    from exfilguard.outside.client import http_status_probe
    from exfilguard.protocol.codec_adapter import RealCodecFactory

    ihost, iport = parse_hostport(inside)
    host, port = parse_hostport(listen)
    keys = read_api_keys(api_keys_file)
    _, weak = load_models(None, weak_spec)
    codecs = RealCodecFactory(weak)
    probe = http_status_probe(meter_status) if meter_status else no_probe
    config.meter_status_url = meter_status  # /health reports the meter, the ledger and the budget from it

    async def main() -> None:
        srv, bound = await start_outside(codecs, tokenizer_of(None, weak), codecs.weak_fingerprint, keys,
                                         ihost, iport, probe, host, port, config)
        print(f"outside API on http://{host}:{bound}/v1 (inside via {ihost}:{iport})", flush=True)
        try:
            await wait_for_signal()
        finally:
            await srv.stop()

    asyncio.run(main())
