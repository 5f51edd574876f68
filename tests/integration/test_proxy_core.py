"""pgguard's own behaviour on the wire: startup rules, refusals, limits, TLS negotiation,
shutdown. Real PostgreSQL, real `pgguard run` subprocess, raw sockets or psycopg."""

from __future__ import annotations

import signal
import socket
import ssl
import struct
import time

import psycopg
import pytest

from pgguard.protocol import messages as m
from pgguard.protocol.framing import INSPECT, Framer, frame_table

pytestmark = pytest.mark.timeout(120)


# -- raw-socket helpers --------------------------------------------------------------------------


def read_messages(sock: socket.socket, until: bytes = b"Z", timeout: float = 10) -> list[tuple[str, bytes]]:
    """Read backend messages until one of type `until` (or EOF). Returns [(type, body)]."""
    sock.settimeout(timeout)
    got: list[tuple[str, bytes]] = []

    def on_frame(typ: int, buf: bytes, start: int, end: int) -> None:
        got.append((chr(typ), bytes(buf[start + 5 : end])))

    framer = Framer(frame_table(INSPECT), on_frame)
    while not got or got[-1][0].encode() not in until:
        data = sock.recv(65536)
        if not data:
            break
        framer.feed(data)
    return got


def errors(msgs: list[tuple[str, bytes]]) -> list[dict[str, str]]:
    out = []
    for typ, body in msgs:
        if typ == "E":
            out.append(m.parse_fields(b"E\0\0\0\0" + body, 0, 5 + len(body)))
    return out


def connect_raw(proxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=10)


def md5_login(sock: socket.socket, user: str = "md5user", password: str = "md5user",
              db: str = "app") -> list[tuple[str, bytes]]:
    import hashlib

    sock.sendall(m.startup_message({"user": user, "database": db}))
    msgs = read_messages(sock, until=b"RE")
    typ, body = msgs[-1]
    assert typ == "R" and struct.unpack("!i", body[:4])[0] == 5, msgs
    salt = body[4:8]
    inner = hashlib.md5((password + user).encode()).hexdigest().encode()
    outer = b"md5" + hashlib.md5(inner + salt).hexdigest().encode()
    sock.sendall(b"p" + struct.pack("!i", len(outer) + 5) + outer + b"\0")
    return read_messages(sock, until=b"ZE")


