"""The `enroll` audit event of `pgguard enroll` (DESIGN §7), written by the command itself.

`pgguard enroll` runs as its own process, usually while the proxy runs and appends to the same
trail: it starts an `AuditSink` on the configured `audit.path` for its one event, and the
sinks' file lock (AuditSink._lock_for_append) keeps the hash chain whole across both writers.

    with audit_enroll_hook(config_file) as on_event:
        run_enroll(..., on_event=on_event)       # on_event is None when no audit.path is set

The event: `user`, `action` (enroll | revoke), `replaced`, and `actor` (the operating-system
account that ran the command). Never the secret.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import sys
from collections.abc import Iterator

from pgguard.enrollment import EnrollEvent, EnrollHook
from pgguard.errors import ConfigError
from pgguard.observability.audit import ENROLL, AuditConfig, AuditError, AuditSink

__all__ = ["audit_enroll_hook"]


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@contextlib.contextmanager
def audit_enroll_hook(config_file: str | None) -> Iterator[EnrollHook | None]:
    """An `on_event` hook for `run_enroll` that appends the `enroll` event to the configured
    trail, or None when the config has no `audit.path` (or cannot be read: `run_enroll` reports
    that itself). A trail that cannot be written is reported on stderr; the enrollment stands."""
    from pgguard.config import find_config_file, load_config

    try:
        settings = load_config(find_config_file(config_file)).audit
    except ConfigError:
        yield None
        return
    if not settings.path:
        yield None
        return
    # Never to stdout, whatever audit.stdout says: stdout is the command's answer (--json).
    config = dataclasses.replace(AuditConfig.from_settings(settings), stdout=False,
                                 fsync="every")
    sinks: list[AuditSink] = []

    def on_event(e: EnrollEvent) -> None:
        sink = AuditSink(config)
        try:
            sink.start()
        except AuditError as exc:
            print(f"pgguard: the enroll event was not audited: {exc}", file=sys.stderr)
            return
        sinks.append(sink)
        sink.emit(ENROLL, user=e.user, action=e.action, replaced=e.replaced, actor=_actor())

    try:
        yield on_event
    finally:
        for sink in sinks:
            if not sink.flush_sync():
                print(f"pgguard: the enroll event was not audited: "
                      f"{sink.last_error or 'the audit trail cannot be written'}",
                      file=sys.stderr)
            sink.close_sync(timeout=2.0)
