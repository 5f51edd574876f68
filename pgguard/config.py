"""One frozen, validated configuration (DESIGN §5), built from `pgguard.yaml` plus CLI overrides.

Validation is schema-driven: `_SCHEMA` maps every known key to a converter; an unknown key, a
wrong type or a bad value is reported as `file:line: key.path: why`, all errors at once.
Relative paths are relative to the config file's folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pgguard.errors import ConfigError

__all__ = [
    "Config",
    "HostPort",
    "Upstream",
    "find_config_file",
    "load_config",
    "parse_duration",
    "parse_size",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|TiB|kB|MB|GB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
               "kB": 1000, "MB": 1000**2, "GB": 1000**3}
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """`15m`, `30s`, `0s`, `250ms`, or a number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s or 15m")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"expected a duration such as 30s or 15m, got {value!r}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(value: object) -> int:
    """`64MiB`, `1GiB`, or a number of bytes → bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"expected a size such as 64MiB, got {value!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    @classmethod
    def parse(cls, value: object, default_port: int | None = None) -> HostPort:
        text = str(value).strip()
        if text.startswith("["):  # [::1]:6433
            host, _, rest = text[1:].partition("]")
            port_text = rest.lstrip(":")
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep:
                host, port_text = text, ""
        if not port_text:
            if default_port is None:
                raise ValueError(f"expected HOST:PORT, got {text!r}")
            port_text = str(default_port)
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"bad port in {text!r}")
        return cls(host or "127.0.0.1", int(port_text))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where the real server is: TCP host:port, or a Unix socket file `.s.PGSQL.<port>`."""

    host: str | None = None
    port: int = 5432
    unix_path: str | None = None

    @classmethod
    def parse(cls, value: object, upstream_port: int = 5432) -> Upstream:
        text = str(value).strip()
        if text.startswith("postgresql://") or text.startswith("postgres://"):
            rest = text.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
            if "@" in rest:
                raise ValueError("the upstream URL takes no user or password (passthrough auth)")
            hp = HostPort.parse(rest, default_port=5432)
            return cls(host=hp.host, port=hp.port)
        if text.startswith("/"):
            return cls(unix_path=os.path.join(text, f".s.PGSQL.{upstream_port}"),
                       port=upstream_port)
        hp = HostPort.parse(text, default_port=5432)
        return cls(host=hp.host, port=hp.port)

    def __str__(self) -> str:
        return self.unix_path or f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    mode: str = "disable"  # disable | allow | require
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    mode: str = "disable"  # disable | require | verify-full
    ca: str | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    max_message_bytes: int = 1 << 30
    max_sql_bytes: int = 1 << 20
    startup_timeout: float = 10.0
    max_held_messages: int = 1024


@dataclass(frozen=True, slots=True)
class Config:
    path: Path | None = None
    listen: HostPort = field(default_factory=lambda: HostPort("127.0.0.1", 6433))
    upstream: Upstream = field(default_factory=lambda: Upstream(host="127.0.0.1", port=5432))
    upstream_tls: UpstreamTls = field(default_factory=UpstreamTls)
    tls: TlsConfig = field(default_factory=TlsConfig)
    allow_trust: bool = False
    limits: Limits = field(default_factory=Limits)
    shutdown_grace: float = 30.0
    pii: Mapping[str, Any] = field(default_factory=dict)
    catalog: Mapping[str, Any] = field(default_factory=dict)
    # Test hook for the refusal mechanism (DESIGN §3) until the policy exists: statements whose
    # text matches this regex are refused with 42501.
    refuse_pattern: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)


# -- schema ---------------------------------------------------------------------------------------

Conv = Callable[[Any], Any]


def _enum(*values: str) -> Conv:
    def conv(v: Any) -> str:
        if str(v) not in values:
            raise ValueError(f"expected one of {', '.join(values)}, got {v!r}")
        return str(v)
    return conv


