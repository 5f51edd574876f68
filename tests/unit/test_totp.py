"""TOTP verification (DESIGN §6): codes computed by pyotp at injected times, never by sleeping."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest

from pgguard.stepup.totp import (
    CodeVerdict,
    new_secret,
    provisioning_uri,
    time_step,
    verify_code,
)

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
T0 = 1_700_000_010.0  # 10 s into a 30-second step
STEP = time_step(T0)


def code_at(t: float, secret: str = SECRET) -> str:
    return pyotp.TOTP(secret).at(t)


def test_current_code_is_accepted_with_its_counter() -> None:
    check = verify_code(SECRET, code_at(T0), T0, None)
    assert check.verdict is CodeVerdict.OK
    assert check.counter == STEP


@pytest.mark.parametrize("offset_steps", [-1, 1])
def test_one_step_either_side_is_accepted(offset_steps: int) -> None:
    code = code_at(T0 + 30 * offset_steps)
    check = verify_code(SECRET, code, T0, None)
    assert check.verdict is CodeVerdict.OK
    assert check.counter == STEP + offset_steps


@pytest.mark.parametrize("offset_steps", [-3, -2, 2, 3])
def test_two_or_more_steps_away_is_bad(offset_steps: int) -> None:
    code = code_at(T0 + 30 * offset_steps)
    if code in {code_at(T0 + 30 * k) for k in (-1, 0, 1)}:
        pytest.fail("test secret produced colliding codes; pick another T0")
    assert verify_code(SECRET, code, T0, None).verdict is CodeVerdict.BAD


def test_same_code_twice_is_a_replay() -> None:
    first = verify_code(SECRET, code_at(T0), T0, None)
    assert first.verdict is CodeVerdict.OK
    again = verify_code(SECRET, code_at(T0), T0 + 5, first.counter)
    assert again.verdict is CodeVerdict.REPLAY
    assert again.counter == STEP


def test_counter_must_increase_an_older_code_after_a_newer_one_is_a_replay() -> None:
    # The user typed the next step's code (clock ahead); the current step's code is now stale.
    newer = verify_code(SECRET, code_at(T0 + 30), T0, None)
    assert newer.verdict is CodeVerdict.OK and newer.counter == STEP + 1
    older = verify_code(SECRET, code_at(T0), T0, newer.counter)
    assert older.verdict is CodeVerdict.REPLAY


def test_next_step_code_after_an_accepted_one_is_accepted() -> None:
    later = verify_code(SECRET, code_at(T0 + 30), T0 + 30, STEP)
    assert later.verdict is CodeVerdict.OK and later.counter == STEP + 1


def test_previous_step_code_is_accepted_when_last_counter_is_older() -> None:
    check = verify_code(SECRET, code_at(T0 - 30), T0, STEP - 2)
    assert check.verdict is CodeVerdict.OK and check.counter == STEP - 1


@pytest.mark.parametrize("code", [
    "", "12345", "1234567", "12345a", " 123456", "123456 ", "12 3456", "-12345",
    "\uff11\uff12\uff13\uff14\uff15\uff16",  # fullwidth digits
    "\u0661\u0662\u0663\u0664\u0665\u0666",  # Arabic-Indic digits
    "+12345", "1e5000",
])
def test_malformed_codes_are_simply_bad(code: str) -> None:
    assert verify_code(SECRET, code, T0, None).verdict is CodeVerdict.BAD


def test_malformed_code_with_the_right_digits_inside_is_bad() -> None:
    good = code_at(T0)
    for variant in (f" {good}", f"{good}\n", f"{good[:3]} {good[3:]}", f"0{good}"):
        assert verify_code(SECRET, variant, T0, None).verdict is CodeVerdict.BAD


def test_another_users_secret_gives_a_bad_code() -> None:
    other = new_secret()
    code = code_at(T0, other)
    if code in {code_at(T0 + 30 * k) for k in (-1, 0, 1)}:
        pytest.fail("random secrets collided; rerun")
    assert verify_code(SECRET, code, T0, None).verdict is CodeVerdict.BAD


def test_wrong_code_is_bad() -> None:
    valid = {code_at(T0 + 30 * k) for k in (-1, 0, 1)}
    wrong = next(f"{n:06d}" for n in range(1_000_000) if f"{n:06d}" not in valid)
    assert verify_code(SECRET, wrong, T0, None).verdict is CodeVerdict.BAD


def test_step_boundaries() -> None:
    boundary = (STEP + 1) * 30.0
    assert time_step(boundary - 0.001) == STEP
    assert time_step(boundary) == STEP + 1
    # At the very first instant of a step, the code of the step before still works (-1).
    assert verify_code(SECRET, code_at(boundary - 1), boundary, None).counter == STEP


def test_new_secret_is_160_bit_base32_and_unique() -> None:
    secrets = {new_secret() for _ in range(50)}
    assert len(secrets) == 50
    for s in secrets:
        assert len(s) == 32
        assert set(s) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
        pyotp.TOTP(s).now()  # usable by pyotp


def test_provisioning_uri_is_authenticator_compatible() -> None:
    uri = provisioning_uri("alice", SECRET)
    parts = urlsplit(uri)
    assert parts.scheme == "otpauth" and parts.netloc == "totp"
    assert parts.path == "/pgguard:alice"
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert q == {"secret": SECRET, "issuer": "pgguard", "algorithm": "SHA1", "digits": "6",
                 "period": "30"}
    # pyotp parses it back to the same generator.
    parsed = pyotp.parse_uri(uri)
    assert isinstance(parsed, pyotp.TOTP)
    assert parsed.at(T0) == code_at(T0)
    assert parsed.issuer == "pgguard" and parsed.name == "alice"


def test_provisioning_uri_escapes_odd_user_names() -> None:
    uri = provisioning_uri("a b/c?d", SECRET)
    assert " " not in uri and "?d" not in uri.split("?", 1)[0]
    assert pyotp.parse_uri(uri).name == "a b/c?d"
