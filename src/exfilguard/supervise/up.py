"""`exfilguard up`: inside, meter and outside as three processes, started and watched by one supervisor.

The supervisor loads no model and imports no ML library: the strong model lives only in the
inside process, the weak model in the inside and the outside, and the meter (started first,
so that a cap mismatch, a bad key, a tampered ledger or a taken port is found before any model
loads) is the only path between them.

Supervision policy: a child that dies is logged with its pid and exit status and restarted on
the same ports (the outside reconnects through the meter on the next request). ``up`` gives
up and exits non-zero instead when a child exits with a configuration (2) or tampered-ledger
(5) code, which a restart cannot fix (it exits with that code), or when one child died
``MAX_RESTARTS`` times within ``RESTART_WINDOW`` seconds (ChildFailed).
"""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from exfilguard.errors import ChildFailed, ConfigError
from exfilguard.supervise.assemble import free_port
from exfilguard.supervise.sandbox import SANDBOX_UID, Sandbox, prepare_socket_dir, python_trees, socket_dir_for

MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
FATAL_CODES = {2: "configuration error", 5: "ledger tampered"}


class _Stopped(Exception):
    """SIGINT/SIGTERM arrived while a child was starting."""


@dataclass
class UpConfig:
    """Everything `exfilguard up` needs. Sizes in bytes."""

    strong: str
    weak: str
    cap: int
    port: int
    data_dir: Path
    ledger: str
    signing_key: Path
    reserve_block: int
    windows: list[str] = field(default_factory=list)
    budget: str = "default"
    metrics: str = ""  # HOST:PORT of the meter's /metrics and /status ("" = a free port)
    publish_heads: str | None = None  # DIR, URL or -: where the meter publishes signed heads (up: DATA_DIR/heads)
    codec: str = "auto"
    flush_every: int = 16
    flush_ms: float = 0.0
    device: str = "cpu"
    model_name: str = "exfilguard"
    dashboard_port: int = 0  # the read-only operator dashboard on `host` (0: not started)
    ready_timeout: float = 600.0  # model loading on a small machine
    host: str = "127.0.0.1"  # where the API and the dashboard listen
    isolate: bool = True  # the inside in its sandbox (supervise/sandbox.py); False only with --no-isolate
    budget_lifetime: str | None = None  # the budget's planned lifetime: the outside's burn-rate alerts
    access_log: Path | None = None  # the outside's access log (up: DATA_DIR/access.jsonl)
    timing_charge: bool = True  # the meter charges each connection's open/close and short reads (timing is egress)

    def private_paths(self) -> list[Path]:
        """What the inside must never read or write: DATA_DIR, the ledger, the keys, the logs, the heads."""
        paths = [self.data_dir.resolve(), self.signing_key.resolve().parent]
        if self.ledger.startswith("sqlite:///"):
            paths.append(Path(self.ledger[len("sqlite:///"):]).resolve().parent)
        if self.publish_heads and "://" not in self.publish_heads and self.publish_heads != "-":
            paths.append(Path(self.publish_heads).resolve())
        if self.access_log is not None:
            paths.append(self.access_log.resolve().parent)
        out: list[Path] = []
        for p in paths:
            if p not in out:
                out.append(p)
        return out


DEFAULT_METRICS = "127.0.0.1:9464"  # the meter's /metrics and /status: fixed, so it can be a Prometheus target
DEFAULT_DASHBOARD_PORT = 8050


