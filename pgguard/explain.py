"""`pgguard explain` (DESIGN §8): config → rules (+ catalog snapshot) → classify → print.

Glue between the CLI and `pgguard.classify`; the only I/O is reading the config, stdin or the
batch file, and loading the catalog from `catalog.dsn` when the config has one. With `--user U`
it also runs the policy (`pgguard.policy.decide`, no grants: what a fresh session would get) and
adds `role`, `decision` (allow | deny | step_up), `rule` and `message` (the client's message).

`pgguard policy check FILE` is `check_policy_file`: `ok`, or every error (DESIGN §5, §8).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from pgguard.classify import CatalogSnapshot, SessionFacts, classify
from pgguard.classify.catalog import DEFAULT_COMMENT_TAG
from pgguard.classify.classifier import Classification
from pgguard.classify.report import render_text
from pgguard.config import Config, find_config_file, load_config
from pgguard.errors import ConfigError
from pgguard.policy import Allow, Deny, Policy, decide


def _load(config_file: str | None) -> Config:
    try:
        path = find_config_file(config_file)
    except ConfigError:
        if config_file:
            raise
        click.echo("pgguard: no config file found: classifying without PII rules or catalog",
                   err=True)
        return Config()
    return load_config(path)


def _catalog(config: Config) -> CatalogSnapshot | None:
    dsn = config.catalog.get("dsn")
    if not dsn:
        return None
    from pgguard.state.catalog import load_catalog  # asyncpg only when needed

    tag = str(config.catalog.get("comment_tag") or DEFAULT_COMMENT_TAG)
    try:
        return asyncio.run(load_catalog(str(dsn), tag))
    except Exception as exc:  # asyncpg, OSError, timeouts: one line, exit 2
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"catalog.dsn: cannot load the catalog: {first}") from None


def check_policy_file(file: str) -> int:
    """Validate FILE as `pgguard run` would: `ok` on stdout (0), or every error on stderr,
    one `FILE:LINE: key.path: why` per line (2)."""
    path = Path(file)
    if not path.is_file():
        click.echo(f"{file}: no such config file", err=True)
        return 2
    try:
        load_config(path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        return 2
    click.echo("ok")
    return 0


def policy_fields(policy: Policy, user: str, c: Classification) -> dict[str, object]:
    """`role`, `decision`, `rule`, `message` for `explain --user` (no grants held)."""
    d = decide(policy, user, c, {}, 0.0)
    message = None if isinstance(d, Allow) else d.reason if isinstance(d, Deny) else d.notice
    role = policy.role_for(user)
    matched_by = ("default_role" if policy.matched_by_default(user)
                  else f"roles.{role.name}.users" if role else None)
    return {"role": role.name if role else None, "matched_by": matched_by,
            "decision": d.kind, "rule": d.rule, "message": message}


def _render_policy(fields: dict[str, object]) -> str:
    via = " (default_role)" if fields["matched_by"] == "default_role" else ""
    lines = [f"role:        {fields['role'] or '(none)'}{via}",
             f"decision:    {fields['decision']}",
             f"rule:        {fields['rule']}"]
    if fields["message"]:
        lines.append(f"message:     {fields['message']}")
    return "\n".join(lines)


def run_explain(sql: str | None, *, as_json: bool, batch_file: str | None,
                config_file: str | None, user: str | None = None) -> int:
    config = _load(config_file)
    rules = config.pii_rules
    catalog = _catalog(config)
    limit = config.limits.max_sql_bytes

    def one(text: str, c: Classification | None = None) -> dict[str, object]:
        c = c or classify(text, rules, catalog, SessionFacts(), max_sql_bytes=limit)
        doc = c.to_json()
        if user is not None:
            doc.update(policy_fields(config.policy, user, c))
        return doc

    if batch_file is not None:
        if sql is not None:
            raise click.UsageError("give SQL or --batch, not both")
        try:
            lines = Path(batch_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"{batch_file}: cannot read: {exc.strerror}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{batch_file}:{n}: not JSON: {exc.msg}") from None
            if not isinstance(text, str):
                raise ConfigError(f"{batch_file}:{n}: expected a JSON string")
            sys.stdout.write(json.dumps(one(text), ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return 0
    if sql is None:
        raise click.UsageError("give SQL as an argument, - for stdin, or --batch FILE")
    if sql == "-":
        sql = sys.stdin.read()
    result = classify(sql, rules, catalog, SessionFacts(), max_sql_bytes=limit)
    if as_json:
        click.echo(json.dumps(one(sql, result), ensure_ascii=False))
        return 0
    click.echo(render_text(result))
    if user is not None:
        click.echo(_render_policy(policy_fields(config.policy, user, result)))
    return 0
