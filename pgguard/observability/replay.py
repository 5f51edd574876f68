"""`pgguard replay AUDIT_FILE... --config NEW.yaml [--json]`: what a new policy would change.

Every `statement` event of the audit trail is classified again from its `redacted_sql` (or its
`sql` when the trail was written with `include_literals: true`) under the new configuration's
PII rules (and catalog, if `catalog.dsn` is set), and decided by the new policy for the recorded
user with no grants held: what a fresh session would get (`pgguard explain --user` does the same
for one statement). The recorded decision is reduced to the same three outcomes:

    allowed                                  → allow    (step_up if its rule is a step_up rule:
                                                          a grant or a code covered it)
    denied                                   → deny     (step_up if its rule is a step_up rule:
                                                          the user had no authenticator)
    held, released, timed_out, canceled      → step_up

and the statements whose outcome differs are printed: a table, or one JSON object per line.

Redacted SQL does not parse (`<redacted>` is deliberately not SQL, see
`pgguard.classify.classifier`), so each `<redacted>` outside quoted identifiers and comments is
replaced by the neutral literal `''` before classifying. A literal's value never decides a class
(the classifier looks at names, not values), so this is exact for every case of the
classification corpus. A statement the trail recorded without text at all (not tokenizable, over
`limits.max_sql_bytes`) replays as `unknown`, as it was then.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pgguard.classify import CatalogSnapshot, ClassificationCache, StatementClass
from pgguard.classify.classifier import REDACTED, Classification
from pgguard.config import Config
from pgguard.observability.audit import STATEMENT
from pgguard.policy import decide

__all__ = [
    "NEUTRAL_LITERAL",
    "RECORDED_DECISIONS",
    "ReplayReport",
    "ReplayedStatement",
    "outcome_of",
    "read_events",
    "replay",
    "replayable_sql",
    "run_replay",
]

NEUTRAL_LITERAL = "''"

RECORDED_DECISIONS: Mapping[str, str] = {
    "allowed": "allow", "denied": "deny", "held": "step_up", "released": "step_up",
    "timed_out": "step_up", "canceled": "step_up"}

# Skip what may legitimately contain the placeholder text: quoted identifiers and comments.
_PLACEHOLDER = re.compile(r'"(?:[^"]|"")*"|--[^\n]*|/\*.*?\*/|' + re.escape(REDACTED), re.S)
# What the trail writes instead of a statement it could not show (see classifier._whole_unknown).
_NOT_SHOWN = re.compile(r"^<statement [^>]*>$")
_UNKNOWN = Classification(frozenset({StatementClass.UNKNOWN}), (),
                          reason="the audit trail holds no text for this statement")


def replayable_sql(redacted_sql: str) -> str:
    """`redacted_sql` with each `<redacted>` literal replaced by `''` (it parses again)."""
    return _PLACEHOLDER.sub(
        lambda m: NEUTRAL_LITERAL if m.group(0) == REDACTED else m.group(0), redacted_sql)


def outcome_of(decision: str, rule: str | None) -> str | None:
    """The recorded decision as allow | deny | step_up (None: not a statement decision).
    A step_up rule on an `allowed` or `denied` record means the policy asked for a step-up."""
    outcome = RECORDED_DECISIONS.get(decision)
    if outcome is not None and rule and ".step_up." in rule:
        return "step_up"
    return outcome


@dataclass(frozen=True, slots=True)
class ReplayedStatement:
    id: int | None
    user: str
    session: str | None
    recorded: str                 # the decision in the trail (allowed, held, …)
    old: str                      # allow | deny | step_up
    old_rule: str | None
    new: str                      # allow | deny | step_up
    rule: str                     # the new policy's rule
    classes: tuple[str, ...]      # the new classification
    redacted_sql: str

    @property
    def changed(self) -> bool:
        return self.old != self.new

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "user": self.user, "session": self.session,
                "recorded": self.recorded, "old": self.old, "old_rule": self.old_rule,
                "new": self.new, "rule": self.rule, "classes": list(self.classes),
                "redacted_sql": self.redacted_sql}


@dataclass(slots=True)
class ReplayReport:
    statements: int = 0
    changed: list[ReplayedStatement] = field(default_factory=list)
    skipped: int = 0              # statement events without a known decision


def replay(events: Iterable[Mapping[str, Any]], config: Config,
           catalog: CatalogSnapshot | None = None,
           on_changed: Callable[[ReplayedStatement], None] | None = None) -> ReplayReport:
    """Re-decide every statement event under `config`; `on_changed` sees each change as it is
    found (the report keeps them too)."""
    cache = ClassificationCache(config.pii_rules, catalog,
                                max_sql_bytes=config.limits.max_sql_bytes)
    report = ReplayReport()
    for event in events:
        if event.get("event") != STATEMENT:
            continue
        recorded = str(event.get("decision", ""))
        old_rule = event.get("rule")
        old = outcome_of(recorded, old_rule if isinstance(old_rule, str) else None)
        if old is None:
            report.skipped += 1
            continue
        report.statements += 1
        text = event.get("sql")
        shown = str(event.get("redacted_sql", ""))
        if isinstance(text, str):
            c = cache.classify(text)
        elif not shown or _NOT_SHOWN.match(shown):
            c = _UNKNOWN
        else:
            c = cache.classify(replayable_sql(shown))
        user = str(event.get("user") or "")
        d = decide(config.policy, user, c, {}, 0.0)
        if d.kind == old:
            continue
        session = event.get("session")
        item = ReplayedStatement(
            id=event.get("id") if isinstance(event.get("id"), int) else None,
            user=user, session=session if isinstance(session, str) else None,
            recorded=recorded, old=old,
            old_rule=old_rule if isinstance(old_rule, str) else None,
            new=d.kind, rule=d.rule, classes=tuple(sorted(x.value for x in c.classes)),
            redacted_sql=shown)
        report.changed.append(item)
        if on_changed is not None:
            on_changed(item)
    return report


def read_events(paths: Iterable[Path],
                on_bad_line: Callable[[Path, int], None]) -> Iterator[dict[str, Any]]:
    """The JSON objects of the files, in order; other lines are reported and skipped (the
    chain is `pgguard audit verify`'s business). OSError propagates."""
    for path in paths:
        with path.open("rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    on_bad_line(path, n)
                    continue
                if isinstance(event, dict):
                    yield event
                else:
                    on_bad_line(path, n)


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"


def _table(rows: list[ReplayedStatement], out: TextIO) -> None:
    head = ("ID", "USER", "DECISION", "RULE", "SQL")
    cells = [(str(r.id if r.id is not None else "-"), r.user, f"{r.old} → {r.new}", r.rule,
              _one_line(r.redacted_sql, 100)) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head[:-1])]
    for row in (head, *cells):
        print("  ".join([*(v.ljust(w) for v, w in zip(row, widths, strict=False)), row[-1]]),
              file=out)


def run_replay(files: list[Path], config: Config, *, as_json: bool, out: TextIO,
               err: TextIO, catalog: CatalogSnapshot | None = None) -> int:
    """The command: 0 when the files were read (whether or not anything changes), 2 when a
    file cannot be read or holds no audit event at all."""
    bad: list[tuple[Path, int]] = []
    events_seen = 0

    def counted() -> Iterator[dict[str, Any]]:
        nonlocal events_seen
        for e in read_events(files, lambda p, n: bad.append((p, n))):
            events_seen += 1
            yield e

    def emit_json(item: ReplayedStatement) -> None:
        print(json.dumps(item.as_json(), ensure_ascii=False), file=out)

    try:
        report = replay(counted(), config, catalog, on_changed=emit_json if as_json else None)
    except OSError as exc:
        print(f"pgguard: {exc.filename or files[0]}: cannot read: {exc.strerror or exc}",
              file=err)
        return 2
    for path, n in bad[:5]:
        print(f"pgguard: {path}:{n}: not an audit event, skipped", file=err)
    if len(bad) > 5:
        print(f"pgguard: … and {len(bad) - 5} more lines skipped", file=err)
    if events_seen == 0 and bad:
        print("pgguard: no audit events found", file=err)
        return 2
    summary = (f"{len(report.changed)} of {report.statements} recorded statements would be "
               f"decided differently")
    if as_json:
        print(summary, file=err)
        return 0
    if report.changed:
        _table(report.changed, out)
        print(file=out)
    print(summary, file=out)
    return 0