def port_free(host: str, port: int) -> str | None:
    """None when host:port can be bound now, else why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def check_port_free(port: int, what: str, flag: str = "--port", host: str = "127.0.0.1") -> None:
    """Raise ConfigError, naming the option that changes it, when host:`port` cannot be bound."""
    why = port_free(host, port)
    if why is not None:
        raise ConfigError(f"{what} {host}:{port} is not available ({why}); pick another with {flag}")


def reachable(host: str) -> str:
    """How a local client reaches a server bound to `host` (a wildcard address means loopback), URL-ready."""
    h = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{h}]" if ":" in h else h


def new_api_key(data_dir: Path) -> str:
    """The API key in DATA_DIR/api-keys: the first one there, else a new one (mode 0600).

    Reused across restarts, so `up` does not add a key at every start."""
    import secrets

    from exfilguard.outside.app import read_api_keys

    path = Path(data_dir) / "api-keys"
    if path.is_file():
        existing = read_api_keys(path)
        if existing:
            return existing[0]
    key = "sk-exfilguard-" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(key + "\n")
    return key


def meter_signing_key(ddir: Path) -> Path:
    """DATA_DIR/meter-key (made on first use, kept across restarts): the meter signs tree heads."""
    from exfilguard.ledger.keytools import generate_keypair

    path = Path(ddir) / "meter-key"
    if not path.is_file():
        generate_keypair(path)
    return path


class Child:
    """One supervised process; its output lines go to ours, prefixed with its name."""

    def __init__(self, name: str, argv: list[str], ready: Callable[[Child], bool]):
        self.name, self.argv, self.ready = name, argv, ready
        self.proc: subprocess.Popen[str] | None = None
        self.deaths: collections.deque[float] = collections.deque()
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.seen = threading.Event()  # set when a line matched `expect`
        self.expect: str | None = None

    def start(self) -> None:
        self.seen.clear()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True,  # Ctrl-C goes to the supervisor, which stops children in order
            preexec_fn=_die_with_parent,
        )
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if self.expect and self.expect in line:
                self.seen.set()
            if line.startswith("error: "):
                continue  # the supervisor reports it, once, with what it does about it
            print(f"[{self.name} {proc.pid}] {line}", flush=True)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def error_line(self) -> str:
        """The child's own one-line error, if it printed one."""
        for line in reversed(self.lines):
            if line.startswith("error: "):
                return line[len("error: "):]
        return ""

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the supervisor dies, even by kill -9 (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _describe(rc: int) -> str:
    return f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5.0) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def _status_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            import json

            return json.loads(resp.read()).get("state") in ("ok", "exhausted")
    except (OSError, ValueError):
        return False


