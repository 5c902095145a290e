"""``referral-broker inbox serve|ingest|setup|users|status|unlock``: the district-team inbox, thin over
``referral_broker.consumers.inbox``."""

from __future__ import annotations

import sys
import threading
from datetime import UTC, datetime

import click

from referral_broker.cli.context import CliContext, emit, json_option, pass_cli, table

team_option = click.option(
    "--team",
    "teams",
    multiple=True,
    metavar="DISTRICT",
    help="A district team (repeatable); every district team when left out.",
)


@click.group()
def inbox() -> None:
    """The district-team inbox: a web app where Early Help teams triage routed referrals."""


@inbox.command()
@click.option("--force", is_flag=True, help="Fetch and unpack again even when present.")
@json_option
@pass_cli
def setup(obj: CliContext, force: bool, as_json: bool) -> None:
    """Install the GOV.UK Frontend assets (pinned govuk-frontend from npm) into the cache folder.

    Idempotent: a complete install is left alone. Needs npm the first time only.
    """
    from referral_broker.consumers.inbox.frontend import GOVUK_FRONTEND_VERSION, install_frontend

    folder = install_frontend(obj.settings, force=force)
    data = {"govuk_frontend": GOVUK_FRONTEND_VERSION, "path": str(folder)}
    emit(data, as_json, lambda d: click.echo(f"govuk-frontend {d['govuk_frontend']} in {d['path']}"))


@inbox.command()
@team_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on."
)
@click.option("--no-ingest", is_flag=True, help="Serve only; do not read the teams' out topics.")
@click.option(
    "--secure-cookies/--no-secure-cookies",
    default=None,
    help="Mark cookies Secure (default: on unless the host is loopback; behind TLS keep it on).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Serve Prometheus metrics on 127.0.0.1:PORT/metrics (apart from the inbox's address).",
)
@pass_cli
def serve(
    obj: CliContext,
    teams: tuple[str, ...],
    host: str,
    port: int,
    no_ingest: bool,
    secure_cookies: bool | None,
    metrics_port: int | None,
) -> None:
    """Serve the inbox, ingesting each team's routed referrals while it runs."""
    from referral_broker.consumers.inbox.server import build_inbox, is_loopback, serve_forever
    from referral_broker.startup_heap import freeze_startup_heap

    obj.bootstrap()
    secure = (not is_loopback(host)) if secure_cookies is None else secure_cookies
    built = build_inbox(obj.settings, teams=teams or None, ingest=not no_ingest, secure_cookies=secure)
    if metrics_port is not None:
        built.app.state.metrics.serve(metrics_port)
    shown = "localhost" if is_loopback(host) else host
    click.echo(f"Inbox for {', '.join(built.teams)} at http://{shown}:{port}/ (Ctrl-C to stop)", err=True)
    freeze_startup_heap()
    try:
        serve_forever(built.app, host, port)
    finally:
        built.close()
    failed = [w.team for w in built.workers if w.error is not None]
    if failed:
        raise click.ClickException(f"ingest was failing for {', '.join(failed)} when the inbox stopped (see the log)")


