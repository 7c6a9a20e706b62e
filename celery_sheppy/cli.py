"""``celery -A proj sheppy …``: the operator's commands (Celery's ``celery.commands`` plugin).

Every command reads the app's own broker (``app.connection_for_read()``: URL, TLS, ACL
and transport options as the workers use them) through :mod:`celery_sheppy.inspect`
and :mod:`celery_sheppy.listings`; this module only parses options and prints.

Exit codes (:data:`EXIT_CODES`, also in docs/operations.md): 0 done; 1 ``stuck`` found
stuck messages, or a destructive command was not confirmed; 2 a bad option or queue
name (click's usage error); 3 a dead letter asked for by id does not exist; 69 the
broker cannot be reached; 78 the broker is not ``sheppy://``.
"""

import json
import re
import sys
import time
from datetime import datetime, timezone

import click
from kombu.exceptions import OperationalError

from . import keys, listings, metrics
from .connection import CONNECTION_ERRORS
from .inspect import IDLE, NotSheppyBroker, broker_url, inspector
from .tables import Column, duration, render

EXIT_STUCK = 1
EXIT_NOT_FOUND = 3
EXIT_UNAVAILABLE = 69  # sysexits EX_UNAVAILABLE, as Celery's own commands use
EXIT_CONFIG = 78  # sysexits EX_CONFIG

EXIT_CODES = {0: "done", EXIT_STUCK: "stuck messages found / not confirmed (Aborted!)",
              2: "bad option or queue name", EXIT_NOT_FOUND: "no such dead letter",
              EXIT_UNAVAILABLE: "broker unreachable", EXIT_CONFIG: "broker is not sheppy://"}

_ENTRY_ID = re.compile(r"^\d+-\d+$")


class Failure(click.ClickException):
    """An error printed as ``Error: …`` with its own exit code."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


def _queues(ctx, param, values):
    """``-Q a,b -Q c`` -> ["a", "b", "c"], each checked against sheppy's layout."""
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    for name in names:
        try:
            keys.check_queue(name)
        except keys.InvalidQueueName as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return names


def _ids(ctx, param, values):
    for value in values:
        if not _ENTRY_ID.match(value):
            raise click.BadParameter(f"{value!r} is not a stream entry id (like "
                                     "1764600000000-0)", ctx=ctx, param=param)
    return list(dict.fromkeys(values))


