"""One frozen, validated configuration (DESIGN §5), built from `pgguard.yaml` plus CLI overrides.

Validation is schema-driven: `_SCHEMA` maps every known key to a converter; an unknown key, a
wrong type or a bad value is reported as `file:line: key.path: why`, all errors at once.
Relative paths are relative to the config file's folder.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pgguard.classify.classes import StatementClass
from pgguard.classify.rules import PiiRules
from pgguard.errors import ConfigError
from pgguard.policy.model import ALL_CLASSES, Policy, Role

__all__ = [
    "AdminConfig",
    "AuditConfig",
    "Config",
    "HostPort",
    "LockoutConfig",
    "ReloadResult",
    "StateConfig",
    "StepUpConfig",
    "Upstream",
    "find_config_file",
    "load_config",
    "parse_duration",
    "parse_size",
    "reload_config",
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
class LockoutConfig:
    """`stepup.lockout` (DESIGN §6): `failures` bad codes within `window` from one address lock
    that user for that address for `duration`; `user_failures` from all addresses lock the user
    everywhere."""

    failures: int = 5
    window: float = 300.0
    duration: float = 300.0
    user_failures: int = 20


@dataclass(frozen=True, slots=True)
class StepUpConfig:
    """`stepup`: `scope` client (grants cover the user's sessions from the same address) or
    session; `default_ttl` is the ttl of classes listed in a plain `step_up` list."""

    scope: str = "client"  # client | session
    default_ttl: float = 900.0
    lockout: LockoutConfig = field(default_factory=LockoutConfig)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: HostPort = field(default_factory=lambda: HostPort("127.0.0.1", 9433))
    public_url: str | None = None
    token_file: str | None = None  # absolute (resolved against the config's folder)

    @property
    def base_url(self) -> str:
        """What users are told to open: `public_url` when set, else `http://<listen>`."""
        return (self.public_url or f"http://{self.listen}").rstrip("/")


@dataclass(frozen=True, slots=True)
class StateConfig:
    """`state`: `sqlite` with an absolute `path`, or (a later issue) `postgresql` with `dsn`."""

    kind: str = "sqlite"  # sqlite | postgresql
    path: str | None = None
    dsn: str | None = None


@dataclass(frozen=True, slots=True)
class AuditConfig:
    path: str | None = None  # absolute; None: no audit file
    include_literals: bool = False
    fsync: str = "interval"  # every | interval
    rotate_bytes: int | None = None
    stdout: bool = False


DEFAULT_STATE_FILE = "state.db"
DEFAULT_KEY_FILE = "pgguard.key"


@dataclass(frozen=True, slots=True)
class Config:
    """Everything `pgguard.yaml` says, validated. Paths are absolute.

    `policy` is `Policy.unrestricted()` (everything allowed, `policy.configured` False) when the
    file has no `roles:`. `raw` holds the validated values by top-level key (for reload diffs).
    """

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
    pii_rules: PiiRules = field(default_factory=PiiRules)
    policy: Policy = field(default_factory=Policy.unrestricted)
    hold_timeout: float = 120.0
    stepup: StepUpConfig = field(default_factory=StepUpConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    state: StateConfig = field(default_factory=StateConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    secrets_key_file: str | None = None  # absolute; PGGUARD_SECRET_KEY wins when set
    raw: Mapping[str, Any] = field(default_factory=dict)
    overrides: Mapping[str, Any] = field(default_factory=dict)  # CLI flags, re-applied on reload


# -- schema ---------------------------------------------------------------------------------------

Conv = Callable[[Any], Any]
KeyPath = tuple[str, ...]  # ("roles", "oncall", "users", "[1]")


class _Invalid(Exception):
    """A converter found several problems below its key: (sub-path, why) each."""

    def __init__(self, errors: list[tuple[KeyPath, str]]) -> None:
        super().__init__(errors)
        self.errors = errors


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


def _positive_int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"expected a whole number above 0, got {v!r}")
    return v


def _positive_duration(v: Any) -> float:
    seconds = parse_duration(v)
    if seconds <= 0:
        raise ValueError(f"must be above 0, got {v!r}")
    return seconds


def _url(v: Any) -> str:
    text = _str(v)
    if not re.match(r"^https?://[^/\s]+", text):
        raise ValueError(f"expected an http:// or https:// URL, got {text!r}")
    return text


def _state(v: Any) -> str:
    text = _str(v).strip()
    scheme = text.split("://", 1)[0] if "://" in text else None
    if scheme in (None, "sqlite", "postgresql", "postgres"):
        if scheme == "sqlite" and not text.startswith("sqlite:///"):
            raise ValueError("expected sqlite:///relative.db or sqlite:////absolute.db")
        if text in ("", "sqlite:///"):
            raise ValueError("expected a file name")
        return text
    raise ValueError(f"expected sqlite:///FILE, a file path or postgresql://…, got {text!r}")


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
    errors: list[tuple[KeyPath, str]] = []
    for name, cols in v.items():
        if not isinstance(name, str) or not name.strip():
            errors.append(((str(name),), f"bad table name {name!r}"))
        elif cols == "*":
            out[name] = "*"
        elif isinstance(cols, list) and cols and all(isinstance(c, str) for c in cols):
            out[name] = list(cols)
        else:
            errors.append(((name,), "expected a list of column names or '*'"))
    if errors:
        raise _Invalid(errors)
    return out


def _str_list(v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError("expected a list of strings")
    return list(v)


# -- roles ----------------------------------------------------------------------------------------

_ROLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_ROLE_KEYS = ("users", "allow", "step_up")
_CLASS_NAMES = ", ".join(c.value for c in StatementClass)


@dataclass(frozen=True, slots=True)
class _RoleSpec:
    """A validated `roles.<name>` entry; `step_up` None values take `stepup.default_ttl`."""

    users: tuple[str, ...]
    allow: frozenset[StatementClass]
    step_up: dict[StatementClass, float | None]


def _class(v: Any) -> StatementClass:
    if isinstance(v, str):
        try:
            return StatementClass(v)
        except ValueError:
            pass
    raise ValueError(f"unknown class {v!r} (expected one of {_CLASS_NAMES})")


def _role(body: Any, errors: list[tuple[KeyPath, str]]) -> _RoleSpec | None:
    if not isinstance(body, dict):
        errors.append(((), "expected a mapping with users, allow and step_up"))
        return None
    before = len(errors)
    for key in body:
        if key not in _ROLE_KEYS:
            why = _unknown_key(str(key), _ROLE_KEYS)
            if why == "unknown key":
                why += f" (a role has {', '.join(_ROLE_KEYS)})"
            errors.append(((str(key),), why))

    users: list[str] = []
    raw_users = body.get("users", [])
    if not isinstance(raw_users, list):
        errors.append((("users",), "expected a list of user names or globs"))
    else:
        for i, u in enumerate(raw_users):
            if not isinstance(u, str) or not u:
                errors.append((("users", f"[{i}]"), f"expected a user name or glob, got {u!r}"))
            else:
                users.append(u)

    allow: set[StatementClass] = set()
    if "allow" not in body:
        errors.append(((), "allow is required: a list of classes, or all"))
    elif body["allow"] == "all":
        allow = set(ALL_CLASSES)
    elif not isinstance(body["allow"], list):
        errors.append((("allow",), f"expected a list of classes or all, got {body['allow']!r}"))
    else:
        for i, c in enumerate(body["allow"]):
            try:
                allow.add(_class(c))
            except ValueError as exc:
                errors.append((("allow", f"[{i}]"), str(exc)))

    step_up: dict[StatementClass, float | None] = {}
    raw_step = body.get("step_up", [])
    allow_known = "allow" in body and ("allow",) not in (p[:1] for p, _ in errors[before:])
    if isinstance(raw_step, list):
        for i, c in enumerate(raw_step):
            try:
                step_up[_class(c)] = None
            except ValueError as exc:
                errors.append((("step_up", f"[{i}]"), str(exc)))
                continue
            if allow_known and _class(c) not in allow:
                errors.append((("step_up", f"[{i}]"), f"{c} is not in allow"))
    elif isinstance(raw_step, dict):
        for c, ttl in raw_step.items():
            try:
                cls = _class(c)
            except ValueError as exc:
                errors.append((("step_up", str(c)), str(exc)))
                continue
            try:
                step_up[cls] = parse_duration(ttl)
            except ValueError as exc:
                errors.append((("step_up", str(c)), str(exc)))
                continue
            if allow_known and cls not in allow:
                errors.append((("step_up", str(c)), f"{c} is not in allow"))
    else:
        errors.append((("step_up",), "expected a list of classes or a mapping of class to ttl"))
    if len(errors) > before:
        return None
    return _RoleSpec(tuple(users), frozenset(allow), step_up)


def _roles(v: Any) -> dict[str, _RoleSpec]:
    if not isinstance(v, dict):
        raise ValueError("expected a mapping of role name to {users, allow, step_up}")
    out: dict[str, _RoleSpec] = {}
    errors: list[tuple[KeyPath, str]] = []
    for name, body in v.items():
        if not isinstance(name, str) or not _ROLE_NAME.match(name):
            errors.append(((str(name),), "a role name is letters, digits, _ and -, "
                                         "starting with a letter or _"))
            continue
        role_errors: list[tuple[KeyPath, str]] = []
        spec = _role(body, role_errors)
        errors.extend(((name, *p), msg) for p, msg in role_errors)
        if spec is not None:
            out[name] = spec
    if errors:
        raise _Invalid(errors)
    return out


# Keys of DESIGN §5. A dict is a section (unknown keys inside it are errors); a callable converts
# and validates one value, raising ValueError (one problem) or _Invalid (problems below it).
_SCHEMA: dict[str, Any] = {
    "listen": HostPort.parse,
    "upstream": _str,
    "upstream_port": _port,
    "upstream_tls": {"mode": _enum("disable", "require", "verify-full"), "ca": _str},
    "auth": {"mode": _enum("passthrough"), "allow_trust": _bool},
    "admin": {"listen": HostPort.parse, "public_url": _url, "token_file": _str},
    "tls": {"mode": _enum("disable", "allow", "require"), "cert": _str, "key": _str},
    "state": _state,
    "audit": {"path": _str, "include_literals": _bool, "fsync": _enum("every", "interval"),
              "rotate_bytes": parse_size, "stdout": _bool},
    "pii": {"tables": _pii_tables, "functions": _str_list},
    "catalog": {"dsn": _str, "refresh": _positive_duration, "comment_tag": _str},
    "roles": _roles,
    "default_role": _str,
    "hold": {"timeout": _positive_duration},
    "stepup": {"scope": _enum("client", "session"), "default_ttl": parse_duration,
               "lockout": {"failures": _positive_int, "window": _positive_duration,
                           "duration": _positive_duration, "user_failures": _positive_int}},
    "secrets": {"key_file": _str},
    "limits": {"max_message_bytes": parse_size, "max_sql_bytes": parse_size,
               "startup_timeout": _positive_duration, "max_held_messages": _positive_int},
    "shutdown": {"grace": parse_duration},
    "debug": {"refuse_pattern": _regex},
}


def _line_map(text: str) -> tuple[dict[KeyPath, int], list[tuple[KeyPath, str]]]:
    """Key path → 1-based line, from the YAML node tree (for error messages); and the
    duplicate keys, which PyYAML would otherwise let the last one win silently."""
    lines: dict[KeyPath, int] = {}
    duplicates: list[tuple[KeyPath, str]] = []

    def walk(node: yaml.Node, path: KeyPath) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                kpath = (*path, str(k.value))
                line = k.start_mark.line + 1
                if kpath in lines:
                    # The last occurrence is what PyYAML keeps: forget the first one's lines.
                    duplicates.append((kpath, f"duplicate key (first at line {lines[kpath]})"))
                    for known in [p for p in lines if p[:len(kpath)] == kpath]:
                        del lines[known]
                lines[kpath] = line
                walk(v, kpath)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, f"[{i}]")] = item.start_mark.line + 1
                walk(item, (*path, f"[{i}]"))
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines, duplicates
    if root is not None:
        walk(root, ())
    return lines, duplicates


def _validate(data: Mapping[str, Any], schema: Mapping[str, Any], path: KeyPath,
              errors: list[tuple[KeyPath, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        kpath = (*path, str(key))
        spec = schema.get(str(key))
        if spec is None:
            errors.append((kpath, _unknown_key(str(key), schema)))
            continue
        if isinstance(spec, dict):
            if not isinstance(value, dict):
                errors.append((kpath, "expected a mapping"))
                continue
            out[str(key)] = _validate(value, spec, kpath, errors)
            continue
        try:
            out[str(key)] = spec(value)
        except _Invalid as inv:
            errors.extend(((*kpath, *sub), msg) for sub, msg in inv.errors)
        except (ValueError, TypeError) as exc:
            errors.append((kpath, str(exc)))
    return out


def _unknown_key(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"unknown key (did you mean {close[0]}?)" if close else "unknown key"


def format_key_path(path: KeyPath) -> str:
    """("roles", "a", "users", "[1]") → `roles.a.users[1]`."""
    out = ""
    for part in path:
        out += part if part.startswith("[") or not out else "." + part
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
    """Read, validate and freeze. `overrides` (from CLI flags) win over the file.

    Raises ConfigError whose text is every problem, one per line, in file order:
    `FILE:LINE: key.path: why`.
    """
    text = ""
    data: dict[str, Any] = {}
    where = str(path) if path else "<flags>"
    if path is not None:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"{path}: cannot read: {why}") from None
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
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    data = {**data, **flags}
    lines, duplicates = _line_map(text)
    errors: list[tuple[KeyPath, str]] = list(duplicates)
    v = _validate(data, _SCHEMA, (), errors)
    base = Path(os.path.abspath(path.parent if path else Path.cwd()))

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

    pii_rules = PiiRules()
    try:
        pii_rules = PiiRules.from_config(v.get("pii", {}))
    except ValueError as exc:
        errors.append((("pii", "tables"), str(exc)))

    su = v.get("stepup", {})
    stepup = StepUpConfig(scope=su.get("scope", "client"),
                          default_ttl=su.get("default_ttl", 900.0),
                          lockout=LockoutConfig(**su.get("lockout", {})))
    policy = _policy(data, v, stepup.default_ttl, errors)

    admin = v.get("admin", {})
    audit = v.get("audit", {})
    if errors:
        errors.sort(key=lambda e: _nearest_line(lines, e[0]))
        raise ConfigError("\n".join(
            f"{where}:{_nearest_line(lines, p)}: {format_key_path(p)}: {msg}"
            for p, msg in errors))
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
        pii_rules=pii_rules,
        policy=policy,
        hold_timeout=v.get("hold", {}).get("timeout", 120.0),
        stepup=stepup,
        admin=AdminConfig(listen=admin.get("listen", HostPort("127.0.0.1", 9433)),
                          public_url=admin.get("public_url"),
                          token_file=_resolve(base, admin.get("token_file"))),
        state=_state_config(base, v.get("state", DEFAULT_STATE_FILE)),
        audit=AuditConfig(path=_resolve(base, audit.get("path")),
                          include_literals=audit.get("include_literals", False),
                          fsync=audit.get("fsync", "interval"),
                          rotate_bytes=audit.get("rotate_bytes"),
                          stdout=audit.get("stdout", False)),
        secrets_key_file=_resolve(base, v.get("secrets", {}).get("key_file", DEFAULT_KEY_FILE)),
        raw=v,
        overrides=flags,
    )


def _policy(data: Mapping[str, Any], v: Mapping[str, Any], default_ttl: float,
            errors: list[tuple[KeyPath, str]]) -> Policy:
    """`roles` + `default_role` → Policy; list-form `step_up` classes get `default_ttl`."""
    default_role = v.get("default_role")
    raw_roles = data.get("roles")
    if default_role is not None:
        if not isinstance(raw_roles, dict):
            errors.append((("default_role",), f"{default_role!r} names no role "
                                              "(there is no roles section)"))
        elif default_role not in raw_roles:
            known = ", ".join(str(k) for k in raw_roles) or "none"
            errors.append((("default_role",), f"{default_role!r} names no role "
                                              f"(roles: {known})"))
    if "roles" not in v:
        return Policy.unrestricted()
    specs: dict[str, _RoleSpec] = v["roles"]
    roles = tuple(
        Role(name, spec.users, spec.allow,
             {cls: default_ttl if ttl is None else ttl for cls, ttl in spec.step_up.items()})
        for name, spec in specs.items())
    if default_role is not None and default_role not in specs:
        default_role = None  # already reported
    return Policy(roles, default_role)


def _state_config(base: Path, text: str) -> StateConfig:
    if text.startswith(("postgresql://", "postgres://")):
        return StateConfig(kind="postgresql", dsn=text)
    if text.startswith("sqlite:///"):
        text = text[len("sqlite:///"):]  # sqlite:////abs.db leaves "/abs.db"
    return StateConfig(kind="sqlite", path=_resolve(base, text))


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """The outcome of `reload_config`: the new `config`, or `error` (every problem, one per
    line) and the old config stays in force. `changed`: top-level keys whose validated value
    differs from the running config (the app applies what it can hot and logs the rest)."""

    config: Config | None
    error: str | None = None
    changed: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.config is not None


def reload_config(current: Config) -> ReloadResult:
    """Re-read `current.path` with the same CLI overrides (SIGHUP or the file changing).
    Never raises: a bad file is a ReloadResult with `error`."""
    if current.path is None:
        return ReloadResult(None, "no config file to reload (started from flags alone)")
    try:
        new = load_config(current.path, current.overrides)
    except ConfigError as exc:
        return ReloadResult(None, str(exc))
    keys = set(current.raw) | set(new.raw)
    changed = tuple(sorted(k for k in keys if current.raw.get(k) != new.raw.get(k)))
    return ReloadResult(new, None, changed)


def _nearest_line(lines: Mapping[KeyPath, int], path: KeyPath) -> int:
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return 1


def _resolve(base: Path, value: str | None) -> str | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)