def eof_after(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# -- startup ---------------------------------------------------------------------------------------


def test_md5_login_and_simple_query(pg, proxy):
    with connect_raw(proxy) as s:
        msgs = md5_login(s)
        assert [t for t, _ in msgs if t in "RKZ"] == ["R", "K", "Z"]
        key = next(b for t, b in msgs if t == "K")
        assert len(key) == 8 and struct.unpack("!i", key[:4])[0] > 0
        s.sendall(m.query("SELECT 41 + 1"))
        msgs = read_messages(s)
        assert [t for t, _ in msgs] == ["T", "D", "C", "Z"]


def test_backend_key_is_pgguards_own(pg, proxy):
    with psycopg.connect(proxy.dsn()) as c:
        real_pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert c.info.backend_pid != real_pid


def test_replication_refused(pg, proxy):
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(proxy.dsn(replication="database"))
    assert "replication connections are not allowed" in str(e.value)


@pytest.mark.parametrize("options,ok", [
    ("-c search_path=public", True),
    ("-c application_name=x --statement-timeout=5s", True),
    ("-c role=postgres", False),
    ("-csession_authorization=postgres", False),
    ("--standard_conforming_strings=off", False),
    ("-c app.tenant=1", False),
    ("-B 100", False),
])
def test_startup_options_classified(pg, proxy, options, ok):
    if ok:
        with psycopg.connect(proxy.dsn(options=options)) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
    else:
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(proxy.dsn(options=options))
        assert "pgguard: startup" in str(e.value) and "is not allowed" in str(e.value)


def test_startup_key_role_refused_with_42501(pg, proxy):
    with connect_raw(proxy) as s:
        s.sendall(m.startup_message({"user": "app", "database": "app", "role": "postgres"}))
        msgs = read_messages(s, until=b"E")
        (err,) = errors(msgs)
        assert err["S"] == "FATAL" and err["C"] == "42501"
        assert err["M"] == "pgguard: startup setting role is not allowed"
        assert eof_after(s)


def test_trust_upstream_refused(pg, proxy):
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(proxy.dsn(user="trustuser"))
    assert "refuses trust authentication" in str(e.value)


def test_trust_upstream_allowed_when_configured(pg, proxy_factory):
    proxy = proxy_factory(pg, {"auth": {"allow_trust": True}})
    with psycopg.connect(proxy.dsn(user="trustuser")) as c:
        assert c.execute("SELECT current_user").fetchone() == ("trustuser",)


def test_wrong_password_is_the_servers_error(pg, proxy):
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(proxy.dsn(password="nope"))
    assert "password authentication failed" in str(e.value)


def test_unix_socket_upstream(pg, proxy_factory):
    proxy = proxy_factory(pg, via_socket=True)
    with psycopg.connect(proxy.dsn()) as c:
        assert c.execute("SELECT current_user").fetchone() == ("app",)


def test_upstream_down_gives_one_clear_fatal(pg, proxy_factory):
    from pgguard.localpg import free_port

    proxy = proxy_factory(pg, {"upstream": f"127.0.0.1:{free_port()}"})
    with connect_raw(proxy) as s:
        s.sendall(m.startup_message({"user": "app", "database": "app"}))
        (err,) = errors(read_messages(s, until=b"E"))
        assert err["S"] == "FATAL" and err["C"] == "08006"
        assert "cannot connect to the database server" in err["M"]
        assert eof_after(s)


def test_protocol_2_refused(pg, proxy):
    with connect_raw(proxy) as s:
        s.sendall(struct.pack("!ii", 9, 2 << 16) + b"\0")
        (err,) = errors(read_messages(s, until=b"E"))
        assert err["C"] == "08P01"


def test_protocol_3_9_negotiated_down(pg, proxy):
    with connect_raw(proxy) as s:
        s.sendall(m.startup_message({"user": "md5user", "database": "app"}, minor=9))
        msgs = read_messages(s, until=b"R")
        assert msgs[0][0] == "v"
        minor = struct.unpack("!i", msgs[0][1][:4])[0] & 0xFFFF  # PG 15 sends 0x30000
        assert minor == (2 if pg.version >= 18 else 0)


def test_startup_timeout(pg, proxy_factory):
    proxy = proxy_factory(pg, {"limits": {"startup_timeout": "1s"}})
    with connect_raw(proxy) as s:
        s.sendall(struct.pack("!i", 40))  # half a startup packet, then nothing
        t0 = time.monotonic()
        assert eof_after(s)
        assert time.monotonic() - t0 < 8
    # the proxy still serves others
    with psycopg.connect(proxy.dsn()) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


# -- malformed input and limits -------------------------------------------------------------------


def test_malformed_message_one_fatal_others_unaffected(pg, proxy):
    with psycopg.connect(proxy.dsn()) as other:
        with connect_raw(proxy) as s:
            md5_login(s)
            s.sendall(b"\xfe\0\0\0\x08abcd")  # no such frontend message type
            msgs = read_messages(s, until=b"E")
            (err,) = errors(msgs)
            assert err["S"] == "FATAL" and err["C"] == "08P01"
            assert err["M"].startswith("pgguard: invalid message")
            assert eof_after(s)
        assert other.execute("SELECT 2").fetchone() == (2,)


def test_bad_length_is_fatal(pg, proxy):
    with connect_raw(proxy) as s:
        md5_login(s)
        s.sendall(b"Q\0\0\0\x02")
        (err,) = errors(read_messages(s, until=b"E"))
        assert err["C"] == "08P01"
        assert eof_after(s)


def test_message_over_limit_is_fatal_before_body(pg, proxy_factory):
    proxy = proxy_factory(pg, {"limits": {"max_message_bytes": "1MiB"}})
    with connect_raw(proxy) as s:
        md5_login(s)
        s.sendall(b"Q" + struct.pack("!i", 50 << 20))  # announce 50 MB, send none of it
        (err,) = errors(read_messages(s, until=b"E"))
        assert err["C"] == "08P01"
        assert eof_after(s)


# -- refusal (poison recipe) ----------------------------------------------------------------------


@pytest.fixture
def refusing(pg, proxy_factory):
    pg.psql("DROP TABLE IF EXISTS refuse_t; CREATE TABLE refuse_t(v text); "
            "GRANT ALL ON refuse_t TO app;", dbname="app")
    return proxy_factory(pg, {"debug": {"refuse_pattern": "FORBIDDEN"}})


def test_refused_query_inside_transaction(pg, refusing):
    with psycopg.connect(refusing.dsn(), autocommit=True) as c:
        c.execute("BEGIN")
        c.execute("INSERT INTO refuse_t VALUES ('a')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            c.execute("SELECT 'FORBIDDEN'")
        assert str(e.value) == "pgguard: statement rejected by policy"
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            c.execute("SELECT 1")
        cur = c.execute("COMMIT")
        assert cur.statusmessage == "ROLLBACK"
        assert c.execute("SELECT count(*) FROM refuse_t").fetchone() == (0,)


def test_refused_multi_statement_query_runs_nothing(pg, refusing):
    with psycopg.connect(refusing.dsn(), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("INSERT INTO refuse_t VALUES ('x'); SELECT 'FORBIDDEN'")
        assert c.execute("SELECT count(*) FROM refuse_t").fetchone() == (0,)


def test_refused_in_pipeline_rolls_back_implicit_transaction(pg, refusing):
    with psycopg.connect(refusing.dsn(), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege), c.pipeline():
            c.execute("INSERT INTO refuse_t VALUES (%s)", ["one"])
            c.execute("SELECT %s::text || 'FORBIDDEN'", ["x"])
            c.execute("INSERT INTO refuse_t VALUES (%s)", ["two"])
        assert c.execute("SELECT count(*) FROM refuse_t").fetchone() == (0,)
        assert c.execute("SELECT 'still usable'").fetchone() == ("still usable",)


def test_refused_query_pipelined_after_show_pgguard(pg, refusing):
    # SHOW pgguard.* is answered by substitution; its ReadyForQuery must end only its own
    # entry, so that the refused query after it still gets pgguard's error, not the poison's.
    with connect_raw(refusing) as s:
        md5_login(s)
        s.sendall(m.query("SHOW pgguard.session_id") + m.query("SELECT 'FORBIDDEN'")
                  + m.query("SELECT 'after'"))
        msgs: list[tuple[str, bytes]] = []
        while [t for t, _ in msgs].count("Z") < 3:
            msgs += read_messages(s)
        replies, cur = [], []
        for typ, body in msgs:
            cur.append((typ, body))
            if typ == "Z":
                replies.append(cur)
                cur = []
        first, second, third = replies
        assert [t for t, _ in first] == ["T", "D", "C", "Z"]
        (err,) = errors(second)
        assert (err["C"], err["M"]) == ("42501", "pgguard: statement rejected by policy")
        assert [t for t, _ in third] == ["T", "D", "C", "Z"] and b"after" in third[1][1]


def test_function_call_refused_session_usable(pg, proxy):
    with connect_raw(proxy) as s:
        md5_login(s)
        # FunctionCall: oid 1 (nonsense, never reaches the server), no args, text result
        body = struct.pack("!ihhh", 1, 0, 0, 0)
        s.sendall(b"F" + struct.pack("!i", len(body) + 4) + body)
        msgs = read_messages(s)
        (err,) = errors(msgs)
        assert err["C"] == "42501" and "fastpath" in err["M"]
        assert msgs[-1][0] == "Z"
        s.sendall(m.query("SELECT 1"))
        assert [t for t, _ in read_messages(s)] == ["T", "D", "C", "Z"]


# -- TLS negotiation -------------------------------------------------------------------------------


@pytest.fixture
def tls_proxy(pg, proxy_factory, certs):
    crt, key = certs
    return proxy_factory(pg, {"tls": {"mode": "allow", "cert": str(crt), "key": str(key)}})


def test_tls_via_sslrequest(pg, tls_proxy):
    with psycopg.connect(tls_proxy.dsn(sslmode="require")) as c:
        assert c.info.pgconn.ssl_in_use
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_direct_tls_with_alpn(pg, tls_proxy):
    with psycopg.connect(tls_proxy.dsn(sslmode="require", sslnegotiation="direct")) as c:
        assert c.info.pgconn.ssl_in_use


def test_direct_tls_without_alpn_refused(pg, tls_proxy):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with connect_raw(tls_proxy) as raw, ctx.wrap_socket(raw) as s:
        # The FATAL answers the client's first packet: closing as the handshake ends could
        # reset the connection before the client has read it.
        s.sendall(m.startup_message({"user": "app", "database": "app"}))
        (err,) = errors(read_messages(s, until=b"E"))
        assert err["C"] == "08P01" and "ALPN" in err["M"]
        assert s.recv(1) == b""  # then closed


def test_gssenc_then_ssl_on_same_socket(pg, tls_proxy):
    with connect_raw(tls_proxy) as s:
        s.sendall(struct.pack("!ii", 8, m.GSSENC_REQUEST_CODE))
        assert s.recv(1) == b"N"
        s.sendall(m.ssl_request())
        assert s.recv(1) == b"S"


def test_bytes_after_sslrequest_refused(pg, tls_proxy):
    with connect_raw(tls_proxy) as s:
        s.sendall(m.ssl_request() + m.startup_message({"user": "app"}))
        time.sleep(0.2)
        data = s.recv(4096)
        assert data[:1] == b"E" and b"unencrypted data after SSL request" in data


def test_tls_disabled_answers_n(pg, proxy):
    with connect_raw(proxy) as s:
        s.sendall(m.ssl_request())
        assert s.recv(1) == b"N"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(sslmode="require"))


def test_tls_required_refuses_plaintext(pg, proxy_factory, certs):
    crt, key = certs
    proxy = proxy_factory(pg, {"tls": {"mode": "require", "cert": str(crt), "key": str(key)}})
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(proxy.dsn(sslmode="disable"))
    assert "TLS connections only" in str(e.value)
    with psycopg.connect(proxy.dsn(sslmode="require")) as c:
        assert c.info.pgconn.ssl_in_use


def test_cancel_inside_tls(pg, tls_proxy):
    with psycopg.connect(tls_proxy.dsn(sslmode="require"), autocommit=True) as c:
        import threading

        t = threading.Timer(0.5, c.cancel_safe)
        t.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            c.execute("SELECT pg_sleep(20)")
        t.join()
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_cancel_with_wrong_key_does_nothing(pg, proxy):
    with psycopg.connect(proxy.dsn()) as c:
        pid = c.info.backend_pid
        import threading

        def bogus_cancel() -> None:
            with connect_raw(proxy) as s:
                s.sendall(m.cancel_request(pid, b"\0\0\0\0"))

        t = threading.Timer(0.3, bogus_cancel)
        t.start()
        assert c.execute("SELECT pg_sleep(1.0), 'done'").fetchone()[1] == "done"
        t.join()


# -- upstream TLS ------------------------------------------------------------------------------------


def test_upstream_tls_required(pg, proxy_factory):
    if not pg.ssl:  # embedded pg18 is built without OpenSSL
        proxy = proxy_factory(pg, {"upstream_tls": {"mode": "require"}})
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(proxy.dsn())
        assert "does not accept TLS" in str(e.value)
        return
    proxy = proxy_factory(pg, {"upstream_tls": {"mode": "require"}})
    with psycopg.connect(proxy.dsn()) as c:
        assert c.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)


# -- shutdown -------------------------------------------------------------------------------------


def test_sigterm_closes_idle_sessions_with_57p01_and_exits(pg, proxy_factory):
    proxy = proxy_factory(pg, {"shutdown": {"grace": "2s"}})
    idle = psycopg.connect(proxy.dsn(), autocommit=True)
    idle.execute("SELECT 1")
    in_tx = psycopg.connect(proxy.dsn())
    in_tx.execute("SELECT 1")  # psycopg opened a transaction: not idle
    proxy.signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(psycopg.OperationalError) as e:
        idle.execute("SELECT 1")
    assert "terminating connection due to administrator command" in str(e.value)
    # the session inside a transaction may go on during the grace period…
    assert in_tx.execute("SELECT 2").fetchone() == (2,)
    time.sleep(2.5)
    # …and is ended after it
    with pytest.raises(psycopg.OperationalError) as e:
        in_tx.execute("SELECT 3")
    assert "administrator command" in str(e.value)
    assert proxy.stop() == 0


def test_sigterm_lets_running_statement_finish(pg, proxy):
    import threading

    c = psycopg.connect(proxy.dsn(), autocommit=True)
    result: list[object] = []

    def run() -> None:
        result.append(c.execute("SELECT pg_sleep(1.5), 'finished'").fetchone())

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.4)
    proxy.signal(signal.SIGTERM)
    t.join(10)
    assert result and result[0][1] == "finished"
    assert proxy.stop() == 0
    # a new connection is refused: pgguard no longer listens
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(connect_timeout="2"))


