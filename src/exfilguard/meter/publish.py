"""Publish every signed tree head outside the ledger, where a rollback of the ledger cannot reach.

Targets: a directory (one JSON file per head, created exclusively, never rewritten), an
HTTP(S) URL (one POST of the head JSON per head) or ``-`` (one JSON line per head on stdout).
The head JSON is ``checkpoint.head_to_json``; ``ledger verify --trusted-head DIR`` reads the
directory back.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

from exfilguard.errors import ConfigError
from exfilguard.ledger.checkpoint import canonical, head_to_json, load_trusted_heads
from exfilguard.ledger.keys import TreeHead


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
        if self.kind != "dir" or not any(Path(self.target).glob("*.json")):
            return []
        return [cp.head for cp in load_trusted_heads([self.target], None)]


def parse_target(target: str | None) -> HeadPublisher | None:
    """A publisher for --publish-heads, or None."""
    if not target:
        return None
    return HeadPublisher(target)


__all__ = ["HeadPublisher", "parse_target"]
