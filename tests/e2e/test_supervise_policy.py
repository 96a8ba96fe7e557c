"""The supervisor's policy with stand-in children (real processes, no models): restart, give up, fatal codes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from exfilguard.errors import ChildFailed
from exfilguard.supervise import Child, Supervisor, UpConfig


def _sup(tmp_path: Path, script: str) -> Supervisor:
    cfg = UpConfig(strong="x", weak="x", cap=1, port=1, data_dir=tmp_path, ledger="sqlite:///x", signing_key=tmp_path / "k",
                   reserve_block=1, ready_timeout=30)
    sup = Supervisor(cfg)
    c = Child("worker", [sys.executable, "-c", script], lambda c: c.seen.is_set())
    c.expect = "ready"
    sup.children = [c]
    sup._start(c, 30)
    return sup


def test_a_child_that_keeps_dying_is_restarted_then_up_gives_up(tmp_path, capsys):
    sup = _sup(tmp_path, "print('ready', flush=True); import time; time.sleep(0.2); raise SystemExit(1)")
    with pytest.raises(ChildFailed, match="died 5 times within 60s") as exc:
        sup.watch()
    assert exc.value.exit_code == 9
    err = capsys.readouterr().err
    assert err.count("up: restarting worker") == 4 and "died with exit code 1" in err


def test_a_fatal_exit_code_is_not_restarted(tmp_path, capsys):
    sup = _sup(tmp_path, "print('ready', flush=True); import time; time.sleep(0.2); print('error: ledger does not add up', flush=True); raise SystemExit(5)")
    with pytest.raises(ChildFailed, match="ledger tampered: ledger does not add up; not restarting") as exc:
        sup.watch()
    assert exc.value.exit_code == 5
    assert "restarting" not in capsys.readouterr().err


def test_choosing_and_sizing_the_models_loads_no_ml_library(tmp_path):
    """`up` picks the weak model and sizes the cap from the weights in the supervisor, which must stay
    free of torch (issue 21/22): only files on disk are looked at."""
    import subprocess

    from exfilguard.supervise import free_port

    code = ("import sys; from exfilguard.supervise import up_config; "
            f"cfg = up_config('smollm2', None, None, {free_port()}, {str(tmp_path / 'd')!r}, dashboard_port=0); "
            "print(cfg.weak, cfg.cap > 0, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["default", "True", "[]"], r.stdout
