"""The command line: argv → config → app. The only module that exits the process.

Errors are one line on stderr, exit 2 for usage and configuration errors (DESIGN §8).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pgguard.errors import ConfigError


class _Group(click.Group):
    """Turns our ConfigError into the one-line, exit-2 error of DESIGN §8."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            for line in str(exc).splitlines():
                click.echo(f"pgguard: {line}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pgguard")
def cli() -> None:
    """pgguard: a PostgreSQL proxy that classifies every statement and holds sensitive ones
    until the user steps up with a TOTP code."""


@cli.command()
@click.option("--config", "config_file", metavar="FILE", help="pgguard.yaml (else $PGGUARD_CONFIG, ./pgguard.yaml).")
@click.option("--listen", metavar="HOST:PORT", help="Client-facing address (default 127.0.0.1:6433).")
@click.option("--upstream", metavar="ADDR", help="HOST:PORT, postgresql://HOST:PORT or a Unix socket directory.")
@click.option("--upstream-port", type=int, metavar="PORT", help="Port of the Unix socket file (default 5432).")
def run(config_file: str | None, listen: str | None, upstream: str | None,
        upstream_port: int | None) -> None:
    """Run the proxy in the foreground until SIGTERM or SIGINT."""
    from pgguard import app
    from pgguard.config import find_config_file, load_config

    path: Path | None
    try:
        path = find_config_file(config_file)
    except ConfigError:
        if config_file or not (listen or upstream):
            raise
        path = None  # flags alone are a complete configuration
    config = load_config(path, {"listen": listen, "upstream": upstream,
                                "upstream_port": upstream_port})
    from pgguard.observability.audit import AuditError

    try:
        code = app.run(config)
    except AuditError as exc:  # the trail's last line cannot be continued: nothing started
        click.echo(f"pgguard: {exc}", err=True)
        sys.exit(2)
    sys.exit(code)


@cli.command()
def demo() -> None:
    """Start an embedded PostgreSQL with a sample schema and pgguard in front of it."""
    from pgguard.demo import main as demo_main

    sys.exit(demo_main())


@cli.command()
@click.argument("sql", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--batch", "batch_file", metavar="FILE",
              help="JSON lines, each a JSON string (one message); one JSON object out per line.")
@click.option("--config", "config_file", metavar="FILE",
              help="pgguard.yaml (else $PGGUARD_CONFIG, ./pgguard.yaml).")
@click.option("--user", metavar="U", help="Also show U's role, the decision and the rule.")
def explain(sql: str | None, as_json: bool, batch_file: str | None,
            config_file: str | None, user: str | None) -> None:
    """Classify SQL (an argument, or - for stdin) and show why. Exit 0 even when unknown."""
    from pgguard.explain import run_explain

    sys.exit(run_explain(sql, as_json=as_json, batch_file=batch_file, config_file=config_file,
                         user=user))


@cli.group()
def policy() -> None:
    """Check the policy file."""


@policy.command("check")
@click.argument("file")
def policy_check(file: str) -> None:
    """Validate FILE: prints `ok` (exit 0) or every error as FILE:LINE: key.path: why (exit 2)."""
    from pgguard.explain import check_policy_file

    sys.exit(check_policy_file(file))


@cli.group()
def audit() -> None:
    """Check and read the audit trail."""


@audit.command("verify")
@click.argument("files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
def audit_verify(files: tuple[Path, ...]) -> None:
    """Verify the hash chain of FILE (or a series of rotated files, oldest first).
    Prints `ok N events` (exit 0) or the first bad line (exit 1)."""
    from pgguard.observability.audit_files import verify_files

    result = verify_files(list(files))
    click.echo(result.message(), err=not result.ok)
    sys.exit(0 if result.ok else 1)


@audit.command("tail")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--follow", "-f", is_flag=True, help="Keep printing events as they are written.")
@click.option("--user", "users", multiple=True, metavar="U", help="Only events of this user.")
@click.option("--event", "events", multiple=True, metavar="E",
              help="Only this event (or dotted prefix: stepup).")
@click.option("-n", "--lines", type=click.IntRange(min=0), metavar="N",
              help="Start with the last N matching events (default: all).")
def audit_tail(file: Path, follow: bool, users: tuple[str, ...], events: tuple[str, ...],
               lines: int | None) -> None:
    """Print the audit trail for humans."""
    from pgguard.observability.audit_files import tail

    try:
        tail(file, follow=follow, users=users, events=events, last=lines, out=click.echo)
    except KeyboardInterrupt:
        pass


@cli.command()
@click.argument("files", nargs=-1, required=True, metavar="AUDIT_FILE...",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--config", "config_file", metavar="NEW.yaml", required=True,
              help="The configuration to replay under (its policy, PII rules and catalog).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per changed statement.")
def replay(files: tuple[Path, ...], config_file: str, as_json: bool) -> None:
    """Re-decide the recorded statements of AUDIT_FILE (or rotated files, oldest first) under
    NEW.yaml's policy, as a fresh session would (no grants), and print those whose decision
    (allow, deny, step_up) would change. Redacted literals (<redacted>) are classified as the
    neutral literal '' (a literal's value never decides a class). Exit 0; 2 on a bad config or
    an unreadable file."""
    from pgguard.config import find_config_file, load_config
    from pgguard.explain import _catalog
    from pgguard.observability.replay import run_replay

    config = load_config(find_config_file(config_file))
    sys.exit(run_replay(list(files), config, as_json=as_json, out=sys.stdout, err=sys.stderr,
                        catalog=_catalog(config)))


@cli.command()
@click.argument("user", required=False)
@click.option("--force", is_flag=True, help="Replace an existing authenticator.")
@click.option("--revoke", is_flag=True, help="Remove the user's authenticator.")
@click.option("--list", "list_users", is_flag=True, help="List enrolled users and when.")
@click.option("--json", "as_json", is_flag=True, help='Print JSON ({"user", "secret", "uri"}).')
@click.option("--config", "config_file", metavar="FILE",
              help="pgguard.yaml (else $PGGUARD_CONFIG, ./pgguard.yaml).")
def enroll(user: str | None, force: bool, revoke: bool, list_users: bool, as_json: bool,
           config_file: str | None) -> None:
    """Give USER a TOTP authenticator: prints the otpauth:// URI and a QR code."""
    from pgguard.enrollment import run_enroll
    from pgguard.observability.audit_enroll import audit_enroll_hook

    with audit_enroll_hook(config_file) as on_event:
        code = run_enroll(user, force=force, revoke=revoke, list_users=list_users,
                          as_json=as_json, config_file=config_file, on_event=on_event)
    sys.exit(code)


@cli.command()
@click.argument("session", required=False)
@click.option("--code", metavar="N", help="The 6-digit code (asked without echo when omitted).")
@click.option("--admin-url", metavar="URL",
              help="pgguard's admin server (else $PGGUARD_ADMIN_URL, the config, :9433).")
@click.option("--config", "config_file", metavar="FILE",
              help="pgguard.yaml, for admin.public_url / admin.listen.")
def stepup(session: str | None, code: str | None, admin_url: str | None,
           config_file: str | None) -> None:
    """Approve a held statement with a TOTP code; without SESSION, choose among the held ones."""
    from pgguard.stepup_cli import run_stepup

    raw = None
    if not admin_url:
        from pgguard.config import find_config_file, load_config

        try:
            raw = dict(load_config(find_config_file(config_file)).raw)
        except ConfigError:
            if config_file:
                raise
    sys.exit(run_stepup(session, code, admin_url, raw))


def main() -> None:
    cli(prog_name="pgguard")
