"""The step-up endpoints (DESIGN §6) and the step-up page.

    GET  /api/v1/holds                     pending holds (no token: the code is the credential)
    POST /api/v1/sessions/{id}/stepup      {"code": "123456"} → 200 | 401 | 404 | 409 | 429
    GET  /stepup/{id}                      a page with a code field that calls the API

The flow itself (verify, grant, release) is injected: admin never imports the proxy.
"""

from __future__ import annotations

import html
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from pgguard.admin.server import add_routes, json_error

__all__ = ["add_stepup_routes"]

_SESSION_ID = re.compile(r"^[a-z0-9]{8,64}$")

ListHolds = Callable[[], list[dict[str, Any]]]
StepUp = Callable[[str, str, str], Awaitable[tuple[int, dict[str, Any]]]]


def add_stepup_routes(app: web.Application, list_holds: ListHolds, step_up: StepUp) -> None:
    async def holds(request: web.Request) -> web.Response:
        return web.json_response({"holds": list_holds()})

    async def stepup(request: web.Request) -> web.Response:
        session_id = request.match_info["id"]
        if not _SESSION_ID.match(session_id):
            return json_error(404, f"no session {session_id}")
        try:
            body = await request.json()
        except ValueError:
            return json_error(400, 'expected a JSON body {"code": "123456"}')
        code = body.get("code") if isinstance(body, dict) else None
        if not isinstance(code, str | int) or isinstance(code, bool):
            return json_error(400, 'expected a JSON body {"code": "123456"}')
        status, reply = await step_up(session_id, str(code).strip(), request.remote or "")
        return web.json_response(reply, status=status)

    async def page(request: web.Request) -> web.Response:
        session_id = request.match_info.get("id", "")
        if session_id and not _SESSION_ID.match(session_id):
            raise web.HTTPNotFound()
        return web.Response(text=_page(session_id, list_holds()), content_type="text/html")

    add_routes(app, [web.get("/api/v1/holds", holds),
                     web.post("/api/v1/sessions/{id}/stepup", stepup)], public=True)
    add_routes(app, [web.get("/stepup", page), web.get("/stepup/{id}", page)])


def _page(session_id: str, holds: list[dict[str, Any]]) -> str:
    rows = "".join(
        f"<li><a href='/stepup/{html.escape(h['session'])}'>{html.escape(h['session'])}</a> "
        f"{html.escape(h['user'])} from {html.escape(h['client_addr'])}: "
        f"{html.escape(h['triggers'])} (since {html.escape(h['since'])})</li>" for h in holds)
    held = next((h for h in holds if h["session"] == session_id), None)
    what = (f"<p>Held statement: <b>{html.escape(held['triggers'])}</b>, user "
            f"{html.escape(held['user'])}.</p>" if held else "")
    form = "" if not session_id else f"""
<h2>Step up session <code>{html.escape(session_id)}</code></h2>{what}
<form id="f"><label>6-digit code from your authenticator
<input id="code" inputmode="numeric" autocomplete="one-time-code" pattern="[0-9]{{6}}"
 maxlength="6" required autofocus></label> <button>Approve</button></form>
<p id="out" role="status"></p>
<script>
document.getElementById('f').addEventListener('submit', async (e) => {{
  e.preventDefault();
  const out = document.getElementById('out');
  const r = await fetch('/api/v1/sessions/{session_id}/stepup', {{method: 'POST',
    headers: {{'Content-Type': 'application/json'}},
    body: JSON.stringify({{code: document.getElementById('code').value}})}});
  const b = await r.json();
  out.textContent = r.ok
    ? 'Approved. Granted: ' + (Object.entries(b.grants).map(([c, t]) => c + ' until ' + t).join(', ') || 'this statement') + (b.released ? '. The held statement is running.' : '.')
    : 'Refused: ' + b.error;
}});
</script>"""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>pgguard step-up</title>
<style>body{{font-family:sans-serif;max-width:40em;margin:2em auto}}input{{font-size:1.4em;width:7em}}</style>
</head><body><h1>pgguard step-up</h1>{form}
<h2>Waiting statements</h2><ul>{rows or "<li>none</li>"}</ul></body></html>"""
