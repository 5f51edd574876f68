"""Classification inside the running proxy: long statements classified in a worker process,
and schema-aware mode (catalog.dsn) with views, comment tags and refresh on SIGHUP."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import psycopg
import pytest

pytestmark = pytest.mark.timeout(120)

SCHEMA = """
DROP SCHEMA IF EXISTS cat CASCADE;
CREATE SCHEMA cat AUTHORIZATION app;
CREATE TABLE cat.people (id int, name text, email text, note text);
INSERT INTO cat.people VALUES (1, 'Ann', 'ann@example.com', 'n');
CREATE VIEW cat.contacts AS SELECT id, email FROM cat.people;
CREATE TABLE cat.other (id int, secret_note text);
INSERT INTO cat.other VALUES (1, 'x');
GRANT ALL ON ALL TABLES IN SCHEMA cat TO app;
"""

# Reads run, PII is denied outright: a refusal names the class, easy to assert.
POLICY = {
    "pii": {"tables": {"cat.people": ["email"]}},
    "roles": {"readers": {"users": ["app"], "allow": ["read", "tx"]}},
}


def _wait_for(done: Callable[[], bool], proxy, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, proxy.log()
        time.sleep(0.2)


def _denied(conn: psycopg.Connection, sql: str) -> str:
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
        conn.execute(sql)
    return str(e.value)


# Classification does not depend on the server version: run once, on the embedded PG 18.
pytestmark = [pytestmark, pytest.mark.parametrize("pg", ["pg18"], indirect=True)]


@pytest.fixture
def pg18(pg):
    return pg


def test_long_statement_classified_off_the_event_loop(pg18, proxy_factory):
    pg18.psql(SCHEMA, dbname="app")
    proxy = proxy_factory(pg18, POLICY)
    filler = "id IN (" + ", ".join(str(i) for i in range(8000)) + ")"  # ~40 KB of SQL
    assert len(filler) > 16 * 1024
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        assert c.execute(f"SELECT count(*) FROM cat.people WHERE {filler}").fetchone() == (1,)
        msg = _denied(c, f"SELECT email FROM cat.people WHERE {filler}")
        assert "may not run pii" in msg
        # extended protocol: the Parse is classified in the worker, the Execute decides
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(f"SELECT email FROM cat.people WHERE {filler} OR id = %s", [1],
                      prepare=True)
        # the session is healthy and the cached classification is reused
        assert c.execute(f"SELECT count(*) FROM cat.people WHERE {filler}").fetchone() == (1,)
    assert "classify.offload_failed" not in proxy.log()


def _outcome(conn: psycopg.Connection, sql: str) -> str:
    try:
        conn.execute(sql)
    except psycopg.errors.InsufficientPrivilege as exc:
        return "denied pii" if "may not run pii" in str(exc) else f"denied: {exc}"
    return "ran"


def test_schema_aware_views_and_comment_tags(pg18, proxy_factory):
    pg18.psql(SCHEMA, dbname="app")
    dsn = f"postgresql://app:secret@127.0.0.1:{pg18.port}/app"
    proxy = proxy_factory(pg18, {**POLICY, "catalog": {"dsn": dsn, "refresh": "1h"}})
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        got = {sql: _outcome(c, sql) for sql in [
            "SELECT * FROM cat.contacts",  # a view exposing a PII column (catalog definition)
            "SELECT * FROM cat.people",  # the star covers email
            "SELECT name FROM cat.people",
            "SELECT secret_note FROM cat.other",
        ]}
    assert got == {"SELECT * FROM cat.contacts": "denied pii",
                   "SELECT * FROM cat.people": "denied pii",
                   "SELECT name FROM cat.people": "ran",
                   "SELECT secret_note FROM cat.other": "ran"}, proxy.log()
    # a DBA tags a column in the database; SIGHUP refreshes the snapshot
    pg18.psql("COMMENT ON COLUMN cat.other.secret_note IS 'pgguard:pii';", dbname="app")
    proxy.signal(signal.SIGHUP)
    _wait_for(lambda: proxy.log().count('"catalog.loaded"') >= 2, proxy)
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        assert "may not run pii" in _denied(c, "SELECT secret_note FROM cat.other")
    # dropping the tagged column is reported on the next refresh
    pg18.psql("ALTER TABLE cat.other RENAME COLUMN secret_note TO note2;", dbname="app")
    proxy.signal(signal.SIGHUP)
    _wait_for(lambda: "catalog.pii_column_gone" in proxy.log(), proxy)
    assert "cat.other.secret_note" in proxy.log()


def test_other_databases_use_the_rules_alone(pg18, proxy_factory):
    pg18.psql(SCHEMA, dbname="app")
    pg18.psql("DROP DATABASE IF EXISTS other; CREATE DATABASE other OWNER app;")
    dsn = f"postgresql://app:secret@127.0.0.1:{pg18.port}/app"
    proxy = proxy_factory(pg18, {**POLICY, "catalog": {"dsn": dsn}})
    with psycopg.connect(proxy.dsn(dbname="other"), autocommit=True) as c:
        # no catalog for this database: a view named like the PII one is not known to be PII,
        # but the rule's table still is (unqualified names match PII relations in any schema)
        assert "may not run pii" in _denied(c, "SELECT email FROM people")


def test_catalog_unreachable_makes_readyz_fail(pg18, proxy_factory):
    import json
    import urllib.error
    import urllib.request

    from pgguard.localpg import free_port

    dsn = f"postgresql://app:secret@127.0.0.1:{free_port()}/app"
    proxy = proxy_factory(pg18, {**POLICY, "catalog": {"dsn": dsn}})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(proxy.admin_url + "/readyz", timeout=10)
    assert e.value.code == 503
    assert "catalog" in json.loads(e.value.read())["reason"]
    assert "catalog.load_failed" in proxy.log()
    assert "secret" not in proxy.log()  # the DSN's password is not logged


def test_reloaded_pii_rules_apply_on_the_catalog_database_when_its_catalog_fails(pg18,
                                                                                proxy_factory):
    """SIGHUP with a new PII rule: sessions on the catalog database classify with it at once,
    cached classifications included, not only once the catalog has loaded again (here it
    cannot: the reloaded catalog.dsn points at no server, so the old snapshot is kept)."""
    import json

    from pgguard.localpg import free_port

    pg18.psql(SCHEMA, dbname="app")
    dsn = f"postgresql://app:secret@127.0.0.1:{pg18.port}/app"
    proxy = proxy_factory(pg18, {**POLICY, "catalog": {"dsn": dsn, "refresh": "1h"}})
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        for _ in range(2):  # the second time from the classification cache
            assert _outcome(c, "SELECT note FROM cat.people") == "ran"
        config = json.loads(proxy.config_path.read_text())
        config["pii"] = {"tables": {"cat.people": ["email", "note"]}}
        config["catalog"]["dsn"] = f"postgresql://app:secret@127.0.0.1:{free_port()}/app"
        proxy.config_path.write_text(json.dumps(config))
        proxy.signal(signal.SIGHUP)
        _wait_for(lambda: "catalog.load_failed" in proxy.log(), proxy, timeout=30)
        assert "policy.reloaded" in proxy.log()
        assert "may not run pii" in _denied(c, "SELECT note FROM cat.people")
