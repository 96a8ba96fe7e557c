"""Every `exfilguard` command answers a usage error with one line on stderr and exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import typer.main

from exfilguard.cli.main import app, main


def _leaves(cmd: object, path: list[str]) -> Iterator[tuple[list[str], bool]]:
    """(command path, has a required parameter) for every command that runs (not a group)."""
    subs = getattr(cmd, "commands", None)
    if subs:
        for name, sub in subs.items():
            yield from _leaves(sub, [*path, name])
    else:
        yield path, any(p.required for p in cmd.params)  # type: ignore[attr-defined]


COMMANDS = list(_leaves(typer.main.get_command(app), []))


def _run(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["exfilguard", *argv])
    with pytest.raises(SystemExit) as ex:
        main()  # anything but SystemExit (a traceback in a terminal) fails the test here
    return ex.value.code, capsys.readouterr().err


def test_the_walk_finds_every_command_group() -> None:
    names = {" ".join(p) for p, _ in COMMANDS}
    assert {"up", "verify", "plan", "keys add", "ledger status", "budget apply", "meter"} <= names
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=[" ".join(p) for p, _ in COMMANDS])
def test_unknown_option_is_one_line_and_exit_2(path: list[str], capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    code, err = _run([*path, "--no-such-option-xyz"], capsys, monkeypatch)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "--no-such-option-xyz" in lines[0] and "Traceback" not in err
    assert lines[0].startswith(f"error: exfilguard {' '.join(path)}: ")


@pytest.mark.parametrize("path", [p for p, req in COMMANDS if req], ids=[" ".join(p) for p, req in COMMANDS if req])
def test_missing_required_option_is_one_line_and_exit_2(path: list[str], capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    code, err = _run(path, capsys, monkeypatch)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Missing" in lines[0] and "Traceback" not in err


def test_bad_value_and_unknown_command_are_one_line() -> None:
    """Through the installed entry point, as an operator types it."""
    for argv in (["up", "--port", "abc"], ["no-such-command"], ["ledger", "status"]):
        r = subprocess.run([sys.executable, "-m", "exfilguard.cli.main", *argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
