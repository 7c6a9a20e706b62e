"""What every ``celery sheppy`` command shares: the group, options, exit codes, errors.

Exit codes (:data:`EXIT_CODES`, also in docs/operations.md): 0 done; 1 ``stuck`` found
stuck messages, or a destructive command was not confirmed; 2 a bad option or queue
name, or a ``-Q`` queue the broker has no trace of (click's usage error); 3 a dead letter
asked for by id does not exist; 69 the broker (or the result backend holding the
counters) cannot be reached; 78 the broker is not ``sheppy://``, or its server (or the
result backend's) is not one it can use.
"""

import json
import re
from contextlib import contextmanager

import click
from celery.exceptions import ImproperlyConfigured
from kombu.exceptions import ChannelError, OperationalError

from .. import keys
from ..connect import CONNECTION_ERRORS
from ..ops.stats import NotSheppyBroker, ResultsUnreachable, UnknownQueue, broker_url, inspector

EXIT_STUCK = 1
EXIT_NOT_FOUND = 3
EXIT_UNAVAILABLE = 69  # sysexits EX_UNAVAILABLE, as Celery's own commands use
EXIT_CONFIG = 78  # sysexits EX_CONFIG

EXIT_CODES = {0: "done", EXIT_STUCK: "stuck messages found / not confirmed (Aborted!)",
              2: "bad option or queue name", EXIT_NOT_FOUND: "no such dead letter",
              EXIT_UNAVAILABLE: "broker unreachable",
              EXIT_CONFIG: "broker is not sheppy://, or its server is not supported"}

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


def entry_ids(ctx, param, values):
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


@contextmanager
def open_broker(ctx):
    """The app's :class:`~celery_sheppy.ops.stats.Inspector`; broker errors become exit codes."""
    app = ctx.find_root().obj.app
    try:
        with inspector(app) as view:
            yield view
    except (NotSheppyBroker, ChannelError, ImproperlyConfigured) as exc:
        # not sheppy://, or a URL to the wrong kind of server, or an unsupported server
        raise Failure(str(exc), EXIT_CONFIG) from None
    except UnknownQueue as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param_hint="'-Q' / '--queue'") from None
    except ResultsUnreachable as exc:
        raise Failure(str(exc), EXIT_UNAVAILABLE) from None
    except (OperationalError, *CONNECTION_ERRORS) as exc:
        raise unreachable(app, exc) from None


def unreachable(app, exc):
    with app.connection_for_read() as conn:
        url = broker_url(conn)
    return Failure(f"cannot reach the sheppy:// broker {url}: {exc}", EXIT_UNAVAILABLE)


def print_json(data):
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def echo_lines(lines):
    click.echo("\n".join(lines))


@click.group(name="sheppy")
def sheppy():
    """Look inside sheppy:// queues: counts, dead letters, scheduled, stuck, metrics."""
