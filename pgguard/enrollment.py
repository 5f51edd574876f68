"""`pgguard enroll USER [--force] [--revoke] [--list] [--json]` (DESIGN §6, §8).

The logic behind the command: a new TOTP secret stored encrypted in the state store, shown once
as an otpauth:// URI and a QR code drawn in the terminal. The CLI (pgguard/cli.py) only parses
arguments and exits with what `run_enroll` returns:

    0  done
    1  nothing to do: --revoke of a user who is not enrolled; or the store cannot be used
    2  usage or configuration error, or the user is already enrolled (needs --force)

Every change is reported to an optional `on_event(EnrollEvent)` hook: the audit trail records it
as the `enroll` event (DESIGN §7). The event never carries the secret.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

import qrcode

from pgguard.errors import ConfigError
from pgguard.state.store import Enrollment, StateStore, StateUnavailable
from pgguard.stepup.totp import new_secret, provisioning_uri

__all__ = [
    "AlreadyEnrolled",
    "EnrollEvent",
    "NewEnrollment",
    "enroll_user",
    "render_qr",
    "run_enroll",
    "validate_user",
]

MAX_USER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1: a longer user name cannot log in


class AlreadyEnrolled(Exception):
    def __init__(self, user: str) -> None:
        super().__init__(f"{user} is already enrolled; use --force to replace the authenticator")
        self.user = user


@dataclass(frozen=True, slots=True)
class NewEnrollment:
    user: str
    secret: str
    uri: str
    created_at: float
    replaced: bool


@dataclass(frozen=True, slots=True)
class EnrollEvent:
    """For the audit trail (`enroll`): action is `enroll` or `revoke`; no secret."""

    action: str
    user: str
    at: float
    replaced: bool = False


EnrollHook = Callable[[EnrollEvent], None]


def validate_user(user: str) -> str:
    """A PostgreSQL role name as a client would send it in StartupMessage `user`."""
    if not user:
        raise ConfigError("enroll: the user name is empty")
    if len(user.encode()) > MAX_USER_BYTES:
        raise ConfigError(f"enroll: user name longer than {MAX_USER_BYTES} bytes")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in user):
        raise ConfigError("enroll: the user name contains control characters")
    return user


async def enroll_user(store: StateStore, user: str, now: float, *,
                      force: bool = False) -> NewEnrollment:
    """Create and store a new secret for `user`. Raises AlreadyEnrolled without `force`."""
    secret = new_secret()
    existed = await store.is_enrolled(user)
    if existed and not force:
        raise AlreadyEnrolled(user)
    # Without force the insert is conditional, so a concurrent enroll of the same user cannot
    # be silently overwritten between the check above and here.
    if not await store.enroll(user, secret, now, replace=force):
        raise AlreadyEnrolled(user)
    return NewEnrollment(user, secret, provisioning_uri(user, secret), now, replaced=existed)


def render_qr(data: str, *, ansi: bool = False) -> str:
    """`data` as a QR code in text, two module rows per line with half blocks (▀ ▄ █).

    Plain: dark modules are drawn in the terminal's foreground colour, right for dark-on-light
    terminals and for files. `ansi`: forced black on white, right on any terminal background
    (an inverted code is not read by every authenticator app).
    """
    qr = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M, border=4)
    qr.add_data(data)
    qr.make(fit=True)
    matrix = qr.get_matrix()
    if len(matrix) % 2:
        matrix.append([False] * len(matrix[0]))
    glyph = {(False, False): " ", (True, False): "\u2580", (False, True): "\u2584",
             (True, True): "\u2588"}
    lines = []
    for top, bottom in zip(matrix[0::2], matrix[1::2], strict=True):
        row = "".join(glyph[(bool(a), bool(b))] for a, b in zip(top, bottom, strict=True))
        lines.append(f"\x1b[30;47m{row}\x1b[0m" if ansi else row)
    return "\n".join(lines) + "\n"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_enroll(user: str | None, *, force: bool = False, revoke: bool = False,
               list_users: bool = False, as_json: bool = False, config_file: str | None = None,
               on_event: EnrollHook | None = None, env: Mapping[str, str] | None = None,
               out: TextIO | None = None, err: TextIO | None = None,
               clock: Callable[[], float] = time.time) -> int:
    """The whole command; returns the exit code. ConfigError propagates (the CLI prints it and
    exits 2)."""
    from pgguard.config import find_config_file, load_config
    from pgguard.state.factory import open_state_store_from_config

    stdout = out or sys.stdout
    stderr = err or sys.stderr
    if list_users:
        if user or force or revoke:
            raise ConfigError("enroll: --list takes no USER, --force or --revoke")
    elif user is None:
        raise ConfigError("enroll: missing USER (or --list)")
    elif revoke and force:
        raise ConfigError("enroll: --revoke and --force do not go together")
    if user is not None:
        validate_user(user)
    config = load_config(find_config_file(config_file))

    async def run() -> int:
        store = await open_state_store_from_config(config, env=env, clock=clock)
        try:
            if list_users:
                return _print_list(await store.enrollments(), as_json, stdout, stderr)
            assert user is not None
            now = clock()
            if revoke:
                if not await store.revoke(user):
                    print(f"pgguard: {user} is not enrolled", file=stderr)
                    return 1
                if on_event:
                    on_event(EnrollEvent("revoke", user, now))
                print(json.dumps({"user": user, "revoked": True}) if as_json
                      else f"revoked the authenticator of {user}", file=stdout)
                return 0
            try:
                new = await enroll_user(store, user, now, force=force)
            except AlreadyEnrolled as exc:
                print(f"pgguard: {exc}", file=stderr)
                return 2
            if on_event:
                on_event(EnrollEvent("enroll", user, now, replaced=new.replaced))
            _print_enrollment(new, as_json, stdout)
            return 0
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except StateUnavailable as exc:
        print(f"pgguard: {exc}", file=stderr)
        return 1


def _print_list(rows: list[Enrollment], as_json: bool, out: TextIO, err: TextIO) -> int:
    if as_json:
        print(json.dumps([{"user": r.user, "created_at": _iso(r.created_at)} for r in rows]),
              file=out)
        return 0
    if not rows:
        print("no users enrolled", file=err)
        return 0
    width = max(len(r.user) for r in rows)
    for r in rows:
        print(f"{r.user:<{width}}  {_iso(r.created_at)}", file=out)
    return 0


def _print_enrollment(new: NewEnrollment, as_json: bool, out: TextIO) -> None:
    if as_json:
        print(json.dumps({"user": new.user, "secret": new.secret, "uri": new.uri}), file=out)
        return
    ansi = _is_tty(out) and os.environ.get("TERM") != "dumb"
    buf = io.StringIO()
    verb = "Re-enrolled" if new.replaced else "Enrolled"
    buf.write(f"{verb} {new.user}. Scan this QR code with an authenticator app "
              "(Google Authenticator, Authy, 1Password, …):\n\n")
    buf.write(render_qr(new.uri, ansi=ansi))
    buf.write(f"\nor add it by hand: account {new.user}, key {new.secret} (time-based, 6 digits)\n")
    buf.write(f"otpauth URI: {new.uri}\n")
    if new.replaced:
        buf.write("The previous authenticator of this user no longer works.\n")
    out.write(buf.getvalue())
    out.flush()


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
