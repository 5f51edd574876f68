"""The listener: accept, negotiate encryption on the raw socket, hand over to a Session.

Encryption is negotiated before any asyncio transport exists (PROTOCOL §1.1): we peek at the
first bytes so that a plaintext StartupMessage or CancelRequest is left in the socket for the
session, a direct-TLS ClientHello (first byte 0x16) is left for the TLS handshake, and
SSLRequest / GSSENCRequest are consumed and answered ('S'/'N'; GSSENC always 'N', after which the
client may send SSLRequest on the same socket). Bytes that arrive after an SSLRequest and before
our answer are refused (CVE-2021-23214).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import pickle
import resource
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, cast

import structlog

from pgguard.classify import (
    CatalogSnapshot,
    Classification,
    ClassificationCache,
    PiiRules,
    SessionFacts,
    StatementClass,
    classify,
)
from pgguard.config import Config
from pgguard.errors import ClientRefused, SqlState, UpstreamError
from pgguard.protocol import framing
from pgguard.protocol import messages as m
from pgguard.proxy.cancel import CancelRegistry
from pgguard.proxy.guard import Guard
from pgguard.proxy.holds import HoldRegistry
from pgguard.proxy.session import Session

if TYPE_CHECKING:
    from pgguard.observability.audit import AuditSink
    from pgguard.observability.metrics import Metrics
    from pgguard.observability.tally import TallyHistogram

log = structlog.get_logger("pgguard.server")

__all__ = ["ProxyContext", "ProxyServer"]

ALPN = "postgresql"


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols([ALPN])
    return ctx


def upstream_ssl_context(mode: str, ca: str | None) -> ssl.SSLContext:
    if mode == "verify-full":
        ctx = ssl.create_default_context(cafile=ca)
    else:  # require: encrypted, not verified (libpq's sslmode=require)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _not_enrolled(user: str) -> bool:
    return False


# Classifications in a worker before giving up (UNKNOWN) when reloads keep outdating them.
OFFLOAD_ATTEMPTS = 3
# Statements longer than this that are not cached are classified in a worker process: a cold
# parse costs ~2 ms per KB (benchmarks/README.md), and the event loop serves every session.
OFFLOAD_CHARS = 16 * 1024
OFFLOAD_TIMEOUT = 60.0

_OFFLOAD_FAILED = Classification(
    classes=frozenset({StatementClass.UNKNOWN}), statements=(),
    redacted_sql="<not classified>",
    reason="the statement could not be classified (classifier worker failed)")


def _classify_in_worker(sql: str, rules: PiiRules, catalog: CatalogSnapshot | None,
                        facts: SessionFacts, max_sql_bytes: int | None,
                        parse_message: bool) -> Classification:
    return classify(sql, rules, catalog, facts, max_sql_bytes=max_sql_bytes,
                    single_statement=parse_message)


class ProxyContext:
    """What every session shares: configuration, the guard, the cancel registry, the upstream
    connector. Cross-session state lives behind interfaces (CancelRegistry, later the store)."""

    # Read per statement by every session: slots, not an instance dict.
    __slots__ = (
        "_cancel_slots", "_pool", "_tasks", "_upstream_ssl", "allowed_tally", "audit_healthy",
        "audit_sink", "by_id", "cancels", "catalog_classifier", "catalog_database", "classifier",
        "config", "guard", "guard_epoch_cell", "hold_timeout", "holds", "is_enrolled", "metrics",
        "offload_chars", "on_session", "on_statement", "on_upstream_error", "sessions",
        "setting_is_harmless", "statement_seconds", "status_text", "stepup_url",
    )

    def __init__(self, config: Config, guard: Guard, cancels: CancelRegistry,
                 setting_is_harmless: Callable[[str], bool],
                 classifier: ClassificationCache | None = None,
                 holds: HoldRegistry | None = None) -> None:
        self.config = config
        self.guard = guard
        self.cancels = cancels
        self.setting_is_harmless = setting_is_harmless
        self.classifier = classifier or ClassificationCache(
            PiiRules.from_config(config.pii), max_sql_bytes=config.limits.max_sql_bytes)
        self.holds = holds if holds is not None else HoldRegistry()
        # Schema-aware classification for the catalog's database (set by app.py).
        self.catalog_classifier: ClassificationCache | None = None
        self.catalog_database: str | None = None
        self.offload_chars = OFFLOAD_CHARS
        # [epoch]: bumped when the policy changes, so cached verdicts expire. A one-item list
        # that sessions keep and read per statement (a C list read in the compiled session).
        self.guard_epoch_cell = [0]
        self._pool: ProcessPoolExecutor | None = None
        self.hold_timeout = 120.0
        self.sessions: set[Session] = set()
        self.on_upstream_error: Callable[[str], None] = lambda kind: None
        # Set by app.py: step-up state (fails closed by raising StateUnavailable), the step-up
        # page URL, the SHOW pgguard.status text, and the decision observer (audit, metrics).
        self.is_enrolled: Callable[[str], Awaitable[bool]] = _not_enrolled
        self.stepup_url: Callable[[str], str] = lambda sid: f"http://127.0.0.1:9433/stepup/{sid}"
        self.status_text: Callable[[Session], str] = lambda s: f"user {s.user}"
        self.on_statement: Callable[[Session, Classification, str, str | None], None] = (
            lambda session, c, decision, rule: None)
        # The statements_total child an allowed statement of these classes counts in, which a
        # session bumps itself for a cached verdict instead of calling on_statement (whose
        # only work for an allowed statement is that count). None: call on_statement.
        self.allowed_tally: Callable[[frozenset[StatementClass]], Any] = lambda classes: None
        self.on_session: Callable[[Session, bool], None] = lambda session, started: None
        # When the server has answered a forwarded statement (hold time excluded), set by
        # app.py: its time goes in this histogram, and this sink's emit_statement makes its
        # audit event. None: not timed, not audited.
        self.statement_seconds: TallyHistogram | None = None
        self.audit_sink: AuditSink | None = None
        self.audit_healthy: Callable[[], bool] = lambda: True
        # Set by app.py (pgguard.observability.metrics.Metrics): classification cache hits and
        # misses, and the time of each miss. None: not counted.
        self.metrics: Metrics | None = None
        self.by_id: dict[str, Session] = {}
        self._upstream_ssl = (upstream_ssl_context(config.upstream_tls.mode, config.upstream_tls.ca)
                              if config.upstream_tls.mode != "disable" else None)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cancel_slots = asyncio.Semaphore(16)

    @property
    def guard_epoch(self) -> int:
        return self.guard_epoch_cell[0]

    def policy_changed(self) -> None:
        """A new policy is in force: every session decides again (cached verdicts expire)."""
        self.guard_epoch_cell[0] += 1

    # -- owned background work --------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel_tasks(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- session bookkeeping --------------------------------------------------------------------

    def cache_for(self, database: str) -> ClassificationCache:
        """The catalog applies to the database `catalog.dsn` names; others get the rules alone."""
        if self.catalog_classifier is not None and database == self.catalog_database:
            return self.catalog_classifier
        return self.classifier

    def classify(self, sql: str, facts: SessionFacts, parse_message: bool,
                 cache: ClassificationCache | None = None) -> Classification | None:
        """The classification, or None when `sql` is long and not cached: then the caller
        holds the message and awaits `classify_offloaded` (a long parse must not stall every
        other session on this event loop)."""
        if cache is None:
            cache = self.classifier
        metrics = self.metrics
        # A hit is one dict lookup: count it, no clock. Only a miss (a parse) is timed.
        hit = cache.lookup(sql, facts, parse_message)
        if hit is not None:
            if metrics is not None:
                metrics.classify_cache["hit"].inc()
            return hit
        if len(sql) > self.offload_chars and len(sql) <= self.config.limits.max_sql_bytes:
            return None
        start = time.perf_counter()
        result = cache.classify(sql, facts, parse_message=parse_message)
        if metrics is not None:
            metrics.classify_seconds.observe(time.perf_counter() - start)
            metrics.classify_cache["miss"].inc()
        return result

    async def classify_offloaded(self, sql: str, facts: SessionFacts, parse_message: bool,
                                 cache: ClassificationCache) -> Classification:
        """Classify in a worker process; any failure there is UNKNOWN (fail closed). If the
        rules or the catalog change while the worker classifies (a reload), its result is
        from the old ones: classified again under the new ones, never cached."""
        loop = asyncio.get_running_loop()
        for _ in range(OFFLOAD_ATTEMPTS):
            epoch = cache.epoch  # a new object only when a reload changes it
            start = time.perf_counter()
            try:
                if self._pool is None:
                    self._pool = ProcessPoolExecutor(
                        max_workers=1, mp_context=multiprocessing.get_context("spawn"))
                async with asyncio.timeout(OFFLOAD_TIMEOUT):
                    result = await loop.run_in_executor(
                        self._pool, _classify_in_worker, sql, cache.rules, cache.catalog,
                        facts, cache.max_sql_bytes, parse_message)
            except (TimeoutError, BrokenProcessPool, OSError, pickle.PickleError) as exc:
                log.warning("classify.offload_failed", error=repr(exc))
                if isinstance(exc, BrokenProcessPool | TimeoutError) and self._pool is not None:
                    self._pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = None
                return _OFFLOAD_FAILED
            if self.metrics is not None:
                self.metrics.classify_seconds.observe(time.perf_counter() - start)
                self.metrics.classify_cache["miss"].inc()
            if cache.epoch is epoch:
                cache.put(sql, facts, parse_message, result)
                return result
        log.warning("classify.offload_failed", error="the rules changed during every attempt")
        return _OFFLOAD_FAILED

    def close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def session_ready(self, session: Session) -> None:
        self.by_id[session.id] = session
        self.on_session(session, True)

    def session_closed(self, session: Session) -> None:
        self.sessions.discard(session)
        if self.by_id.pop(session.id, None) is not None:
            self.on_session(session, False)

    def upstream_error(self, kind: str) -> None:
        self.on_upstream_error(kind)

    # -- upstream ---------------------------------------------------------------------------------

    async def connect_upstream(self, factory: Callable[[], asyncio.Protocol]) -> asyncio.Transport:
        up = self.config.upstream
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.config.limits.startup_timeout):
                if up.unix_path:
                    transport, _ = await loop.create_unix_connection(factory, up.unix_path)
                    return transport
                assert up.host is not None
                if self._upstream_ssl is None:
                    transport, _ = await loop.create_connection(factory, up.host, up.port)
                    return transport
                sock = await self._negotiated_tls_socket(up.host, up.port)
                transport, _ = await loop.create_connection(
                    factory, sock=sock, ssl=self._upstream_ssl, server_hostname=up.host)
                return transport
        except ssl.SSLError as exc:
            raise UpstreamError("tls", f"TLS with the database server failed: {exc.reason}") from None
        except TimeoutError:
            raise UpstreamError("connect", f"{up} did not answer in time") from None
        except OSError as exc:
            raise UpstreamError("connect", f"{up}: {exc.strerror or exc}") from None

    async def _negotiated_tls_socket(self, host: str, port: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr)
            await loop.sock_sendall(sock, m.ssl_request())
            answer = await loop.sock_recv(sock, 1)
        except BaseException:
            sock.close()
            raise
        if answer != b"S":
            sock.close()
            raise UpstreamError("tls", "the database server does not accept TLS")
        return sock

    async def forward_cancel(self, pid: int, secret: bytes) -> None:
        """Send the real cancel key upstream on a new connection (bounded, with a deadline)."""
        async with self._cancel_slots:
            try:
                async with asyncio.timeout(5):
                    transport = await self.connect_upstream(asyncio.Protocol)
                    transport.write(m.cancel_request(pid, secret))
                    await asyncio.sleep(0)
                    if transport.can_write_eof():
                        transport.write_eof()
                    await asyncio.sleep(0.05)
                    transport.close()
            except (UpstreamError, TimeoutError, OSError) as exc:
                log.info("cancel.forward_failed", error=str(exc))

    def handle_cancel(self, req: m.CancelRequest) -> None:
        session = self.cancels.lookup(req.pid, req.secret)
        if session is not None:
            session.cancel_requested()


class ProxyServer:
    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        cfg = ctx.config.tls
        self._tls = server_ssl_context(cfg.cert, cfg.key) if cfg.mode != "disable" and cfg.cert and cfg.key else None
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    async def start(self) -> None:
        listen = self.ctx.config.listen
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(512)
        sock.setblocking(False)
        self._sock = sock
        self._accept_task = loop.create_task(self._accept_loop())
        log.info("proxy.listening", listen=str(listen), upstream=str(self.ctx.config.upstream),
                 compiled=not str(framing.__file__).endswith(".py"),
                 tls=self.ctx.config.tls.mode, open_files=_raise_open_files_limit())

    async def stop_accepting(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        if self._sock is not None:
            self._sock.close()
        for t in list(self._handshakes):
            t.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, addr = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                log.warning("proxy.accept_failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            task = loop.create_task(self._handshake(conn, addr))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket, addr: Any) -> None:
        loop = asyncio.get_running_loop()
        client_addr = addr[0] if isinstance(addr, tuple) else str(addr)
        timeout = self.ctx.config.limits.startup_timeout
        try:
            async with asyncio.timeout(timeout):
                tls, direct = await self._negotiate(conn)
        except (TimeoutError, OSError, _Refused) as exc:
            if isinstance(exc, _Refused) and exc.reply:
                with contextlib.suppress(OSError):
                    conn.send(exc.reply)
            conn.close()
            return
        session = Session(self.ctx, client_addr, tls is not None)
        self.ctx.sessions.add(session)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: _client_side(session), conn, ssl=tls,
                ssl_handshake_timeout=timeout if tls else None)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.info("session.tls_failed", client=client_addr, error=str(exc))
            conn.close()
            session.close()
            return
        if direct:
            ssl_obj = transport.get_extra_info("ssl_object")
            if ssl_obj is None or ssl_obj.selected_alpn_protocol() != ALPN:
                session.refuse_at_startup(ClientRefused(
                    SqlState.PROTOCOL_VIOLATION,
                    "pgguard: direct TLS connection without the postgresql ALPN protocol"))

    async def _negotiate(self, conn: socket.socket) -> tuple[ssl.SSLContext | None, bool]:
        """Answer SSLRequest/GSSENCRequest; returns (TLS context or None, direct TLS?)."""
        while True:
            head = await _peek(conn, 8)
            if not head:
                raise _Refused(None)
            if head[0] == 0x16:  # a TLS ClientHello: direct TLS (PostgreSQL 17+)
                if self._tls is None:
                    raise _Refused(None)
                return self._tls, True
            if len(head) < 8:
                await asyncio.sleep(0.005)  # rare: a packet split before 8 bytes
                continue
            length, code = struct.unpack("!ii", head)
            if length != 8 or code not in (m.SSL_REQUEST_CODE, m.GSSENC_REQUEST_CODE):
                return None, False  # StartupMessage or CancelRequest: the session reads it
            conn.recv(8)
            if code == m.GSSENC_REQUEST_CODE or self._tls is None:
                conn.send(b"N")
                continue
            try:
                extra = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                extra = b""
            if extra:
                raise _Refused(m.error_response(
                    SqlState.PROTOCOL_VIOLATION,
                    "pgguard: received unencrypted data after SSL request", severity="FATAL"))
            conn.send(b"S")
            return self._tls, False


class _Refused(Exception):
    def __init__(self, reply: bytes | None) -> None:
        super().__init__("refused")
        self.reply = reply


def _raise_open_files_limit() -> int:
    """Raise the soft limit on open descriptors to the hard one, as servers do: a session holds
    four (both sockets, and the duplicate of each it sends replies to); returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def _client_side(session: Session) -> asyncio.Protocol:
    from pgguard.proxy.session import _Side

    # _Side has the methods of an asyncio.Protocol without the base class (compiled, it is an
    # extension type: its data callbacks are C calls into the session).
    return cast(asyncio.Protocol, _Side(session, client=True))


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _peek(sock: socket.socket, n: int) -> bytes:
    """Wait until the socket is readable, then look at up to n bytes without consuming them."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return sock.recv(n, socket.MSG_PEEK)
        except BlockingIOError:
            pass
        fut: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()
        loop.add_reader(fd, _wake, fut)
        try:
            await fut
        finally:
            loop.remove_reader(fd)
