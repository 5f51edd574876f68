"""The admin HTTP server (aiohttp): metrics, health, readiness, and the hook for the step-up API.

It never imports `proxy/`; `app.py` hands it callables (readiness, the step-up handlers)."""

from pgguard.admin.probe import Readiness, all_ready, probe_upstream
from pgguard.admin.server import (
    API_PREFIX,
    AdminServer,
    ReadinessCache,
    add_routes,
    build_admin_app,
    json_error,
    start_admin,
)

__all__ = [
    "API_PREFIX",
    "AdminServer",
    "Readiness",
    "ReadinessCache",
    "add_routes",
    "all_ready",
    "build_admin_app",
    "json_error",
    "probe_upstream",
    "start_admin",
]
