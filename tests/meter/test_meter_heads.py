"""The meter publishes every signed head outside the ledger; a rolled-back ledger is caught with them."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

from meterkit import MeterProcess, Upstream, free_port, pull

from exfilguard.ledger import open_ledger
from exfilguard.ledger import reads
from exfilguard.ledger.keytools import generate_keypair, load_public_key, verify_tree_head
from exfilguard.ledger.checkpoint import head_from_json

EXFILGUARD = [sys.executable, "-m", "exfilguard.cli.main"]


def test_published_heads_catch_a_rollback(tmp_path):
    priv, pub = generate_keypair(tmp_path / "meter.key")
    heads = tmp_path / "heads"
    db = tmp_path / "ledger.db"
    url = f"sqlite:///{db}"
    flood = Upstream("flood")
    extra = ("--signing-key", str(priv), "--publish-heads", str(heads), "--sth-interval", "0.2")
    try:
        m = MeterProcess(tmp_path, url, flood.addr, 20_000, *extra, block=1000)
        m.wait_ready()
        assert asyncio.run(pull("127.0.0.1", m.port, 30)) == 20_000
        assert m.stop() == 0
        saved = tmp_path / "saved"
        saved.mkdir()
        for f in tmp_path.glob("ledger.db*"):
            shutil.copy2(f, saved / f.name)
        m = MeterProcess(tmp_path, url, flood.addr, 20_000, *extra, block=1000)
        m.wait_ready()
        assert m.stop() == 0
    finally:
        flood.close()
    files = sorted(heads.glob("*.json"))
    assert len(files) >= 2
    key = load_public_key(pub)
    published = [head_from_json(json.loads(f.read_text())) for f in files]
    assert all(verify_tree_head(key, h) for h in published)
    led = open_ledger(url, create=False)
    assert max(h.tree_size for h in published) == reads.tree_head(led).tree_size
    led.close()
    verify = [*EXFILGUARD, "ledger", "verify", "--ledger", url, "--public-key", str(pub), "--trusted-head", str(heads)]
    ok = subprocess.run(verify, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    # Roll the ledger back to the copy taken after the first run: consistent, signed, shorter.
    for f in tmp_path.glob("ledger.db*"):
        f.unlink()
    for f in saved.iterdir():
        shutil.copy2(f, tmp_path / f.name)
    alone = subprocess.run(verify[:-2], capture_output=True, text=True, timeout=60)
    assert alone.returncode == 0, alone.stderr  # what the ledger holds still vouches for itself
    bad = subprocess.run(verify, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 5 and "rolled back" in bad.stderr
    # And the meter, pointed at its published heads, refuses the rolled-back ledger.
    start = subprocess.run(
        [*EXFILGUARD, "meter", "--listen", f"127.0.0.1:{free_port()}", "--upstream", f"127.0.0.1:{free_port()}",
         "--ledger", url, "--cap", "20000", "--upstream-wait", "0", *extra],
        capture_output=True, text=True, timeout=60,
    )
    assert start.returncode == 5 and "rolled back" in start.stderr


def test_heads_on_stdout(tmp_path):
    priv, pub = generate_keypair(tmp_path / "meter.key")
    echo = Upstream("echo")
    try:
        m = MeterProcess(tmp_path, f"sqlite:///{tmp_path}/l.db", echo.addr, 10_000,
                         "--signing-key", str(priv), "--publish-heads", "-")
        m.wait_ready()
        assert m.stop() == 0
    finally:
        echo.close()
    lines = [ln for ln in m.log().splitlines() if ln.startswith('{"key_id"')]
    assert lines, m.log()
    key = load_public_key(pub)
    assert all(verify_tree_head(key, head_from_json(json.loads(ln))) for ln in lines)


def test_publish_needs_a_signing_key(tmp_path):
    out = subprocess.run(
        [*EXFILGUARD, "meter", "--listen", f"127.0.0.1:{free_port()}", "--upstream", "127.0.0.1:9",
         "--ledger", f"sqlite:///{tmp_path}/l.db", "--cap", "1000", "--upstream-wait", "0", "--publish-heads", "-"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2 and "--publish-heads needs --signing-key" in out.stderr


def test_heads_posted_to_a_url(tmp_path):
    import http.server
    import threading

    got: list[bytes] = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            got.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(201)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    priv, pub = generate_keypair(tmp_path / "meter.key")
    echo = Upstream("echo")
    try:
        m = MeterProcess(tmp_path, f"sqlite:///{tmp_path}/l.db", echo.addr, 10_000, "--signing-key", str(priv),
                         "--publish-heads", f"http://127.0.0.1:{srv.server_address[1]}/heads")
        m.wait_ready()
        assert m.stop() == 0
    finally:
        echo.close()
        srv.shutdown()
    assert got, m.log()
    key = load_public_key(pub)
    assert all(verify_tree_head(key, head_from_json(json.loads(b))) for b in got)


def test_heads_at_start_and_after_every_settlement_at_rest(tmp_path):
    """With a long --sth-interval, the published heads still cover the log at start and at rest."""
    from exfilguard.ledger.events import decode_event
    from exfilguard.meter import Meter, MeterConfig

    priv, _pub = generate_keypair(tmp_path / "meter.key")
    heads = tmp_path / "heads"
    echo = Upstream("echo")
    cfg = MeterConfig(listen="127.0.0.1:0", upstream=echo.addr, ledger=f"sqlite:///{tmp_path}/l.db", cap=10**6,
                      signing_key=priv, publish_heads=str(heads), sth_interval=3600, settle_idle=0.2)

    def published() -> int:
        return max(head_from_json(json.loads(f.read_text())).tree_size for f in heads.glob("*.json"))

    def log_size() -> tuple[int, list[str]]:
        led = open_ledger(cfg.ledger, create=False)
        try:
            kinds = [decode_event(e)["kind"] for _, e in reads.entries(led)]
        finally:
            led.close()
        return len(kinds), kinds

    async def main() -> tuple[int, int, int, list[str]]:
        m = Meter(cfg)
        await m.start()
        at_start, start_size = published(), log_size()[0]
        r, w = await asyncio.open_connection(*m.listen_address)
        w.write(b"x" * 500)
        await r.readexactly(500)
        at_rest, kinds = -1, []
        for _ in range(400):  # until the connection settled at rest and a head covers it (before any stop)
            await asyncio.sleep(0.05)
            size, kinds = log_size()
            if "release" in kinds and published() == size:
                at_rest = size
                break
        w.close()
        await m.stop()
        return at_start, start_size, at_rest, kinds

    try:
        at_start, start_size, at_rest, kinds = asyncio.run(main())
    finally:
        echo.close()
    assert at_start == start_size  # the head published at start covers the whole log then
    assert at_rest >= kinds.index("release") + 1  # a head after the settlement covers it