class Supervisor:
    """Start meter, inside and outside; restart a dead one; stop all on SIGINT/SIGTERM."""

    def __init__(self, cfg: UpConfig):
        self.cfg = cfg
        self.inside_port = free_port()
        self.meter_port = free_port()
        self.sandbox: Sandbox | None = None
        if cfg.isolate:
            # The inside's only channel: a UNIX socket in a directory of its own, which the meter connects to.
            self.sandbox = Sandbox(readable=python_trees([cfg.strong, cfg.weak]), hidden=cfg.private_paths(),
                                   socket_dir=socket_dir_for(cfg.data_dir), device=cfg.device)
            inside_at = f"unix:{self.sandbox.socket_inside_path}"
            upstream = f"unix:{self.sandbox.socket_host_path}"
        else:
            inside_at = upstream = f"127.0.0.1:{self.inside_port}"
        self.status_host, self.status_port = ("127.0.0.1", free_port())
        if cfg.metrics:
            from exfilguard.meter.config import parse_hostport

            self.status_host, self.status_port = parse_hostport(cfg.metrics, "--metrics")
        self.status_url = f"http://{reachable(self.status_host)}:{self.status_port}/status"
        self.metrics_url = f"http://{reachable(self.status_host)}:{self.status_port}/metrics"
        metrics_at = f"[{self.status_host}]:{self.status_port}" if ":" in self.status_host else f"{self.status_host}:{self.status_port}"
        self._stop = threading.Event()
        exe = [sys.executable, "-m", "exfilguard.cli.main"]
        meter = [
            *exe, "meter", "--listen", f"127.0.0.1:{self.meter_port}", "--upstream", upstream,
            "--ledger", cfg.ledger, "--cap", str(cfg.cap), "--budget", cfg.budget, "--reserve-block", str(cfg.reserve_block),
            "--signing-key", str(cfg.signing_key), "--metrics", metrics_at, "--upstream-wait", "0",
        ]
        for w in cfg.windows:
            meter += ["--window", w]
        if cfg.publish_heads:
            meter += ["--publish-heads", cfg.publish_heads]
        if cfg.timing_charge:
            meter += ["--timing-charge"]
        inside = [*exe, "inside", "--strong", cfg.strong, "--weak", cfg.weak, "--listen", inside_at, "--device", cfg.device]
        if self.sandbox is not None:
            inside = self.sandbox.wrap(inside)
        host = cfg.host
        listen_host = f"[{host}]" if ":" in host else host
        outside = [
            *exe, "outside", "--inside", f"127.0.0.1:{self.meter_port}", "--weak", cfg.weak, "--listen", f"{listen_host}:{cfg.port}",
            "--api-keys", str(cfg.data_dir / "api-keys"), "--meter-status", self.status_url, "--codec", cfg.codec,
            "--flush-every", str(cfg.flush_every), "--flush-ms", str(cfg.flush_ms), "--model-name", cfg.model_name,
            "--keys-ledger", f"sqlite:///{(cfg.data_dir / 'keys.sqlite').resolve()}",
            # every answer (request, seed, output ids), hash-chained, for `exfilguard verify`
            "--request-log", str((cfg.data_dir / "request-log.jsonl").resolve()),
        ]
        if cfg.budget_lifetime:
            outside += ["--budget-lifetime", cfg.budget_lifetime]
        if cfg.access_log is not None:
            outside += ["--access-log", str(cfg.access_log.resolve())]
        self.meter = Child("meter", meter, lambda c: _status_ok(self.status_url))
        self.inside = Child("inside", inside, lambda c: c.seen.is_set())
        self.inside.expect = "inside worker listening on"
        self.outside = Child("outside", outside, lambda c: c.seen.is_set())
        self.outside.expect = "outside API on"
        self.children = [self.meter, self.inside, self.outside]  # start order; stop in reverse
        self.dashboard: Child | None = None
        if cfg.dashboard_port:
            dash = [
                *exe, "dashboard", "--ledger", cfg.ledger, "--meter-metrics", self.metrics_url,
                "--tokens-metrics", f"http://{reachable(host)}:{cfg.port}/metrics", "--public-key", f"{cfg.signing_key}.pub",
                "--listen", f"{listen_host}:{cfg.dashboard_port}",
            ]
            page = f"http://{reachable(host)}:{cfg.dashboard_port}/api/state"
            self.dashboard = Child("dashboard", dash, lambda c: c.seen.is_set() and _http_ok(page))
            self.dashboard.expect = "exfilguard dashboard on"
            self.children.append(self.dashboard)

    def _start(self, c: Child, timeout: float) -> None:
        """Start one child and wait until it is ready; raise ChildFailed when it exits first."""
        c.start()
        self._wait_ready(c, timeout)

    def _wait_ready(self, c: Child, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not c.ready(c):
            if not c.alive():
                assert c.proc is not None
                rc = c.proc.wait()
                why = c.error_line() or f"{c.name} exited with {_describe(rc)} while starting"
                raise ChildFailed(why, rc if rc > 0 else None)
            if self._stop.is_set():
                c.stop()
                raise _Stopped()
            if time.monotonic() > deadline:
                c.stop()
                raise ChildFailed(f"{c.name} was not ready after {timeout:g}s")
            time.sleep(0.05)

    def start_all(self) -> None:
        """Meter first (no model: startup errors show before any model loads), then inside, then outside."""
        check_port_free(self.cfg.port, "the API port", host=self.cfg.host)
        if self.sandbox is not None:
            prepare_socket_dir(self.sandbox.socket_dir)
        try:
            self._start(self.meter, 60.0)
            # Both load models; neither needs the other to load.
            self.inside.start()
            self.outside.start()
            self._wait_ready(self.inside, self.cfg.ready_timeout)
            self._wait_ready(self.outside, self.cfg.ready_timeout)
            if self.dashboard is not None:  # reads the ledger and both /metrics; loads no model
                self._start(self.dashboard, 60.0)
        except BaseException:
            self.stop_all()
            raise

    def watch(self) -> None:
        """Until stopped: restart a child that died; raise ChildFailed when that cannot help."""
        while not self._stop.wait(0.2):
            for c in self.children:
                if c.alive() or self._stop.is_set():
                    continue
                assert c.proc is not None
                rc = c.proc.wait()
                now = time.monotonic()
                c.deaths.append(now)
                while c.deaths and c.deaths[0] < now - RESTART_WINDOW:
                    c.deaths.popleft()
                print(f"up: {c.name} (pid {c.proc.pid}) died with {_describe(rc)}"
                      + (f": {c.error_line()}" if c.error_line() else ""), file=sys.stderr, flush=True)
                if rc in FATAL_CODES:
                    raise ChildFailed(f"{c.name} exited with {FATAL_CODES[rc]}: {c.error_line() or _describe(rc)}; not restarting", rc)
                if len(c.deaths) >= MAX_RESTARTS:
                    raise ChildFailed(f"{c.name} died {len(c.deaths)} times within {RESTART_WINDOW:g}s; giving up")
                print(f"up: restarting {c.name}", file=sys.stderr, flush=True)
                self._start(c, self.cfg.ready_timeout if c is not self.meter else 60.0)
                print(f"up: {c.name} restarted (pid {c.pid})", file=sys.stderr, flush=True)

    def request_stop(self) -> None:
        self._stop.set()

    def stop_all(self) -> None:
        """Outside, then meter (it settles reservations and signs a head), then inside."""
        for c in (self.dashboard, self.outside, self.meter, self.inside):
            if c is not None:
                c.stop()


def serve_up(cfg: UpConfig, api_key: str) -> None:
    """Run the stack until SIGINT/SIGTERM (exit 0) or until a child cannot be kept up (ChildFailed)."""
    sup = Supervisor(cfg)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sup.request_stop())
    try:
        sup.start_all()
    except _Stopped:
        return
    here = reachable(cfg.host)
    print(f"exfilguard is up: base URL http://{here}:{cfg.port}/v1" + (f" (listening on {cfg.host})" if here != cfg.host else ""), flush=True)
    print(f"API key: {api_key}", flush=True)
    print(f"processes: meter pid {sup.meter.pid}, inside pid {sup.inside.pid}, outside pid {sup.outside.pid} "
          f"(supervisor pid {os.getpid()})", flush=True)
    if sup.sandbox is not None:
        user = f"user nobody (uid {SANDBOX_UID})" if sup.sandbox.as_root else "an unprivileged user namespace"
        print(f"inside isolated: bwrap, own network (loopback only), PID and mount namespaces, {user}; "
              f"its only channel is the meter, over unix:{sup.sandbox.socket_host_path}", flush=True)
    else:
        print("warning: --no-isolate: the inside runs unsandboxed beside the meter: a compromised inside can read the "
              "meter key, rewrite the ledger and kill the meter", flush=True)
    print(f"meter status {sup.status_url}, metrics {sup.metrics_url}", flush=True)
    if cfg.publish_heads:
        print(f"signed tree heads published to {cfg.publish_heads} (audit: exfilguard ledger verify --trusted-head ...)", flush=True)
    rlog = cfg.data_dir / "request-log.jsonl"
    ledger_shown = re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", cfg.ledger)
    # With the timing charge the ledger holds bytes no frame carried; the auditor gives their total.
    charged = " --timing-charged <the meter's exfilguard_meter_timing_charged_bytes_total>" if cfg.timing_charge else ""
    print(f"request log {rlog} (audit: exfilguard verify --log {rlog} --log-key {rlog}.key.pub --ledger {ledger_shown}{charged} "
          f"--strong {cfg.strong}), access log {cfg.access_log}", flush=True)
    if sup.dashboard is not None:
        print(f"dashboard http://{here}:{cfg.dashboard_port}/ (pid {sup.dashboard.pid})", flush=True)
    print(f"strong {cfg.strong}, weak {cfg.weak}, cap {cfg.cap} bytes, block {cfg.reserve_block} bytes, ledger {ledger_shown} "
          f"(tree heads signed with {cfg.signing_key}; audit: exfilguard ledger verify --ledger "
          f"{ledger_shown} --public-key {cfg.signing_key}.pub); Ctrl-C stops", flush=True)
    try:
        sup.watch()
    except _Stopped:
        pass
    finally:
        print("stopping: outside, meter, inside", flush=True)
        sup.stop_all()


