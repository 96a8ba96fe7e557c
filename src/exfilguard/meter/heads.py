"""Signed tree heads: the meter signs one every --sth-interval (when the log grew) and at stop, stores
it in the ledger and publishes it outside the ledger, where a rollback of the ledger cannot reach.

Targets: a directory (one JSON file per head, created exclusively, never rewritten), an
HTTP(S) URL (one POST of the head JSON per head) or ``-`` (one JSON line per head on stdout).
The head JSON is ``keys.head_to_json``; ``ledger verify --trusted-head DIR`` reads the
directory back, and so does the meter at start (a ledger shorter than a published head is refused).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from exfilguard.base_errors import ConfigError
from exfilguard.ledger.events import canonical
from exfilguard.ledger import Ledger, merkle
from exfilguard.ledger.keys import TreeHead, head_from_json, head_to_json, key_id, sign_tree_head
from exfilguard.meter.proxy import LEDGER_FAILURES

log = logging.getLogger("exfilguard.meter")


class HeadPublisher:
    """Sends each signed head to one target; ``publish`` raises OSError when it could not."""

    def __init__(self, target: str):
        self.target = target
        self.kind = "stdout" if target == "-" else "url" if target.startswith(("http://", "https://")) else "dir"
        if self.kind == "dir":
            d = Path(target)
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"--publish-heads {target}: cannot create the directory: {exc.strerror}") from None
            if not os.access(d, os.W_OK):
                raise ConfigError(f"--publish-heads {target}: directory is not writable")

    def publish(self, head: TreeHead) -> None:
        """Publish one signed head (blocking)."""
        body = canonical(head_to_json(head))
        if self.kind == "stdout":
            sys.stdout.write(body.decode() + "\n")
            sys.stdout.flush()
        elif self.kind == "url":
            req = urllib.request.Request(self.target, data=body, method="POST", headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=5) as resp:
                if resp.status >= 300:
                    raise OSError(f"POST {self.target} answered {resp.status}")
        else:
            path = Path(self.target) / f"sth-{head.tree_size:012d}-{head.ts}-{head.key_id}.json"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # append-only: never rewrite a head
            with os.fdopen(fd, "wb") as f:
                f.write(body + b"\n")
                f.flush()
                os.fsync(f.fileno())

    def published(self) -> list[TreeHead]:
        """The heads already in a directory target (none for stdout and URL targets)."""
        if self.kind != "dir":
            return []
        heads = []
        for f in sorted(Path(self.target).glob("*.json")):
            try:
                obj = json.loads(f.read_bytes())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"published head {f} cannot be read: {exc}") from None
            heads.append(head_from_json(obj["head"] if isinstance(obj, dict) and "head" in obj else obj, f"published head {f}"))
        return heads


class HeadSigner:
    """Meter's head signing (a mixin: it uses the Meter's key, worker and publisher): every
    --sth-interval when the log grew, at start, after connections settled at rest, and at stop."""

    _rest_sign: asyncio.Future[None] | None = None

    def _key_id(self) -> str | None:
        if self._key is None:
            return None
        return key_id(self._key.public_key())

    async def _sign_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sth_interval)
            try:
                await self._sign_head()
            except LEDGER_FAILURES as exc:
                self._ledger_failed(exc)

    def _at_rest(self, commits: list[asyncio.Future[Any]]) -> None:
        """Connections settled at rest: sign (and publish) a head once those settlements committed."""
        if self._key is not None and (self._rest_sign is None or self._rest_sign.done()):
            self._rest_sign = asyncio.ensure_future(self._sign_after(commits))

    async def _sign_after(self, commits: list[asyncio.Future[Any]]) -> None:
        await asyncio.gather(*commits, return_exceptions=True)
        try:
            await self._sign_head()
        except LEDGER_FAILURES as exc:
            self._ledger_failed(exc)

    async def _sign_head(self) -> None:
        """Sign the log's head as this transaction replayed and checked it (never the head row as
        read), store it, and publish it outside the ledger; nothing when the log did not grow."""
        if self._key is None:
            return
        key = self._key

        def sign(led: Ledger) -> TreeHead | None:
            def body(cur: Any, head: Any) -> TreeHead | None:
                if head.tree_size == self._signed_size:
                    return None
                sth = sign_tree_head(key, head.tree_size, max(head.last_ts, int(time.time() * 1_000_000)),
                                     merkle.frontier_root(head.frontier))
                led.add_tree_head(sth, cur)
                self._signed_size = head.tree_size  # on the ledger's thread: the next call sees it
                return sth

            return led.write(body)

        sth = await self._worker.call(sign)
        if sth is not None and self._publisher is not None:
            # Outside the ledger, so that rolling the ledger back cannot take the head with it.
            try:
                await asyncio.to_thread(self._publisher.publish, sth)
            except OSError as exc:
                self.metrics.ledger_failures.inc()
                log.error("could not publish signed tree head %d to %s: %s", sth.tree_size, self._publisher.target, exc)


__all__ = ["HeadPublisher", "HeadSigner"]