@inbox.command()
@team_option
@click.option(
    "--stop-when-idle",
    type=click.FloatRange(min=0.1),
    default=None,
    metavar="SECONDS",
    help="Exit 0 after this many seconds with nothing to read (for scripts and tests).",
)
@json_option
@pass_cli
def ingest(obj: CliContext, teams: tuple[str, ...], stop_when_idle: float | None, as_json: bool) -> None:
    """Read each team's out topic into the inbox store (idempotent), without serving."""
    from referral_broker.consumers.inbox.auth import check_team, district_teams
    from referral_broker.consumers.inbox.deadlines import DuePolicy
    from referral_broker.consumers.inbox.ingest import IngestStats, TeamIngest
    from referral_broker.consumers.inbox.sealed_format import SealedReferralFormat
    from referral_broker.consumers.inbox.store import InboxStore
    from referral_broker.startup_heap import freeze_startup_heap

    obj.bootstrap()
    chosen = tuple(check_team(t) for t in (teams or district_teams()))
    fmt = SealedReferralFormat.from_settings(obj.settings, chosen)
    results: dict[str, IngestStats] = {}
    errors: dict[str, BaseException] = {}
    with InboxStore(obj.settings.inbox_db_path) as store:
        store.due_policy = DuePolicy.from_settings(obj.settings)
        workers = [TeamIngest(obj.settings, team, store, fmt) for team in chosen]

        def run(worker: TeamIngest) -> None:
            try:
                results[worker.team] = worker.run(stop_when_idle=stop_when_idle)
            except BaseException as exc:
                errors[worker.team] = exc

        threads = [threading.Thread(target=run, args=(w,), name=f"ingest-{w.team}") for w in workers]
        freeze_startup_heap()
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.5)
        except KeyboardInterrupt:
            for w in workers:
                w.stop()
            for t in threads:
                t.join()
    if errors:
        raise next(iter(errors.values()))
    data = {team: stats.as_dict() for team, stats in sorted(results.items())}

    def human(d: dict[str, dict[str, object]]) -> None:
        rows = [
            [team, *(str(s[k]) for k in ("new", "updated", "duplicate", "dead_lettered"))]
            for team, s in d.items()
        ]
        click.echo(table(rows, ["team", "new", "updated", "duplicate", "dead-lettered"]))

    emit(data, as_json, human)


@inbox.group()
def users() -> None:
    """Local accounts of team members (argon2-hashed passwords)."""


@users.command("add")
@click.argument("username")
@click.option("--team", required=True, metavar="DISTRICT", help="The member's district team.")
@click.option("--role", default="Early Help practitioner", show_default=True, help="Role shown to referrers.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input (for scripts).")
@json_option
@pass_cli
def users_add(
    obj: CliContext, username: str, team: str, role: str, password_stdin: bool, as_json: bool
) -> None:
    """Add a member; the password is prompted for (twice) unless --password-stdin."""
    from referral_broker.consumers.inbox.auth import add_user, check_new_credentials, check_team
    from referral_broker.consumers.inbox.store import InboxStore

    check_team(team)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    check_new_credentials(username, password)
    with InboxStore(obj.settings.inbox_db_path) as store:
        user = add_user(store, username, team, password, at=datetime.now(UTC), role=role)
    data = {"username": user.username, "team": user.team, "role": user.role}
    emit(data, as_json, lambda d: click.echo(f"Added {d['username']} to {d['team']}."))


@users.command("list")
@click.option("--team", default=None, metavar="DISTRICT", help="Only this team's members.")
@json_option
@pass_cli
def users_list(obj: CliContext, team: str | None, as_json: bool) -> None:
    """Members, their team, role and whether they are disabled (never a hash)."""
    from referral_broker.consumers.inbox.store import InboxStore

    with InboxStore(obj.settings.inbox_db_path) as store:
        found = store.list_users(team)
    data = [
        {
            "username": u.username,
            "team": u.team,
            "role": u.role,
            "disabled": u.disabled,
            "created_at": u.created_at,
        }
        for u in found
    ]

    def human(rows: list[dict[str, object]]) -> None:
        cells = [
            [str(r["username"]), str(r["team"]), str(r["role"]), "yes" if r["disabled"] else "no"]
            for r in rows
        ]
        click.echo(table(cells, ["username", "team", "role", "disabled"]))

    emit(data, as_json, human)


@users.command("disable")
@click.argument("username")
@click.option("--enable", is_flag=True, help="Re-enable the account instead.")
@json_option
@pass_cli
def users_disable(obj: CliContext, username: str, enable: bool, as_json: bool) -> None:
    """Disable a member (ending their sessions at once), or re-enable with --enable."""
    from referral_broker.consumers.inbox.store import InboxStore

    with InboxStore(obj.settings.inbox_db_path) as store:
        user = store.set_disabled(username, not enable)
    data = {"username": user.username, "team": user.team, "disabled": user.disabled}
    emit(
        data,
        as_json,
        lambda d: click.echo(f"{d['username']} is {'disabled' if d['disabled'] else 'enabled'}."),
    )


