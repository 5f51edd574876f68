"""Readiness probes (DESIGN §7): is the upstream there, without logging in or leaving noise.

The upstream probe connects (TCP or the Unix socket), sends an SSLRequest and reads the 1-byte
answer. `N` (no TLS): we close, and PostgreSQL closes silently ("no data at all" is normal for
service monitors). `S`: closing now would make the server log "could not accept SSL connection:
EOF detected" on every probe, so we finish a TLS handshake (no certificate check: we send nothing)
and close cleanly, which the server also takes silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Protocol

__all__ = ["Readiness", "all_ready", "probe_upstream"]

Readiness = Callable[[], Awaitable[tuple[bool, str]]]

_SSL_REQUEST = struct.pack("!ii", 8, 80877103)


class _UpstreamAddress(Protocol):
    """pgguard.config.Upstream, structurally (admin does not depend on the config module)."""

    @property
    def host(self) -> str | None: ...
    @property
    def port(self) -> int: ...
    @property
    def unix_path(self) -> str | None: ...


def _client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we only say hello and goodbye; nothing is sent inside
    return ctx


async def probe_upstream(upstream: _UpstreamAddress, *,
                         timeout: float = 3.0) -> tuple[bool, str]:  # noqa: ASYNC109
    """(True, "ok") if the upstream accepts a connection and answers an SSLRequest, else
    (False, why). Never raises; never takes longer than `timeout`."""
    where = upstream.unix_path or f"{upstream.host}:{upstream.port}"
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            if upstream.unix_path:
                reader, writer = await asyncio.open_unix_connection(upstream.unix_path)
            else:
                reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
            writer.write(_SSL_REQUEST)
            await writer.drain()
            answer = await reader.read(1)
            if answer not in (b"S", b"N"):
                return False, f"upstream {where} did not answer the SSLRequest ({answer!r})"
            if answer == b"S":
                with contextlib.suppress(ssl.SSLError, OSError):
                    await writer.start_tls(_client_context())
            return True, "ok"
    except TimeoutError:
        return False, f"upstream {where}: no answer within {timeout:g} s"
    except OSError as exc:
        return False, f"upstream {where}: {exc.strerror or exc}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()


def all_ready(**probes: Readiness) -> Readiness:
    """One readiness callable from named ones, run concurrently: ready when all are; the reason
    names the first that is not (`upstream: ...`, `state: ...`)."""

    async def check() -> tuple[bool, str]:
        names = list(probes)
        results = await asyncio.gather(*(probes[n]() for n in names), return_exceptions=True)
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                return False, f"{name}: probe failed: {result}"
            ok, reason = result
            if not ok:
                return False, f"{name}: {reason}"
        return True, "ok"

    return check
