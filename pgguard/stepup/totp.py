"""TOTP secrets and code verification (RFC 6238, DESIGN §6). Pure: the clock is a parameter.

Authenticator apps (Google Authenticator, Authy, 1Password, …) only agree on SHA-1, 6 digits
and 30-second steps, so those are fixed here rather than configurable.

Verification accepts the code of the current time step and of one step either side (clock
drift). RFC 6238 §5.2: a verifier must not accept the same OTP twice, so the matched step
counter must be greater than the last one accepted for that user; a code matching only an
already-used step is a REPLAY. The caller persists the accepted counter with an atomic
compare-and-set (the store), which is what really stops two replicas accepting one code.
"""

from __future__ import annotations

import enum
import hmac
import re
from dataclasses import dataclass
from urllib.parse import quote

import pyotp

__all__ = [
    "DIGITS",
    "ISSUER",
    "STEP_SECONDS",
    "CodeCheck",
    "CodeVerdict",
    "new_secret",
    "provisioning_uri",
    "time_step",
    "verify_code",
]

ISSUER = "pgguard"
DIGITS = 6
STEP_SECONDS = 30
DRIFT_STEPS = 1  # ±1 step: a code typed just before or after a step boundary still works

# ASCII digits only: str.isdigit() would also accept fullwidth or Arabic-Indic digits.
_CODE = re.compile(r"[0-9]{6}")


def new_secret() -> str:
    """A fresh base32 secret of 160 bits (RFC 4226 §4 recommends at least 128, 160 for SHA-1)."""
    return pyotp.random_base32(length=32)


def provisioning_uri(user: str, secret: str) -> str:
    """`otpauth://totp/pgguard:USER?secret=…&issuer=pgguard&algorithm=SHA1&digits=6&period=30`.

    The parameters are spelled out even where they are the defaults: some apps otherwise
    guess differently.
    """
    label = quote(f"{ISSUER}:{user}", safe=":@")
    return (f"otpauth://totp/{label}?secret={secret}&issuer={ISSUER}"
            f"&algorithm=SHA1&digits={DIGITS}&period={STEP_SECONDS}")


def time_step(now: float) -> int:
    """The RFC 6238 counter T = floor(unix time / 30)."""
    return int(now // STEP_SECONDS)


class CodeVerdict(enum.Enum):
    OK = "ok"
    BAD = "bad"          # wrong, malformed, or another user's code
    REPLAY = "replay"    # right code, but its step is not after the last accepted one


@dataclass(frozen=True, slots=True)
class CodeCheck:
    verdict: CodeVerdict
    counter: int | None = None  # the matched time step (OK and REPLAY)


def verify_code(secret: str, code: str, now: float, last_counter: int | None) -> CodeCheck:
    """Check `code` against `secret` at `now` (unix seconds); `last_counter` is the last
    accepted step for this user (None: never).

    Every candidate step is computed and compared with `hmac.compare_digest`, without
    stopping at the first match, so the time taken does not say which step (if any) matched.
    """
    if not isinstance(code, str) or not _CODE.fullmatch(code):
        return CodeCheck(CodeVerdict.BAD)
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS)
    current = time_step(now)
    matched: list[int] = []
    for step in range(current - DRIFT_STEPS, current + DRIFT_STEPS + 1):
        if hmac.compare_digest(totp.generate_otp(step).encode(), code.encode()):
            matched.append(step)
    if not matched:
        return CodeCheck(CodeVerdict.BAD)
    fresh = [s for s in matched if last_counter is None or s > last_counter]
    if fresh:
        # Two steps of the window can share a code (1 in 10^6); take the earliest fresh one so
        # the user's next code is not refused as a replay.
        return CodeCheck(CodeVerdict.OK, min(fresh))
    return CodeCheck(CodeVerdict.REPLAY, max(matched))
