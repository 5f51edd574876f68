"""From configuration to an open `StateStore` (DESIGN §5 `state`, `secrets`; §8 URL forms).

    state: sqlite:///state.db          relative to the config file's folder
    state: sqlite:////var/lib/pgguard/state.db   four slashes: absolute
    state: /var/lib/pgguard/state.db   a plain path (relative ones: to the config folder)
    state: postgresql://…              not yet supported (a later issue)

Without `state` the store is `state.db` next to the config file; without `secrets.key_file` (and
without PGGUARD_SECRET_KEY) the key is `pgguard.key` there, created 0600 on first use.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pgguard.errors import ConfigError
from pgguard.state.secrets import load_secret_key
from pgguard.state.sqlite import SqliteStore
from pgguard.state.store import StateStore

if TYPE_CHECKING:
    from pgguard.config import Config

__all__ = [
    "DEFAULT_KEY_FILE",
    "DEFAULT_STATE",
    "config_base_dir",
    "key_file_path",
    "open_state_store",
    "open_state_store_from_config",
    "sqlite_path",
]

DEFAULT_STATE = "sqlite:///state.db"
DEFAULT_KEY_FILE = "pgguard.key"


def sqlite_path(url: str, base_dir: str | Path) -> Path:
    """The SQLite file a `state` value names. Raises ConfigError (one line) for anything else."""
    text = url.strip()
    base = Path(base_dir)
    if not text:
        raise ConfigError("state: empty value")
    scheme, sep, rest = text.partition("://")
    if not sep:
        p = Path(text).expanduser()
        return p if p.is_absolute() else base / p
    scheme = scheme.lower()
    if scheme in ("postgresql", "postgres"):
        raise ConfigError("state: the PostgreSQL state backend is not yet supported; "
                          "use sqlite:///FILE or a file path")
    if scheme != "sqlite":
        raise ConfigError(f"state: unsupported URL scheme {scheme}:// "
                          "(expected sqlite:///FILE or a file path)")
    if not rest.startswith("/") or rest in ("/", "//"):
        raise ConfigError(f"state: {text!r}: expected sqlite:///relative.db or "
                          "sqlite:////absolute.db")
    path = rest[1:]  # sqlite:///x → "x" (relative); sqlite:////x → "/x" (absolute)
    if "?" in path:
        raise ConfigError(f"state: {text!r}: query parameters are not supported")
    p = Path(path)
    return p if p.is_absolute() else base / p


async def open_state_store(url: str | None, *, base_dir: str | Path,
                           key_file: str | None = None,
                           env: Mapping[str, str] | None = None,
                           clock: Callable[[], float] = time.time) -> StateStore:
    """Open the store `url` names (None: DEFAULT_STATE), with the TOTP secrets' key from
    PGGUARD_SECRET_KEY in `env` (default os.environ), else `key_file` (relative to `base_dir`;
    None: DEFAULT_KEY_FILE). Raises ConfigError for a bad URL, StateUnavailable (or its
    subclass SecretKeyError) when the store or the key cannot be used."""
    path = sqlite_path(url or DEFAULT_STATE, base_dir)
    # Reading (or creating) the key file touches the disk: keep it off the event loop.
    box = await asyncio.to_thread(load_secret_key, key_file_path(key_file, base_dir), env)
    return await SqliteStore.open(path, box, clock=clock)


def key_file_path(key_file: str | None, base_dir: str | Path) -> Path:
    """`secrets.key_file` (None: DEFAULT_KEY_FILE), relative to `base_dir`."""
    kf = Path(key_file or DEFAULT_KEY_FILE).expanduser()
    return kf if kf.is_absolute() else Path(base_dir) / kf


async def open_state_store_from_config(config: Config,
                                       env: Mapping[str, str] | None = None,
                                       clock: Callable[[], float] = time.time) -> StateStore:
    """Open the store of a loaded config: `config.state` and `config.secrets_key_file` are
    already validated and absolute (pgguard.config resolves them against the config folder)."""
    state = config.state
    if state.kind != "sqlite" or not state.path:
        raise ConfigError("state: the PostgreSQL state backend is not yet supported; "
                          "use sqlite:///FILE or a file path")
    key_file = config.secrets_key_file or str(config_base_dir(config) / DEFAULT_KEY_FILE)
    box = await asyncio.to_thread(load_secret_key, Path(key_file), env)
    return await SqliteStore.open(Path(state.path), box, clock=clock)


def config_base_dir(config: Config) -> Path:
    """The folder relative paths in `config` are relative to."""
    return config.path.absolute().parent if config.path is not None else Path.cwd()
