"""TOTP secrets at rest (DESIGN §6, §8): AES-256-GCM with a key from `PGGUARD_SECRET_KEY`, else
from `secrets.key_file` (created with mode 0600 on first use).

Blob layout: version byte 0x01 ‖ 12-byte random nonce ‖ ciphertext+tag. The user name is the
associated data, so a row copied onto another user's enrollment does not decrypt.

The key text is any string of at least 32 characters (a generated key file holds 32 random
bytes in base64url); HKDF-SHA256 turns it into the AES key, so an operator can paste the output
of `openssl rand -base64 32` into PGGUARD_SECRET_KEY. A store remembers a check value encrypted
with its key (`key_check`/`verify_check`), so a wrong key is reported when the store opens rather
than as codes that never match.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pgguard.state.store import SecretKeyError

__all__ = ["ENV_VAR", "SecretBox", "load_secret_key"]

ENV_VAR = "PGGUARD_SECRET_KEY"
MIN_KEY_CHARS = 32
_VERSION = b"\x01"
_NONCE = 12
_CHECK_AAD = b"pgguard:key-check"
_CHECK_PLAIN = b"pgguard secret key check v1"


class SecretBox:
    """Encrypts and decrypts TOTP secrets with one key."""

    __slots__ = ("_aead", "source")

    def __init__(self, key_text: str, source: str = "the secret key") -> None:
        text = key_text.strip()
        if len(text) < MIN_KEY_CHARS:
            raise SecretKeyError(f"{source}: the key must be at least {MIN_KEY_CHARS} characters "
                                 "(generate one with: openssl rand -base64 32)")
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"pgguard secrets v1",
                   info=b"totp secret encryption").derive(text.encode())
        self._aead = AESGCM(key)
        self.source = source  # named in errors: "PGGUARD_SECRET_KEY" or the key file's path

    def encrypt(self, user: str, secret: str) -> bytes:
        nonce = os.urandom(_NONCE)
        return _VERSION + nonce + self._aead.encrypt(nonce, secret.encode(), _aad(user))

    def decrypt(self, user: str, blob: bytes) -> str:
        return self._open(blob, _aad(user), f"the TOTP secret of {user}").decode()

    def key_check(self) -> bytes:
        """A value to store next to the secrets; `verify_check` proves the same key later."""
        nonce = os.urandom(_NONCE)
        return _VERSION + nonce + self._aead.encrypt(nonce, _CHECK_PLAIN, _CHECK_AAD)

    def verify_check(self, blob: bytes) -> None:
        if self._open(blob, _CHECK_AAD, "the state store") != _CHECK_PLAIN:
            raise self._wrong_key("the state store")

    def _open(self, blob: bytes, aad: bytes, what: str) -> bytes:
        if len(blob) <= 1 + _NONCE or blob[:1] != _VERSION:
            raise SecretKeyError(f"{what}: unrecognised encrypted value")
        try:
            return self._aead.decrypt(blob[1:1 + _NONCE], blob[1 + _NONCE:], aad)
        except InvalidTag:
            raise self._wrong_key(what) from None

    def _wrong_key(self, what: str) -> SecretKeyError:
        return SecretKeyError(f"{what} was encrypted with a different key than {self.source}; "
                              f"set {ENV_VAR} or secrets.key_file to the original key")


def _aad(user: str) -> bytes:
    return b"pgguard:totp:" + user.encode()


def load_secret_key(key_file: str | Path | None,
                    env: Mapping[str, str] | None = None) -> SecretBox:
    """`PGGUARD_SECRET_KEY` from `env` (default os.environ), else the key file, created with
    mode 0600 (and its folder with 0700) when missing. Raises SecretKeyError."""
    environ = os.environ if env is None else env
    from_env = environ.get(ENV_VAR)
    if from_env:
        return SecretBox(from_env, ENV_VAR)
    if key_file is None:
        raise SecretKeyError(f"no secret key: set {ENV_VAR} or secrets.key_file")
    path = Path(key_file)
    try:
        text = _read_or_create(path)
    except OSError as exc:
        raise SecretKeyError(f"{path}: cannot read or create the key file: "
                             f"{exc.strerror or exc}") from None
    return SecretBox(text, str(path))


def _read_or_create(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode() + "\n"
    try:
        # O_EXCL: two processes starting at once must not each write their own key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text()
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return text