def _str(v: Any) -> str:
    if not isinstance(v, str | int | float) or isinstance(v, bool):
        raise ValueError(f"expected a string, got {type(v).__name__}")
    return str(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _port(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 65536:
        raise ValueError(f"expected a port number, got {v!r}")
    return v


def _regex(v: Any) -> str:
    try:
        re.compile(str(v))
    except re.error as exc:
        raise ValueError(f"bad regular expression: {exc}") from None
    return str(v)


def _pii_tables(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError("expected a mapping of schema.table to a list of columns or '*'")
    out: dict[str, Any] = {}
    for name, cols in v.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"bad table name {name!r}")
        if cols == "*":
            out[name] = "*"
        elif isinstance(cols, list) and cols and all(isinstance(c, str) for c in cols):
            out[name] = list(cols)
        else:
            raise ValueError(f"{name}: expected a list of column names or '*'")
    return out


def _str_list(v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError("expected a list of strings")
    return list(v)


def _any(v: Any) -> Any:
    return v


# Keys of DESIGN §5. Sections that later issues interpret (roles, stepup, audit, …) are accepted
# with their shape checked here and their meaning validated by their owners.
_SCHEMA: dict[str, Any] = {
    "listen": HostPort.parse,
    "upstream": _str,
    "upstream_port": _port,
    "upstream_tls": {"mode": _enum("disable", "require", "verify-full"), "ca": _str},
    "auth": {"mode": _enum("passthrough"), "allow_trust": _bool},
    "admin": {"listen": HostPort.parse, "public_url": _str, "token_file": _str},
    "tls": {"mode": _enum("disable", "allow", "require"), "cert": _str, "key": _str},
    "state": _str,
    "audit": {"path": _str, "include_literals": _bool, "fsync": _enum("every", "interval"),
              "rotate_bytes": parse_size, "stdout": _bool},
    "pii": {"tables": _pii_tables, "functions": _str_list},
    "catalog": {"dsn": _str, "refresh": parse_duration, "comment_tag": _str},
    "roles": _any,
    "default_role": _str,
    "hold": {"timeout": parse_duration},
    "stepup": _any,
    "secrets": {"key_file": _str},
    "limits": {"max_message_bytes": parse_size, "max_sql_bytes": parse_size,
               "startup_timeout": parse_duration, "max_held_messages": int},
    "shutdown": {"grace": parse_duration},
    "debug": {"refuse_pattern": _regex},
}


def _line_map(text: str) -> dict[tuple[str, ...], int]:
    """Key path → 1-based line, from the YAML node tree (for error messages)."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = str(k.value)
                lines[(*path, key)] = k.start_mark.line + 1
                walk(v, (*path, key))
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _validate(data: Mapping[str, Any], schema: Mapping[str, Any], path: tuple[str, ...],
              errors: list[tuple[tuple[str, ...], str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        kpath = (*path, str(key))
        spec = schema.get(str(key))
        if spec is None:
            errors.append((kpath, "unknown key"))
            continue
        if isinstance(spec, dict):
            if not isinstance(value, dict):
                errors.append((kpath, "expected a mapping"))
                continue
            out[str(key)] = _validate(value, spec, kpath, errors)
            continue
        try:
            out[str(key)] = spec(value)
        except (ValueError, TypeError) as exc:
            errors.append((kpath, str(exc)))
    return out


def find_config_file(explicit: str | None) -> Path:
    """`--config`, else $PGGUARD_CONFIG, else ./pgguard.yaml (DESIGN §8)."""
    for candidate in (explicit, os.environ.get("PGGUARD_CONFIG"), "pgguard.yaml"):
        if candidate:
            p = Path(candidate)
            if p.is_file():
                return p
            if candidate is not None and candidate != "pgguard.yaml":
                raise ConfigError(f"{candidate}: no such config file")
    raise ConfigError("no config file: pass --config FILE, set PGGUARD_CONFIG or create ./pgguard.yaml")


def load_config(path: Path | None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read, validate and freeze. `overrides` (from CLI flags) win over the file."""
    text = ""
    data: dict[str, Any] = {}
    where = str(path) if path else "<flags>"
    if path is not None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{path}{line}: not valid YAML: {problem}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}:1: the top level must be a mapping of keys")
        data = loaded
    data = {**data, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    errors: list[tuple[tuple[str, ...], str]] = []
    v = _validate(data, _SCHEMA, (), errors)
    lines = _line_map(text)
    base = path.parent if path else Path.cwd()
    try:
        upstream = Upstream.parse(v.get("upstream", "127.0.0.1:5432"), v.get("upstream_port", 5432))
    except ValueError as exc:
        errors.append((("upstream",), str(exc)))
        upstream = Upstream()
    tls = v.get("tls", {})
    tls_cfg = TlsConfig(tls.get("mode", "disable"),
                        _resolve(base, tls.get("cert")), _resolve(base, tls.get("key")))
    if tls_cfg.mode != "disable" and not (tls_cfg.cert and tls_cfg.key):
        errors.append((("tls",), f"mode {tls_cfg.mode} needs cert and key"))
    utls = v.get("upstream_tls", {})
    lim = v.get("limits", {})
    if errors:
        raise ConfigError("\n".join(
            f"{where}:{_nearest_line(lines, p)}: {'.'.join(p)}: {msg}" for p, msg in errors))
    return Config(
        path=path,
        listen=v.get("listen", HostPort("127.0.0.1", 6433)),
        upstream=upstream,
        upstream_tls=UpstreamTls(utls.get("mode", "disable"), _resolve(base, utls.get("ca"))),
        tls=tls_cfg,
        allow_trust=v.get("auth", {}).get("allow_trust", False),
        limits=Limits(**{k: lim[k] for k in lim}),
        shutdown_grace=v.get("shutdown", {}).get("grace", 30.0),
        pii=v.get("pii", {}),
        catalog=v.get("catalog", {}),
        refuse_pattern=v.get("debug", {}).get("refuse_pattern"),
        raw=v,
    )


def _nearest_line(lines: Mapping[tuple[str, ...], int], path: tuple[str, ...]) -> int:
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return 1


def _resolve(base: Path, value: str | None) -> str | None:
    if value is None:
        return None
    p = Path(value)
    return str(p if p.is_absolute() else base / p)
