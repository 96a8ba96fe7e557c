"""The errors of the meter's trusted base: the root of the tree, configuration, the ledger, the upstream.

The rest of the tree (codec, models, requests, approvals, the outside) is in exfilguard.errors,
which re-exports these: import from there everywhere outside the trusted base. Each class maps
itself to an HTTP status and a CLI exit code (``http_status``, ``exit_code``).
"""

from __future__ import annotations


class ExfilguardError(Exception):
    """Base class: something exfilguard refuses to do, with a message saying why."""

    http_status: int = 500
    error_type: str = "server_error"
    exit_code: int = 1


class ConfigError(ExfilguardError):
    """A command-line option, URL, spec or file is malformed or missing."""

    http_status = 500
    error_type = "configuration_error"
    exit_code = 2


class LedgerUnavailable(ExfilguardError):
    """The ledger cannot be read or written; the meter forwards nothing (fail closed)."""

    http_status = 503
    error_type = "ledger_unavailable"
    exit_code = 4


class LedgerTampered(ExfilguardError):
    """The ledger's entries, tree or signed heads do not verify."""

    http_status = 500
    error_type = "ledger_tampered"
    exit_code = 5


class UpstreamUnavailable(ExfilguardError):
    """The meter or the inside worker cannot be reached."""

    http_status = 503
    error_type = "upstream_unavailable"
    exit_code = 6