def up_config(strong: str, weak: str | None, cap: str | None, port: int, data_dir: str, *, ledger: str | None = None,
              reserve_block: str | None = None, windows: list[str] | None = None, signing_key: Path | None = None,
              metrics: str | None = None, publish_heads: str | None = None, codec: str = "auto", flush_every: int = 16,
              flush_ms: float = 0.0, device: str = "cpu", dashboard_port: int | None = None, host: str = "127.0.0.1",
              isolate: bool = True, budget_lifetime: str | None = None, access_log: str | None = None,
              timing_charge: bool = True) -> UpConfig:
    """Check every option of `up` (no model is loaded here) and return the config; ConfigError otherwise.

    `metrics` and `dashboard_port` left at None take their defaults (DEFAULT_METRICS, DEFAULT_DASHBOARD_PORT);
    a default that is taken is replaced by a free port, said on stdout; one given and taken is an error."""
    from exfilguard.ledger.keys import load_private_key
    from exfilguard.meter.config import DEFAULT_BLOCK, parse_hostport
    from exfilguard.units import parse_duration, parse_size, parse_window
    from exfilguard.models.loading import resolve_weak_spec, weight_file_bytes

    ddir = Path(data_dir)
    try:
        ddir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the ledger, the keys and the logs: nobody else's
    except OSError as exc:
        raise ConfigError(f"cannot create --data-dir {ddir}: {exc.strerror}") from None
    asked = weak
    weak_spec = resolve_weak_spec(weak, strong)
    if asked is None and weak_spec == strong:
        print(f"warning: no distilled weak model found; using the strong model {strong} as the weak model", flush=True)
    if cap is None:
        size = weight_file_bytes(strong)
        if size is None:
            raise ConfigError(f"cannot size the weights of {strong!r}: pass --cap BYTES")
        cap_bytes = size // 10
    else:
        cap_bytes = parse_size(cap, "--cap")
    block = parse_size(reserve_block, "--reserve-block") if reserve_block else DEFAULT_BLOCK
    if block <= 0:
        raise ConfigError("--reserve-block must be a positive number of bytes")
    for w in windows or ():
        parse_window(w)
    if budget_lifetime is not None:
        parse_duration(budget_lifetime)
    key = Path(signing_key) if signing_key else ddir / "meter-key"
    if not host or any(c.isspace() for c in host):
        raise ConfigError(f"--host {host!r} is not an address")
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is out of range")
    check_port_free(port, "the API port", "--port", host)
    dport = _pick_port(dashboard_port, DEFAULT_DASHBOARD_PORT, host, "the dashboard port", "--dashboard-port", avoid={port})
    if metrics is None:
        mhost, mport = parse_hostport(DEFAULT_METRICS, "--metrics")
        mport = _pick_port(None, mport, mhost, "the meter's metrics port", "--metrics HOST:PORT", avoid={port, dport})
    else:
        mhost, mport = parse_hostport(metrics, "--metrics")
        if mport == 0:
            raise ConfigError(f"--metrics {metrics!r} needs a port (it is a Prometheus target: fixed)")
        check_port_free(mport, "the meter's metrics address", "--metrics HOST:PORT", mhost)
    if isolate:
        if strong.startswith("openai:"):
            raise ConfigError("--strong openai:URL needs the network, and the inside's sandbox has none: run that inside "
                              "on its own host (docs/deploy.md) or pass --no-isolate")
        from exfilguard.supervise.sandbox import check_available

        check_available()
    alog = Path(access_log) if access_log else ddir / "access.jsonl"
    try:  # the outside would find out only after loading its model
        alog.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(alog, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640))
    except OSError as exc:
        raise ConfigError(f"cannot write the access log {alog}: {exc.strerror}; pick another with --access-log") from None
    heads = publish_heads if publish_heads is not None else str((ddir / "heads").resolve())
    cfg = UpConfig(
        strong=strong, weak=weak_spec, cap=cap_bytes, port=port, data_dir=ddir,
        ledger=ledger or f"sqlite:///{(ddir / 'ledger.sqlite').resolve()}", signing_key=key.resolve(),
        reserve_block=block, windows=list(windows or ()), metrics=f"{mhost}:{mport}", publish_heads=heads,
        codec=codec, flush_every=flush_every, flush_ms=flush_ms, device=device,
        model_name=strong if not strong.startswith("openai:") else "exfilguard", dashboard_port=dport,
        host=host, isolate=isolate, budget_lifetime=budget_lifetime,
        access_log=alog, timing_charge=timing_charge,
    )
    if isolate:
        from exfilguard.supervise.sandbox import check_layout

        check_layout(python_trees([cfg.strong, cfg.weak]), cfg.private_paths())
    if not signing_key:
        meter_signing_key(ddir)  # made on first use, once the layout is known to be safe
    load_private_key(key)  # a bad key fails here, before anything starts
    return cfg


def _pick_port(asked: int | None, default: int, host: str, what: str, flag: str, avoid: set[int]) -> int:
    """The port asked for (0: none; an error when taken), else the default, else a free one (said on stdout)."""
    if asked is not None:
        if asked == 0:
            return 0
        if not 0 < asked < 65536 or asked in avoid:
            raise ConfigError(f"{flag} {asked} is out of range or already used by another part of `up`")
        check_port_free(asked, what, flag, host)
        return asked
    why = port_free(host, default) if default not in avoid else "used by another part of `up`"
    if why is None:
        return default
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        free = int(s.getsockname()[1])
    print(f"note: {what}'s default {host}:{default} is taken ({why}); using {host}:{free} instead (choose one with {flag})", flush=True)
    return free


__all__ = ["DEFAULT_DASHBOARD_PORT", "DEFAULT_METRICS", "ChildFailed", "Supervisor", "UpConfig", "check_port_free", "meter_signing_key",
           "new_api_key", "reachable", "serve_up", "up_config"]
