"""Fail-closed corners of the relay found in review: what a portal is decided on, statement
names that SQL re-prepares or a failed Parse leaves behind, refused cursors, and a pipelined
change of client_encoding. Raw protocol against a real server through `pgguard run`."""

from __future__ import annotations

import json
import signal
import struct
import time

import pytest

from pgguard.protocol import messages as m
from tests.integration.test_proxy_core import connect_raw, errors, md5_login, read_messages

pytestmark = [pytest.mark.timeout(120), pytest.mark.parametrize("pg", ["pg18"], indirect=True)]

TABLE = """
DROP TABLE IF EXISTS fc_t; CREATE TABLE fc_t (id int);
DROP TABLE IF EXISTS fc_users; CREATE TABLE fc_users (id int, email text);
INSERT INTO fc_users VALUES (1, 'a@x');
GRANT ALL ON fc_t, fc_users TO md5user;
"""


def policy(allow: list[str]) -> dict:
    return {"pii": {"tables": {"public.fc_users": ["email"]}},
            "roles": {"r": {"users": ["md5user"], "allow": allow}}}


def bind(portal: bytes, stmt: bytes) -> bytes:
    body = portal + b"\0" + stmt + b"\0" + struct.pack("!hhh", 0, 0, 0)
    return b"B" + struct.pack("!i", len(body) + 4) + body


def rows_in_t(pg) -> int:
    return int(pg.psql("SELECT count(*) FROM fc_t", dbname="app").strip())


def reload(proxy, cfg: dict) -> None:
    base = json.loads(proxy.config_path.read_text())
    base.update(cfg)
    before = proxy.log().count("policy.reloaded")
    proxy.config_path.write_text(json.dumps(base))
    proxy.signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while proxy.log().count("policy.reloaded") <= before:
        assert time.monotonic() < deadline, proxy.log()
        time.sleep(0.1)


def test_portal_is_decided_on_what_it_was_bound_to(pg, proxy_factory):
    pg.psql(TABLE, dbname="app")
    proxy = proxy_factory(pg, policy(["read", "tx"]))
    with connect_raw(proxy) as s:
        md5_login(s)
        s.sendall(m.parse(b"", "INSERT INTO fc_t VALUES (100)") + bind(b"p", b"")
                  + m.parse(b"", "SELECT 1") + m.execute(b"p") + m.sync())
        msgs = read_messages(s)
        (err,) = errors(msgs)
        assert err["C"] == "42501" and "write" in err["M"], err
    assert rows_in_t(pg) == 0


def test_sql_prepare_and_failed_parse_do_not_leave_stale_names(pg, proxy_factory):
    pg.psql(TABLE, dbname="app")
    proxy = proxy_factory(pg, policy(["read", "write", "tx"]))
    with connect_raw(proxy) as s:
        md5_login(s)
        # s1: prepared by SQL as a write; a protocol Parse of the same name then fails (42P05)
        s.sendall(m.query("PREPARE s1 AS INSERT INTO fc_t VALUES (1)"))
        read_messages(s)
        # s2: parsed by protocol as a read, then re-prepared by SQL as a write
        s.sendall(m.parse(b"s2", "SELECT 1") + m.sync())
        read_messages(s)
        s.sendall(m.query("DEALLOCATE s2; PREPARE s2 AS INSERT INTO fc_t VALUES (2)"))
        read_messages(s)
        reload(proxy, policy(["read", "tx"]))  # writes are no longer allowed
        s.sendall(m.parse(b"s1", "SELECT 1") + m.sync())
        (err,) = errors(read_messages(s))
        assert err["C"] == "42P05"  # the server kept the INSERT under that name
        for name in (b"s1", b"s2"):
            s.sendall(bind(b"", name) + m.execute(b"") + m.sync())
            (err,) = errors(read_messages(s))
            assert err["C"] == "42501", (name, err)
    assert rows_in_t(pg) == 0


