"""A small client of the admin API for the command line (`pgguard stepup`).

Synchronous and stdlib-only (urllib): the CLI makes one or two requests and exits.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

__all__ = ["AdminClient", "AdminUnreachable", "ApiResponse", "resolve_admin_url"]

DEFAULT_ADMIN_URL = "http://127.0.0.1:9433"


class AdminUnreachable(Exception):
    """The admin server did not answer (exit code 3)."""


@dataclass(frozen=True, slots=True)
class ApiResponse:
    status: int
    body: dict[str, Any]


def resolve_admin_url(explicit: str | None, config_raw: dict[str, Any] | None) -> str:
    """--admin-url, else $PGGUARD_ADMIN_URL, else admin.public_url / admin.listen of the
    config, else the default (DESIGN §8)."""
    if explicit:
        return explicit.rstrip("/")
    env = os.environ.get("PGGUARD_ADMIN_URL")
    if env:
        return env.rstrip("/")
    admin = (config_raw or {}).get("admin") or {}
    if admin.get("public_url"):
        return str(admin["public_url"]).rstrip("/")
    if admin.get("listen"):
        return f"http://{admin['listen']}"
    return DEFAULT_ADMIN_URL


class AdminClient:
    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> ApiResponse:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return ApiResponse(resp.status, _json(resp.read()))
        except urllib.error.HTTPError as exc:
            return ApiResponse(exc.code, _json(exc.read()))
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminUnreachable(f"cannot reach the pgguard admin server at {self.base_url}: "
                                   f"{reason}") from None

    def holds(self) -> ApiResponse:
        return self._request("GET", "/api/v1/holds")

    def stepup(self, session: str, code: str) -> ApiResponse:
        return self._request("POST", f"/api/v1/sessions/{session}/stepup", {"code": code})


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw or b"{}")
    except ValueError:
        return {"error": raw.decode("utf-8", "replace")[:200]}
    return value if isinstance(value, dict) else {"value": value}