@inbox.command()
@click.argument("username", required=False)
@click.option("--address", default=None, metavar="ADDRESS", help="Unlock a client address instead.")
@json_option
@pass_cli
def unlock(obj: CliContext, username: str | None, address: str | None, as_json: bool) -> None:
    """Release a sign-in lockout of a member (USERNAME) or of a client address (--address), and
    forget its failed attempts. Recorded in the inbox's record of lockouts and logged."""
    import getpass

    from referral_broker.consumers.inbox.store import InboxStore
    from referral_broker.consumers.inbox.throttle import ADDRESS, account_subject, address_subject
    from referral_broker.errors import ConfigError
    from referral_broker.structured_log import get_logger

    if (username is None) == (address is None):
        raise ConfigError("name either a USERNAME or --address ADDRESS to unlock")
    now = datetime.now(UTC)
    with InboxStore(obj.settings.inbox_db_path) as store:
        secret = store.secret_key()
        if address is not None:
            subject = address_subject(secret, address)
        else:
            subject = account_subject(store, secret, username or "")
            if subject.username is None:
                raise ConfigError(f"no user '{username}'")
        released = store.unlock(subject.key, at=now, by=f"administrator {getpass.getuser()}")
    get_logger(__name__).warning(
        "sign-in unlocked" if released else "sign-in unlock: nothing was locked",
        scope=subject.scope,
        subject_ref=subject.ref,
        count=released.failures if released else 0,
    )
    data: dict[str, object] = {
        "scope": subject.scope,
        "username": subject.username,
        "subject_ref": subject.ref,
        "was_locked": released is not None,
        "locked_at": released.locked_at if released else None,
        "failures": released.failures if released else None,
    }
    shown = "that address" if subject.scope == ADDRESS else subject.username

    def human(d: dict[str, object]) -> None:
        if d["was_locked"]:
            click.echo(
                f"Unlocked {shown} (locked at {d['locked_at']} after {d['failures']} failed sign-ins)."
            )
        else:
            click.echo(f"{shown} was not locked; its failed sign-ins are forgotten.")

    emit(data, as_json, human)


@inbox.command()
@json_option
@pass_cli
def status(obj: CliContext, as_json: bool) -> None:
    """What the inbox database holds: referrals per team and state, copies of records
    recognised and not stored again (re-delivered, replayed, conflicting), and the sign-in
    lockouts in force. Reads the database only (no Kafka)."""
    from referral_broker.consumers.inbox.store import InboxStore

    now = datetime.now(UTC)
    with InboxStore(obj.settings.inbox_db_path) as store:
        states = store.state_counts()
        copies = store.duplicate_counts()
        locks = store.sign_in_locks(active_at=now)
    teams = sorted(set(states) | set(copies))
    data: dict[str, object] = {
        "database": str(obj.settings.inbox_db_path),
        "teams": {
            team: {"referrals": states.get(team, {}), "copies_not_stored": copies.get(team, {})}
            for team in teams
        },
        "locked": [
            {
                "scope": lock.scope,
                "username": lock.username,
                "subject_ref": lock.subject[:12],
                "failures": lock.failures,
                "locked_at": lock.locked_at,
                "locked_until": lock.locked_until,
            }
            for lock in locks
        ],
    }

    def human(d: dict[str, object]) -> None:
        rows = []
        for team in teams:
            by_state = states.get(team, {})
            kinds = copies.get(team, {})
            rows.append(
                [
                    team,
                    str(sum(by_state.values())),
                    ", ".join(f"{k} {n}" for k, n in sorted(by_state.items())) or "-",
                    ", ".join(f"{k} {n}" for k, n in kinds.items() if n) or "none",
                ]
            )
        click.echo(table(rows, ["team", "referrals", "by state", "copies not stored"]))
        if locks:
            cells = [
                [
                    lock.scope,
                    lock.username or f"({lock.subject[:12]})",
                    str(lock.failures),
                    str(lock.locked_until),
                ]
                for lock in locks
            ]
            click.echo(table(cells, ["locked", "who", "failures", "until"]))
        else:
            click.echo("No sign-in lockouts in force.")

    emit(data, as_json, human)
