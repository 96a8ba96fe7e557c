"""The meter's one ledger thread: queues ledger calls and commits them in groups.

Reservations from many connections that arrive while a commit is in flight go into the next
transaction together (group commit): one fsync for many debits. A database failure fails
every call in the group with LedgerUnavailable.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from exfilguard.base_errors import LedgerUnavailable
from exfilguard.ledger.store import Ledger

_STOP = object()
MAX_GROUP = 256


class LedgerWorker:
    """Runs ledger operations on a dedicated thread; async callers await their results."""

    def __init__(self, ledger_factory: Callable[[], Ledger], on_commit: Callable[[float], None] | None = None):
        self._factory = ledger_factory
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._on_commit = on_commit
        self._thread: threading.Thread | None = None
        self._ledger: Ledger | None = None
        self._opened: asyncio.Future[None] | None = None

    async def start(self) -> None:
        """Open the ledger on the worker thread; raise what opening raised."""
        loop = asyncio.get_running_loop()
        self._opened = loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(loop,), name="exfilguard-ledger", daemon=True)
        self._thread.start()
        await self._opened

    async def call(self, fn: Callable[[Ledger], Any]) -> Any:
        """Run fn(ledger) alone on the worker thread."""
        return await self._submit(("call", fn))

    async def op(self, name: str, *args: Any) -> Any:
        """Queue one batchable op ("reserve", "release", "settle", "record"); await its result."""
        res = await self._submit(("op", (name, args)))
        if isinstance(res, Exception):
            raise res
        return res

    def _submit(self, item: tuple[str, Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if self._thread is None or not self._thread.is_alive():
            fut.set_exception(LedgerUnavailable("the ledger worker is not running"))
            return fut
        self._queue.put((item, fut, loop))
        return fut

    async def close(self) -> None:
        """Finish queued work, close the ledger and stop the thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)
        self._thread = None

    # -- worker thread -----------------------------------------------------------------
    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._opened is not None
        try:
            self._ledger = self._factory()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(_settle, self._opened, None, exc)
            return
        loop.call_soon_threadsafe(_settle, self._opened, None, None)
        pending: list[Any] = []
        while True:
            item = self._queue.get() if not pending else pending.pop(0)
            if item is _STOP:
                break
            (kind, payload), fut, floop = item
            if kind == "call":
                self._do_call(payload, fut, floop)
                continue
            group = [item]
            while len(group) < MAX_GROUP:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP or nxt[0][0] != "op":
                    pending.append(nxt)
                    break
                group.append(nxt)
            self._do_batch(group)
        try:
            self._ledger.close()
        except Exception:
            pass

    def _do_call(self, fn: Callable[[Ledger], Any], fut: asyncio.Future[Any], floop: asyncio.AbstractEventLoop) -> None:
        try:
            result = fn(self._ledger)
        except BaseException as exc:  # noqa: BLE001
            floop.call_soon_threadsafe(_settle, fut, None, exc)
        else:
            floop.call_soon_threadsafe(_settle, fut, result, None)

    def _do_batch(self, group: list[Any]) -> None:
        assert self._ledger is not None
        ops = [payload for (_k, payload), _f, _l in group]
        t0 = time.perf_counter()
        try:
            results = self._ledger.batch(ops)
        except BaseException as exc:  # noqa: BLE001
            for _item, fut, floop in group:
                floop.call_soon_threadsafe(_settle, fut, None, exc)
            return
        if self._on_commit is not None:
            self._on_commit(time.perf_counter() - t0)
        for (_item, fut, floop), res in zip(group, results):
            floop.call_soon_threadsafe(_settle, fut, res, None)


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
