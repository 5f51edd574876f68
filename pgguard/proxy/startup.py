"""Startup parameters are settings (DESIGN §3, CLASSIFICATION §4 and §7).

`options=-c name=value`, `--name=value` and every startup key that is not a connection parameter
amount to `SET name = value` at connection start: each is classified as that SET would be, and
anything but a harmless (`tx`) setting refuses the connection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from pgguard.errors import ClientRefused, SqlState

__all__ = ["check_startup", "split_options", "startup_settings"]

# Keys of the StartupMessage that are not GUCs.
_CONNECTION_KEYS = frozenset({"user", "database", "options", "replication"})
_REPLICATION_OFF = frozenset({"false", "off", "no", "0"})


def split_options(options: str) -> list[str]:
    """Split `options` as PostgreSQL's pg_split_opts does: on unescaped white space, with a
    backslash taking the next character literally."""
    out: list[str] = []
    cur: list[str] = []
    have = False
    i = 0
    while i < len(options):
        ch = options[i]
        if ch == "\\" and i + 1 < len(options):
            cur.append(options[i + 1])
            have = True
            i += 2
            continue
        if ch.isspace():
            if have:
                out.append("".join(cur))
                cur, have = [], False
        else:
            cur.append(ch)
            have = True
        i += 1
    if have:
        out.append("".join(cur))
    return out


def _guc_name(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def startup_settings(params: Mapping[str, str]) -> list[tuple[str, str]]:
    """Every (GUC name, value) the StartupMessage would set; raises ClientRefused for options
    that are not settings."""
    settings: list[tuple[str, str]] = []
    for key, value in params.items():
        if key in _CONNECTION_KEYS or key.startswith("_pq_."):
            continue
        settings.append((_guc_name(key), value))
    words = split_options(params.get("options", ""))
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-c" and i + 1 < len(words):
            item, i = words[i + 1], i + 2
        elif w.startswith("-c") and len(w) > 2:
            item, i = w[2:], i + 1
        elif w.startswith("--") and len(w) > 2:
            item, i = w[2:], i + 1
        else:
            raise ClientRefused(SqlState.INSUFFICIENT_PRIVILEGE,
                                f"pgguard: startup option {w} is not allowed")
        name, sep, value = item.partition("=")
        if not sep:
            raise ClientRefused(SqlState.INSUFFICIENT_PRIVILEGE,
                                f"pgguard: startup option {item} is not allowed")
        settings.append((_guc_name(name), value))
    return settings


def check_startup(params: Mapping[str, str], setting_is_harmless: Callable[[str], bool]) -> None:
    """Refuse replication connections and every setting that is not harmless."""
    if "user" not in params or not params["user"]:
        raise ClientRefused("28000", "no PostgreSQL user name specified in startup packet")
    replication = params.get("replication")
    if replication is not None and replication.lower() not in _REPLICATION_OFF:
        raise ClientRefused(SqlState.FEATURE_NOT_SUPPORTED,
                            "pgguard: replication connections are not allowed")
    for name, _value in startup_settings(params):
        if not setting_is_harmless(name):
            raise ClientRefused(SqlState.INSUFFICIENT_PRIVILEGE,
                                f"pgguard: startup setting {name} is not allowed")