def test_a_refused_cursor_execute_is_decided_again(pg, proxy_factory):
    pg.psql(TABLE, dbname="app")
    proxy = proxy_factory(pg, policy(["read", "pii", "tx"]))
    with connect_raw(proxy) as s:
        md5_login(s)
        s.sendall(m.query("BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT email FROM fc_users;"
                          " COMMIT"))
        read_messages(s)
        reload(proxy, policy(["read", "tx"]))  # PII no longer allowed
        for _ in range(2):
            s.sendall(m.execute(b"c", 1) + m.sync())
            msgs = read_messages(s)
            assert "D" not in [t for t, _ in msgs], msgs
            (err,) = errors(msgs)
            assert err["C"] == "42501"


def test_pipelined_client_encoding_change_fails_closed(pg, proxy_factory):
    pg.psql(TABLE, dbname="app")
    proxy = proxy_factory(pg, policy(["read", "tx"]))
    with connect_raw(proxy) as s:
        md5_login(s)
        # In BIG5, 0xAD 0x5C is one character: the backslash does not escape the quote there,
        # so PostgreSQL would see an INSERT where a UTF-8 reading sees one string.
        crafted = b"SELECT E'\xad\\'; INSERT INTO fc_t VALUES (200); --'"
        s.sendall(m.query("SET client_encoding TO 'BIG5'") + b"Q"
                  + struct.pack("!i", len(crafted) + 5) + crafted + b"\0")
        msgs = read_messages(s)  # the SET's reply, and maybe the next one in the same read
        if [t for t, _ in msgs].count("Z") < 2:
            msgs += read_messages(s)
        (err,) = errors(msgs)
        assert err["C"] == "42501" and "unknown" in err["M"], err
    assert rows_in_t(pg) == 0


def test_text_in_a_client_only_encoding_is_unknown(pg, proxy_factory):
    pg.psql(TABLE, dbname="app")
    proxy = proxy_factory(pg, policy(["read", "tx"]))
    with connect_raw(proxy) as s:
        md5_login(s)
        s.sendall(m.query("SET client_encoding TO 'SJIS'"))
        read_messages(s)
        s.sendall(m.query("SELECT 1"))
        (err,) = errors(read_messages(s))
        assert err["C"] == "42501" and "unknown" in err["M"]


def test_prepared_statements_are_classified_again_after_a_rules_reload(pg, proxy_factory):
    pg.psql(TABLE, dbname="app")
    cfg = policy(["read", "tx"])
    cfg["pii"] = {"tables": {"public.other": ["x"]}}  # fc_users.email is not PII yet
    proxy = proxy_factory(pg, cfg)
    with connect_raw(proxy) as s:
        md5_login(s)
        s.sendall(m.parse(b"q", "SELECT email FROM fc_users") + bind(b"", b"q")
                  + m.execute(b"") + m.sync())
        assert "D" in [t for t, _ in read_messages(s)]
        reload(proxy, policy(["read", "tx"]))  # now fc_users.email is PII
        s.sendall(bind(b"", b"q") + m.execute(b"") + m.sync())
        msgs = read_messages(s)
        (err,) = errors(msgs)
        assert err["C"] == "42501" and "pii" in err["M"], err


def test_statement_parsed_under_other_rules_is_classified_again_when_they_change_back(
        pg, proxy_factory):
    """Rules A (email is PII), then B (it is not): a statement parsed under B and bound after
    the rules went back to A (an equal epoch, a new reload) is classified again under A."""
    pg.psql(TABLE, dbname="app")
    strict = policy(["read", "tx"])  # fc_users.email is PII
    lax = policy(["read", "tx"])
    lax["pii"] = {"tables": {"public.other": ["x"]}}
    proxy = proxy_factory(pg, strict)
    with connect_raw(proxy) as s:
        md5_login(s)
        s.sendall(m.parse(b"q", "SELECT 1") + bind(b"", b"q") + m.execute(b"") + m.sync())
        assert "D" in [t for t, _ in read_messages(s)]
        reload(proxy, lax)
        s.sendall(m.parse(b"x", "SELECT email FROM fc_users") + m.sync())
        assert "1" in [t for t, _ in read_messages(s)]  # classified under B: a plain read
        reload(proxy, strict)
        s.sendall(bind(b"", b"x") + m.execute(b"") + m.sync())
        (err,) = errors(read_messages(s))
        assert err["C"] == "42501" and "pii" in err["M"], err
