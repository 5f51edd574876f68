"""`pgguard explain` (DESIGN §8): config → rules (+ catalog snapshot) → classify → print.

Glue between the CLI and `pgguard.classify`; the only I/O is reading the config, stdin or the
batch file, and loading the catalog from `catalog.dsn` when the config has one.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from pgguard.classify import CatalogSnapshot, PiiRules, SessionFacts, classify
from pgguard.classify.catalog import DEFAULT_COMMENT_TAG
from pgguard.classify.report import render_text
from pgguard.config import Config, find_config_file, load_config
from pgguard.errors import ConfigError


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


def run_explain(sql: str | None, *, as_json: bool, batch_file: str | None,
                config_file: str | None) -> int:
    config = _load(config_file)
    try:
        rules = PiiRules.from_config(config.pii)
    except ValueError as exc:
        raise ConfigError(f"{config.path}: pii: {exc}") from None
    catalog = _catalog(config)
    limit = config.limits.max_sql_bytes

    def one(text: str) -> dict[str, object]:
        return classify(text, rules, catalog, SessionFacts(), max_sql_bytes=limit).to_json()

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
        click.echo(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        click.echo(render_text(result))
    return 0
