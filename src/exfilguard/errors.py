"""One tree of errors for every component.

Each message says what happened and what to do. The HTTP layer (outside) and the CLI map
these classes to status codes and exit codes here, in one place: ``http_status`` and
``exit_code`` on each class. The classes the meter's trusted base raises (the root,
ConfigError, LedgerUnavailable, LedgerTampered, UpstreamUnavailable) are defined in
base_errors.py, so that the meter imports only them, and re-exported here.
"""

from __future__ import annotations

from exfilguard.base_errors import (  # noqa: F401 - re-exported: the whole tree is importable from here
    ConfigError,
    ExfilguardError,
    LedgerTampered,
    LedgerUnavailable,
    UpstreamUnavailable,
)


class RequestInvalid(ExfilguardError):
    """A client request is malformed or asks for something that raises egress."""

    http_status = 400
    error_type = "invalid_request_error"
    exit_code = 2

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class BudgetExhausted(ExfilguardError):
    """The egress budget (cap or rolling window) has no bytes left for this transfer."""

    http_status = 429
    error_type = "egress_budget_exhausted"
    exit_code = 3


class FrameCorrupt(ExfilguardError):
    """A codec stream or protocol frame is malformed, truncated or fails its checksum."""

    http_status = 502
    error_type = "frame_corrupt"
    exit_code = 7


class ModelMismatch(ExfilguardError):
    """The encoder's weak model is not the decoder's: fingerprints differ."""

    http_status = 500
    error_type = "model_mismatch"
    exit_code = 8

    def __init__(self, expected: str, got: str, what: str = "weak model"):
        super().__init__(
            f"{what} fingerprint mismatch: stream was encoded with {got}, "
            f"this side has {expected}; run the same {what} on both sides"
        )
        self.expected = expected
        self.got = got


class Desync(FrameCorrupt):
    """A model-coded chunk decoded to tokens whose checksum does not match: ask for a raw resend."""

    error_type = "codec_desync"

    def __init__(self, message: str, chunk_index: int):
        super().__init__(message)
        self.chunk_index = chunk_index


class ChildFailed(ExfilguardError):
    """A process that `exfilguard up` supervises died and cannot be brought back."""

    http_status = 503
    error_type = "child_failed"
    exit_code = 9

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code  # the child's own code (2 configuration, 5 tampered ledger, ...)


class ApprovalRefused(ExfilguardError):
    """A k-of-n budget change (cap or approver set) is refused: approvals short, or a bad request."""

    http_status = 403
    error_type = "approval_refused"
    exit_code = 10


class ApprovalsShort(ApprovalRefused):
    """Fewer than k distinct approver keys of the budget's set signed the request."""

    error_type = "approvals_short"


class RequestExpired(ApprovalRefused):
    """The budget change request is past its expiry time."""

    error_type = "request_expired"


class RequestReplayed(ApprovalRefused):
    """The budget change request (its nonce) was applied already."""

    error_type = "request_replayed"


class RequestStale(ApprovalRefused):
    """The ledger moved on since the request was made: the cap or the approver set changed."""

    error_type = "request_stale"


class RequestTampered(ApprovalRefused):
    """The request or a signature file was changed after signing, or does not parse."""

    error_type = "request_tampered"


class WrongBudget(ApprovalRefused):
    """The request is for another budget or another ledger than the one it is applied to."""

    error_type = "wrong_budget"


class ModelNotFound(ExfilguardError):
    """A request names a model this server does not serve (OpenAI's 404 `model_not_found`)."""

    http_status = 404
    error_type = "invalid_request_error"
    error_code = "model_not_found"

    def __init__(self, model: str, served: list[str]):
        super().__init__(f"The model `{model}` does not exist; this server serves {', '.join(served)} (GET /v1/models lists it)")
        self.param = "model"


class KeyBudgetExhausted(BudgetExhausted):
    """An API key's own budget (its cap or one of its windows) has no bytes left."""

    error_type = "key_budget_exhausted"

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after  # seconds until a window frees bytes; None: only a new cap helps


class RequestTooLarge(ExfilguardError):
    """A request body is larger than the outside accepts."""

    http_status = 413
    error_type = "invalid_request_error"
    error_code = "request_too_large"


class LogCorrupt(ExfilguardError):
    """The outside's request log is truncated, malformed or its hash chain is broken."""

    http_status = 500
    error_type = "request_log_corrupt"
    exit_code = 11


class LogUnreconciled(ExfilguardError):
    """The request log's answers do not explain the bytes the meter's ledger says it forwarded."""

    http_status = 500
    error_type = "request_log_unreconciled"
    exit_code = 13


class VerificationFailed(ExfilguardError):
    """`exfilguard verify` flagged answers that a trusted strong model does not reproduce."""

    http_status = 500
    error_type = "verification_failed"
    exit_code = 12


class EgressThrottled(ExfilguardError):
    """The outside is throttling answers: the egress budget is burning faster than planned."""

    http_status = 429
    error_type = "egress_throttled"
    exit_code = 3
