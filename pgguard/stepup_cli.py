"""`pgguard stepup [SESSION] [--code N] [--admin-url URL]` (DESIGN §6, §8).

Exit codes: 0 granted, 1 refused (the line says which), 2 usage or config error, 3 admin
unreachable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from pgguard.admin.client import AdminClient, AdminUnreachable, resolve_admin_url

__all__ = ["run_stepup"]

GRANTED, REFUSED, USAGE, UNREACHABLE = 0, 1, 2, 3


def run_stepup(session: str | None, code: str | None, admin_url: str | None,
               config_raw: dict[str, Any] | None,
               ask: Callable[..., Any] = click.prompt) -> int:
    client = AdminClient(resolve_admin_url(admin_url, config_raw))
    try:
        if session is None:
            session = _choose_hold(client, ask)
            if session is None:
                return REFUSED
        if code is None:
            code = str(ask("6-digit code from your authenticator", hide_input=True)).strip()
        reply = client.stepup(session, code)
    except AdminUnreachable as exc:
        click.echo(f"pgguard: {exc}", err=True)
        return UNREACHABLE
    except click.Abort:
        click.echo("pgguard: aborted", err=True)
        return USAGE
    if reply.status == 200:
        body = reply.body
        grants = body.get("grants") or {}
        what = (", ".join(f"{cls} until {until}" for cls, until in sorted(grants.items()))
                or "this statement only (fresh code required each time)")
        click.echo(f"granted for {body.get('user')}: {what}")
        others = [s for s in body.get("sessions", []) if s != session]
        if others:
            click.echo(f"also covers sessions: {', '.join(others)}")
        click.echo("the held statement is running" if body.get("released")
                   else "no statement was waiting in that session")
        return GRANTED
    error = reply.body.get("error") or f"HTTP {reply.status}"
    label = {401: "bad code", 404: "unknown session", 409: "code already used",
             429: "locked out"}.get(reply.status, "refused")
    click.echo(f"pgguard: step-up refused ({label}): {error}", err=True)
    return REFUSED


def _choose_hold(client: AdminClient, ask: Callable[..., Any]) -> str | None:
    reply = client.holds()
    if reply.status != 200:
        click.echo(f"pgguard: cannot list held statements: "
                   f"{reply.body.get('error') or reply.status}", err=True)
        return None
    holds = reply.body.get("holds") or []
    if not holds:
        click.echo("pgguard: no statement is waiting for step-up", err=True)
        return None
    for i, h in enumerate(holds, 1):
        click.echo(f"{i}) {h['session']}  {h['user']} from {h['client_addr']}  "
                   f"{h['triggers']}  (waiting since {h['since']})")
    if len(holds) == 1:
        return str(holds[0]["session"])
    choice = ask("which one", type=click.IntRange(1, len(holds)), default=1)
    return str(holds[int(choice) - 1]["session"])
