"""The error tree and the SQLSTATEs pgguard sends.

    PgGuardError
    ├── ConfigError            bad configuration (file, key path, why): CLI exit 2
    ├── ProtocolError          the peer sent bytes that are not PostgreSQL protocol (08P01)
    │   └── MessageTooLarge    a frame over limits.max_message_bytes (08P01)
    ├── ClientRefused          we end a client's connection with a FATAL of our own choosing
    └── UpstreamError          the real server could not be reached or spoke nonsense
         kind: connect | tls | auth | reset (the label of pgguard_upstream_errors_total)

Peer faults (ProtocolError, UpstreamError) are expected at run time and become one FATAL for that
connection; anything else escaping a session is a bug, logged once by the session's catch-all.
"""

from __future__ import annotations


class SqlState:
    SUCCESSFUL_COMPLETION = "00000"
    WARNING = "01000"
    CONNECTION_FAILURE = "08006"
    PROTOCOL_VIOLATION = "08P01"
    FEATURE_NOT_SUPPORTED = "0A000"
    INVALID_AUTHORIZATION = "28000"
    INSUFFICIENT_PRIVILEGE = "42501"
    SYNTAX_ERROR = "42601"
    QUERY_CANCELED = "57014"
    ADMIN_SHUTDOWN = "57P01"
    CANNOT_CONNECT_NOW = "57P03"
    IO_ERROR = "58000"
    TOO_MANY_CONNECTIONS = "53300"
    INTERNAL_ERROR = "XX000"


class PgGuardError(Exception):
    """Base of every error pgguard raises on purpose."""


class ConfigError(PgGuardError):
    """A configuration problem; `str()` is the one line the CLI prints."""


class ProtocolError(PgGuardError):
    """The peer broke the PostgreSQL protocol (malformed, out-of-place or oversize message)."""

    sqlstate = SqlState.PROTOCOL_VIOLATION


class MessageTooLarge(ProtocolError):
    pass


class ClientRefused(PgGuardError):
    """End the client connection with one FATAL ErrorResponse (sqlstate, message)."""

    def __init__(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.hint = hint


class UpstreamError(PgGuardError):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class StateUnavailable(PgGuardError):
    """The state store (enrollments, counters, grants) cannot be reached or read: sensitive
    statements are refused (ERROR 58000 `pgguard: cannot verify step-up state; sensitive
    statement refused`), reads allowed by policy keep working."""

    sqlstate = SqlState.IO_ERROR
