"""The policy (DESIGN §5, §6): role matching and the pure `decide()`, clock injected."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgguard.classify import Classification, PiiRules, SessionFacts, StatementClass, classify
from pgguard.classify.classifier import StatementResult
from pgguard.policy import (
    ALL_CLASSES,
    Allow,
    Deny,
    Policy,
    Role,
    StepUp,
    decide,
    format_triggers,
    grants_after_stepup,
    triggers_for,
)

C = StatementClass
NOW = 1_000_000.0

RULES = PiiRules.from_config({"tables": {"public.users": ["email", "phone"],
                                         "public.customers": "*"}})

ANALYST = Role("analyst", ("analyst_*",), {C.READ, C.TX, C.PII}, {C.PII: 900.0})
ONCALL = Role("oncall", ("alice", "bob"), {C.READ, C.WRITE, C.PII, C.TX, C.UNKNOWN},
              {C.PII: 1800.0, C.WRITE: 600.0, C.UNKNOWN: 0.0})
DBA = Role("dba", ("postgres",), ALL_CLASSES, {C.DDL: 0.0, C.ADMIN: 0.0, C.PII: 900.0})
POLICY = Policy((ANALYST, ONCALL, DBA), default_role="analyst")


def cls(sql: str) -> Classification:
    return classify(sql, RULES, None, SessionFacts())


def run(user: str, sql: str, grants: Mapping[StatementClass, float] | None = None,
        now: float = NOW, policy: Policy = POLICY, **kw: object) -> Allow | Deny | StepUp:
    return decide(policy, user, cls(sql), grants or {}, now, **kw)  # type: ignore[arg-type]


# -- role matching ---------------------------------------------------------------------------

def test_first_matching_role_wins_in_file_order() -> None:
    broad = Role("everyone", ("*",), {C.READ})
    narrow = Role("admins", ("admin_*",), ALL_CLASSES)
    assert Policy((broad, narrow)).role_for("admin_joe") is broad
    assert Policy((narrow, broad)).role_for("admin_joe") is narrow
    assert Policy((narrow, broad)).role_for("joe") is broad


def test_globs_are_case_sensitive_fnmatch() -> None:
    role = Role("r", ("db?", "team[ab]_*"))
    assert role.matches("db1") and not role.matches("db12")
    assert role.matches("teama_x") and not role.matches("teamc_x")
    assert not role.matches("DB1")
    assert not Role("none").matches("anyone")  # no users: only reachable as default_role


def test_default_role_and_no_role() -> None:
    assert POLICY.role_for("carol") is ANALYST
    assert POLICY.matched_by_default("carol") and not POLICY.matched_by_default("alice")
    assert Policy((ONCALL,)).role_for("carol") is None


@given(st.lists(st.text("ab*?[]!-", max_size=5), min_size=1, max_size=3), st.text("ab-", max_size=6))
def test_compiled_globs_equal_fnmatchcase(globs: list[str], user: str) -> None:
    assert Role("r", tuple(globs)).matches(user) == any(fnmatch.fnmatchcase(user, g) for g in globs)


def test_policy_rejects_duplicate_names_and_unknown_default() -> None:
    with pytest.raises(ValueError, match="unique"):
        Policy((ONCALL, ONCALL))
    with pytest.raises(ValueError, match="names no role"):
        Policy((ONCALL,), default_role="dba")


def test_role_is_immutable() -> None:
    with pytest.raises(TypeError):
        ONCALL.step_up[C.DDL] = 1.0  # type: ignore[index]


# -- allow / deny ----------------------------------------------------------------------------

def test_allowed_class_runs() -> None:
    d = run("alice", "SELECT count(*) FROM orders")
    assert d == Allow("roles.oncall.allow", "oncall", "roles.oncall.users")


def test_class_outside_allow_is_denied_naming_role_class_and_trigger() -> None:
    d = run("alice", "DROP TABLE public.users")
    assert isinstance(d, Deny)
    assert d.reason == "pgguard: role oncall may not run ddl (public.users)"
    assert d.rule == "roles.oncall.allow" and d.role == "oncall"
    assert d.classes == (C.DDL,)


def test_denial_wins_over_step_up_and_lists_every_refused_class() -> None:
    d = run("analyst_1", "DELETE FROM orders; VACUUM")
    assert isinstance(d, Deny)
    assert d.reason == "pgguard: role analyst may not run admin (VACUUM), write (orders)"
    assert d.classes == (C.ADMIN, C.WRITE)


def test_unknown_denied_with_the_classifiers_reason() -> None:
    c = cls("SELECT foo(")
    d = decide(POLICY, "analyst_1", c, {}, NOW)
    assert isinstance(d, Deny) and c.reason
    assert d.reason == f"pgguard: role analyst may not run unknown ({c.reason})"
    assert d.rule == "roles.analyst.allow"


def test_allow_all_includes_unknown() -> None:
    everything = Policy((Role("ops", ("*",), ALL_CLASSES),))
    for sql in ("SELECT foo(", "VACUUM", "DROP TABLE t", "SELECT email FROM users"):
        assert isinstance(run("x", sql, policy=everything), Allow), sql


def test_unrestricted_policy_allows_everything() -> None:
    p = Policy.unrestricted()
    assert not p.configured
    d = run("anyone", "SELECT foo(", policy=p)
    assert isinstance(d, Allow) and d.role == "default"


def test_user_with_no_role_and_no_default_is_denied() -> None:
    d = run("mallory", "SELECT 1", policy=Policy((ONCALL,)))
    assert isinstance(d, Deny) and d.rule == "default_role" and d.role is None
    assert d.reason == "pgguard: user mallory matches no role and there is no default_role"


def test_default_role_decides_for_unmatched_users() -> None:
    d = run("carol", "SELECT 1")
    assert d == Allow("roles.analyst.allow", "analyst", "default_role")


def test_empty_query_is_allowed_even_without_a_role() -> None:
    assert run("mallory", "", policy=Policy((ONCALL,))) == Allow("empty")
    assert run("mallory", " ; ", policy=Policy((ONCALL,))) == Allow("empty")


# -- step-up ---------------------------------------------------------------------------------

def test_step_up_class_without_grant_needs_step_up() -> None:
    d = run("alice", "SELECT email, phone FROM users")
    assert isinstance(d, StepUp)
    assert d.classes == (C.PII,)
    assert d.triggers == ((C.PII, ("public.users.email", "public.users.phone")),)
    assert d.reason == "step-up required (pii: public.users.email, public.users.phone)"
    assert d.notice == ("pgguard: statement held: step-up required "
                        "(pii: public.users.email, public.users.phone)")
    assert d.rule == "roles.oncall.step_up.pii" and d.role == "oncall"
    assert not d.fresh_only


def test_unexpired_grant_covers_and_expired_does_not() -> None:
    sql = "SELECT email FROM users"
    ok = run("alice", sql, {C.PII: NOW + 1})
    assert ok == Allow("roles.oncall.step_up.pii", "oncall", "roles.oncall.users",
                       frozenset({C.PII}))
    assert isinstance(run("alice", sql, {C.PII: NOW}), StepUp)       # expires_at == now: gone
    assert isinstance(run("alice", sql, {C.PII: NOW - 5}), StepUp)
    assert isinstance(run("alice", sql, {C.WRITE: NOW + 100}), StepUp)  # other class's grant


def test_grant_expires_as_the_clock_moves() -> None:
    grants = grants_after_stepup(ONCALL, NOW)
    sql = "UPDATE orders SET n = 1"
    assert isinstance(run("alice", sql, grants, now=NOW + 599), Allow)
    assert isinstance(run("alice", sql, grants, now=NOW + 600), StepUp)
    # pii lasts longer (30m) than write (10m)
    assert isinstance(run("alice", "SELECT email FROM users", grants, now=NOW + 1799), Allow)


def test_only_the_uncovered_classes_are_listed() -> None:
    d = run("alice", "INSERT INTO orders SELECT email FROM users", {C.PII: NOW + 60})
    assert isinstance(d, StepUp)
    assert d.classes == (C.WRITE,)
    assert d.rule == "roles.oncall.step_up.write"


def test_several_classes_and_the_triggers_text() -> None:
    d = run("alice", "UPDATE orders SET n = 1; SELECT email, phone FROM public.users")
    assert isinstance(d, StepUp)
    assert d.classes == (C.PII, C.WRITE)
    assert d.rule == "roles.oncall.step_up.pii, roles.oncall.step_up.write"
    assert d.triggers[0] == (C.PII, ("public.users.email", "public.users.phone"))
    assert d.triggers_text.startswith("pii: public.users.email, public.users.phone; write: ")


def test_format_triggers() -> None:
    triggers = ((C.PII, ("public.users.email", "public.users.phone")),
                (C.WRITE, ("public.orders",)))
    assert format_triggers(triggers) == \
        "pii: public.users.email, public.users.phone; write: public.orders"
    many = ((C.READ, tuple(f"t{i}" for i in range(13))),)
    assert format_triggers(many, limit=10) == \
        "read: t0, t1, t2, t3, t4, t5, t6, t7, t8, t9 and 3 more"


def test_ttl_zero_is_never_covered_by_a_grant_only_by_a_fresh_code() -> None:
    sql = "SELECT foo("
    d = run("alice", sql, {C.UNKNOWN: NOW + 10_000})
    assert isinstance(d, StepUp) and d.classes == (C.UNKNOWN,) and d.fresh_only
    fresh = run("alice", sql, fresh=frozenset({C.UNKNOWN}))
    assert isinstance(fresh, Allow) and fresh.granted == {C.UNKNOWN}
    # the next statement needs a new code again
    assert isinstance(run("alice", sql, {C.UNKNOWN: NOW + 10_000}), StepUp)


def test_fresh_code_releases_a_statement_needing_lasting_and_ttl0_classes() -> None:
    d = run("postgres", "DROP TABLE public.users")
    assert isinstance(d, StepUp) and d.classes == (C.DDL, C.PII) and not d.fresh_only
    grants = grants_after_stepup(DBA, NOW)
    assert grants == {C.PII: NOW + 900.0}
    assert isinstance(run("postgres", "DROP TABLE public.users", grants), StepUp)
    assert isinstance(run("postgres", "DROP TABLE public.users", grants, fresh=d.classes), Allow)


def test_grants_after_stepup_each_class_for_its_own_ttl() -> None:
    assert grants_after_stepup(ONCALL, NOW) == {C.PII: NOW + 1800.0, C.WRITE: NOW + 600.0}
    assert grants_after_stepup(Role("r", allow={C.DDL}, step_up={C.DDL: 0.0}), NOW) == {}
    assert grants_after_stepup(Role("r", allow={C.READ}), NOW) == {}


# -- triggers ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("sql", "klass", "expected"), [
    ("VACUUM", C.ADMIN, ("VACUUM",)),
    ("CREATE ROLE bob", C.ADMIN, ("CREATE ROLE",)),
    ("CREATE ROLE bob", C.DDL, ("CREATE ROLE",)),
    ("/* why */ CREATE OR REPLACE VIEW v AS SELECT 1", C.DDL, ("v",)),
    ("SELECT pg_terminate_backend(42)", C.ADMIN, ("pg_terminate_backend",)),
    ("SELECT * FROM pg_authid", C.ADMIN, ("pg_authid",)),
    ("BEGIN", C.TX, ("BEGIN",)),
    ("DELETE FROM orders", C.WRITE, ("orders",)),
    ("SELECT * FROM customers", C.PII, ("public.customers.*",)),
])
def test_triggers_for(sql: str, klass: StatementClass, expected: tuple[str, ...]) -> None:
    c = cls(sql)
    assert klass in c.classes
    assert triggers_for(klass, c) == expected


def test_trigger_keywords_never_carry_literals() -> None:
    c = Classification(frozenset({C.ADMIN}),
                       (StatementResult("SET ROLE 'secret'", frozenset({C.ADMIN})),))
    assert triggers_for(C.ADMIN, c) == ("SET ROLE",)
    c2 = Classification(frozenset({C.ADMIN}),
                        (StatementResult("'x'", frozenset({C.ADMIN})),))
    assert triggers_for(C.ADMIN, c2) == ("admin",)


def test_role_memo_stays_correct_past_its_bound() -> None:
    p = Policy((Role("even", ("*[02468]",), {C.READ}), Role("odd", ("*",), {C.READ})))
    for i in range(5000):
        assert p.role_for(f"u{i}") is p.roles[i % 2], i
    assert p.resolve("u7") == (p.roles[1], "roles.odd.users")