def test_execute_of_sql_cursor_is_decided(pg, proxy_factory):
    """A protocol Execute of a portal the client never bound (a DECLAREd cursor) is decided
    on the cursor's classes; a portal pgguard knows nothing of is decided as unknown."""
    proxy = proxy_factory(pg, {"roles": {"readers": {"users": ["*"], "allow": ["read", "tx"]}}})
    with connect_raw(proxy) as s:
        md5_login(s)
        s.sendall(m.query("BEGIN; DECLARE c CURSOR FOR SELECT g FROM generate_series(1, 3) g"))
        assert [t for t, _ in read_messages(s)][-1] == "Z"
        s.sendall(m.execute(b"c", 2) + m.sync())
        msgs = read_messages(s)
        assert [t for t, _ in msgs] == ["D", "D", "s", "Z"], msgs
        s.sendall(m.execute(b"nosuch") + m.sync())
        msgs = read_messages(s)
        (err,) = errors(msgs)
        assert err["C"] == "42501" and "unknown" in err["M"], err
        assert msgs[-1] == ("Z", b"E")  # the server's own state: the transaction failed


def test_unnamed_portal_closed_then_executed_is_decided_as_unknown(pg, proxy_factory):
    """The unnamed portal is tracked on its own (not in the portal map): a Close of it forgets
    it, so an Execute after that is decided as unknown, as for any portal never bound; a
    portal suspended by a row limit runs on without a new decision."""
    proxy = proxy_factory(pg, {"roles": {"readers": {"users": ["*"], "allow": ["read", "tx"]}}})
    select = b"SELECT g FROM generate_series(1, 3) g"

    def frame(typ: bytes, body: bytes) -> bytes:
        return typ + struct.pack("!i", len(body) + 4) + body

    bind = frame(b"B", b"\0\0" + struct.pack("!hhh", 0, 0, 0))  # unnamed portal and statement
    close_portal = frame(b"C", b"P\0")
    with connect_raw(proxy) as s:
        md5_login(s)
        s.sendall(m.query("BEGIN") + m.parse(b"", select) + bind + m.execute(b"", 2)
                  + m.execute(b"", 0) + m.sync())
        msgs: list[tuple[str, bytes]] = []
        while [t for t, _ in msgs].count("Z") < 2:
            msgs += read_messages(s)
        assert [t for t, _ in msgs if t in "DsCE"] == ["C", "D", "D", "s", "D", "C"], msgs
        s.sendall(bind + close_portal + m.execute(b"") + m.sync())
        msgs = read_messages(s)
        (err,) = errors(msgs)
        assert err["C"] == "42501" and "unknown" in err["M"], err
        assert msgs[-1] == ("Z", b"E")