queue_option = click.option(
    "-Q", "--queue", "queues", multiple=True, callback=_queues, metavar="QUEUE[,QUEUE]",
    help="Only these queues (repeatable). Default: the app's queues and sheppy's registry.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def count_option(default):
    return click.option("-n", "--count", default=default, show_default=True,
                        type=click.IntRange(1), help="Most items listed per queue.")


def yes_option(action):
    return click.option("-y", "--yes", is_flag=True, help=f"{action} without asking.")


class _Open:
    """``with _Open(ctx) as view``: an Inspector, broker errors turned into exit codes."""

    def __init__(self, ctx):
        self.app = ctx.find_root().obj.app
        self._cm = None

    def __enter__(self):
        self._cm = inspector(self.app)
        try:
            return self._cm.__enter__()
        except NotSheppyBroker as exc:
            raise Failure(str(exc), EXIT_CONFIG) from None
        except (OperationalError, *CONNECTION_ERRORS) as exc:
            raise _unreachable(self.app, exc) from None

    def __exit__(self, *exc_info):
        if exc_info[0] is not None and issubclass(exc_info[0], (OperationalError,
                                                                *CONNECTION_ERRORS)):
            self._cm.__exit__(*exc_info)
            raise _unreachable(self.app, exc_info[1]) from None
        return self._cm.__exit__(*exc_info)


def _unreachable(app, exc):
    with app.connection_for_read() as conn:
        url = broker_url(conn)
    return Failure(f"cannot reach the sheppy:// broker {url}: {exc}", EXIT_UNAVAILABLE)


def _print_json(data):
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _echo_lines(lines):
    click.echo("\n".join(lines))


@click.group(name="sheppy")
def sheppy():
    """Look inside sheppy:// queues: counts, dead letters, scheduled, stuck, metrics."""


# -- status ----------------------------------------------------------------------------


@sheppy.command()
@queue_option
@json_option
@click.option("--watch", type=click.FloatRange(min=0.1), metavar="SECONDS",
              help="Refresh every SECONDS until interrupted (Ctrl-C).")
@click.pass_context
def status(ctx, queues, as_json, watch):
    """Per queue: ready, in flight, oldest ready age, scheduled, dead letters, results,
    and each consumer's messages and state."""
    with _Open(ctx) as view:
        try:
            while True:
                stats = view.stats(queues)
                if as_json:
                    document = {"broker": view.url, "time": view.now(),
                                "lease": view.settings.lease,
                                "queues": [s.as_dict() for s in stats]}
                    # watching: one document per line (JSON Lines), so a reader can split them
                    click.echo(json.dumps(document, sort_keys=True) if watch
                               else json.dumps(document, indent=2, sort_keys=True))
                else:
                    if watch and sys.stdout.isatty():
                        click.clear()
                    _echo_lines(status_lines(view, stats))
                if not watch:
                    return
                sys.stdout.flush()
                time.sleep(watch)
                if not as_json:
                    click.echo()
        except KeyboardInterrupt:
            return


def status_lines(view, stats):
    now = datetime.fromtimestamp(view.now(), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [f"{view.url}  {now}  lease {duration(view.settings.lease)}", ""]
    lines += render(
        [Column("QUEUE", flex=True, least=10), Column("READY", right=True),
         Column("IN FLIGHT", right=True), Column("OLDEST", right=True),
         Column("SCHEDULED", right=True), Column("DEAD", right=True),
         Column("DONE", right=True), Column("FAILED", right=True)],
        [[s.queue, s.ready, s.in_flight, duration(s.oldest_ready_age), s.scheduled,
          s.dead_letters, s.completed, s.failed] for s in stats])
    consumers = [(s, c) for s in stats for c in s.consumers]
    lines.append("")
    if not consumers:
        return lines + ["no consumers"]
    lines += render(
        [Column("QUEUE", flex=True, least=10), Column("CONSUMER", flex=True, least=24),
         Column("IN FLIGHT", right=True), Column("IDLE", right=True), Column("STATE")],
        [[s.queue, c.name, c.in_flight, duration(c.idle), c.state] for s, c in consumers])
    alive = sum(s.count("alive") for s in stats)
    dead = sum(s.count("dead") for s in stats)
    stuck = sum(s.stuck for s in stats)
    lines.append(f"consumers: {alive} alive, {dead} dead; {stuck} message(s) stuck "
                 "past the lease")
    if any(c.state == IDLE for _, c in consumers):
        lines.append("idle: holds nothing and read nothing for a lease; Redis < 7.2 does not "
                     "record empty reads, so it may be alive or gone")
    return lines


# -- dead letters --------------------------------------------------------------------


@sheppy.group()
def dead():
    """Dead letters (sheppy:dead:<queue>): list, show, replay, purge."""


def _letter_rows(letters):
    return render(
        [Column("QUEUE", flex=True, least=8), Column("ID"), Column("AGE", right=True),
         Column("DELIV", right=True), Column("REASON", flex=True, least=10),
         Column("TASK", flex=True, least=10)],
        [[letter["queue"], letter["id"], duration(letter["age"]), letter["deliveries"],
          letter["reason"], letter["task"] or "(not a task)"] for letter in letters])


@dead.command(name="list")
@queue_option
@count_option(20)
@json_option
@click.pass_context
def dead_list(ctx, queues, count, as_json):
    """The oldest dead letters of each queue."""
    with _Open(ctx) as view:
        letters = [letter for queue in view.queues(queues)
                   for letter in listings.dead_letters(view, queue, count)]
    if as_json:
        return _print_json(letters)
    _echo_lines(_letter_rows(letters) if letters else ["no dead letters"])


@dead.command(name="show")
@click.argument("ids", nargs=-1, required=True, callback=_ids)
@queue_option
@click.pass_context
def dead_show(ctx, ids, queues):
    """Every field of the dead letters IDS, and the original message."""
    with _Open(ctx) as view:
        names = view.queues(queues)
        found = listings.find_dead_letters(view, names, ids)
    for entry_id in ids:
        letter = found.get(entry_id)
        if letter is None:
            continue
        for name in ("queue", "id", "reason", "deliveries", "stream", "entry", "task",
                     "task_id", "args"):
            click.echo(f"{name + ':':12}{'-' if letter[name] is None else letter[name]}")
        click.echo(f"{'age:':12}{duration(letter['age'])}")
        click.echo("data:")
        click.echo(listings.pretty_data(letter["data"]))
        click.echo()
    _missing(ids, found, names)


def _missing(ids, found, names):
    missing = [entry_id for entry_id in ids if entry_id not in found]
    if missing:
        raise Failure(f"no dead letter {', '.join(missing)} in queue(s) {', '.join(names)}",
                      EXIT_NOT_FOUND)


def _dead_action(ctx, ids, queues, yes, verb, done_verb, act):
    """Replay or purge: the letters ``ids`` (found in any queue), or all of ``queues``."""
    with _Open(ctx) as view:
        names = view.queues(queues)
        if ids:
            found = listings.find_dead_letters(view, names, ids)
            by_queue = {}
            for entry_id, letter in found.items():
                by_queue.setdefault(letter["queue"], []).append(entry_id)
            plan = {queue: len(chosen) for queue, chosen in by_queue.items()}
        else:
            lengths = view.client.pipeline(transaction=False)
            for queue in names:
                lengths.xlen(keys.dead_letter_stream(queue))
            plan = {q: n for q, n in zip(names, lengths.execute()) if n}
            by_queue = {queue: None for queue in plan}
        if plan and not yes:
            what = ", ".join(f"{queue}: {n}" for queue, n in plan.items())
            click.confirm(f"{verb} {sum(plan.values())} dead letter(s) ({what})?", abort=True)
        done = {queue: act(view.connection, queue, ids=chosen)
                for queue, chosen in by_queue.items()}
    click.echo(f"{done_verb} {sum(done.values())} dead letter(s)"
               + "".join(f"; {queue}: {n}" for queue, n in done.items()))
    if ids:
        _missing(ids, found, names)


@dead.command(name="replay")
@click.argument("ids", nargs=-1, callback=_ids)
@queue_option
@yes_option("Replay")
@click.pass_context
def dead_replay(ctx, ids, queues, yes):
    """Put dead letters back in their streams, delivery count cleared: the letters IDS,
    or every letter of the queues."""
    from .transport import replay_dead_letters

    _dead_action(ctx, ids, queues, yes, "Replay", "replayed", replay_dead_letters)


@dead.command(name="purge")
@click.argument("ids", nargs=-1, callback=_ids)
@queue_option
@yes_option("Purge")
@click.pass_context
def dead_purge(ctx, ids, queues, yes):
    """Delete dead letters: the letters IDS, or every letter of the queues."""
    from .transport import purge_dead_letters

    _dead_action(ctx, ids, queues, yes, "Purge", "purged", purge_dead_letters)


# -- scheduled, stuck, revoked ------------------------------------------------------------


@sheppy.group()
def scheduled():
    """Messages waiting for their ETA in sheppy:scheduled:<queue>."""


@scheduled.command(name="list")
@queue_option
@count_option(20)
@json_option
@click.pass_context
def scheduled_list(ctx, queues, count, as_json):
    """The next scheduled messages of each queue, soonest first."""
    with _Open(ctx) as view:
        items = [item for queue in view.queues(queues)
                 for item in listings.scheduled(view, queue, count)]
    if as_json:
        return _print_json(items)
    _echo_lines(render(
        [Column("QUEUE", flex=True, least=8), Column("DUE IN", right=True),
         Column("TASK", flex=True, least=10), Column("TASK ID")],
        [[i["queue"], duration(i["due_in"]),
          ("(revoked) " if i["revoked"] else "") + (i["task"] or "(not a task)"),
          i["task_id"] or i["id"]] for i in items]) if items else ["nothing scheduled"])


@sheppy.command()
@queue_option
@count_option(100)
@json_option
@click.pass_context
def stuck(ctx, queues, count, as_json):
    """Messages in flight past the lease (their consumer stopped renewing). Exit code 1
    when there are any: a live worker on the queue takes them over within half a lease."""
    with _Open(ctx) as view:
        names = view.queues(queues)
        states = {s.queue: {c.name: c.state for c in s.consumers} for s in view.stats(names)}
        items = [item for queue in names
                 for item in listings.stuck(view, queue, count, states[queue])]
    if as_json:
        _print_json(items)
    elif items:
        _echo_lines(render(
            [Column("QUEUE", flex=True, least=8), Column("ID"),
             Column("CONSUMER", flex=True, least=20), Column("STATE"),
             Column("IDLE", right=True), Column("DELIV", right=True),
             Column("TASK", flex=True, least=10)],
            [[i["queue"], i["id"], i["consumer"], i["consumer_state"] or "gone",
              duration(i["idle"]), i["deliveries"], i["task"] or "(not a task)"]
             for i in items]))
    else:
        click.echo("nothing stuck")
    if items:
        ctx.exit(EXIT_STUCK)


@sheppy.group()
def revoked():
    """Revoked task ids kept in sheppy:celery::revoked for workers that were away."""


@revoked.command(name="list")
@count_option(20)
@json_option
@click.pass_context
def revoked_list(ctx, count, as_json):
    """The most recently revoked task ids."""
    with _Open(ctx) as view:
        total, items = listings.revoked(view, count)
    if as_json:
        return _print_json({"total": total, "revoked": items})
    if not items:
        return click.echo("no revoked tasks")
    _echo_lines(render([Column("TASK ID"), Column("REVOKED", right=True)],
                       [[i["task_id"], duration(i["age"]) + " ago"] for i in items])
                + [f"{len(items)} of {total} shown"])


# -- metrics -------------------------------------------------------------------------


@sheppy.command(name="metrics")
@queue_option
@click.option("--serve", "port", type=click.IntRange(0, 65535), metavar="PORT",
              help="Serve GET /metrics on PORT (0: any free port) instead of printing.")
@click.option("--bind", default="", metavar="ADDRESS",
              help="Address --serve listens on (default: all).")
@click.pass_context
def metrics_command(ctx, queues, port, bind):
    """Prometheus text exposition of the queue counts (print once, or --serve)."""
    with _Open(ctx) as view:
        stats = view.stats(queues)  # also proves the broker works before serving
    if port is None:
        return click.echo(metrics.exposition(stats), nl=False)

    def ready(server):
        host, bound = server.server_address[:2]
        click.echo(f"serving metrics on http://{host or '0.0.0.0'}:{bound}/metrics")
        sys.stdout.flush()

    try:
        metrics.serve(ctx.find_root().obj.app, port, bind, queues or None, ready=ready)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise click.BadParameter(f"cannot listen on {bind or '*'}:{port}: {exc}",
                                 param_hint="--serve") from None
