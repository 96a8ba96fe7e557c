"""Progress for long CLI commands (one home, shared by the bench commands)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_reporter(plain: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A progress(name, done, total) callback for long benchmarks: timestamped lines on stderr
    when stdout carries JSON (`plain`), else a transient rich progress bar."""
    if plain:
        t0 = time.perf_counter()

        def log(name: str, done: int, total: int) -> None:
            print(f"[{time.perf_counter() - t0:7.1f}s] {name} {done}/{total}", file=sys.stderr, flush=True)

        yield log
        return
    from rich.progress import Progress

    with Progress(transient=True) as prog:
        task = prog.add_task("working", total=None)

        def update(name: str, done: int, total: int) -> None:
            prog.update(task, description=f"{name} {done}/{total}", completed=done, total=total)

        yield update
